//! The DCS contract checks run against real etcd (one fresh server per
//! test, on free loopback ports), plus the failures only a real server
//! shows: a frozen etcd, a dead one, and a member cut off from its quorum.

#![forbid(unsafe_code)]

mod common;

use common::RawWriter;
use mainstay_dcs::{Dcs, DcsError, EtcdDcs, EtcdSettings, KeyKind, WatchEvent};
use mainstay_testkit::{Etcd, free_port};
use std::time::Duration;
use tempfile::TempDir;
use tokio::time::Instant;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Slack over a bound for a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1000);

struct Fixture {
    dcs: EtcdDcs,
    etcd: Etcd,
    // Last: etcd is killed (dropped) before its data dir is removed.
    _dir: TempDir,
}

async fn connect(endpoints: Vec<String>) -> EtcdDcs {
    let mut settings = EtcdSettings::new(endpoints, "test");
    settings.request_timeout = REQUEST_TIMEOUT;
    settings.connect_timeout = REQUEST_TIMEOUT;
    EtcdDcs::connect(settings).await.unwrap()
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(dir.path()).unwrap();
    let dcs = connect(vec![etcd.endpoint()]).await;
    Fixture {
        dcs,
        etcd,
        _dir: dir,
    }
}

impl RawWriter for EtcdDcs {
    async fn put_raw(&self, key: &str, value: &[u8]) {
        let mut client = self.client().await.unwrap();
        client
            .put(format!("{}{key}", self.prefix()), value, None)
            .await
            .unwrap();
    }
}

/// Asserts that `call` fails as unreachable or timed out, within the
/// request timeout; returns how long it took.
async fn assert_fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<T, DcsError>>,
) -> Duration {
    let start = Instant::now();
    let result = call.await;
    let took = start.elapsed();
    match result {
        Err(DcsError::Unreachable(_) | DcsError::Timeout) => {}
        other => panic!("{what}: expected Unreachable or Timeout, got {other:?}"),
    }
    assert!(took <= REQUEST_TIMEOUT + SLACK, "{what} took {took:?}");
    eprintln!("{what}: {:?} after {took:?}", result.unwrap_err());
    took
}

/// Waits for the watch to report an error; returns how long it took.
async fn wait_for_watch_error(
    watch: &mut tokio::sync::mpsc::Receiver<WatchEvent>,
    within: Duration,
) -> (String, Duration) {
    let start = Instant::now();
    loop {
        let left = within.saturating_sub(start.elapsed());
        match common::next_event(watch, left).await {
            WatchEvent::Error(e) => return (e, start.elapsed()),
            WatchEvent::Changed { .. } => continue,
        }
    }
}

#[tokio::test]
async fn leader_election() {
    common::check_leader_election(&fixture().await.dcs).await;
}

#[tokio::test]
async fn members() {
    common::check_members(&fixture().await.dcs).await;
}

#[tokio::test]
async fn lease_expiry() {
    let f = fixture().await;
    let delay = common::check_lease_expiry(&f.dcs, 2).await;
    eprintln!("2 s lease: watch reported the leader's deletion {delay:?} after the last renewal");
    // etcd checks for expired leases every 500 ms.
    assert!(delay <= Duration::from_secs(2) + Duration::from_millis(500) + SLACK);
}

#[tokio::test]
async fn one_second_leases_hold_with_renewal() {
    // Legal only because testkit runs etcd with a 500 ms election timeout.
    common::check_keep_alive_holds(&fixture().await.dcs, 1).await;
}

#[tokio::test]
async fn initialize() {
    common::check_initialize(&fixture().await.dcs).await;
}

#[tokio::test]
async fn history() {
    common::check_history(&fixture().await.dcs).await;
}

#[tokio::test]
async fn config() {
    common::check_config(&fixture().await.dcs).await;
}

#[tokio::test]
async fn watch() {
    common::check_watch(&fixture().await.dcs).await;
}

#[tokio::test]
async fn corrupt_values() {
    let f = fixture().await;
    common::check_corrupt_values(&f.dcs, &f.dcs).await;
}

/// A quiet cluster is not a broken one: the watch's liveness probe must be
/// answered by etcd (progress requests exist since etcd 3.4).
#[tokio::test]
async fn idle_watch_stays_open() {
    let f = fixture().await;
    let mut watch = f.dcs.watch().await.unwrap();
    tokio::time::sleep(REQUEST_TIMEOUT * 5).await;
    assert!(
        watch.try_recv().is_err(),
        "no event expected on a quiet cluster"
    );
    let lease = f.dcs.grant_lease(5).await.unwrap();
    assert!(f.dcs.acquire_leader("a", lease).await.unwrap());
    common::wait_for_key(&mut watch, KeyKind::Leader, false, REQUEST_TIMEOUT).await;
}

