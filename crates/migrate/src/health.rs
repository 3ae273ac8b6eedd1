//! Whether a running Patroni cluster can be taken over, judged from what
//! its REST API answers (`GET /patroni`, `/cluster`, `/config`, in the
//! shapes Patroni 4.1.5 gives them): a running leader, every other member
//! streaming, no standby cluster, no switchover waiting, and the file's
//! node and scope being this cluster's. A takeover of anything less would
//! start mainstay on a cluster that Patroni itself could not fail over
//! safely. Lag is only reported: Patroni computes it from positions each
//! member publishes once a loop (10 s by default), so a healthy cluster
//! under steady writes shows megabytes, and the takeover keeps the same
//! primary: a streaming replica behind it only catches up.

use crate::values::{boolean, seconds};
use serde_json::Value as Json;

/// Patroni's default `maximum_lag_on_failover`, in bytes.
const DEFAULT_MAXIMUM_LAG: u64 = 1_048_576;

/// What Patroni's REST API answered.
pub struct Answers<'a> {
    /// `GET /patroni`.
    pub patroni: &'a Json,
    /// `GET /cluster`.
    pub cluster: &'a Json,
    /// `GET /config`.
    pub config: &'a Json,
}

/// A cluster fit to be taken over, and what the takeover needs from it.
#[derive(Debug, PartialEq, Eq)]
pub struct Healthy {
    /// The member holding Patroni's leader lock.
    pub leader: String,
    /// Every member's name, in Patroni's order (by name).
    pub members: Vec<String>,
    /// Patroni's maintenance mode is on.
    pub paused: bool,
    /// The physical slots Patroni keeps on the leader for the other
    /// members, named as Patroni names them.
    pub slots: Vec<String>,
    /// Those it keeps on each other member for the rest (with
    /// `member_slots_ttl`, so that they are there after a failover).
    pub replica_slots: Vec<(String, Vec<String>)>,
    /// Members whose PostgreSQL runs older values than the cluster-wide
    /// configuration, with the parameters (`name old -> new`).
    pub pending_restart: Vec<String>,
    pub maximum_lag: u64,
    /// Members Patroni shows further behind than `maximum_lag_on_failover`
    /// (`name: N bytes`), reported, not refused (see the module comment).
    pub lagging: Vec<String>,
    /// `patroni.version` and `patroni.name` of the Patroni that answered.
    pub version: String,
    pub answered_by: String,
}

