//! PostgreSQL must not outlive a SIGKILLed agent (it would keep accepting
//! writes with nobody renewing the leader lease), and must not die when the
//! tokio runtime or thread that asked for it goes away.
//!
//! A plain `main` (harness = false) because the test re-executes itself as
//! the "agent" that gets SIGKILLed.

mod common;

use common::*;
use mainstay_pg::{PgSettings, Postgres, StartRole, StopMode};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HELPER_ENV: &str = "MAINSTAY_PG_PDEATHSIG_HELPER";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn main() {
    if let Ok(encoded) = std::env::var(HELPER_ENV) {
        return helper(&encoded);
    }
    if !postgres_available() {
        println!("test pdeathsig ... skipped");
        return;
    }
    init_tracing();
    let started = Instant::now();
    let mut dir = TestDir::new();
    let s = dir.node("delta");
    runtime()
        .block_on(Postgres::new(s.clone()).initdb())
        .unwrap();

    survives_the_runtime_that_started_it(&s);
    dies_with_the_agent(&s);
    println!("test pdeathsig ... ok ({:?})", started.elapsed());
}

/// Worker threads of the runtime that started postgres exit with it; the
/// postmaster is forked by the crate's own long-lived thread, so it stays.
fn survives_the_runtime_that_started_it(s: &PgSettings) {
    let mut pg = Postgres::new(s.clone());
    {
        let rt = runtime();
        rt.block_on(pg.start(StartRole::Primary)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        pg.is_running(),
        "postgres died with the runtime that started it"
    );
    runtime().block_on(pg.stop(StopMode::Fast)).unwrap();
    assert!(!pg.is_running());
}

/// A separate "agent" process starts postgres and is SIGKILLed; the kernel's
/// parent-death signal (SIGQUIT) must stop the postmaster at once.
fn dies_with_the_agent(s: &PgSettings) {
    let encoded = format!("{}|{}|{}", s.data_dir.display(), s.node_name, s.port);
    let mut agent = Command::new(std::env::current_exe().unwrap())
        .env(HELPER_ENV, encoded)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(agent.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: i32 = line
        .trim()
        .strip_prefix("READY ")
        .unwrap_or_else(|| panic!("helper said {line:?}"))
        .parse()
        .unwrap();
    let pg = Postgres::new(s.clone());
    assert_eq!(pg.pid(), Some(pid));

    let killed_at = Instant::now();
    unsafe { libc::kill(agent.id() as i32, libc::SIGKILL) };
    agent.wait().unwrap();
    while pg.is_running() {
        assert!(
            killed_at.elapsed() < Duration::from_secs(2),
            "postgres still running 2 s after its agent died"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "agent SIGKILLed -> postmaster gone in {:?}",
        killed_at.elapsed()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err(),
        "postgres still listening"
    );
}

/// The "agent": starts postgres, reports its pid, waits to be killed.
fn helper(encoded: &str) {
    let parts: Vec<&str> = encoded.split('|').collect();
    let s = node_settings(parts[0].into(), parts[1], parts[2].parse().unwrap());
    let mut pg = Postgres::new(s);
    runtime().block_on(pg.start(StartRole::Primary)).unwrap();
    println!("READY {}", pg.pid().unwrap());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}
