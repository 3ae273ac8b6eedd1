//! Replicated directories (`[[replicate]]`) on a real three-node cluster:
//! files written on the leader's node appear on the others, deletions
//! follow, a replica's own writes are moved aside, and after a crash of
//! the leader the new leader is the source; the old one, back as a
//! replica, receives only what changed and keeps (moved aside) what only
//! it had.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_files::scan::{HashCache, scan};
use mainstay_files::{Excludes, Manifest};
use mainstay_lab::demo::LocalCluster;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn media(h: &Harness, node: &str) -> PathBuf {
    let i = h.cluster.node_index(node).unwrap();
    h.cluster.nodes[i].dir.join("media")
}

/// The tree as replicated: without the excluded `*.part` files.
fn tree(root: &Path) -> Manifest {
    let excludes = Excludes::new(&["*.part".to_string()]).unwrap();
    scan(root, &excludes, &mut HashCache::default())
        .map(|s| s.manifest)
        .unwrap_or_default()
}

/// Same entries, bytes, modes, owners and file mtimes.
fn same(a: &Manifest, b: &Manifest) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|((pa, ea), (pb, eb))| pa == pb && ea.same_content(eb) && ea.same_metadata(eb))
}

/// Waits (at most 30 s) until every node in `nodes` has the leader's tree.
async fn converged(h: &Harness, leader: &str, nodes: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let source = tree(&media(h, leader));
        let behind: Vec<&String> = nodes
            .iter()
            .filter(|n| !same(&source, &tree(&media(h, n))))
            .collect();
        if behind.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{behind:?} did not get {leader}'s tree within 30 s: {:?}",
            source.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Node `node`'s state of its first replicated directory.
async fn status(h: &Harness, node: &str) -> serde_json::Value {
    let answer = api(h, node).get("/replication/files").await.unwrap();
    answer.body["directories"][0].clone()
}

#[test]
fn directories_follow_the_leader_and_a_failback_keeps_what_only_the_old_leader_had() {
    cluster_test(async {
        let dir = test_dir("files");
        let mut cluster = LocalCluster::prepare(
            &dir,
            3,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            "default",
        )
        .unwrap();
        for i in 0..3 {
            let node = &cluster.nodes[i];
            cluster.nodes[i].extra_config = format!(
                "\n[[replicate]]\npath = \"{}\"\nexclude = [\"*.part\"]\nsettle = 0.2\nscan_interval = 5\n\n[alerts]\nreplicated_files_lag = 1\n",
                node.dir.join("media").display()
            );
            let node = &cluster.nodes[i];
            std::fs::write(&node.config, cluster.config_text(node, "default")).unwrap();
        }
        for i in 0..3 {
            cluster.start_agent(i).unwrap();
        }
        let mut h = Harness::adopt(cluster);
        let first = h.healthy(Duration::from_secs(90)).await;
        let others: Vec<String> = h.names().into_iter().filter(|n| *n != first).collect();
        let source = media(&h, &first);
        std::fs::create_dir_all(source.join("local_content/ab")).unwrap();
        std::fs::write(source.join("local_content/ab/photo"), vec![7u8; 1 << 20]).unwrap();
        std::fs::write(source.join("voice-note"), b"ogg bytes").unwrap();
        std::fs::write(source.join("upload.part"), b"excluded").unwrap();
        std::os::unix::fs::symlink("voice-note", source.join("alias")).unwrap();
        converged(&h, &first, &others).await;
        assert!(!media(&h, &others[0]).join("upload.part").exists());
        let status_first = status(&h, &first).await;
        assert_eq!(status_first["role"], "source", "{status_first}");
        let status_other = status(&h, &others[0]).await;
        assert_eq!(status_other["role"], "receiver", "{status_other}");
        assert_eq!(status_other["files_received"], 2, "{status_other}");
        // The source knows how far behind each receiver is: nowhere, once
        // each has told it (its next question, within a second).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let source_status = status(&h, &first).await;
            let receivers = source_status["receivers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let caught_up = receivers.len() == 2
                && receivers
                    .iter()
                    .all(|r| r["files_behind"] == 0 && r["seconds_behind"] == 0.0);
            if caught_up {
                break;
            }
            assert!(Instant::now() < deadline, "{source_status}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Every member's key says where its copy stands: /cluster and
        // `ctl list` show it.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let doc = cluster_doc(&h, &first).await.unwrap_or_default();
            let words: Vec<String> = doc["members"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| {
                    let files = m["files"].as_object().cloned().unwrap_or_default();
                    let word = files.values().next().and_then(|w| w.as_str()).unwrap_or("");
                    format!("{}={word}", m["name"].as_str().unwrap_or(""))
                })
                .collect();
            let expected: Vec<String> = h
                .names()
                .iter()
                .map(|n| format!("{n}={}", if *n == first { "source" } else { "in sync" }))
                .collect();
            if words == expected {
                break;
            }
            assert!(Instant::now() < deadline, "{words:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (code_list, listing, err) = run_ctl(&h, &first, &["list"]).await;
        assert_eq!(code_list, 0, "{err}");
        assert!(
            listing.contains(&format!("Files {first}: {} source", source.display())),
            "{listing}"
        );
        let metrics = api(&h, &first).get("/metrics").await.unwrap().text;
        let receiver_label = format!("receiver=\"{}\"", others[0]);
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("mainstay_replicated_files_behind{")
                    && l.contains(&receiver_label)
                    && l.ends_with(" 0")),
            "{metrics}"
        );
        let metrics = api(&h, &others[0]).get("/metrics").await.unwrap().text;
        assert!(
            metrics.lines().any(
                |l| l.starts_with("mainstay_replicated_received_files_total{") && l.ends_with(" 2")
            ),
            "{metrics}"
        );

        // A deletion on the leader is a deletion everywhere; a write on a
        // replica is moved aside there, not kept in the copy.
        std::fs::remove_file(source.join("voice-note")).unwrap();
        std::fs::write(media(&h, &others[0]).join("written-on-a-replica"), b"x").unwrap();
        converged(&h, &first, &others).await;
        let status_other = status(&h, &others[0]).await;
        assert_eq!(status_other["deleted"], 1, "{status_other}");
        assert_eq!(status_other["moved_aside_files"], 1, "{status_other}");
        let aside = h.cluster.nodes[h.cluster.node_index(&others[0]).unwrap()]
            .dir
            .join("media.moved-aside");
        let kept: Vec<PathBuf> = std::fs::read_dir(&aside)
            .unwrap()
            .map(|e| e.unwrap().path().join("written-on-a-replica"))
            .collect();
        assert!(kept.iter().any(|p| p.exists()), "{kept:?}");
        // ...and `ctl list` says so, with the count and size.
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (code_list, listing, err) = run_ctl(&h, &first, &["list"]).await;
            assert_eq!(code_list, 0, "{err}");
            let expected = format!(
                "Files {}: {} in sync, 1 moved aside (0.0 MB)",
                others[0],
                media(&h, &others[0]).display()
            );
            if listing.contains(&expected) {
                break;
            }
            assert!(Instant::now() < deadline, "{expected:?} not in {listing}");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // A receiver that falls behind raises an alert on the source, which
        // clears once it has caught up.
        let away = h.cluster.node_index(&others[1]).unwrap();
        assert!(h.cluster.stop_agent(away, Duration::from_secs(30)));
        std::fs::write(source.join("while-a-node-is-away"), b"x").unwrap();
        let files_alert = |doc: &serde_json::Value| -> Option<String> {
            doc["alerts"].as_array()?.iter().find_map(|a| {
                (a["alert"] == "replicated_files" && a["subject"] == others[1].as_str())
                    .then(|| a["message"].as_str().unwrap_or("").to_string())
            })
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let message = loop {
            let doc = api(&h, &first).get("/patroni").await.unwrap().body;
            if let Some(message) = files_alert(&doc) {
                break message;
            }
            assert!(
                Instant::now() < deadline,
                "no alert for {}: {doc}",
                others[1]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert!(message.contains("1 files"), "{message}");
        h.cluster.start_agent(away).unwrap();
        converged(&h, &first, &others).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let doc = api(&h, &first).get("/patroni").await.unwrap().body;
            if files_alert(&doc).is_none() {
                break;
            }
            assert!(Instant::now() < deadline, "the alert stays: {doc}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // The leader's node crashes; while it is down a file lands in its
        // copy (an upload after the last replication, as it were). The new
        // leader is the source; the old one, back, receives only what
        // changed and keeps its own file moved aside.
        let f = h.cluster.node_index(&first).unwrap();
        h.cluster.kill_node(f);
        std::fs::write(source.join("late-upload"), b"only on the old leader").unwrap();
        let second = h
            .wait_for("a new leader", Duration::from_secs(60), async |v| {
                v.leader_status()
                    .filter(|s| s.name != first && s.role == mainstay_core::PgRole::Primary)
                    .map(|s| s.name.clone())
            })
            .await;
        std::fs::write(media(&h, &second).join("after-the-failover"), b"new").unwrap();
        let third: Vec<String> = others.iter().filter(|n| **n != second).cloned().collect();
        converged(&h, &second, &third).await;
        h.cluster.start_agent(f).unwrap();
        converged(&h, &second, std::slice::from_ref(&first)).await;
        let back = status(&h, &first).await;
        assert_eq!(back["role"], "receiver", "{back}");
        assert_eq!(back["files_received"], 1, "only the changed file: {back}");
        assert_eq!(back["moved_aside_files"], 1, "{back}");
        assert_eq!(back["deleted"], 0, "{back}");
        let aside = h.cluster.nodes[f].dir.join("media.moved-aside");
        let kept: Vec<PathBuf> = std::fs::read_dir(&aside)
            .unwrap()
            .map(|e| e.unwrap().path().join("late-upload"))
            .filter(|p| p.exists())
            .collect();
        assert_eq!(kept.len(), 1, "the late upload was not kept aside");
        assert_eq!(std::fs::read(&kept[0]).unwrap(), b"only on the old leader");

        // The files are the API's to give only with its credentials, only
        // from the source, and only what it offers.
        let s = h.cluster.node_index(&second).unwrap();
        let with_auth = h.cluster.nodes[s].api();
        let photo = "/replication/files/0/file?path=local_content/ab/photo";
        assert_eq!(code(&h, &second, "GET", photo).await, 401);
        assert_eq!(
            code(&h, &second, "GET", "/replication/files/0/offer").await,
            401
        );
        let answer = with_auth.get(photo).await.unwrap();
        assert_eq!(answer.status, 200);
        assert_eq!(answer.text.len(), 1 << 20);
        // A cut transfer resumes past what it received.
        let rest = with_auth
            .get(&format!("{photo}&offset={}", (1 << 20) - 100))
            .await
            .unwrap();
        assert_eq!((rest.status.as_u16(), rest.text.len()), (200, 100));
        for (path, status) in [
            ("/replication/files/0/file?path=../node1/mainstay.toml", 400),
            ("/replication/files/0/file?path=upload.part", 404),
            ("/replication/files/0/file?path=alias", 404),
            ("/replication/files/0/file?path=local_content", 404),
            ("/replication/files/1/offer", 409),
            ("/replication/files/x/offer", 400),
        ] {
            let answer = with_auth.get(path).await.unwrap();
            assert_eq!(answer.status, status, "{path}: {}", answer.text);
        }
        let on_a_replica = h.cluster.nodes[f]
            .api()
            .get("/replication/files/0/offer")
            .await;
        assert_eq!(on_a_replica.unwrap().status, 409);
        h.passed = true;
    });
}
