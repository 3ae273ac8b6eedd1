//! Property-based fuzzing of the REST API with schemathesis, against a real
//! cluster (three agents, etcd, PostgreSQL 15) and the agent's own OpenAPI
//! document (`GET /openapi.json`, `src/api/openapi.rs`).
//!
//! Every operation is fuzzed, the unsafe ones too, with the demo
//! credentials: switchovers, failovers, restarts, re-clones, crash drills,
//! configuration changes, member removals. The run fails on a 5xx other than
//! the 503s `tests/schemathesis.toml` lists with their reasons, on an answer
//! (status code, content type, body) the document does not describe, on a
//! request the document calls valid that the server refuses for its shape,
//! and on one it calls invalid that the server accepts. Half of the
//! candidate, leader and member names it generates are the cluster's own,
//! and half of the scheduled times lie within the scheduling window, so
//! that requests get past the pre-checks and really move the cluster.
//! schemathesis talks to the leader at the start; its role changes with
//! the switchovers, failovers and crash drills it sends.
//!
//! Afterwards the cluster must be healthy again: every agent still running,
//! one leader running as primary, every other node streaming from it, `GET
//! /cluster` answered by every node, and no panic in any agent's log. Before
//! checking, the test undoes only what a valid request legitimately leaves
//! behind and that would keep a healthy cluster from forming: maintenance
//! mode (`PATCH /config {"pause": true}`) and a switchover scheduled for
//! later. Whatever else the fuzz stored stays, so that a stored value that
//! breaks PostgreSQL fails the test.
//!
//! schemathesis comes from `scripts/setup.sh` (a virtualenv in
//! /opt/mainstay-venv); `MAINSTAY_SCHEMATHESIS` names another executable.
//! `MAINSTAY_FUZZ_SEED` replays or varies the run (default: a fixed seed, so
//! that every CI run sends the same requests), `MAINSTAY_FUZZ_EXAMPLES`
//! changes the number of examples per operation. schemathesis' whole output
//! and its reports (NDJSON with every request and answer, JUnit) are in the
//! test directory, kept when the test fails (or with
//! `MAINSTAY_KEEP_TEST_FILES=1`).

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::demo::{API_PASSWORD, API_USER};
use mainstay_testkit::skip;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Where `scripts/setup.sh` installs schemathesis.
const DEFAULT_SCHEMATHESIS: &str = "/opt/mainstay-venv/bin/schemathesis";
const SCHEMATHESIS_ENV: &str = "MAINSTAY_SCHEMATHESIS";
/// The major version this test's options and configuration file are for.
const SCHEMATHESIS_MAJOR: &str = "4.";

const DEFAULT_SEED: u64 = 20_261_206;
/// Examples per operation in the fuzzing phase (the examples and coverage
/// phases add their own). The run covers 65 operations; with 50 it takes
/// about a minute on an idle CI machine, most of it in re-clones,
/// restarts and switchovers.
const DEFAULT_EXAMPLES: u32 = 50;
/// The whole schemathesis run, killed when it has not finished by then
/// (with the cluster's start and [`HEALTHY_AGAIN`], the test stays under
/// four minutes whatever happens).
const FUZZ_TIMEOUT: Duration = Duration::from_secs(150);
/// One request: a switchover is answered once done (2 ttl + 10 s at most),
/// a restart or a re-clone once PostgreSQL runs again.
const REQUEST_TIMEOUT_SECS: u32 = 60;
/// After the fuzz: a crash drill keeps its node standing aside for up to
/// 3 ttl + 20 s (32 s with the default timing), then it rejoins.
const HEALTHY_AGAIN: Duration = Duration::from_secs(60);

/// The schemathesis executable and its version line, or why there is none.
fn schemathesis() -> Result<(PathBuf, String), String> {
    let path = std::env::var_os(SCHEMATHESIS_ENV)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SCHEMATHESIS));
    let output = std::process::Command::new(&path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "schemathesis is not installed at {} ({e}): run scripts/setup.sh, or set \
                 {SCHEMATHESIS_ENV} to its executable",
                path.display()
            )
        })?;
    let version = String::from_utf8_lossy(&output.stdout).trim().to_string();
    // "schemathesis, version 4.32.5"
    match version.rsplit_once("version ") {
        Some((_, v)) if output.status.success() && v.starts_with(SCHEMATHESIS_MAJOR) => {
            Ok((path, version))
        }
        _ => Err(format!(
            "{} --version says {version:?} ({}): this test needs schemathesis \
             {SCHEMATHESIS_MAJOR}x; run scripts/setup.sh",
            path.display(),
            output.status
        )),
    }
}

