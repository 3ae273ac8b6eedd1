//! Per-node tags: the four that change how the cluster treats a node, and
//! the operator's own ("dc", "rack"), which only the REST API's tag filters
//! read. Published in the member key as one flat object, as Patroni's are,
//! so that `/cluster` and `/patroni` show them the way Patroni users expect.

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
    /// The operator's own tags. Flattened: an agent that predates custom
    /// tags refuses a member record carrying one, so set them once every
    /// node runs a version that knows them.
    #[serde(flatten)]
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
        let json = serde_json::to_value(&tags).unwrap();
        assert_eq!(json["dc"], "one");
        assert_eq!(json["rack"], 7);
        assert_eq!(json["nofailover"], true);
        let back: Tags = serde_json::from_value(json).unwrap();
        assert_eq!(back, tags);
        assert_eq!(back.filter_value("dc").as_deref(), Some("one"));
        assert_eq!(back.filter_value("rack").as_deref(), Some("7"));
        // A custom false is a tag (Patroni keeps it); a built-in false is not.
        assert_eq!(back.filter_value("ssd").as_deref(), Some("false"));
        assert_eq!(back.filter_value("nosync"), None);
        assert_eq!(back.filter_value("weight").as_deref(), Some("1.5"));
        assert_eq!(back.filter_value("absent"), None);
    }

    #[test]
    fn records_written_before_custom_tags_still_read() {
        let old = r#"{"nofailover":false,"nosync":false,"noloadbalance":false,"priority":3}"#;
        let tags: Tags = serde_json::from_str(old).unwrap();
        assert_eq!(tags.priority, 3);
        assert!(tags.custom.is_empty());
    }
}
