//! The DCS contract as executable checks, written once over `impl Dcs` and
//! run against both real etcd (`tests/etcd.rs`) and `MemoryDcs`
//! (`tests/memory.rs`), so that the stand-in cannot drift from etcd.
#![allow(dead_code)] // each test binary uses a different subset

use mainstay_core::{HistoryEntry, InitializeRecord, Lsn, MemberStatus, PgRole, Tags};
use mainstay_dcs::{Dcs, DcsError, KeyKind, WatchEvent};
use std::future::Future;
use tokio::sync::mpsc::Receiver;
use tokio::time::{Duration, Instant, timeout};

/// Writes bytes at a key (relative to the cluster prefix) behind the DCS's
/// back, like a foreign or buggy writer.
pub trait RawWriter {
    fn put_raw(&self, key: &str, value: &[u8]) -> impl Future<Output = ()>;
}

pub fn member(name: &str) -> MemberStatus {
    MemberStatus {
        name: name.to_string(),
        role: PgRole::Replica,
        state: "running".into(),
        api_url: format!("http://{name}:8008"),
        pg_host: name.to_string(),
        pg_port: 5432,
        timeline: 1,
        received_lsn: Lsn(0x3000148),
        replayed_lsn: Lsn(0x3000148),
        flush_lsn: Lsn(0x3000148),
        following: None,
        streaming: false,
        tags: Tags::default(),
        version: "test".into(),
        view_revision: 0,
        view_had_leader: false,
        vip: None,
        warning: None,
        services: Default::default(),
        files: Default::default(),
        alerts: Vec::new(),
        witness: false,
        pending_restart: Vec::new(),
        data_timeline: 0,
        custom_tags: Default::default(),
    }
}

fn history_entry(timeline: u32) -> HistoryEntry {
    HistoryEntry {
        timeline,
        switch_lsn: Lsn(u64::from(timeline) << 24),
        reason: format!("test switch to {timeline}"),
        new_leader: "a".into(),
        at: "2024-01-01T00:00:00Z".into(),
    }
}

/// The next event, or a panic after `within`.
pub async fn next_event(watch: &mut Receiver<WatchEvent>, within: Duration) -> WatchEvent {
    match timeout(within, watch.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("watch channel closed without an error event"),
        Err(_) => panic!("no watch event within {within:?}"),
    }
}

/// Skips events until one about `key` arrives; returns it and its delay.
pub async fn wait_for_key(
    watch: &mut Receiver<WatchEvent>,
    key: KeyKind,
    deleted: bool,
    within: Duration,
) -> (i64, Duration) {
    let start = Instant::now();
    let deadline = start + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(watch, left).await {
            WatchEvent::Changed {
                key: k,
                deleted: d,
                revision,
            } if k == key && d == deleted => return (revision, start.elapsed()),
            WatchEvent::Changed { .. } => continue,
            WatchEvent::Error(e) => panic!("watch failed while waiting for {key:?}: {e}"),
        }
    }
}