fn env_number<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}

/// How a schemathesis run ended.
struct FuzzRun {
    /// `None`: killed at the timeout.
    status: Option<std::process::ExitStatus>,
    took: Duration,
    log: PathBuf,
}

impl FuzzRun {
    fn passed(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// The part of schemathesis' output that says what failed (from the
    /// first section header on; the last 100 lines of a run killed before
    /// its summary), bounded for a test log; the whole output stays in the
    /// kept test directory.
    fn report(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines
            .iter()
            .position(|l| {
                l.starts_with("=====") && (l.contains("FAILURES") || l.contains("ERRORS"))
            })
            .unwrap_or(lines.len().saturating_sub(100));
        let shown: Vec<&str> = lines[start..].iter().copied().take(600).collect();
        let cut = if lines.len() - start > shown.len() {
            format!("\n[... {} more lines]", lines.len() - start - shown.len())
        } else {
            String::new()
        };
        let outcome = match self.status {
            None => format!("schemathesis did not finish within {FUZZ_TIMEOUT:?} and was killed"),
            Some(status) => format!("schemathesis exited with {status} after {:?}", self.took),
        };
        format!(
            "{outcome}; its whole output is in {}\n{}{cut}",
            self.log.display(),
            shown.join("\n")
        )
    }
}

/// `tests/schemathesis.toml` plus what only this run knows, written into
/// `dir`: the members' names and times within the scheduling window, as
/// dictionaries schemathesis draws from for half of the values it
/// generates in those places. Random strings alone would never name a
/// member or a time between now and the horizon, and every switchover,
/// failover and member removal would stop at a pre-check.
fn write_config(h: &Harness, dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis.toml");
    let mut text = std::fs::read_to_string(&source)
        .unwrap_or_else(|e| panic!("reading {}: {e}", source.display()));
    let now = std::time::SystemTime::now();
    let unix = |after: u64| {
        (now + Duration::from_secs(after))
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let rfc3339 = |after: u64| {
        humantime::format_rfc3339_seconds(now + Duration::from_secs(after)).to_string()
    };
    let members: Vec<String> = h.names().iter().map(|n| format!("{n:?}")).collect();
    // Due during the run (the leader carries it out), due after it (the
    // test cancels it), and an hour ahead; RFC 3339 and Unix seconds.
    let soon = [
        format!("{:?}", rfc3339(20)),
        unix(40).to_string(),
        format!("{:?}", rfc3339(600)),
        unix(3600).to_string(),
    ];
    text.push_str(&format!(
        "\n# --- Added by tests/api_fuzz.rs for this run ---\n\
         [dictionaries.members]\nvalues = [{}]\n\
         [dictionaries.soon]\nvalues = [{}]\n\
         [parameters]\n\
         \"body.candidate\" = {{ dictionary = \"members\", probability = 0.5 }}\n\
         \"body.leader\" = {{ dictionary = \"members\", probability = 0.5 }}\n\
         \"path.name\" = {{ dictionary = \"members\", probability = 0.5 }}\n\
         \"body.scheduled_at\" = {{ dictionary = \"soon\", probability = 0.5 }}\n",
        members.join(", "),
        soon.join(", ")
    ));
    let path = dir.join("schemathesis.toml");
    std::fs::write(&path, text).expect("writing the schemathesis configuration");
    path
}

/// Runs schemathesis against `base` (an agent's API) in `dir`, bounded by
/// [`FUZZ_TIMEOUT`]: a run still going then is killed.
async fn fuzz(
    executable: &Path,
    config: &Path,
    base: &str,
    dir: &Path,
    seed: u64,
    examples: u32,
) -> FuzzRun {
    let log = dir.join("schemathesis.log");
    let output = std::fs::File::create(&log).expect("creating the schemathesis log");
    let mut command = tokio::process::Command::new(executable);
    command
        .arg("--config-file")
        .arg(config)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--auth", &format!("{API_USER}:{API_PASSWORD}")])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--checks", "all"])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", &seed.to_string()])
        // One request at a time: the state a request meets is the one the
        // previous requests left, so a failure replays with its seed.
        .args(["--workers", "1"])
        .args(["--request-timeout", &REQUEST_TIMEOUT_SECS.to_string()])
        .args(["--generation-database", "none"])
        .args(["--report", "ndjson,junit"])
        .arg("--report-dir")
        .arg(dir.join("schemathesis-report"))
        .args(["--output-truncate", "false"])
        .arg("--no-color")
        .current_dir(dir)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("the log file"))
        .stderr(output)
        .kill_on_drop(true);
    eprintln!(
        "api_fuzz: schemathesis run {base}/openapi.json --seed {seed} --max-examples {examples} \
         (MAINSTAY_FUZZ_SEED={seed} replays it)"
    );
    let started = Instant::now();
    let mut child = command.spawn().expect("starting schemathesis");
    let status = match tokio::time::timeout(FUZZ_TIMEOUT, child.wait()).await {
        Ok(status) => Some(status.expect("waiting for schemathesis")),
        Err(_) => {
            // One Python process (one worker, threads inside): SIGKILL by
            // its PID ends the run.
            let _ = child.kill().await;
            None
        }
    };
    FuzzRun {
        status,
        took: started.elapsed(),
        log,
    }
}

