//! A single primary against a real PostgreSQL 15: initdb, start, probe,
//! roles and slots, fencing, crash recovery, stop, moving a data dir aside.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_pg::{ClusterState, DataDirState, Error, Postgres, StartRole, StopMode};
use std::time::{Duration, Instant};

fn main() {
    run_tests(&[
        ("primary_lifecycle", || Box::pin(primary_lifecycle())),
        ("refuses_to_use_a_foreign_directory", || {
            Box::pin(refuses_to_use_a_foreign_directory())
        }),
        ("parameters_are_checked_by_the_server_itself", || {
            Box::pin(parameters_are_checked_by_the_server_itself())
        }),
    ]);
}

/// `postgres -C` on a scratch file: what a start would refuse is found
/// without a server, with PostgreSQL's own words.
async fn parameters_are_checked_by_the_server_itself() {
    if !postgres_available() {
        return;
    }
    let check = async |pairs: &[(&str, &str)]| {
        let parameters = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        mainstay_pg::check_parameters(std::path::Path::new(BIN_DIR), Some("postgres"), &parameters)
            .await
            .expect("the check runs")
    };
    let fine = check(&[
        ("work_mem", "64MB"),
        ("max_connections", "200"),
        ("wal_level", "logical"),
        (
            "shared_preload_libraries",
            "pg_stat_statements, auto_explain",
        ),
        ("auto_explain.log_min_duration", "250ms"),
        ("application_name", "it's \\ fine"),
        ("shared_buffers", "128MB"),
    ])
    .await;
    assert!(fine.is_empty(), "{fine:?}");
    let unknown = check(&[("no_such_parameter", "1")]).await;
    assert!(
        unknown.iter().all(|p| !p.message.contains("check.conf")),
        "the scratch file stays out of the message: {unknown:?}"
    );
    for (pairs, parameter, words) in [
        (
            &[("max_connections", "0")][..],
            "max_connections",
            "outside the valid range",
        ),
        (&[("wal_level", "bogus")], "wal_level", "Available values"),
        (
            &[("no_such_parameter", "1")],
            "no_such_parameter",
            "unrecognized",
        ),
        (
            &[("block_size", "16384")],
            "block_size",
            "cannot be changed",
        ),
        (&[("work_mem", "4 parsecs")], "work_mem", "invalid value"),
        (
            &[(
                "shared_preload_libraries",
                "pg_stat_statements,no_such_library",
            )],
            "shared_preload_libraries",
            "\"no_such_library\" is not installed",
        ),
        (
            &[("local_preload_libraries", "auto_explain")],
            "local_preload_libraries",
            "plugins",
        ),
        (&[("shared_buffers", "1TB")], "shared_buffers", "memory"),
    ] {
        let problems = check(pairs).await;
        assert!(
            problems
                .iter()
                .any(|p| p.parameter == parameter && p.message.contains(words)),
            "{pairs:?}: {problems:?}"
        );
    }
}

