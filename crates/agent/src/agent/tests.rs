//! The shell's own rules that hold without any process: what it publishes
//! for its followers, and which operator commands it refuses in which
//! state. PostgreSQL never runs here (the data directory does not exist),
//! so these pin the answers a node gives while its server is down.

use super::*;
use mainstay_core::LeaderRecord;
use mainstay_dcs::MemoryDcs;

fn agent() -> Option<Agent<MemoryDcs>> {
    let bin_dir = crate::config::default_bin_dir();
    if !bin_dir.join("postgres").exists() {
        mainstay_testkit::skip(&format!(
            "needs PostgreSQL 15 in {}: run scripts/setup.sh",
            bin_dir.display()
        ));
        return None;
    }
    let text = r#"
cluster = "ship"
name = "node1"
[etcd]
endpoints = ["http://127.0.0.1:2379"]
[postgresql]
data_dir = "/nonexistent/mainstay-agent-test/data"
superuser = { username = "postgres", password = "s3cret" }
replication = { username = "replicator", password = "r3pl" }
"#;
    let config = Config::parse(std::path::Path::new("test.toml"), text).unwrap();
    Some(Agent::new(&config, MemoryDcs::new()))
}

/// A view in which `leader` holds the key on `lease_id`.
fn view_led_by(leader: &str, lease_id: i64) -> ClusterView {
    ClusterView {
        revision: 10,
        leader: Some(LeaderRecord {
            name: leader.into(),
            lease_id,
            mod_revision: 9,
        }),
        ..ClusterView::default()
    }
}

/// A lease this node holds, confirmed for a minute from now.
fn hold_lease(agent: &Agent<MemoryDcs>, id: i64) {
    agent.lease_tx.as_ref().unwrap().send_replace(Lease {
        id: Some(id),
        valid_until: boot_clock::now().plus(60_000),
        members_confirmed: false,
    });
}

#[tokio::test]
async fn the_leader_key_without_a_running_primary_is_not_leading() {
    let Some(mut agent) = agent() else { return };
    let mut follower = agent.follow();
    assert_eq!(*follower.borrow_and_update(), Published::default());
    hold_lease(&agent, 7);
    agent.last_view = Some(view_led_by("node1", 7));
    assert!(agent.holds_leader());
    agent.publish_state();
    assert!(follower.has_changed().unwrap(), "a new view is published");
    let published = follower.borrow_and_update().clone();
    assert_eq!(published.view.as_deref(), agent.last_view.as_ref());
    // The VIP and everything that runs beside the primary follow this: a
    // key holder whose server does not run must not attract them.
    assert_eq!(
        published.local,
        LocalState {
            leading: false,
            pg_role: PgRole::Stopped
        }
    );
    agent.publish_state();
    assert!(
        !follower.has_changed().unwrap(),
        "an unchanged state wakes no follower"
    );
}

#[tokio::test]
async fn a_lapsed_lease_is_not_the_leader_key() {
    let Some(mut agent) = agent() else { return };
    agent.lease_tx.as_ref().unwrap().send_replace(Lease {
        id: Some(7),
        valid_until: boot_clock::now(),
        members_confirmed: false,
    });
    agent.last_view = Some(view_led_by("node1", 7));
    assert!(!agent.holds_leader(), "the lease may have expired in etcd");
    hold_lease(&agent, 8);
    assert!(!agent.holds_leader(), "the key is on another lease");
}

#[tokio::test]
async fn leader_only_commands_on_a_replica_name_the_leader() {
    let Some(mut agent) = agent() else { return };
    hold_lease(&agent, 7);
    agent.last_view = Some(view_led_by("node2", 3));
    for command in [Command::Remove("node3".into()), Command::CrashDrill] {
        let label = command.label();
        let (refusal, reason) = agent.run_command(command).await.unwrap_err();
        assert_eq!(refusal, CommandRefusal::Conflict, "{label}: {reason}");
        assert!(reason.contains("node2"), "{label}: {reason}");
    }
}

#[tokio::test]
async fn the_leader_cannot_remove_itself() {
    let Some(mut agent) = agent() else { return };
    hold_lease(&agent, 7);
    agent.last_view = Some(view_led_by("node1", 7));
    let (refusal, reason) = agent
        .run_command(Command::Remove("node1".into()))
        .await
        .unwrap_err();
    assert_eq!(refusal, CommandRefusal::Conflict);
    assert!(reason.contains("cannot remove itself"), "{reason}");
}
