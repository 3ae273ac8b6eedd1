//! Two real PostgreSQL 15 nodes through a whole failover: clone, stream,
//! re-point without restart, promote, diverge the old primary, rewind it and
//! bring it back as a replica of the new one.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_pg::{
    ClusterState, DataDirState, Error, Health, PgSettings, Postgres, RewindOutcome, StartRole,
    StopMode,
};

fn main() {
    run_tests(&[
        ("clone_stream_follow_promote_rewind", || {
            Box::pin(clone_stream_follow_promote_rewind())
        }),
        ("failed_clone_leaves_nothing_deleted", || {
            Box::pin(failed_clone_leaves_nothing_deleted())
        }),
    ]);
}

async fn streaming_from(pg: &Postgres, leader: &PgSettings) -> Option<Health> {
    let h = pg.probe().await.ok()?;
    let w = h.wal_receiver.as_ref()?;
    (h.in_recovery && w.status == "streaming" && w.sender_port == Some(leader.port)).then_some(h)
}

async fn has_row(s: &PgSettings, src: &str) -> bool {
    let sql = format!("SELECT src FROM t WHERE src = '{src}'");
    client(s)
        .await
        .query(&sql, &[])
        .await
        .map(|rows| !rows.is_empty())
        .unwrap_or(false)
}