/// Only one node can hold the leader key, and only its holder (name and
/// lease) can release or hand it over.
pub async fn check_leader_election(dcs: &impl Dcs) {
    let la = dcs.grant_lease(10).await.unwrap();
    let lb = dcs.grant_lease(10).await.unwrap();
    assert_ne!(la, lb);

    assert!(dcs.acquire_leader("a", la).await.unwrap());
    assert!(
        !dcs.acquire_leader("b", lb).await.unwrap(),
        "second acquire"
    );
    assert!(
        !dcs.acquire_leader("a", la).await.unwrap(),
        "re-acquire by holder"
    );
    assert!(dcs.leader_held_by("a", la).await.unwrap());
    assert!(!dcs.leader_held_by("b", lb).await.unwrap());
    assert!(
        !dcs.leader_held_by("a", lb).await.unwrap(),
        "right name, wrong lease"
    );

    assert!(
        !dcs.release_leader("b", lb).await.unwrap(),
        "release by non-holder"
    );
    assert!(
        !dcs.release_leader("a", lb).await.unwrap(),
        "release with wrong lease"
    );
    assert!(dcs.leader_held_by("a", la).await.unwrap());

    let view = dcs.read_cluster().await.unwrap();
    let leader = view.leader.clone().expect("leader key");
    assert_eq!((leader.name.as_str(), leader.lease_id), ("a", la));
    assert!(leader.mod_revision > 0 && leader.mod_revision <= view.revision);

    assert!(dcs.release_leader("a", la).await.unwrap());
    assert!(
        !dcs.release_leader("a", la).await.unwrap(),
        "second release"
    );
    assert!(dcs.read_cluster().await.unwrap().leader.is_none());

    assert!(dcs.acquire_leader("b", lb).await.unwrap());
    assert!(
        !dcs.hand_over_leader("a", la, "a", la).await.unwrap(),
        "hand over by non-holder"
    );
    assert!(dcs.hand_over_leader("b", lb, "a", la).await.unwrap());
    assert!(dcs.leader_held_by("a", la).await.unwrap());
    assert!(!dcs.leader_held_by("b", lb).await.unwrap());
    // The handed-over key lives on the new holder's lease.
    dcs.revoke_lease(lb).await.unwrap();
    assert!(dcs.leader_held_by("a", la).await.unwrap());
    dcs.revoke_lease(la).await.unwrap();
    assert!(dcs.read_cluster().await.unwrap().leader.is_none());
}

/// Member keys are on their node's lease and vanish with it.
pub async fn check_members(dcs: &impl Dcs) {
    let la = dcs.grant_lease(10).await.unwrap();
    let lb = dcs.grant_lease(10).await.unwrap();
    dcs.put_member(&member("a"), la).await.unwrap();
    dcs.put_member(&member("b"), lb).await.unwrap();
    assert!(dcs.acquire_leader("a", la).await.unwrap());

    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.members.keys().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(view.members["a"].status, member("a"));
    assert!(view.members["a"].mod_revision < view.members["b"].mod_revision);
    assert!(view.members["b"].mod_revision <= view.revision);
    assert_eq!(view.leader_status(), Some(&member("a")));

    dcs.revoke_lease(la).await.unwrap();
    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.members.keys().collect::<Vec<_>>(), ["b"]);
    assert!(view.leader.is_none(), "leader key goes with its lease");
    // Revoking twice is not an error: the goal (no lease) is reached.
    dcs.revoke_lease(la).await.unwrap();

    let err = dcs.put_member(&member("a"), la).await.unwrap_err();
    assert!(matches!(err, DcsError::Conflict(_)), "{err:?}");
    let err = dcs.acquire_leader("a", la).await.unwrap_err();
    assert!(matches!(err, DcsError::Conflict(_)), "{err:?}");
    assert_eq!(dcs.keep_alive(la).await.unwrap(), 0);

    let err = dcs.put_member(&member("x/y"), lb).await.unwrap_err();
    assert!(matches!(err, DcsError::Other(_)), "{err:?}");
}

/// A lease that is not renewed expires: etcd deletes the leader and member
/// keys on it and watchers hear of it promptly. Returns how long after the
/// last renewal the watch reported the leader's deletion.
pub async fn check_lease_expiry(dcs: &impl Dcs, ttl: i64) -> Duration {
    let mut watch = dcs.watch().await.unwrap();
    let lease = dcs.grant_lease(ttl).await.unwrap();
    dcs.put_member(&member("a"), lease).await.unwrap();
    assert!(dcs.acquire_leader("a", lease).await.unwrap());
    assert_eq!(dcs.keep_alive(lease).await.unwrap(), ttl);
    let renewed = Instant::now();

    let ttl_d = Duration::from_secs(ttl as u64);
    // etcd revokes expired leases on a 500 ms tick; the rest is slack for a
    // loaded machine.
    let (_, _) = wait_for_key(
        &mut watch,
        KeyKind::Leader,
        true,
        ttl_d * 2 + Duration::from_secs(2),
    )
    .await;
    let delay = renewed.elapsed();
    assert!(
        delay >= ttl_d - Duration::from_millis(100),
        "expired early: {delay:?}"
    );

    let view = dcs.read_cluster().await.unwrap();
    assert!(view.leader.is_none());
    assert!(view.members.is_empty());
    assert_eq!(dcs.keep_alive(lease).await.unwrap(), 0);
    delay
}