/// Undoes what a valid fuzzed request legitimately leaves behind and that
/// keeps the cluster from becoming healthy by itself: maintenance mode (no
/// failover after a crash drill) and a switchover scheduled for later.
/// Returns what was undone, or why it could not be (as a problem of the
/// run: these requests are valid and the API must take them).
async fn undo_legitimate_changes(h: &Harness) -> Result<Vec<String>, String> {
    let mut undone = Vec::new();
    let node = h.names()[0].clone();
    let client = api(h, &node).with_basic_auth(API_USER, API_PASSWORD);
    let config = client
        .get("/config")
        .await
        .map_err(|e| format!("GET /config on {node} after the fuzz: {e}"))?;
    if config.body["pause"] == true {
        let patch = serde_json::json!({"pause": false});
        let answer = client
            .request(hyper::Method::PATCH, "/config", Some(&patch))
            .await
            .map_err(|e| format!("PATCH /config {patch} on {node} after the fuzz: {e}"))?;
        if !answer.status.is_success() {
            return Err(format!(
                "PATCH /config {patch} on {node} after the fuzz: {}: {}",
                answer.status, answer.text
            ));
        }
        undone.push("pause: true (maintenance mode), set back to false".to_string());
    }
    let cancelled = client
        .request(hyper::Method::DELETE, "/switchover", None)
        .await
        .map_err(|e| format!("DELETE /switchover on {node} after the fuzz: {e}"))?;
    match cancelled.status.as_u16() {
        200 => undone.push("a pending switchover or failover, cancelled".into()),
        404 => {}
        other => {
            return Err(format!(
                "DELETE /switchover on {node} after the fuzz: {other}: {}",
                cancelled.text
            ));
        }
    }
    Ok(undone)
}

