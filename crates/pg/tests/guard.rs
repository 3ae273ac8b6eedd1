//! The fencing guard against a real PostgreSQL 15: the server stops when
//! its write permission expires, whatever state the agent is in (killed,
//! frozen, its whole process group stopped), when the guard itself dies, and
//! never starts past its deadline; an extended deadline keeps it running.
//!
//! A separate "agent" process (this binary again, with `HELPER_ENV` set)
//! starts PostgreSQL for the cases where the agent is killed or frozen.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_pg::{BootTime, PgSettings, Postgres, StartRole, StopMode};
use mainstay_sys::process;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const HELPER_ENV: &str = "MAINSTAY_PG_GUARD_TEST_AGENT";

fn main() {
    mainstay_guard::run_if_asked();
    if let Ok(encoded) = std::env::var(HELPER_ENV) {
        return helper(&encoded);
    }
    run_tests(&[
        ("survives_the_runtime_that_started_it", || {
            Box::pin(survives_the_runtime_that_started_it())
        }),
        ("stops_when_the_agent_is_killed", || {
            Box::pin(stops_when_the_agent_is_killed())
        }),
        ("stops_at_the_deadline_when_the_agent_is_frozen", || {
            Box::pin(stops_at_the_deadline_when_the_agent_is_frozen())
        }),
        ("stops_when_the_agents_process_group_is_stopped", || {
            Box::pin(stops_when_the_agents_process_group_is_stopped())
        }),
        (
            "extensions_keep_it_running_and_disarming_stops_the_clock",
            || Box::pin(extensions_keep_it_running_and_disarming_stops_the_clock()),
        ),
        ("stops_when_the_guard_is_killed", || {
            Box::pin(stops_when_the_guard_is_killed())
        }),
        ("a_killed_postmaster_leaves_no_backend_behind", || {
            Box::pin(a_killed_postmaster_leaves_no_backend_behind())
        }),
        ("never_starts_past_its_deadline", || {
            Box::pin(never_starts_past_its_deadline())
        }),
    ]);
}

async fn initialized(dir: &mut TestDir, name: &str) -> Option<PgSettings> {
    if !postgres_available() {
        return None;
    }
    init_tracing();
    let s = dir.node(name);
    Postgres::new(s.clone()).initdb().await.unwrap();
    Some(s)
}

/// Waits (bounded) until nothing runs on the data directory and nothing of
/// the postmaster's process group is left; returns how long that took.
fn wait_gone(s: &PgSettings, pm: i32, limit: Duration) -> Duration {
    let started = Instant::now();
    let pg = Postgres::new(s.clone());
    while pg.is_running() || group_alive(pm) {
        assert!(
            started.elapsed() < limit,
            "postgres (or a process of its group) still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", s.port)).is_err(),
        "postgres still listening"
    );
    started.elapsed()
}

fn group_alive(pgid: i32) -> bool {
    process::alive(-pgid)
}

/// Worker threads of the runtime that started postgres exit with it; the
/// server must not.
async fn survives_the_runtime_that_started_it() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "delta").await else {
        return;
    };
    let s2 = s.clone();
    let pg = std::thread::spawn(move || {
        let mut pg = Postgres::new(s2);
        start_on_own_runtime(&mut pg);
        pg
    })
    .join()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        pg.is_running(),
        "postgres died with the runtime that started it"
    );
    let mut pg = pg;
    pg.stop(StopMode::Fast).await.unwrap();
    assert!(!pg.is_running());
}

/// A separate agent that starts postgres; `deadline_ms` from now is its
/// write permission (none: a replica's disarmed guard).
fn spawn_agent(s: &PgSettings, deadline_ms: Option<u64>, own_group: bool) -> (Child, i32) {
    let encoded = format!(
        "{}|{}|{}|{}",
        s.data_dir.display(),
        s.node_name,
        s.port,
        deadline_ms.map_or("-".into(), |d| d.to_string())
    );
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(HELPER_ENV, encoded).stdout(Stdio::piped());
    if own_group {
        cmd.process_group(0);
    }
    let mut agent = cmd.spawn().unwrap();
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
    assert_eq!(Postgres::new(s.clone()).pid(), Some(pid));
    (agent, pid)
}