/// Renewing every ttl/3 keeps leadership well past the TTL.
pub async fn check_keep_alive_holds(dcs: &impl Dcs, ttl: i64) {
    let lease = dcs.grant_lease(ttl).await.unwrap();
    assert!(dcs.acquire_leader("a", lease).await.unwrap());
    let period = Duration::from_millis(ttl as u64 * 1000 / 3);
    for _ in 0..7 {
        tokio::time::sleep(period).await;
        assert_eq!(dcs.keep_alive(lease).await.unwrap(), ttl);
        assert!(dcs.leader_held_by("a", lease).await.unwrap());
    }
    dcs.revoke_lease(lease).await.unwrap();
    assert!(!dcs.leader_held_by("a", lease).await.unwrap());
}

/// `initialize` is created once, then changed only by whoever read it last.
pub async fn check_initialize(dcs: &impl Dcs) {
    let rec = InitializeRecord {
        system_id: None,
        by: "a".into(),
        at: "2024-01-01T00:00:00Z".into(),
        awaiting_first_leader: false,
    };
    assert!(dcs.create_initialize(&rec).await.unwrap());
    let other = InitializeRecord {
        by: "b".into(),
        ..rec.clone()
    };
    assert!(
        !dcs.create_initialize(&other).await.unwrap(),
        "second create"
    );

    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.initialize.as_ref(), Some(&rec));
    let rev = view.initialize_revision;
    assert!(rev > 0);

    let done = InitializeRecord {
        system_id: Some("7234567890123456789".into()),
        ..rec.clone()
    };
    assert!(
        !dcs.update_initialize(&done, rev + 100).await.unwrap(),
        "stale update"
    );
    assert!(dcs.update_initialize(&done, rev).await.unwrap());
    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.initialize.as_ref(), Some(&done));
    assert!(view.initialize_revision > rev);

    assert!(!dcs.delete_initialize(rev).await.unwrap(), "stale delete");
    assert!(
        dcs.delete_initialize(view.initialize_revision)
            .await
            .unwrap()
    );
    let view = dcs.read_cluster().await.unwrap();
    assert_eq!((view.initialize, view.initialize_revision), (None, 0));
    assert!(
        dcs.create_initialize(&other).await.unwrap(),
        "create after delete"
    );
}

/// Appends keep every entry in order, even when they race.
pub async fn check_history(dcs: &impl Dcs) {
    assert!(dcs.read_cluster().await.unwrap().history.is_empty());
    dcs.append_history(&history_entry(2), None).await.unwrap();
    dcs.append_history(&history_entry(3), None).await.unwrap();
    // Racing appends: with etcd they interleave and the CAS retries.
    let racing: Vec<HistoryEntry> = (4..=7).map(history_entry).collect();
    let (r4, r5, r6, r7) = tokio::join!(
        dcs.append_history(&racing[0], None),
        dcs.append_history(&racing[1], None),
        dcs.append_history(&racing[2], None),
        dcs.append_history(&racing[3], None),
    );
    for r in [r4, r5, r6, r7] {
        r.unwrap();
    }
    let history = dcs.read_cluster().await.unwrap().history;
    assert_eq!(&history[..2], &[history_entry(2), history_entry(3)]);
    let mut timelines: Vec<u32> = history.iter().map(|h| h.timeline).collect();
    timelines.sort_unstable();
    assert_eq!(timelines, [2, 3, 4, 5, 6, 7]);

    // Guarded appends: only the holder of the leader key records.
    let lease = dcs.grant_lease(30).await.unwrap();
    assert!(dcs.acquire_leader("a", lease).await.unwrap());
    dcs.append_history(&history_entry(8), Some(("a", lease)))
        .await
        .unwrap();
    let refused = dcs
        .append_history(&history_entry(9), Some(("b", lease)))
        .await;
    assert!(matches!(refused, Err(DcsError::Conflict(_))), "{refused:?}");
    let history = dcs.read_cluster().await.unwrap().history;
    assert_eq!(history.last(), Some(&history_entry(8)));
    assert!(dcs.release_leader("a", lease).await.unwrap());
}