/// SIGSTOP: etcd's sockets accept but nothing answers. Every call must give
/// up within the request timeout and the watch must not stay silent.
#[tokio::test]
async fn frozen_etcd_fails_fast() {
    let mut f = fixture().await;
    let lease = f.dcs.grant_lease(10).await.unwrap();
    assert_eq!(f.dcs.keep_alive(lease).await.unwrap(), 10);
    let mut watch = f.dcs.watch().await.unwrap();

    f.etcd.pause().unwrap();
    // Silence for a request timeout, a progress probe, silence again.
    let (error, took) = wait_for_watch_error(&mut watch, REQUEST_TIMEOUT * 3).await;
    eprintln!("watch on a frozen etcd: {error:?} {took:?} after SIGSTOP");
    assert!(
        watch.recv().await.is_none(),
        "the watch ends after its error"
    );

    assert_fails_fast("read_cluster", f.dcs.read_cluster()).await;
    assert_fails_fast("keep_alive", f.dcs.keep_alive(lease)).await;
    assert_fails_fast("acquire_leader", f.dcs.acquire_leader("a", lease)).await;
    assert_fails_fast("grant_lease", f.dcs.grant_lease(10)).await;
    assert_fails_fast("watch", f.dcs.watch()).await;

    f.etcd.resume().unwrap();
    // The same client recovers once etcd answers again.
    assert_eq!(f.dcs.keep_alive(lease).await.unwrap(), 10);
    let mut watch = f.dcs.watch().await.unwrap();
    f.dcs.put_member(&common::member("b"), lease).await.unwrap();
    let b = KeyKind::Member("b".into());
    common::wait_for_key(&mut watch, b, false, REQUEST_TIMEOUT).await;
    // The acquire that timed out sat in etcd's socket buffer; when etcd
    // thaws it applies or not, depending on whether etcd sees the client's
    // cancellation first. That is why a timeout means "outcome unknown".
    let view = f.dcs.read_cluster().await.unwrap();
    eprintln!(
        "timed-out acquire applied after thaw: {}",
        view.leader.is_some()
    );
}

/// etcd killed and restarted: calls fail fast while it is down, the watch
/// reports the broken stream, and the same client works again afterwards.
#[tokio::test]
async fn dead_etcd_fails_fast_and_client_recovers() {
    let mut f = fixture().await;
    let lease = f.dcs.grant_lease(30).await.unwrap();
    assert!(f.dcs.acquire_leader("a", lease).await.unwrap());
    let mut watch = f.dcs.watch().await.unwrap();

    f.etcd.kill().unwrap();
    let (error, took) = wait_for_watch_error(&mut watch, REQUEST_TIMEOUT * 3).await;
    eprintln!("watch on a killed etcd: {error:?} after {took:?}");
    assert_fails_fast("read_cluster", f.dcs.read_cluster()).await;
    assert_fails_fast("keep_alive", f.dcs.keep_alive(lease)).await;

    f.etcd.restart().unwrap();
    // Data and (at most one TTL later) leases survive a restart.
    let start = Instant::now();
    let view = loop {
        match f.dcs.read_cluster().await {
            Ok(view) => break view,
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                eprintln!("after restart: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("client did not recover after etcd restart: {e}"),
        }
    };
    eprintln!(
        "client recovered {:?} after etcd answered again",
        start.elapsed()
    );
    assert_eq!(view.leader_name(), Some("a"));
    assert_eq!(f.dcs.keep_alive(lease).await.unwrap(), 30);
}

/// Nothing listens on the endpoint: connecting is lazy and succeeds, calls
/// fail with a reason instead of hanging.
#[tokio::test]
async fn nothing_listening() {
    let dcs = connect(vec![format!("http://127.0.0.1:{}", free_port())]).await;
    assert_fails_fast("read_cluster", dcs.read_cluster()).await;
    assert_fails_fast("grant_lease", dcs.grant_lease(5)).await;
    assert_fails_fast("watch", dcs.watch()).await;
}

/// A member that loses its quorum: with require-leader it refuses requests
/// and cancels open watch and keep-alive streams instead of going silent.
#[tokio::test]
async fn member_without_quorum_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = Etcd::start_cluster(dir.path(), 3).unwrap();
    // Talk only to member 0, then freeze the other two.
    let dcs = connect(vec![members[0].endpoint()]).await;
    let lease = dcs.grant_lease(10).await.unwrap();
    assert_eq!(dcs.keep_alive(lease).await.unwrap(), 10);
    let mut watch = dcs.watch().await.unwrap();

    members[1].pause().unwrap();
    members[2].pause().unwrap();
    let cut_off = Instant::now();
    let (error, took) = wait_for_watch_error(&mut watch, Duration::from_secs(10)).await;
    eprintln!("watch on a member without quorum: {error:?} after {took:?}");

    let start = Instant::now();
    let err = dcs.read_cluster().await.unwrap_err();
    eprintln!(
        "read_cluster without quorum: {err:?} after {:?} ({:?} after the cut)",
        start.elapsed(),
        cut_off.elapsed()
    );
    assert!(matches!(err, DcsError::Unreachable(_)), "{err:?}");
    assert_fails_fast("keep_alive", dcs.keep_alive(lease)).await;
    assert_fails_fast("acquire_leader", dcs.acquire_leader("a", lease)).await;

    members[1].resume().unwrap();
    members[2].resume().unwrap();
    let start = Instant::now();
    loop {
        match dcs.keep_alive(lease).await {
            Ok(ttl) => {
                assert_eq!(ttl, 10);
                break;
            }
            Err(e) if start.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = e;
            }
            Err(e) => panic!("no recovery after the quorum came back: {e}"),
        }
    }
    eprintln!(
        "quorum back: lease renewed {:?} after resume",
        start.elapsed()
    );
    assert!(dcs.acquire_leader("a", lease).await.unwrap());
}