/// The "agent": starts postgres, reports its pid, then never extends.
fn helper(encoded: &str) {
    let parts: Vec<&str> = encoded.split('|').collect();
    let s = node_settings(parts[0].into(), parts[1], parts[2].parse().unwrap());
    let mut pg = Postgres::new(s);
    if let Ok(ms) = parts[3].parse::<u64>() {
        pg.fencer().set_writable(true);
        pg.fencer()
            .set_deadline(BootTime::now().saturating_add(Duration::from_millis(ms)));
    }
    start_on_own_runtime(&mut pg);
    println!("READY {}", pg.pid().unwrap());
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Starts a primary on a runtime that is gone when this returns.
fn start_on_own_runtime(pg: &mut Postgres) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(pg.start(StartRole::Primary))
        .unwrap();
}

fn kill(pid: i32, signal: i32) {
    if let Err(e) = process::kill(pid, signal) {
        panic!("kill({pid}, {signal}): {e}");
    }
}

/// SIGKILL of the agent closes its end of the guard's socket: a replica's
/// server (no deadline at all) stops at once.
async fn stops_when_the_agent_is_killed() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "echo").await else {
        return;
    };
    let (mut agent, pm) = spawn_agent(&s, None, false);
    kill(agent.id() as i32, libc::SIGKILL);
    agent.wait().unwrap();
    let took = wait_gone(&s, pm, Duration::from_secs(3));
    println!("agent SIGKILLed -> postgres and its backends gone in {took:?}");
}

/// SIGSTOP of the agent: the guard stops postgres at the deadline, not
/// before, and its backends with it.
async fn stops_at_the_deadline_when_the_agent_is_frozen() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "foxtrot").await else {
        return;
    };
    frozen_agent_case(&s, false).await;
}

/// Ctrl-Z stops the agent's whole process group; the guard has a session of
/// its own and must go on.
async fn stops_when_the_agents_process_group_is_stopped() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "golf").await else {
        return;
    };
    frozen_agent_case(&s, true).await;
}

async fn frozen_agent_case(s: &PgSettings, whole_group: bool) {
    const DEADLINE: Duration = Duration::from_millis(3000);
    let armed_at = Instant::now();
    let (mut agent, pm) = spawn_agent(s, Some(DEADLINE.as_millis() as u64), whole_group);
    let agent_pid = agent.id() as i32;
    // A session opened before the freeze, as a client's would be.
    let (client, conn) = tokio_postgres::connect(&conn_string(s), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    kill(
        if whole_group { -agent_pid } else { agent_pid },
        libc::SIGSTOP,
    );
    client.simple_query("SELECT 1").await.unwrap();
    let pg = Postgres::new(s.clone());
    let early = DEADLINE.saturating_sub(Duration::from_millis(500));
    tokio::time::sleep(early.saturating_sub(armed_at.elapsed())).await;
    assert!(pg.is_running(), "fenced before the deadline");
    let took = wait_gone(s, pm, Duration::from_secs(3));
    let after_deadline = armed_at.elapsed().saturating_sub(DEADLINE);
    assert!(
        client.simple_query("SELECT 1").await.is_err(),
        "a session opened before the fence still answers"
    );
    println!(
        "agent frozen (whole group: {whole_group}) -> postgres gone at most {after_deadline:?} \
         after its deadline (waited {took:?})"
    );
    kill(agent_pid, libc::SIGKILL);
    if whole_group {
        let _ = process::kill(-agent_pid, libc::SIGCONT);
    }
    agent.wait().unwrap();
}

fn conn_string(s: &PgSettings) -> String {
    format!(
        "host=127.0.0.1 port={} user=postgres password='{}' dbname=postgres connect_timeout=5",
        s.port,
        SUPERUSER_PASSWORD
            .replace('\\', "\\\\")
            .replace('\'', "\\'")
    )
}

/// Extensions before the deadline keep the server up; a disarmed guard
/// (replica) lets any deadline pass; arming with a past deadline fences.
async fn extensions_keep_it_running_and_disarming_stops_the_clock() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "hotel").await else {
        return;
    };
    let mut pg = Postgres::new(s.clone());
    let fencer = pg.fencer();
    let step = Duration::from_millis(800);
    fencer.set_writable(true);
    fencer.set_deadline(BootTime::now().saturating_add(step));
    pg.start(StartRole::Primary).await.unwrap();
    for _ in 0..10 {
        fencer.set_deadline(BootTime::now().saturating_add(step));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        pg.is_running(),
        "fenced although every deadline was extended in time"
    );
    fencer.set_writable(false);
    tokio::time::sleep(step * 2).await;
    assert!(pg.is_running(), "a disarmed guard fenced");
    let pm = pg.pid().unwrap();
    // Armed again, with the deadline it had: long past.
    fencer.set_writable(true);
    let took = wait_gone(&s, pm, Duration::from_secs(3));
    println!("armed with a past deadline -> postgres gone in {took:?}");
    let status = tokio::time::timeout(Duration::from_secs(3), pg.wait_for_exit()).await;
    assert!(
        status.is_ok_and(|s| s.is_some()),
        "the guard did not report the exit"
    );
}

