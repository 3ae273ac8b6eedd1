//! `GET /config` as Patroni shows it: every dynamic setting with its
//! effective value (defaults filled in), and this node's `ttl`,
//! `loop_wait` and `retry_timeout`. mainstay keeps timing in each node's
//! file, where it is checked against the fencing deadline, so those three
//! keys are shown but not changed through `/config`: a document read back
//! unchanged (`GET` then `PUT`) is accepted, a different value is refused.

use mainstay_core::{DynamicConfig, Timing};
use serde_json::{Value, json};

/// Seconds as a JSON number: whole when whole, as Patroni writes them.
fn seconds(duration: std::time::Duration) -> Value {
    let secs = duration.as_secs_f64();
    if secs.fract() == 0.0 {
        json!(duration.as_secs())
    } else {
        json!(secs)
    }
}

/// The per-node timing keys and their values here.
fn timing_keys(timing: &Timing) -> [(&'static str, Value, &'static str); 3] {
    [
        ("ttl", seconds(timing.ttl), "ttl"),
        ("loop_wait", seconds(timing.loop_wait), "loop_wait"),
        ("retry_timeout", seconds(timing.dcs_timeout), "dcs_timeout"),
    ]
}

/// The stored document with every default filled in and this node's
/// timing; a stored document this version cannot read is shown as stored.
pub fn effective(stored: &Value, timing: &Timing) -> Value {
    let Ok(config) = DynamicConfig::from_json(stored) else {
        return stored.clone();
    };
    let mut doc = serde_json::to_value(&config).unwrap_or_else(|_| stored.clone());
    if let Value::Object(map) = &mut doc {
        for (key, value, _) in timing_keys(timing) {
            map.insert(key.into(), value);
        }
    }
    doc
}

/// Takes the timing keys out of a `PUT`/`PATCH` body: gone when they
/// repeat this node's values, refused (with the fix) when they differ.
pub fn strip_timing(change: &mut Value, timing: &Timing) -> Result<(), String> {
    let Value::Object(map) = change else {
        return Ok(());
    };
    for (key, here, file_key) in timing_keys(timing) {
        let Some(value) = map.get(key) else {
            continue;
        };
        let same = match (value.as_f64(), here.as_f64()) {
            (Some(asked), Some(here)) => asked == here,
            _ => value.is_null(),
        };
        if !same {
            return Err(format!(
                "{key}: timing is set in each node's file (`[timing] {file_key}`, here {here} s), \
                 where mainstay checks that the node can fence itself in time; it cannot be \
                 changed through /config: remove the key, or change [timing] on every node \
                 and restart them one at a time"
            ));
        }
        map.remove(key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_timing_are_shown_and_read_back_unchanged() {
        let stored = json!({"synchronous_mode": true});
        let shown = effective(&stored, &Timing::FAST);
        assert_eq!(shown["synchronous_mode"], true);
        assert_eq!(shown["maximum_lag_on_failover"], 1_048_576);
        assert_eq!(shown["ttl"], 2);
        assert_eq!(shown["loop_wait"], 0.5);
        assert!(shown["postgresql"]["parameters"].is_object(), "{shown}");
        let mut back = shown.clone();
        strip_timing(&mut back, &Timing::FAST).unwrap();
        assert!(back.get("ttl").is_none());
        assert!(DynamicConfig::from_json(&back).is_ok());
    }

    #[test]
    fn another_timing_is_refused_with_the_fix() {
        let mut change = json!({"ttl": 30, "pause": true});
        let refused = strip_timing(&mut change, &Timing::DEFAULT).unwrap_err();
        assert!(refused.contains("[timing] ttl"), "{refused}");
        assert_eq!(change["ttl"], 30, "nothing removed on a refusal");
        let mut text = json!({"loop_wait": "1"});
        assert!(strip_timing(&mut text, &Timing::DEFAULT).is_err());
    }

    #[test]
    fn an_unreadable_stored_document_is_shown_as_it_is() {
        let stored = json!({"bogus": 1});
        assert_eq!(effective(&stored, &Timing::DEFAULT), stored);
    }
}