/// A frozen member among three endpoints (a crashed host whose connections
/// hang) costs one timeout, then requests stick to a live member.
#[tokio::test]
async fn frozen_member_costs_one_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut members = Etcd::start_cluster(dir.path(), 3).unwrap();
    let dcs = connect(members.iter().map(|m| m.endpoint()).collect()).await;
    let lease = dcs.grant_lease(10).await.unwrap();
    assert_eq!(dcs.current_endpoint(), members[0].endpoint());
    let mut watch = dcs.watch().await.unwrap();

    members[0].pause().unwrap();
    let start = Instant::now();
    let mut failures = Vec::new();
    while start.elapsed() < Duration::from_secs(6) {
        let t = Instant::now();
        if let Err(e) = dcs.keep_alive(lease).await {
            failures.push((start.elapsed(), e));
        }
        if let Err(e) = dcs.read_cluster().await {
            failures.push((start.elapsed(), e));
        }
        tokio::time::sleep(Duration::from_millis(100).saturating_sub(t.elapsed())).await;
    }
    eprintln!("failures with member 0 frozen: {failures:?}");
    eprintln!("now using {}", dcs.current_endpoint());
    assert_ne!(dcs.current_endpoint(), members[0].endpoint());
    // One timeout moves requests away; if member 0 led the raft group the
    // others need an election (~0.5-1 s), answering "no leader" meanwhile.
    let last = failures.last().map_or(Duration::ZERO, |f| f.0);
    assert!(
        last < Duration::from_secs(3),
        "still failing after {last:?}"
    );
    let (error, took) = wait_for_watch_error(&mut watch, REQUEST_TIMEOUT * 3).await;
    eprintln!("watch on the frozen member: {error:?} after {took:?}");
    // A new watch goes to the live member.
    let mut watch = dcs.watch().await.unwrap();
    assert!(dcs.acquire_leader("a", lease).await.unwrap());
    common::wait_for_key(&mut watch, KeyKind::Leader, false, REQUEST_TIMEOUT).await;
}

/// The in-memory stand-in produces exactly etcd's outcomes and revisions.
#[tokio::test]
async fn memory_dcs_matches_etcd() {
    let f = fixture().await;
    let etcd = common::revision_trace(&f.dcs).await;
    let memory = common::revision_trace(&mainstay_dcs::MemoryDcs::new()).await;
    for (e, m) in etcd.iter().zip(&memory) {
        eprintln!("etcd:   {e}");
        if e != m {
            eprintln!("memory: {m}");
        }
    }
    assert_eq!(etcd, memory);
}

/// With authentication: a wrong password is reported as such, and the
/// client authenticates again after etcd restarts and forgets its token.
#[tokio::test]
async fn authentication_survives_etcd_restart() {
    let mut f = fixture().await;
    let mut admin = f.dcs.client().await.unwrap();
    admin.user_add("root", "secret", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let settings = |password: &str| {
        let mut s = EtcdSettings::new(vec![f.etcd.endpoint()], "test");
        s.request_timeout = REQUEST_TIMEOUT;
        s.username = Some("root".into());
        s.password = Some(password.into());
        s
    };
    let wrong = EtcdDcs::connect(settings("wrong")).await.unwrap();
    let err = wrong.read_cluster().await.unwrap_err();
    eprintln!("wrong password: {err}");
    assert!(
        matches!(err, DcsError::Other(ref m) if m.contains("password")),
        "{err:?}"
    );

    let dcs = EtcdDcs::connect(settings("secret")).await.unwrap();
    let lease = dcs.grant_lease(30).await.unwrap();
    assert!(dcs.acquire_leader("a", lease).await.unwrap());

    f.etcd.stop().unwrap();
    f.etcd.restart().unwrap();
    // The first request after the restart meets a dead connection, then a
    // forgotten auth token: both are handled inside the call.
    let view = dcs.read_cluster().await.unwrap();
    assert_eq!(view.leader_name(), Some("a"));
    assert_eq!(dcs.keep_alive(lease).await.unwrap(), 30);
}
