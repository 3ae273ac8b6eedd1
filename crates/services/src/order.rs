//! `depends_on`: the order services start in (each after those it depends
//! on; they stop in the reverse order), and the configurations it refuses:
//! a dependency on a service the node does not have, or a cycle.

use std::collections::BTreeMap;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OrderError {
    /// `service` depends on `missing`, which is not a service of this node.
    Unknown { service: String, missing: String },
    /// The services of a cycle, the first repeated at the end.
    Cycle(Vec<String>),
}

impl fmt::Display for OrderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderError::Unknown { service, missing } => write!(
                f,
                "{service} depends on {missing:?}, which is not a service of this node: \
                 add a [[service]] named {missing:?} or remove it from depends_on"
            ),
            OrderError::Cycle(path) => write!(
                f,
                "depends_on forms a cycle ({}): no service of it could ever start first; \
                 remove one of these dependencies",
                path.join(" -> ")
            ),
        }
    }
}

/// Every service after the ones it depends on, ties broken by name so that
/// the order never depends on the file's layout.
pub fn start_order(depends_on: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, OrderError> {
    for (service, needs) in depends_on {
        if let Some(missing) = needs.iter().find(|n| !depends_on.contains_key(*n)) {
            return Err(OrderError::Unknown {
                service: service.clone(),
                missing: missing.clone(),
            });
        }
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        name: &str,
        depends_on: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), OrderError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let from = path.iter().position(|p| p == name).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(name.to_string());
                return Err(OrderError::Cycle(cycle));
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        path.push(name.to_string());
        let mut needs = depends_on[name].clone();
        needs.sort();
        for need in &needs {
            visit(need, depends_on, marks, path, order)?;
        }
        path.pop();
        marks.insert(name.to_string(), Mark::Done);
        order.push(name.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for name in depends_on.keys() {
        visit(name, depends_on, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(name, needs)| {
                (
                    name.to_string(),
                    needs.iter().map(|n| n.to_string()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn dependencies_start_first_and_ties_go_by_name() {
        let order = start_order(&graph(&[
            ("synapse", &["redis", "media-proxy"]),
            ("redis", &[]),
            ("media-proxy", &["redis"]),
            ("coturn", &[]),
        ]))
        .unwrap();
        assert_eq!(order, ["coturn", "redis", "media-proxy", "synapse"]);
    }

    #[test]
    fn cycles_and_unknown_services_are_refused_with_the_path() {
        let cycle = start_order(&graph(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]));
        assert_eq!(
            cycle,
            Err(OrderError::Cycle(vec![
                "a".into(),
                "b".into(),
                "c".into(),
                "a".into()
            ]))
        );
        let text = cycle.unwrap_err().to_string();
        assert!(text.contains("a -> b -> c -> a"), "{text}");
        let own = start_order(&graph(&[("a", &["a"])])).unwrap_err();
        assert_eq!(own, OrderError::Cycle(vec!["a".into(), "a".into()]));
        let unknown = start_order(&graph(&[("a", &["ghost"])])).unwrap_err();
        assert!(unknown.to_string().contains("\"ghost\""), "{unknown}");
    }
}
