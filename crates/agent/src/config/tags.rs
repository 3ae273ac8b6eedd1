//! `[tags]`: the four built-in tags, typed, and the operator's own, which
//! must survive the trip through etcd (JSON) and back out of the REST API
//! and a load balancer's `?tag_<name>=<value>` query unchanged.

use mainstay_core::{TagValue, Tags};

/// Long enough for any rack or site name, short enough for a health URL.
const MAX_NAME_LEN: usize = 64;
const MAX_TEXT_LEN: usize = 256;

/// Patroni's tags that mainstay does not implement: accepting them as
/// custom tags would let a migrated configuration look obeyed.
const PATRONI_ONLY: [(&str, &str); 5] = [
    (
        "failover_priority",
        "mainstay's is `priority` (higher wins; use `nofailover = true` for never)",
    ),
    (
        "sync_priority",
        "mainstay chooses synchronous standbys by WAL position; use `nosync = true` to keep a node out",
    ),
    ("clonefrom", "mainstay clones a new replica from the leader"),
    (
        "replicatefrom",
        "mainstay replicas stream from the leader (no cascading)",
    ),
    ("nostream", "mainstay replicas always stream"),
];

pub(super) fn tags(table: toml::Table) -> Result<Tags, (String, String)> {
    let mut tags = Tags::default();
    for (name, value) in table {
        let key = format!("tags.{name}");
        let refuse = |why: String| Err((key.clone(), why));
        match name.as_str() {
            "nofailover" | "nosync" | "noloadbalance" => {
                let toml::Value::Boolean(on) = value else {
                    return refuse(format!(
                        "{value} is not a boolean: write `{name} = true` or `{name} = false`"
                    ));
                };
                match name.as_str() {
                    "nofailover" => tags.nofailover = on,
                    "nosync" => tags.nosync = on,
                    _ => tags.noloadbalance = on,
                }
            }
            "priority" => {
                let priority = match value {
                    toml::Value::Integer(n) => i32::try_from(n).ok(),
                    _ => None,
                };
                let Some(priority) = priority else {
                    return refuse(format!(
                        "{value} is not a whole number from {} to {}: \
                         write e.g. `priority = 10` (higher wins)",
                        i32::MIN,
                        i32::MAX
                    ));
                };
                tags.priority = priority;
            }
            _ => {
                if let Some((_, instead)) = PATRONI_ONLY.iter().find(|(n, _)| *n == name) {
                    return refuse(format!(
                        "is Patroni's tag, which mainstay does not implement: {instead}; \
                         remove it"
                    ));
                }
                check_custom_name(&name).map_err(|why| (key.clone(), why))?;
                check_not_a_typo(&name).map_err(|why| (key.clone(), why))?;
                let value = custom_value(&name, value).map_err(|why| (key.clone(), why))?;
                tags.custom.insert(name, value);
            }
        }
    }
    Ok(tags)
}

/// Letters changed, added or removed to turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

/// A custom tag that looks like a built-in one is a typo: `no_failover =
/// true` must not leave a node electable.
fn check_not_a_typo(name: &str) -> Result<(), String> {
    let folded: String = name
        .chars()
        .filter(|c| !matches!(c, '_' | '-' | '.'))
        .flat_map(char::to_lowercase)
        .collect();
    match Tags::BUILT_IN
        .iter()
        .find(|built_in| edit_distance(&folded, built_in) <= 2)
    {
        Some(built_in) => Err(format!(
            "looks like the built-in tag `{built_in}` misspelt, which would be taken as a tag \
             of your own and change nothing: write `{built_in}`"
        )),
        None => Ok(()),
    }
}

/// A name a health check can ask for as `?tag_<name>=` without escaping.
fn check_custom_name(name: &str) -> Result<(), String> {
    let fits = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if fits {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a usable tag name: use 1-{MAX_NAME_LEN} ASCII letters, digits, \
             '_', '-' or '.' (a load balancer asks for it as ?tag_<name>=<value>)"
        ))
    }
}

fn custom_value(name: &str, value: toml::Value) -> Result<TagValue, String> {
    match value {
        toml::Value::Boolean(b) => Ok(TagValue::Bool(b)),
        toml::Value::Integer(n) => Ok(TagValue::Number(n.into())),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(TagValue::Number)
            .ok_or_else(|| {
                format!(
                    "{f} is not a finite number; JSON cannot carry it: give a number or a string"
                )
            }),
        toml::Value::String(text) => {
            if text.len() > MAX_TEXT_LEN {
                Err(format!(
                    "the value is {} bytes long; a tag value may have at most {MAX_TEXT_LEN}",
                    text.len()
                ))
            } else if text.chars().any(char::is_control) {
                Err(format!(
                    "{text:?} holds a control character, which no query string carries \
                     back: use printable text"
                ))
            } else {
                Ok(TagValue::Text(text))
            }
        }
        other => Err(format!(
            "{other} is a {}; a tag is a string, a number or a boolean \
             (e.g. `{name} = \"one\"`)",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Tags, (String, String)> {
        tags(toml::from_str(text).unwrap())
    }

    #[test]
    fn built_in_and_custom_tags_are_read() {
        let tags = parse(
            "nofailover = true\npriority = 5\ndc = \"one\"\nrack = 7\nweight = 1.5\nssd = false\n",
        )
        .unwrap();
        assert!(tags.nofailover && !tags.nosync);
        assert_eq!(tags.priority, 5);
        assert_eq!(tags.custom.len(), 4);
        assert_eq!(tags.filter_value("dc").as_deref(), Some("one"));
        assert_eq!(tags.filter_value("weight").as_deref(), Some("1.5"));
    }

    #[test]
    fn tags_that_would_not_round_trip_are_refused_with_their_key() {
        for (text, key, why) in [
            ("priority = \"high\"", "tags.priority", "whole number"),
            ("priority = 4294967296", "tags.priority", "whole number"),
            ("nosync = 1", "tags.nosync", "not a boolean"),
            ("\"d c\" = \"one\"", "tags.d c", "usable tag name"),
            ("\"\" = \"one\"", "tags.", "usable tag name"),
            ("dc = nan", "tags.dc", "finite"),
            ("dc = inf", "tags.dc", "finite"),
            ("dc = \"a\\u0007b\"", "tags.dc", "control character"),
            ("dc = [1, 2]", "tags.dc", "array"),
            ("dc = 1979-05-27", "tags.dc", "datetime"),
            ("[dc]\nx = 1", "tags.dc", "table"),
            (
                "failover_priority = 2",
                "tags.failover_priority",
                "`priority`",
            ),
            ("nostream = true", "tags.nostream", "Patroni's tag"),
            ("no_failover = true", "tags.no_failover", "`nofailover`"),
            ("noFailover = true", "tags.noFailover", "`nofailover`"),
            ("nofailovr = true", "tags.nofailovr", "`nofailover`"),
            (
                "no-load-balance = true",
                "tags.no-load-balance",
                "`noloadbalance`",
            ),
            ("Priority = 3", "tags.Priority", "`priority`"),
        ] {
            let (got_key, message) = parse(text).expect_err(text);
            assert_eq!(got_key, key, "{text}");
            assert!(message.contains(why), "{text}: {message}");
        }
        let long = format!("dc = \"{}\"", "x".repeat(MAX_TEXT_LEN + 1));
        assert!(parse(&long).unwrap_err().1.contains("at most"));
        let long_name = format!("{} = 1", "n".repeat(MAX_NAME_LEN + 1));
        assert!(parse(&long_name).is_err());
    }
}
