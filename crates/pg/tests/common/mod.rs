//! Shared harness for the tests that run a real PostgreSQL: a private temp
//! directory per test, free loopback ports, settings for a node, and a guard
//! that SIGKILLs every postmaster the test started, even when it fails.

#![allow(dead_code)]

use mainstay_pg::{ConnTarget, Credentials, PgSettings};
use mainstay_testkit::skip;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_postgres::NoTls;

pub const BIN_DIR: &str = "/usr/lib/postgresql/15/bin";
pub const SUPERUSER_PASSWORD: &str = "super:secret\\1";
pub const REPLICATION_PASSWORD: &str = "repl:secret'2";
pub const REWIND_PASSWORD: &str = "rewind secret 3";

/// False when PostgreSQL 15 is not installed, and then the test fails
/// through [`skip`], unless `MAINSTAY_ALLOW_SKIP=1` (the caller returns).
pub fn postgres_available() -> bool {
    let ok = Path::new(BIN_DIR).join("postgres").exists();
    if !ok {
        skip(&format!("PostgreSQL 15 binaries not found in {BIN_DIR}"));
    }
    ok
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .try_init();
}

/// A test's directory; dropping it kills the postmasters first, then removes
/// the files.
pub struct TestDir {
    nodes: Vec<PathBuf>,
    /// Taken on drop when MAINSTAY_PG_KEEP is set, to read the logs after.
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix("mainstay-pg-")
            .tempdir()
            .unwrap();
        // PostgreSQL runs as another user and must traverse it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        TestDir {
            nodes: Vec::new(),
            dir: Some(dir),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    /// Settings for a node with its data directory in this test directory,
    /// registered so that its postmaster is killed on drop.
    pub fn node(&mut self, name: &str) -> PgSettings {
        let s = node_settings(self.path().join(format!("{name}.data")), name, free_port());
        self.nodes.push(s.data_dir.clone());
        s
    }
}

/// Test settings: small, unsafe-but-fast (fsync off), passwords that need
/// escaping everywhere they go.
pub fn node_settings(data_dir: PathBuf, name: &str, port: u16) -> PgSettings {
    let mut s = PgSettings::new(BIN_DIR, data_dir, name);
    s.port = port;
    s.superuser = Credentials::new("postgres", SUPERUSER_PASSWORD);
    s.replication = Credentials::new("replicator", REPLICATION_PASSWORD);
    s.rewind = Credentials::new("rewinder", REWIND_PASSWORD);
    if mainstay_sys::process::geteuid() == 0 {
        s.run_as = Some("postgres".into());
    }
    for (k, v) in [
        ("shared_buffers", "16MB"),
        ("fsync", "off"),
        ("synchronous_commit", "off"),
        ("max_connections", "20"),
        ("checkpoint_timeout", "30min"),
    ] {
        s.parameters.insert(k.into(), v.into());
    }
    s.start_timeout = Duration::from_secs(30);
    s
}

impl Drop for TestDir {
    fn drop(&mut self) {
        for data_dir in &self.nodes {
            let pid = std::fs::read_to_string(data_dir.join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<i32>().ok()));
            if let Some(pid) = pid.filter(|p| *p > 0) {
                let _ = mainstay_sys::process::kill(pid, libc::SIGKILL);
            }
        }
        if std::env::var_os("MAINSTAY_PG_KEEP").is_some()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn target(s: &PgSettings) -> ConnTarget {
    s.conn_target()
}

/// A superuser connection to a node, for the test's own queries.
pub async fn client(s: &PgSettings) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .port(s.port)
        .user(&s.superuser.user)
        .password(&s.superuser.password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2))
        .connect(NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {}: {e}", s.node_name));
    tokio::spawn(conn);
    client
}

pub async fn exec(s: &PgSettings, sql: &str) {
    client(s)
        .await
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql} on {}: {e}", s.node_name));
}

pub async fn texts(s: &PgSettings, sql: &str) -> Vec<String> {
    let rows = client(s)
        .await
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|r| r.get::<_, String>(0)).collect()
}

/// Polls `check` every 100 ms until it returns Some, or panics after `secs`.
pub async fn eventually<T>(what: &str, secs: u64, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A test: a name and the async body, run on its own two-thread runtime.
pub type Test = (
    &'static str,
    fn() -> std::pin::Pin<Box<dyn Future<Output = ()>>>,
);

/// `main` of the test binaries (`harness = false`): the binary must act as
/// the postmaster's fencing guard when `Postgres::start` re-executes it with
/// `guard` (the default guard program is `/proc/self/exe`), which libtest's
/// generated `main` cannot do. Runs the tests whose name contains the first
/// free argument, each in turn, and exits non-zero if any failed.
pub fn run_tests(tests: &[Test]) {
    mainstay_guard::run_if_asked();
    let filter = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    let mut failed = Vec::new();
    let selected: Vec<_> = tests.iter().filter(|(n, _)| n.contains(&filter)).collect();
    println!("running {} tests", selected.len());
    for (name, body) in selected {
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(body())
        });
        match outcome {
            Ok(()) => println!("test {name} ... ok ({:?})", started.elapsed()),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}
