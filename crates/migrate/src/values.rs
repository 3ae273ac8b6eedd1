//! Patroni's YAML as JSON values (what its own code sees after loading),
//! and flattened to dotted keys so that every setting meets one rule.

use serde_json::{Map, Number, Value as Json};

/// The YAML document as JSON: mapping keys must be text, numbers finite.
pub fn to_json(value: &yaml_serde::Value) -> Result<Json, String> {
    Ok(match value {
        yaml_serde::Value::Null => Json::Null,
        yaml_serde::Value::Bool(b) => Json::Bool(*b),
        yaml_serde::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Json::Number(i.into())
            } else if let Some(u) = n.as_u64() {
                Json::Number(u.into())
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                Json::Number(
                    Number::from_f64(f).ok_or_else(|| format!("{f} is not a finite number"))?,
                )
            }
        }
        yaml_serde::Value::String(s) => Json::String(s.clone()),
        yaml_serde::Value::Sequence(items) => {
            Json::Array(items.iter().map(to_json).collect::<Result<_, _>>()?)
        }
        yaml_serde::Value::Mapping(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                let key = match key {
                    yaml_serde::Value::String(s) => s.clone(),
                    yaml_serde::Value::Number(n) => n.to_string(),
                    yaml_serde::Value::Bool(b) => b.to_string(),
                    other => return Err(format!("a mapping key is not text: {other:?}")),
                };
                map.insert(key, to_json(value)?);
            }
            Json::Object(map)
        }
        yaml_serde::Value::Tagged(tagged) => to_json(&tagged.value)?,
    })
}

/// Every leaf as (`a.b.c`, value); a list or an empty mapping is a leaf.
pub fn flatten(prefix: &str, value: &Json, out: &mut Vec<(String, Json)>) {
    match value {
        Json::Object(map) if !map.is_empty() => {
            for (key, value) in map {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, value, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// `host:port`, `[v6]:port` or a bare host.
pub fn host_and_port(text: &str) -> Result<(String, Option<u16>), String> {
    let text = text.trim();
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{text:?}: an IPv6 address needs its closing ]"))?;
        (host, after.strip_prefix(':'))
    } else if text.matches(':').count() == 1 {
        let (host, port) = text.split_once(':').expect("one colon");
        (host, Some(port))
    } else {
        (text, None)
    };
    let port = port
        .map(|p| {
            p.parse::<u16>()
                .map_err(|_| format!("{text:?}: {p:?} is not a port"))
        })
        .transpose()?;
    if host.is_empty() {
        return Err(format!("{text:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// A value as Patroni reads a boolean setting ("on", "true", yes...).
pub fn boolean(value: &Json) -> Option<bool> {
    match value {
        Json::Bool(b) => Some(*b),
        Json::String(s) => match s.to_ascii_lowercase().as_str() {
            "on" | "true" | "yes" | "1" => Some(true),
            "off" | "false" | "no" | "0" => Some(false),
            _ => None,
        },
        Json::Number(n) => n.as_i64().map(|n| n != 0),
        _ => None,
    }
}

/// Seconds from a number or a Patroni duration ("30min", "1h", "90s").
pub fn seconds(value: &Json) -> Option<u64> {
    match value {
        Json::Number(n) => n.as_u64(),
        Json::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (number, unit) = s.split_at(split);
            let number: u64 = number.parse().ok()?;
            let factor = match unit.trim() {
                "" | "s" => 1,
                "min" | "m" => 60,
                "h" => 3600,
                "d" => 86400,
                "ms" => return Some(number / 1000),
                _ => return None,
            };
            number.checked_mul(factor)
        }
        _ => None,
    }
}

/// A TOML value for a JSON scalar (parameters, tags).
pub fn toml_scalar(value: &Json) -> Option<toml::Value> {
    match value {
        Json::Bool(b) => Some(toml::Value::Boolean(*b)),
        Json::Number(n) => n
            .as_i64()
            .map(toml::Value::Integer)
            .or_else(|| n.as_f64().map(toml::Value::Float)),
        Json::String(s) => Some(toml::Value::String(s.clone())),
        _ => None,
    }
}
