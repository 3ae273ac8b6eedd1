//! Per-node tags: the four that change how the cluster treats a node, and
//! the operator's own ("dc", "rack"), which only the REST API's tag filters
//! read. The member key carries the operator's tags in a field of their own
//! (`custom_tags`), which agents that predate them ignore and which is read
//! leniently (a value that is no string, number or boolean is dropped, not
//! the whole record); `/cluster` and `/patroni` show both as one flat
//! object, as Patroni does.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Per-node tags.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Tags {
    /// Never promote this node.
    pub nofailover: bool,
    /// Never choose this node as a synchronous standby.
    pub nosync: bool,
    /// Never send read-only load here: `/replica` answers 503 and the
    /// read-only proxy skips it (a replica kept for backups or reports).
    pub noloadbalance: bool,
    /// Higher wins among equally advanced candidates.
    pub priority: i32,
    /// The operator's own tags (published as `MemberStatus::custom_tags`).
    #[serde(skip)]
    pub custom: BTreeMap<String, TagValue>,
}

impl Tags {
    /// The names mainstay gives a meaning to; everything else is custom.
    pub const BUILT_IN: [&'static str; 4] = ["nofailover", "nosync", "noloadbalance", "priority"];

    /// The tag as a `?tag_<name>=<value>` filter compares it, Patroni's
    /// way: a built-in boolean tag that is false is no tag at all, other
    /// values are compared as their lower-case text.
    pub fn filter_value(&self, name: &str) -> Option<String> {
        let flag = |on: bool| on.then(|| "true".to_string());
        match name {
            "nofailover" => flag(self.nofailover),
            "nosync" => flag(self.nosync),
            "noloadbalance" => flag(self.noloadbalance),
            "priority" => Some(self.priority.to_string()),
            _ => self.custom.get(name).map(TagValue::filter_text),
        }
    }
}

/// A custom tag's value: text, a number or a boolean, as in Patroni.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TagValue {
    Bool(bool),
    Number(serde_json::Number),
    Text(String),
}

impl TagValue {
    /// What a query's value must equal. Patroni compares a non-text value
    /// with `str(value).lower()`: `true`, `3`, `1.5`.
    pub fn filter_text(&self) -> String {
        match self {
            TagValue::Text(text) => text.clone(),
            other => other.to_string().to_lowercase(),
        }
    }
}

impl fmt::Display for TagValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagValue::Bool(b) => write!(f, "{b}"),
            TagValue::Number(n) => write!(f, "{n}"),
            TagValue::Text(t) => write!(f, "{t}"),
        }
    }
}

/// `custom_tags` as read from a member key someone else may have written:
/// the string, number and boolean values, the rest dropped.
pub fn lenient<'de, D>(deserializer: D) -> Result<BTreeMap<String, TagValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let value = serde_json::Value::deserialize(deserializer)?;
    let serde_json::Value::Object(map) = value else {
        return Ok(BTreeMap::new());
    };
    Ok(map
        .into_iter()
        .filter_map(|(name, value)| {
            let tag = match value {
                serde_json::Value::Bool(b) => TagValue::Bool(b),
                serde_json::Value::Number(n) => TagValue::Number(n),
                serde_json::Value::String(s) => TagValue::Text(s),
                _ => return None,
            };
            Some((name, tag))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_tags_sit_beside_the_built_in_ones_and_round_trip() {
        let mut tags = Tags {
            nofailover: true,
            ..Tags::default()
        };
        tags.custom
            .insert("dc".into(), TagValue::Text("one".into()));
        tags.custom
            .insert("rack".into(), TagValue::Number(7.into()));
        tags.custom.insert("ssd".into(), TagValue::Bool(false));
        tags.custom.insert(
            "weight".into(),
            TagValue::Number(serde_json::Number::from_f64(1.5).unwrap()),
        );
        let json = serde_json::to_value(&tags.custom).unwrap();
        assert_eq!(json["dc"], "one");
        assert_eq!(json["rack"], 7);
        let back = tags.clone();
        assert_eq!(back.filter_value("dc").as_deref(), Some("one"));
        assert_eq!(back.filter_value("rack").as_deref(), Some("7"));
        // A custom false is a tag (Patroni keeps it); a built-in false is not.
        assert_eq!(back.filter_value("ssd").as_deref(), Some("false"));
        assert_eq!(back.filter_value("nosync"), None);
        assert_eq!(back.filter_value("weight").as_deref(), Some("1.5"));
        assert_eq!(back.filter_value("absent"), None);
    }

    #[test]
    fn custom_tags_written_by_someone_else_are_read_leniently() {
        #[derive(Deserialize)]
        struct Holder {
            #[serde(deserialize_with = "lenient")]
            tags: BTreeMap<String, TagValue>,
        }
        let read: Holder =
            serde_json::from_str(r#"{"tags": {"dc": "one", "n": 2, "bad": [1], "none": null}}"#)
                .unwrap();
        assert_eq!(read.tags.len(), 2);
        let read: Holder = serde_json::from_str(r#"{"tags": "not a map"}"#).unwrap();
        assert!(read.tags.is_empty());
    }

    #[test]
    fn records_written_before_custom_tags_still_read() {
        let old = r#"{"nofailover":false,"nosync":false,"noloadbalance":false,"priority":3}"#;
        let tags: Tags = serde_json::from_str(old).unwrap();
        assert_eq!(tags.priority, 3);
        assert!(tags.custom.is_empty());
    }
}