/// `config` is an opaque JSON value changed with compare-and-swap.
pub async fn check_config(dcs: &impl Dcs) {
    assert_eq!(dcs.read_config().await.unwrap(), None);
    let v1 = serde_json::json!({"ttl": 10, "pause": false});
    let v2 = serde_json::json!({"ttl": 5, "pause": true});
    assert!(dcs.write_config(&v1, 0).await.unwrap());
    assert!(!dcs.write_config(&v2, 0).await.unwrap(), "create twice");
    let read = dcs.read_config().await.unwrap().unwrap();
    assert_eq!(read.value, v1);
    assert!(!dcs.write_config(&v2, read.mod_revision + 1).await.unwrap());
    assert!(dcs.write_config(&v2, read.mod_revision).await.unwrap());
    let read2 = dcs.read_config().await.unwrap().unwrap();
    assert_eq!(read2.value, v2);
    assert!(read2.mod_revision > read.mod_revision);
}

/// The watch reports every change under the prefix, with its revision.
pub async fn check_watch(dcs: &impl Dcs) {
    let mut watch = dcs.watch().await.unwrap();
    let lease = dcs.grant_lease(10).await.unwrap();
    let within = Duration::from_secs(5);

    assert!(dcs.acquire_leader("a", lease).await.unwrap());
    let revision = dcs.read_cluster().await.unwrap().revision;
    assert_eq!(
        next_event(&mut watch, within).await,
        WatchEvent::Changed {
            key: KeyKind::Leader,
            deleted: false,
            revision
        }
    );
    dcs.put_member(&member("a"), lease).await.unwrap();
    assert!(matches!(
        next_event(&mut watch, within).await,
        WatchEvent::Changed { key: KeyKind::Member(name), deleted: false, .. } if name == "a"
    ));
    assert!(dcs.release_leader("a", lease).await.unwrap());
    let (revision, _) = wait_for_key(&mut watch, KeyKind::Leader, true, within).await;
    assert_eq!(revision, dcs.read_cluster().await.unwrap().revision);

    dcs.write_config(&serde_json::json!({}), 0).await.unwrap();
    assert!(matches!(
        next_event(&mut watch, within).await,
        WatchEvent::Changed {
            key: KeyKind::Config,
            ..
        }
    ));
    // Revoking the lease deletes the member key: one more event.
    dcs.revoke_lease(lease).await.unwrap();
    wait_for_key(&mut watch, KeyKind::Member("a".into()), true, within).await;
}