async fn primary_lifecycle() {
    if !postgres_available() {
        return;
    }
    init_tracing();
    let mut dir = TestDir::new();
    let s = dir.node("alpha");
    let mut pg = Postgres::new(s.clone());
    assert_eq!(pg.data_dir_state(), DataDirState::Missing);

    pg.initdb().await.unwrap();
    let DataDirState::Initialized(control) = pg.data_dir_state() else {
        panic!("not initialized")
    };
    assert!(control.data_checksums, "initdb must enable data checksums");
    assert_eq!(control.state, ClusterState::ShutDown);
    assert_eq!(control.timeline, 1);

    // Never initdb over an existing cluster: refused, nothing touched.
    let hba = std::fs::read(s.data_dir.join("pg_hba.conf")).unwrap();
    assert!(matches!(pg.initdb().await, Err(Error::Refused(_))));
    assert_eq!(std::fs::read(s.data_dir.join("pg_hba.conf")).unwrap(), hba);

    pg.start(StartRole::Primary).await.unwrap();
    assert!(pg.is_running());
    assert!(matches!(
        pg.start(StartRole::Primary).await,
        Err(Error::Refused(_))
    ));

    let health = pg.probe().await.unwrap();
    assert!(!health.in_recovery);
    assert_eq!(health.timeline, 1);
    assert_eq!(health.system_identifier, control.system_identifier);
    assert!(health.server_version_num >= 150000, "{health:?}");
    assert!(health.receive_lsn.is_none() && health.wal_receiver.is_none());
    let before = health.flush_lsn.unwrap();
    exec(
        &s,
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)",
    )
    .await;
    let after = pg.probe().await.unwrap().flush_lsn.unwrap();
    assert!(after > before, "LSN did not advance: {before} -> {after}");

    // Roles are idempotent; the replication role can log in with its password.
    pg.create_roles().await.unwrap();
    pg.create_roles().await.unwrap();
    let roles = texts(
        &s,
        "SELECT rolname::text FROM pg_roles WHERE rolname IN ('replicator','rewinder') ORDER BY 1",
    )
    .await;
    assert_eq!(roles, ["replicator", "rewinder"]);

    // Slots for the others, not for itself; unwanted inactive ones dropped.
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let changes = pg
        .sync_slots(&names(&["alpha", "beta", "gamma"]))
        .await
        .unwrap();
    assert_eq!(changes.created, ["mainstay_beta", "mainstay_gamma"]);
    let changes = pg.sync_slots(&names(&["alpha", "beta"])).await.unwrap();
    assert_eq!(changes.dropped, ["mainstay_gamma"]);
    assert!(changes.created.is_empty());
    assert_eq!(
        pg.sync_slots(&names(&["alpha", "beta"])).await.unwrap(),
        Default::default()
    );

    // Fencing: immediate shutdown, no waiting, effective within a second.
    assert!(matches!(
        pg.move_aside("while running"),
        Err(Error::Refused(_))
    ));
    let fenced_at = Instant::now();
    let fencer = pg.fencer();
    std::thread::spawn(move || assert!(fencer.fence_now()))
        .join()
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(1), pg.wait_for_exit()).await;
    assert!(status.expect("no exit within 1 s of fencing").is_some());
    while pg.is_running() {
        assert!(
            fenced_at.elapsed() < Duration::from_secs(1),
            "postgres still running 1 s after fence_now"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("fence_now -> postmaster gone in {:?}", fenced_at.elapsed());
    assert!(pg.exit_status().is_some());
    assert_eq!(pg.control_data().unwrap().state, ClusterState::InProduction);

    // Crash recovery in single-user mode leaves a cleanly shut down cluster.
    assert!(pg.ensure_clean_shutdown().await.unwrap());
    assert_eq!(pg.control_data().unwrap().state, ClusterState::ShutDown);
    assert!(!pg.ensure_clean_shutdown().await.unwrap());

    pg.start(StartRole::Primary).await.unwrap();
    assert_eq!(texts(&s, "SELECT count(*)::text FROM t").await, ["1000"]);
    pg.stop(StopMode::Immediate).await.unwrap();
    assert!(!pg.is_running());
    pg.start(StartRole::Primary).await.unwrap();

    // A postmaster this agent did not start (say, a previous agent's) is
    // stopped before starting our own, and `stop` finds one by its pid file.
    let old_pid = pg.pid().unwrap();
    let mut next_agent = Postgres::new(s.clone());
    next_agent.start(StartRole::Primary).await.unwrap();
    assert!(
        pg.exit_status().is_some(),
        "the old postmaster must have been stopped"
    );
    assert_ne!(next_agent.pid(), Some(old_pid));
    pg.stop(StopMode::Fast).await.unwrap();
    assert!(!next_agent.is_running());
    assert_eq!(pg.control_data().unwrap().state, ClusterState::ShutDown);
    pg.stop(StopMode::Fast).await.unwrap(); // stopping a stopped server is fine

    // No password in PostgreSQL's log or in any error seen above.
    let log = std::fs::read_to_string(s.log_path()).unwrap();
    for secret in [SUPERUSER_PASSWORD, REPLICATION_PASSWORD, REWIND_PASSWORD] {
        assert!(!log.contains(secret));
    }
    assert!(!format!("{:?}", s.superuser).contains(SUPERUSER_PASSWORD));

    let aside = pg.move_aside("test: Reason!").unwrap();
    assert!(
        aside
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("alpha.data.test__reason_."),
        "{aside:?}"
    );
    assert!(aside.join("PG_VERSION").exists());
    assert_eq!(pg.data_dir_state(), DataDirState::Missing);
}

async fn refuses_to_use_a_foreign_directory() {
    if !postgres_available() {
        return;
    }
    let mut dir = TestDir::new();
    let s = dir.node("beta");
    std::fs::create_dir(&s.data_dir).unwrap();
    std::fs::write(s.data_dir.join("notes.txt"), "not a cluster").unwrap();
    let mut pg = Postgres::new(s.clone());
    assert!(matches!(pg.data_dir_state(), DataDirState::Unusable(_)));
    assert!(matches!(pg.initdb().await, Err(Error::Refused(_))));
    assert!(matches!(
        pg.start(StartRole::Primary).await,
        Err(Error::Refused(_))
    ));
    assert!(s.data_dir.join("notes.txt").exists());
}
