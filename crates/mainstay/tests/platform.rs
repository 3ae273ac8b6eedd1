//! The platform with the real programs, on real (namespaced) hosts: Synapse
//! from PyPI as a `with-leader` service, coturn from Debian everywhere, a
//! VIP, and a Matrix client that only knows the VIP (see
//! `mainstay_lab::platform`). Needs root, Synapse's virtualenv and coturn
//! (`scripts/setup.sh` installs both); without them it fails, unless
//! `MAINSTAY_ALLOW_SKIP=1` lets it say it was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::platform::{self, Platform, coturn, matrix, synapse};
use mainstay_testkit::netns::{self, Lab};
use mainstay_testkit::skip;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Keeps the test's files (logs of every agent, Synapse and coturn) when
/// the test fails, and removes them when it passed.
struct Files {
    dir: PathBuf,
    passed: bool,
}

impl Drop for Files {
    fn drop(&mut self) {
        if self.passed && std::env::var_os("MAINSTAY_KEEP_TEST_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}

fn runnable() -> bool {
    if let Some(why) = platform::unavailable() {
        skip(&why);
        return false;
    }
    prerequisites()
}

/// Every node's coturn pid, once each runs.
async fn coturn_pids(p: &Platform) -> Vec<i32> {
    let mut pids = Vec::new();
    for i in 0..p.cluster.nodes.len() {
        pids.push(
            p.running_pid(i, "coturn", Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    pids
}

/// Waits (at most 60 s) until a message is acknowledged through the VIP
/// after now.
async fn acked_again(sender: &matrix::Sender, after_what: &str) {
    let now = Instant::now();
    let deadline = now + Duration::from_secs(60);
    while sender.first_ack_after(now).is_none() {
        assert!(
            Instant::now() < deadline,
            "no message acknowledged through the VIP within 60 s after {after_what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn synapse_follows_the_leader_and_keeps_every_acknowledged_message() {
    if !runnable() {
        return;
    }
    let lab = Lab::create(3).expect("building the network namespaces");
    // This thread and its runtime live in the client namespace: the Matrix
    // client reaches the platform over the lab's bridge, through the VIP.
    netns::enter(&format!("/run/netns/{}", lab.client())).unwrap();
    cluster_test(async move {
        let mut files = Files {
            dir: test_dir("platform"),
            passed: false,
        };
        let mut p = Platform::start(
            &files.dir,
            lab,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            3,
        )
        .unwrap();
        let first = p.healthy(Duration::from_secs(120)).await.unwrap();
        p.synchronous(&first).await.unwrap();
        let crew = p.crew_client().await.unwrap();
        let room = crew.create_room("bridge").await.unwrap();

        // coturn runs on every node and answers STUN on each node's own
        // address; Synapse hands TURN clients every node's relay.
        let turn = coturn_pids(&p).await;
        for node in &p.cluster.nodes {
            let server = format!("{}:{}", node.host, coturn::PORT).parse().unwrap();
            let mapped = coturn::stun_binding(server, Duration::from_secs(2))
                .unwrap_or_else(|e| panic!("STUN to {}'s coturn: {e}", node.name));
            assert_eq!(mapped.ip().to_string(), "10.213.0.100", "{mapped}");
        }
        let uris = crew.turn_servers().await.unwrap();
        for node in &p.cluster.nodes {
            assert!(
                uris.iter().any(|u| u.contains(&node.host)),
                "{uris:?} lacks {}",
                node.host
            );
        }
        // Synapse runs on the leader only.
        let f = p.index(&first).unwrap();
        let synapse_first = p
            .running_pid(f, "synapse", Duration::from_secs(30))
            .await
            .unwrap();
        for i in (0..3).filter(|&i| i != f) {
            let status = p.service(i, "synapse").await.unwrap();
            assert_eq!(status["state"], "stopped", "{status}");
            assert!(!Platform::synapse_answers(&p.node_url(i)).await);
        }

        let sender = matrix::Sender::start(&crew, &room);
        tokio::time::sleep(Duration::from_secs(2)).await;

        // A planned switchover: Synapse stops on the old leader before it
        // starts on the new one; coturn is not touched anywhere.
        let second = p.cluster.nodes[(f + 1) % 3].name.clone();
        let s = p.index(&second).unwrap();
        let leader_api = p.cluster.nodes[f]
            .api()
            .with_timeout(Duration::from_secs(60));
        let switchover = serde_json::json!({ "leader": first, "candidate": second });
        let asked = leader_api.request(hyper::Method::POST, "/switchover", Some(&switchover));
        let (answer, gone) = tokio::join!(
            asked,
            platform::watch_until_gone(synapse_first, Duration::from_secs(60))
        );
        let answer = answer.unwrap();
        assert!(answer.status.is_success(), "{}", answer.text);
        let old_gone = gone.expect("the old leader's Synapse never stopped");
        let synapse_second = p
            .running_pid(s, "synapse", Duration::from_secs(60))
            .await
            .unwrap();
        let new_start = platform::started_at(synapse_second).unwrap();
        assert!(
            new_start > old_gone,
            "{second}'s Synapse started {:?} before {first}'s was gone",
            old_gone - new_start
        );
        let status = p.service(f, "synapse").await.unwrap();
        assert_eq!(status["state"], "stopped", "{status}");
        assert_eq!(
            coturn_pids(&p).await,
            turn,
            "coturn restarted in a switchover"
        );
        acked_again(&sender, "the switchover").await;

        // Synapse hangs (SIGSTOP): its /health check fails three times in
        // a row, the agent kills it (grace, then SIGKILL) and starts it
        // again on the same node.
        let restarts_before = p.service(s, "synapse").await.unwrap()["restarts"]
            .as_u64()
            .unwrap();
        mainstay_sys::process::kill(synapse_second, libc::SIGSTOP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let restarted = loop {
            let status = p.service(s, "synapse").await.unwrap();
            if status["restarts"].as_u64().unwrap() > restarts_before
                && status["state"] == "running"
                && status["pid"].as_i64() != Some(synapse_second as i64)
            {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "a hung Synapse was not restarted: {status}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(mainstay_testkit::crash::gone(synapse_second), "{restarted}");
        acked_again(&sender, "Synapse's restart").await;

        // An image uploaded through the client API is copied to the other
        // nodes' media stores ([[replicate]]) before the crash...
        let image: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let mxc = crew.upload("deck-plan.png", &image).await.unwrap();
        let media_id = mxc.rsplit('/').next().unwrap().to_string();
        let has_image = |i: usize| {
            let media = p.cluster.nodes[i].dir.join("synapse/media/local_content");
            mainstay_files::scan::scan(
                &media,
                &mainstay_files::Excludes::none(),
                &mut Default::default(),
            )
            .is_ok_and(|scan| {
                scan.manifest.iter().any(|(path, entry)| {
                    path.replace('/', "").ends_with(&media_id) && entry.size() == image.len() as u64
                })
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(0..3).all(has_image) {
            assert!(
                Instant::now() < deadline,
                "the image did not reach every node"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        // The leader's whole host loses power. Synapse answers on the new
        // leader; its copy started after the old one was gone.
        let crash = platform::crash_leader(&mut p, &sender).await.unwrap();
        // ... and downloads from the new leader, byte for byte.
        assert_eq!(crew.download(&mxc).await.unwrap(), image);
        assert_eq!(crash.old_leader, second);
        assert!(
            crash.gap_between_copies_ms > 0,
            "two Synapse copies at once"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        let log = sender.finish().await;
        let check = crew
            .with_timeout(Duration::from_secs(20))
            .check_room(&room, &log)
            .await
            .unwrap();
        // Synchronous mode: every acknowledged message is in the room, once.
        assert!(
            check.lost.is_empty(),
            "acknowledged but lost: {:?}",
            check.lost
        );
        assert_eq!(check.duplicates, 0);
        assert!(check.messages >= log.acked.len());
        let n = p.index(&crash.new_leader).unwrap();
        assert!(Platform::synapse_answers(&p.node_url(n)).await);
        eprintln!(
            "platform: {} messages acknowledged, {} failed requests; crash of {}: first message \
             {} ms after, Synapse started in {} ms on {}, {} ms after the old copy was gone",
            log.acked.len(),
            log.failed_requests,
            crash.old_leader,
            crash.unavailability.as_millis(),
            crash.synapse_start.as_millis(),
            crash.new_leader,
            crash.gap_between_copies_ms,
        );
        // coturn on the survivors never noticed.
        let survivors: Vec<usize> = (0..3).filter(|&i| i != s).collect();
        for i in survivors {
            assert_eq!(
                p.running_pid(i, "coturn", Duration::from_secs(5))
                    .await
                    .unwrap(),
                turn[i]
            );
        }
        p.cluster.stop_all();
        files.passed = true;
    });
}

/// `mainstay bench platform` as a user runs it: one run in synchronous
/// mode; its JSON line holds the figures the README quotes, and no
/// acknowledged message is lost.
#[test]
fn the_platform_benchmark_runs_and_loses_nothing_in_synchronous_mode() {
    if !runnable() {
        return;
    }
    // Alone, as every cluster test: the benchmark builds a lab of its own.
    cluster_test(async {
        // Its files go where the benchmark puts them (kept on failure).
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args([
                "bench", "platform", "--runs", "1", "--mode", "sync", "--json",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stdout}\n{stderr}");
        let last = stdout.lines().last().unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(report["runs"], 1);
        assert_eq!(report["lost_acked_messages"], 0, "{last}");
        assert_eq!(report["duplicates"], 0, "{last}");
        assert_eq!(report["overlapping_copies"], 0, "{last}");
        for key in ["message_unavailability_ms", "synapse_start_ms"] {
            let median = report[key]["median"].as_u64().unwrap();
            assert!(median > 0 && median < 60_000, "{key}: {last}");
        }
        assert!(report["failed_requests"].as_u64().is_some(), "{last}");
        let installed = synapse::version();
        assert!(!installed.is_empty());
        assert_eq!(report["settings"]["synapse"], installed);
    });
}

/// A `mainstay demo` child, stopped (SIGTERM, then SIGKILL) when dropped;
/// its agents stop with it.
struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = mainstay_sys::process::kill(self.0.id() as i32, libc::SIGTERM);
        for _ in 0..600 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The pid of the process whose command line holds every one of `parts`.
fn pid_with(parts: &[&str]) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        parts.iter().all(|p| cmdline.contains(p)).then_some(pid)
    })
}

/// `mainstay demo --with-synapse`, as the README tells a newcomer to run
/// it: Synapse answers beside the primary only, and when the leader's
/// agent is killed it stops there and starts beside the new primary, which
/// the demo's lines show.
#[test]
fn the_demo_runs_synapse_beside_the_primary_and_moves_it() {
    if synapse::venv().is_err() {
        skip("needs Synapse's virtualenv: run scripts/setup.sh");
        return;
    }
    if !prerequisites() {
        return;
    }
    cluster_test(async {
        let mut files = Files {
            dir: test_dir("demo"),
            passed: false,
        };
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args(["demo", "--with-synapse", "--dir"])
            .arg(&files.dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let _demo = Demo(child);
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let reader = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                mainstay_core::poison::lock(&reader).push(line);
            }
        });
        // "leader=node2 | ... node2=primary[synapse:running] ...": the
        // node whose Synapse runs beside its primary, other than `not`.
        let wait_synapse_on_primary = async |not: Option<&str>| -> String {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let found = mainstay_core::poison::lock(&lines)
                    .iter()
                    .rev()
                    .find_map(|l| {
                        let at = l.find("=primary[synapse:running]")?;
                        let name = l[..at].rsplit(' ').next()?.to_string();
                        (Some(name.as_str()) != not).then_some(name)
                    });
                if let Some(name) = found {
                    return name;
                }
                assert!(
                    Instant::now() < deadline,
                    "the demo never showed Synapse running beside a primary: {:?}",
                    mainstay_core::poison::lock(&lines)
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        };
        let first = wait_synapse_on_primary(None).await;
        let url_of = |node: &str| {
            mainstay_core::poison::lock(&lines)
                .iter()
                .find_map(|l| {
                    let rest = l.trim().strip_prefix(&format!("{node}: http://"))?;
                    Some(format!(
                        "http://{}",
                        rest.strip_suffix("/_matrix/client/versions")?
                    ))
                })
                .unwrap_or_else(|| panic!("no Synapse address printed for {node}"))
        };
        assert!(Platform::synapse_answers(&url_of(&first)).await);
        for other in ["node1", "node2", "node3"].iter().filter(|n| **n != first) {
            assert!(!Platform::synapse_answers(&url_of(other)).await);
        }
        let config = files.dir.join(&first).join("mainstay.toml");
        let agent = pid_with(&["agent", "--config", &config.display().to_string()])
            .expect("the leader's agent");
        mainstay_sys::process::kill(agent, libc::SIGKILL).unwrap();
        let second = wait_synapse_on_primary(Some(&first)).await;
        assert!(Platform::synapse_answers(&url_of(&second)).await);
        assert!(!Platform::synapse_answers(&url_of(&first)).await);
        files.passed = true;
    });
}