/// The guard's death must take PostgreSQL's write permission with it.
async fn stops_when_the_guard_is_killed() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "india").await else {
        return;
    };
    let mut pg = Postgres::new(s.clone());
    // Not writable: the guard has no deadline, only its death stops it.
    pg.start(StartRole::Primary).await.unwrap();
    let pm = pg.pid().unwrap();
    let guard = parent_of(pm);
    assert_ne!(
        guard,
        std::process::id() as i32,
        "postgres is not under a guard"
    );
    kill(guard, libc::SIGKILL);
    let took = wait_gone(&s, pm, Duration::from_secs(3));
    println!("guard SIGKILLed -> postgres gone in {took:?}");
    let exited = tokio::time::timeout(Duration::from_secs(3), pg.wait_for_exit()).await;
    assert!(
        exited.is_ok_and(|s| s.is_some()),
        "the agent never learnt that postgres exited"
    );
}

fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // pid (comm) state ppid ...; comm may hold spaces, so split after ')'.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.split(' ').nth(1).unwrap().parse().unwrap()
}

/// A deadline that passed before the start: no postmaster at all.
async fn never_starts_past_its_deadline() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "juliet").await else {
        return;
    };
    let mut pg = Postgres::new(s.clone());
    pg.fencer().set_writable(true);
    pg.fencer()
        .set_deadline(BootTime::now().saturating_sub(Duration::from_millis(1)));
    let err = pg.start(StartRole::Primary).await.unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(!pg.is_running());
}

/// PostgreSQL's children lead sessions of their own, so a SIGKILL of the
/// postmaster alone would leave its backends serving their sessions; the
/// guard, their subreaper, kills them.
async fn a_killed_postmaster_leaves_no_backend_behind() {
    let mut dir = TestDir::new();
    let Some(s) = initialized(&mut dir, "kilo").await else {
        return;
    };
    let mut pg = Postgres::new(s.clone());
    pg.start(StartRole::Primary).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&conn_string(&s), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let backend: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let pm = pg.pid().unwrap();
    assert_ne!(
        mainstay_testkit::crash::process_group_of(backend),
        Some(pm),
        "PostgreSQL's children are expected to lead groups of their own"
    );
    kill(pm, libc::SIGKILL);
    let killed_at = Instant::now();
    while std::path::Path::new(&format!("/proc/{backend}")).exists() {
        assert!(
            killed_at.elapsed() < Duration::from_secs(3),
            "the backend outlived its postmaster by 3 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "postmaster SIGKILLed -> its backend gone in {:?}",
        killed_at.elapsed()
    );
    assert!(client.simple_query("SELECT 1").await.is_err());
}