/// The cluster as Patroni describes it, judged for a takeover by the node
/// `name` of cluster `scope` (the file's). Every problem found is listed,
/// each with what to do about it.
pub fn judge(scope: &str, name: &str, answers: &Answers) -> Result<Healthy, Vec<String>> {
    let mut problems = Vec::new();
    let patroni = &answers.patroni["patroni"];
    match patroni["scope"].as_str() {
        Some(served) if served == scope => {}
        Some(served) => problems.push(format!(
            "Patroni serves cluster `{served}` (GET /patroni), but the file's scope is \
             `{scope}`: the file is not this cluster's, or the address is another cluster's \
             Patroni (check --patroni-url)"
        )),
        None => problems.push(
            "GET /patroni names no cluster (`patroni.scope`): the address does not answer as \
             Patroni 4's REST API does (check --patroni-url)"
                .to_string(),
        ),
    }
    let maximum_lag = answers.config["maximum_lag_on_failover"]
        .as_u64()
        .unwrap_or(DEFAULT_MAXIMUM_LAG);
    let members: &[Json] = answers.cluster["members"]
        .as_array()
        .map_or(&[], Vec::as_slice);
    let names: Vec<String> = members
        .iter()
        .filter_map(|m| m["name"].as_str().map(String::from))
        .collect();
    let leader = members.iter().find(|m| m["role"] == "leader");
    let running_leader = leader
        .filter(|m| m["state"] == "running")
        .and_then(|m| m["name"].as_str());
    if running_leader.is_none() {
        let seen = match leader {
            Some(m) => format!(
                "the leader `{}` is `{}`",
                m["name"].as_str().unwrap_or("?"),
                m["state"].as_str().unwrap_or("?")
            ),
            None => "no member holds the leader lock".to_string(),
        };
        problems.push(format!(
            "no member is the leader with state `running` ({seen}): wait until Patroni has a \
             running leader (patronictl list), or repair the cluster under Patroni first"
        ));
    }
    for member in members {
        let member_name = member["name"].as_str().unwrap_or("?");
        match member["role"].as_str() {
            Some("leader") => continue,
            Some("standby_leader") => {
                problems.push(format!(
                    "`{member_name}` is a standby_leader: this is a standby cluster \
                     (`standby_cluster` in Patroni's configuration), which mainstay cannot run; \
                     promote it under Patroni first (patronictl edit-config, remove \
                     standby_cluster) or leave it to Patroni"
                ));
                continue;
            }
            _ => {}
        }
        if let Some(problem) = replica_problem(member_name, member) {
            problems.push(problem);
        }
    }
    if !names.iter().any(|n| n == name) {
        problems.push(format!(
            "`{name}` (the file's `name`) is not a member of the cluster (members: {}): start \
             this node's Patroni, or run the command with the file of a member",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        ));
    }
    if let Some(switchover) = answers.cluster.get("scheduled_switchover") {
        problems.push(format!(
            "a switchover{}{} is scheduled at {}: let it happen first, or cancel it \
             (patronictl flush {scope} switchover)",
            switchover["from"]
                .as_str()
                .map(|f| format!(" from `{f}`"))
                .unwrap_or_default(),
            switchover["to"]
                .as_str()
                .map(|t| format!(" to `{t}`"))
                .unwrap_or_default(),
            switchover["at"].as_str().unwrap_or("an unknown time"),
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let leader = running_leader.unwrap_or_default().to_string();
    let use_slots = boolean(&answers.config["postgresql"]["use_slots"]).unwrap_or(true);
    // Patroni 4.1.5's `Cluster._get_members_slots`: every node keeps one
    // for each other member that streams (no `nostream` tag); a replica
    // only while member_slots_ttl (default 30 min) is not 0, and one
    // tagged nofailover not at all (short of cascading, not mapped).
    let slots_on = |node: &str| -> Vec<String> {
        members
            .iter()
            .filter(|m| use_slots && m["name"].as_str() != Some(node))
            .filter(|m| boolean(&m["tags"]["nostream"]) != Some(true))
            .filter_map(|m| m["name"].as_str().map(slot_name_from_member_name))
            .collect()
    };
    let member_slots_ttl = seconds(&answers.config["member_slots_ttl"]).unwrap_or(1800);
    let replica_slots = members
        .iter()
        .filter(|_| member_slots_ttl > 0)
        .filter(|m| boolean(&m["tags"]["nofailover"]) != Some(true))
        .filter_map(|m| m["name"].as_str())
        .filter(|name| *name != leader)
        .map(|name| (name.to_string(), slots_on(name)))
        .filter(|(_, slots)| !slots.is_empty())
        .collect();
    let slots = slots_on(&leader);
    Ok(Healthy {
        leader,
        members: names,
        paused: answers.cluster["pause"] == true,
        slots,
        replica_slots,
        pending_restart: members.iter().filter_map(pending_restart).collect(),
        maximum_lag,
        lagging: members
            .iter()
            .filter(|m| m["role"] != "leader")
            .filter_map(|m| {
                let lag = m["lag"].as_u64().filter(|lag| *lag > maximum_lag)?;
                Some(format!(
                    "{}: {lag} bytes",
                    m["name"].as_str().unwrap_or("?")
                ))
            })
            .collect(),
        version: patroni["version"].as_str().unwrap_or("?").to_string(),
        answered_by: patroni["name"].as_str().unwrap_or("?").to_string(),
    })
}

/// Why a member other than the leader is not ready: not streaming (the
/// state Patroni 3.0.4 and later report for a replica connected to its
/// upstream), or a lag that is unknown (stopped, or never connected).
fn replica_problem(name: &str, member: &Json) -> Option<String> {
    let mut wrong = Vec::new();
    let state = member["state"].as_str().unwrap_or("unknown");
    if state != "streaming" {
        wrong.push(format!("its state is `{state}`, not `streaming`"));
    }
    if member["lag"].as_u64().is_none() {
        wrong.push(format!(
            "its lag is {}, not a number of bytes",
            match &member["lag"] {
                Json::Null => "not reported".to_string(),
                Json::String(s) => format!("`{s}`"),
                other => other.to_string(),
            }
        ));
    }
    if wrong.is_empty() {
        return None;
    }
    Some(format!(
        "`{name}`: {}: start it or wait until it streams from the leader (patronictl list), \
         or remove the member",
        wrong.join("; ")
    ))
}

fn pending_restart(member: &Json) -> Option<String> {
    if member["pending_restart"] != true {
        return None;
    }
    let name = member["name"].as_str().unwrap_or("?");
    let reasons: Vec<String> = member["pending_restart_reason"]
        .as_object()
        .map(|r| {
            r.iter()
                .map(|(param, change)| {
                    format!(
                        "{param} {} -> {}",
                        change["old_value"].as_str().unwrap_or("?"),
                        change["new_value"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Some(if reasons.is_empty() {
        name.to_string()
    } else {
        format!("{name} ({})", reasons.join(", "))
    })
}

/// Patroni's `slot_name_from_member_name`: lower case, `-` and `.` as
/// `_`, any other character outside `[a-z0-9_]` as `u` and its code point
/// in (at least) four decimal digits, at most 63 characters.
pub fn slot_name_from_member_name(member: &str) -> String {
    let mut slot = String::new();
    for c in member.to_lowercase().chars() {
        match c {
            'a'..='z' | '0'..='9' | '_' => slot.push(c),
            '-' | '.' => slot.push('_'),
            other => slot.push_str(&format!("u{:04}", u32::from(other))),
        }
    }
    slot.chars().take(63).collect()
}

#[cfg(test)]
mod tests;
