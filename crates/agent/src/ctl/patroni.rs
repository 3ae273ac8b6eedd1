//! What lets a patronictl runbook run as `mainstay ctl` word for word:
//! the cluster name patronictl takes first (checked: a runbook for another
//! cluster is refused, never applied here), several members at once for
//! `restart` and `reinit`, `--wait` on `pause`/`resume`, `flush`. The
//! spellings themselves (`--primary`, `-s`, `--pg`, `topology`...) are
//! clap aliases in `mod.rs`; docs/operations.md has the table.

use super::{Ctl, Failure, call, client_for};
use hyper::Method;
use serde_json::Value;
use std::time::{Duration, Instant};

/// How long `pause --wait` and `resume --wait` wait for every member.
const WAIT_FOR_MEMBERS: Duration = Duration::from_secs(30);

/// patronictl's `restart CLUSTER [MEMBER...]` and `reinit CLUSTER
/// MEMBER...`, or mainstay's `restart NODE...`: the members meant. The
/// cluster's own name first is dropped; alone, it means every member
/// (`restart` only: `all_allowed`), replicas first so that the primary
/// restarts last.
pub fn members_meant(
    names: &[String],
    scope: &str,
    members: &[(String, String)],
    all_allowed: bool,
) -> Result<Vec<String>, String> {
    if names == [scope] && members.iter().any(|(member, _)| member == scope) {
        return Err(format!(
            "{scope} is both the cluster's name and a member's: name the members after the \
             cluster (`{scope} {scope}` for that member alone)"
        ));
    }
    let named: &[String] = match names.split_first() {
        Some((first, rest)) if first == scope => rest,
        _ => names,
    };
    if named.is_empty() {
        if !all_allowed {
            return Err(format!(
                "name the member(s) of {scope} to re-clone, e.g. `reinit {scope} node2`"
            ));
        }
        let mut all: Vec<&(String, String)> = members.iter().collect();
        all.sort_by_key(|(_, role)| role == "leader");
        return Ok(all.into_iter().map(|(name, _)| name.clone()).collect());
    }
    for name in named {
        if !members.iter().any(|(member, _)| member == name) {
            let known: Vec<&str> = members.iter().map(|(m, _)| m.as_str()).collect();
            return Err(format!(
                "{name} is neither a member of {scope} ({}) nor its name",
                known.join(", ")
            ));
        }
    }
    Ok(named.to_vec())
}

/// `--pg name=value` as patronictl has it: `--set
/// postgresql.parameters.name=value`.
pub fn pg_settings(pairs: &[String]) -> Vec<String> {
    pairs
        .iter()
        .map(|pair| format!("postgresql.parameters.{}", pair.trim_start()))
        .collect()
}

impl Ctl {
    /// The cluster's name and its members (name, role), from `/cluster`.
    pub(super) async fn scope_and_members(
        &self,
    ) -> Result<(String, Vec<(String, String)>), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        let scope = cluster["scope"].as_str().unwrap_or_default().to_string();
        let members = cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["name"].as_str().unwrap_or_default().to_string(),
                    m["role"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect();
        Ok((scope, members))
    }

    /// A patronictl-style cluster name must be this cluster's.
    pub(super) async fn check_cluster(&self, given: Option<&str>) -> Result<(), Failure> {
        let Some(given) = given else {
            return Ok(());
        };
        let (scope, _) = self.scope_and_members().await?;
        if given == scope {
            Ok(())
        } else {
            Err(Failure::Usage(format!(
                "this API serves cluster {scope:?}, not {given:?}: nothing was done (give \
                 --url or --config of a node of {given:?}, or the right name)"
            )))
        }
    }

    /// Polls every member's `/patroni` until each reports `pause` as
    /// `paused`, at most [`WAIT_FOR_MEMBERS`].
    pub(super) async fn wait_for_pause(&self, paused: bool) -> Result<(), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        let urls: Vec<(String, String)> = cluster["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m["name"].as_str()?.into(), m["api_url"].as_str()?.into())))
            .collect();
        let deadline = Instant::now() + WAIT_FOR_MEMBERS;
        let mut waiting: Vec<String> = urls.iter().map(|(n, _)| n.clone()).collect();
        let mut unreachable = Vec::new();
        while !waiting.is_empty() {
            let mut still = Vec::new();
            unreachable.clear();
            for (name, url) in &urls {
                if !waiting.contains(name) {
                    continue;
                }
                // Each request within what is left of the wait.
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .clamp(Duration::from_millis(200), Duration::from_secs(5));
                let api = client_for(url, left, &self.auth, &self.ca_file)?;
                match call(&api, Method::GET, "/patroni", None).await {
                    Ok(answer) if (answer.body["pause"] == Value::Bool(true)) == paused => {}
                    Ok(_) => still.push(name.clone()),
                    Err(_) => {
                        still.push(name.clone());
                        unreachable.push(name.clone());
                    }
                }
            }
            waiting = still;
            if waiting.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                let why = format!(
                    "{} did not report the change within {WAIT_FOR_MEMBERS:?} (it is stored; \
                     they apply it at their next turn)",
                    waiting.join(", ")
                );
                return Err(if unreachable.len() == waiting.len() {
                    Failure::Unreachable(format!(
                        "{why}: {} did not answer",
                        unreachable.join(", ")
                    ))
                } else {
                    Failure::Refused(why)
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        if !self.json {
            println!("every member reports it");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members() -> Vec<(String, String)> {
        [
            ("node1", "leader"),
            ("node2", "replica"),
            ("node3", "sync_standby"),
        ]
        .iter()
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .collect()
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn patronictl_and_mainstay_spellings_name_the_same_members() {
        let m = members();
        assert_eq!(
            members_meant(&names(&["node2"]), "demo", &m, true).unwrap(),
            names(&["node2"])
        );
        assert_eq!(
            members_meant(&names(&["demo", "node2", "node3"]), "demo", &m, true).unwrap(),
            names(&["node2", "node3"])
        );
        // The cluster alone: everyone, the leader last.
        assert_eq!(
            members_meant(&names(&["demo"]), "demo", &m, true).unwrap(),
            names(&["node2", "node3", "node1"])
        );
        assert!(members_meant(&names(&["demo"]), "demo", &m, false).is_err());
        let refused = members_meant(&names(&["other", "node2"]), "demo", &m, true).unwrap_err();
        assert!(refused.contains("other"), "{refused}");
        // A member named like the cluster: ambiguous, refused.
        let mut named_like = members();
        named_like.push(("demo".into(), "replica".into()));
        assert!(members_meant(&names(&["demo"]), "demo", &named_like, true).is_err());
        assert_eq!(
            members_meant(&names(&["demo", "demo"]), "demo", &named_like, true).unwrap(),
            names(&["demo"])
        );
    }

    #[test]
    fn pg_pairs_become_parameters() {
        assert_eq!(
            pg_settings(&names(&["work_mem=16MB"])),
            names(&["postgresql.parameters.work_mem=16MB"])
        );
    }
}