async fn clone_stream_follow_promote_rewind() {
    if !postgres_available() {
        return;
    }
    init_tracing();
    let mut dir = TestDir::new();
    let (sa, sb) = (dir.node("a"), dir.node("b"));
    let (mut a, mut b) = (Postgres::new(sa.clone()), Postgres::new(sb.clone()));

    // --- a: the first primary ---
    a.initdb().await.unwrap();
    a.start(StartRole::Primary).await.unwrap();
    a.create_roles().await.unwrap();
    a.sync_slots(&["a".into(), "b".into()]).await.unwrap();
    exec(&sa, "CREATE TABLE t (id serial PRIMARY KEY, src text); INSERT INTO t (src) SELECT 'a' FROM generate_series(1, 100)")
        .await;

    // --- b: clone and stream ---
    b.basebackup(&target(&sa)).await.unwrap();
    let DataDirState::Initialized(cb) = b.data_dir_state() else {
        panic!("clone is not a cluster")
    };
    assert_eq!(
        cb.system_identifier,
        a.control_data().unwrap().system_identifier
    );
    b.start(StartRole::Replica {
        leader: Some(target(&sa)),
    })
    .await
    .unwrap();
    let hb = eventually("b streaming from a", 20, async || {
        streaming_from(&b, &sa).await
    })
    .await;
    assert_eq!(hb.timeline, 1);
    assert_eq!(
        hb.wal_receiver.as_ref().unwrap().slot_name.as_deref(),
        Some("mainstay_b")
    );
    exec(&sa, "INSERT INTO t (src) VALUES ('a-live')").await;
    let a_lsn = a.probe().await.unwrap().flush_lsn.unwrap();
    eventually("b to receive a's WAL", 10, async || {
        b.probe()
            .await
            .ok()
            .filter(|h| h.receive_lsn >= Some(a_lsn))
            .map(|_| ())
    })
    .await;
    eventually("row on b", 10, async || {
        has_row(&sb, "a-live").await.then_some(())
    })
    .await;
    let ha = a.probe().await.unwrap();
    assert_eq!(ha.replicas.len(), 1);
    assert_eq!(ha.replicas[0].application_name, "b");

    // --- follow: re-point by reload, the postmaster stays ---
    let pid = b.pid().unwrap();
    b.follow(None).await.unwrap();
    eventually("b to stop streaming", 10, async || {
        b.probe()
            .await
            .ok()
            .filter(|h| h.wal_receiver.is_none())
            .map(|_| ())
    })
    .await;
    b.follow(Some(&target(&sa))).await.unwrap();
    eventually("b streaming again", 10, async || {
        streaming_from(&b, &sa).await
    })
    .await;
    assert_eq!(b.pid(), Some(pid), "follow must not restart postgres");
    assert!(
        matches!(a.follow(Some(&target(&sb))).await, Err(Error::Refused(_))),
        "a primary cannot follow"
    );

    // --- promote b: new timeline, history readable from it ---
    b.promote().await.unwrap();
    let hb = b.probe().await.unwrap();
    assert!(!hb.in_recovery);
    assert_eq!(hb.timeline, 2, "timeline right after promotion: {hb:?}");
    let history = a.timeline_history(&target(&sb), 2).await.unwrap();
    println!("00000002.history on b:\n{history}");
    assert!(history.starts_with("1\t"), "{history:?}");
    assert_eq!(a.timeline_history(&target(&sb), 1).await.unwrap(), "");

    // --- split brain for a moment: a keeps writing on timeline 1 ---
    exec(
        &sa,
        "INSERT INTO t (src) SELECT 'a-diverged' FROM generate_series(1, 1000)",
    )
    .await;
    exec(&sb, "INSERT INTO t (src) VALUES ('b-new')").await;
    a.stop(StopMode::Immediate).await.unwrap();
    assert_eq!(a.control_data().unwrap().state, ClusterState::InProduction);
    assert!(
        matches!(a.rewind(&target(&sb)).await, Err(Error::Refused(_))),
        "rewind needs a clean shutdown"
    );
    assert!(a.ensure_clean_shutdown().await.unwrap());

    // --- rewind a onto b's history and follow b ---
    b.sync_slots(&["a".into(), "b".into()]).await.unwrap();
    let outcome = a.rewind(&target(&sb)).await.unwrap();
    println!("rewind outcome: {outcome:?}");
    assert!(
        matches!(
            outcome,
            RewindOutcome::Rewound {
                diverged_at: Some(_)
            }
        ),
        "{outcome:?}"
    );
    assert!(
        matches!(a.start(StartRole::Primary).await, Err(Error::Refused(_))),
        "a rewound directory must not start as primary"
    );
    a.start(StartRole::Replica {
        leader: Some(target(&sb)),
    })
    .await
    .unwrap();
    let ha = eventually("a streaming from b", 20, async || {
        streaming_from(&a, &sb).await
    })
    .await;
    assert_eq!(ha.timeline, 2);
    eventually("b's row on a", 10, async || {
        has_row(&sa, "b-new").await.then_some(())
    })
    .await;
    assert!(
        !has_row(&sa, "a-diverged").await,
        "the diverged rows must be gone after the rewind"
    );
    assert_eq!(a.local_timeline_history(2).unwrap(), history);

    // --- a second rewind has nothing to do ---
    a.stop(StopMode::Fast).await.unwrap();
    assert_eq!(
        a.control_data().unwrap().state,
        ClusterState::ShutDownInRecovery
    );
    assert_eq!(
        a.rewind(&target(&sb)).await.unwrap(),
        RewindOutcome::NotNeeded
    );

    // --- a clone onto an existing cluster is refused ---
    assert!(matches!(
        a.basebackup(&target(&sb)).await,
        Err(Error::Refused(_))
    ));

    b.stop(StopMode::Fast).await.unwrap();
}

async fn failed_clone_leaves_nothing_deleted() {
    if !postgres_available() {
        return;
    }
    init_tracing();
    let mut dir = TestDir::new();
    let s = dir.node("c");
    let pg = Postgres::new(s.clone());
    // Nobody listens on this port.
    let nowhere = mainstay_pg::ConnTarget {
        host: "127.0.0.1".into(),
        port: free_port(),
        name: "nowhere".into(),
    };
    let err = pg.basebackup(&nowhere).await.unwrap_err();
    println!("expected failure: {err}");
    assert!(matches!(err, Error::Tool { .. }), "{err}");
    for secret in [SUPERUSER_PASSWORD, REPLICATION_PASSWORD, REWIND_PASSWORD] {
        assert!(!err.to_string().contains(secret));
    }
    // The empty directory stays usable for the next attempt.
    assert_eq!(pg.data_dir_state(), DataDirState::Empty);
}