/// Polls until one leader runs as primary with every other node streaming
/// from it, and every agent answers `GET /cluster` and its health check
/// (`/primary` on the leader, `/replica` elsewhere) with 200; the leader,
/// or the last state seen after `timeout`.
async fn healthy_again(h: &Harness, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("nothing read yet");
    let dcs = h
        .cluster
        .dcs()
        .await
        .map_err(|e| format!("etcd client: {e}"))?;
    while Instant::now() < deadline {
        last = match healthy_now(h, &dcs).await {
            Ok(leader) => return Ok(leader),
            Err(why) => why,
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last)
}

async fn healthy_now(h: &Harness, dcs: &mainstay_dcs::EtcdDcs) -> Result<String, String> {
    use mainstay_core::PgRole;
    use mainstay_dcs::Dcs;
    let view = dcs
        .read_cluster()
        .await
        .map_err(|e| format!("etcd: {e:?}"))?;
    let described = mainstay_lab::demo::describe(&view);
    let leader = view
        .leader_status()
        .filter(|s| s.role == PgRole::Primary)
        .ok_or_else(|| format!("no leader running as primary: {described}"))?
        .name
        .clone();
    for name in h.names().iter().filter(|n| **n != leader) {
        let streaming = view.members.get(name).is_some_and(|m| {
            m.status.role == PgRole::Replica
                && m.status.streaming
                && m.status.following.as_deref() == Some(leader.as_str())
        });
        if !streaming {
            return Err(format!("{name} does not stream from {leader}: {described}"));
        }
    }
    for name in h.names() {
        let check = if name == leader {
            "/primary"
        } else {
            "/replica"
        };
        let answer = api(h, &name)
            .get(check)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        if answer.status.as_u16() != 200 {
            return Err(format!(
                "{name} answers {check} with {}: {described}",
                answer.status
            ));
        }
        if cluster_doc(h, &name).await.is_none() {
            return Err(format!("{name} does not answer GET /cluster with 200"));
        }
    }
    Ok(leader)
}

/// Lines of the agents' logs that say a task panicked or a handler hit a
/// bug (the API answers 500 for those; the HA loop's tasks would die).
fn panics_in_logs(h: &Harness) -> Vec<String> {
    h.names()
        .iter()
        .flat_map(|name| {
            h.agent_log(name)
                .lines()
                .filter(|l| l.contains("panicked") || l.contains("BUG:"))
                .map(|l| format!("{name}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn schemathesis_finds_the_api_true_to_its_openapi_document_and_the_cluster_survives() {
    let (executable, version) = match schemathesis() {
        Ok(found) => found,
        Err(why) => {
            skip(&why);
            return;
        }
    };
    cluster_test(async {
        let mut h = Harness::start("api-fuzz", 3);
        let leader = h.healthy(Duration::from_secs(60)).await;
        wait_code(&h, &leader, "/primary", 200, Duration::from_secs(10)).await;
        for node in h.names().iter().filter(|n| **n != leader) {
            wait_code(&h, node, "/replica", 200, Duration::from_secs(10)).await;
        }
        // The leader: its crash drill and restart run for real, and after
        // the first switchover it is a replica that re-clones.
        let i = h.cluster.node_index(&leader).unwrap();
        let base = format!(
            "http://{}:{}",
            h.cluster.nodes[i].host, h.cluster.nodes[i].api_port
        );
        let seed = env_number("MAINSTAY_FUZZ_SEED", DEFAULT_SEED);
        let examples = env_number("MAINSTAY_FUZZ_EXAMPLES", DEFAULT_EXAMPLES);
        eprintln!("api_fuzz: {version} against {leader} (the leader)");
        let config = write_config(&h, &h.dir);
        let run = fuzz(&executable, &config, &base, &h.dir, seed, examples).await;
        eprintln!(
            "api_fuzz: schemathesis {} after {:?}",
            if run.passed() { "passed" } else { "FAILED" },
            run.took
        );

        // The cluster must come back on its own once the fuzz stops.
        let mut problems = Vec::new();
        if !run.passed() {
            problems.push(run.report());
        }
        match undo_legitimate_changes(&h).await {
            Ok(undone) => {
                for change in &undone {
                    eprintln!("api_fuzz: undone after the fuzz: {change}");
                }
            }
            Err(problem) => problems.push(problem),
        }
        let names = h.names();
        for (i, name) in names.iter().enumerate() {
            if !h.cluster.agent_running(i) {
                problems.push(format!("the agent of {name} died during the fuzz"));
            }
        }
        match healthy_again(&h, HEALTHY_AGAIN).await {
            Ok(leader) => eprintln!("api_fuzz: {leader} leads, every other node streams"),
            Err(last) => problems.push(format!(
                "the cluster is not healthy {HEALTHY_AGAIN:?} after the fuzz (one leader \
                 running as primary, every agent answering GET /cluster and /primary or \
                 /replica, every other node streaming from the leader); last seen: {last}"
            )),
        }
        let panics = panics_in_logs(&h);
        if !panics.is_empty() {
            problems.push(format!(
                "panics in the agents' logs:\n{}",
                panics.join("\n")
            ));
        }
        if !problems.is_empty() {
            h.dump_logs();
            panic!("{}", problems.join("\n\n"));
        }
        eprintln!("api_fuzz: passed ({:?} of fuzzing)", run.took);
        h.passed = true;
    });
}