/// Garbage written by someone else never panics: a bad member is skipped,
/// a bad `initialize` or `history` is reported as corrupt, naming the key.
pub async fn check_corrupt_values(dcs: &impl Dcs, raw: &impl RawWriter) {
    let lease = dcs.grant_lease(10).await.unwrap();
    dcs.put_member(&member("y"), lease).await.unwrap();
    raw.put_raw("members/x", b"{not json").await;
    raw.put_raw("members/z", br#"{"name":"z"}"#).await;
    raw.put_raw("sync", b"something newer").await;
    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.members.keys().collect::<Vec<_>>(), ["y"]);

    raw.put_raw("history", b"[1, 2").await;
    match dcs.read_cluster().await.unwrap_err() {
        DcsError::Corrupt { key, .. } => assert!(key.ends_with("/history"), "{key}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    let err = dcs
        .append_history(&history_entry(2), None)
        .await
        .unwrap_err();
    assert!(matches!(err, DcsError::Corrupt { .. }), "{err:?}");
    raw.put_raw("history", b"[]").await;

    raw.put_raw("initialize", b"\xff\xfe").await;
    let err = dcs.read_cluster().await.unwrap_err();
    match &err {
        DcsError::Corrupt { key, .. } => assert!(key.ends_with("/initialize"), "{key}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(err.to_string().contains("initialize"), "{err}");

    raw.put_raw("config", b"nope").await;
    let err = dcs.read_config().await.unwrap_err();
    assert!(matches!(err, DcsError::Corrupt { .. }), "{err:?}");
}

/// Runs a fixed script of operations and records every outcome and the
/// revisions they produce (relative to the start), with lease ids left out.
/// etcd and `MemoryDcs` must produce the same trace.
pub async fn revision_trace(dcs: &impl Dcs) -> Vec<String> {
    let mut trace = Vec::new();
    let start = dcs.read_cluster().await.unwrap().revision;
    macro_rules! step {
        ($what:expr, $op:expr) => {{
            let outcome = $op;
            let view = dcs.read_cluster().await;
            let view = match view {
                Ok(v) => format!(
                    "rev {} leader {:?} members {:?} init {} history {}",
                    v.revision - start,
                    v.leader.map(|l| (l.name, l.mod_revision - start)),
                    v.members
                        .iter()
                        .map(|(k, m)| (k.clone(), m.mod_revision - start))
                        .collect::<Vec<_>>(),
                    if v.initialize_revision == 0 {
                        0
                    } else {
                        v.initialize_revision - start
                    },
                    v.history.len(),
                ),
                Err(e) => format!("read failed: {e:?}"),
            };
            trace.push(format!("{}: {:?} -> {view}", $what, outcome));
        }};
    }
    let la = dcs.grant_lease(10).await.unwrap();
    let lb = dcs.grant_lease(10).await.unwrap();
    let lc = dcs.grant_lease(10).await.unwrap();
    step!("acquire a", dcs.acquire_leader("a", la).await);
    step!("acquire b", dcs.acquire_leader("b", lb).await);
    step!("member a", dcs.put_member(&member("a"), la).await);
    step!("member b", dcs.put_member(&member("b"), lb).await);
    step!("member a again", dcs.put_member(&member("a"), la).await);
    step!("release by b", dcs.release_leader("b", lb).await);
    step!(
        "hand over a->b",
        dcs.hand_over_leader("a", la, "b", lb).await
    );
    step!("release b", dcs.release_leader("b", lb).await);
    step!("release b again", dcs.release_leader("b", lb).await);
    let rec = InitializeRecord {
        system_id: None,
        by: "a".into(),
        at: "now".into(),
        awaiting_first_leader: false,
    };
    step!("create init", dcs.create_initialize(&rec).await);
    step!("create init again", dcs.create_initialize(&rec).await);
    step!("delete init absent rev", dcs.delete_initialize(0).await);
    let init_rev = dcs.read_cluster().await.unwrap().initialize_revision;
    step!("update init", dcs.update_initialize(&rec, init_rev).await);
    step!(
        "config",
        dcs.write_config(&serde_json::json!({"a": 1}), 0).await
    );
    step!(
        "history 1",
        dcs.append_history(&history_entry(2), None).await
    );
    step!(
        "history 2",
        dcs.append_history(&history_entry(3), None).await
    );
    step!("revoke lease without keys", dcs.revoke_lease(lc).await);
    step!("acquire a", dcs.acquire_leader("a", la).await);
    step!("revoke a", dcs.revoke_lease(la).await);
    step!("revoke a again", dcs.revoke_lease(la).await);
    step!("revoke b", dcs.revoke_lease(lb).await);
    step!("keep alive a", dcs.keep_alive(la).await);
    step!(
        "member on dead lease",
        dcs.put_member(&member("c"), la).await
    );
    step!("acquire on dead lease", dcs.acquire_leader("c", la).await);
    trace
}
