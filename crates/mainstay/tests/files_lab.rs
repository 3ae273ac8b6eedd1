//! Replicated directories on real (namespaced) hosts, the REST API and so
//! the files over HTTPS (see `mainstay_lab::replicated`): the benchmark as
//! a user runs it (a stream of files, a failback that resends only what
//! changed, a crash in the middle of uploads that leaves no partial file
//! anywhere, the crashed leader back with what only it had moved aside),
//! and big trees in bounded memory: 100,000 small files, then one 2 GB
//! file. Needs root (network namespaces), rsync and python3
//! (`scripts/setup.sh`); without them it fails, unless
//! `MAINSTAY_ALLOW_SKIP=1` lets it say it was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_lab::replicated::{FilesLab, FilesOptions, content};
use mainstay_testkit::netns::{self, Lab};
use mainstay_testkit::skip;
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

fn runnable() -> bool {
    if let Some(why) = mainstay_lab::bench::files::unavailable() {
        skip(&why);
        return false;
    }
    prerequisites()
}

#[test]
fn the_files_benchmark_runs_and_a_failback_resends_only_what_changed() {
    if !runnable() {
        return;
    }
    // Alone, as every cluster test: the benchmark builds a lab of its own.
    cluster_test(async {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args([
                "bench",
                "files",
                "--runs",
                "1",
                "--tree-files",
                "2000",
                "--stream-files",
                "20",
                "--json",
            ])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // The run itself fails when a survivor holds a file under its real
        // name that is not a whole upload, or when the failback received
        // anything but the changed files or moved anything aside.
        assert!(output.status.success(), "{stdout}\n{stderr}");
        let last = stdout.lines().last().unwrap_or_default();
        let report: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(report["runs"], 1);
        assert_eq!(report["lag_ms"]["samples"], 40, "{last}");
        let p99 = report["lag_ms"]["p99"].as_u64().unwrap();
        assert!(p99 > 0 && p99 < 5_000, "{last}");
        assert_eq!(report["resync_files"]["mainstay"], 20, "{last}");
        assert_eq!(report["resync_files"]["rsync"], 20, "{last}");
        let acked = report["acknowledged_uploads"].as_u64().unwrap();
        let missing = report["files_missing_after_crash"].as_u64().unwrap();
        assert!(acked > 0 && missing <= acked, "{last}");
        // What the new leader lacks is kept aside on the old one (the run
        // fails otherwise): at least those files.
        let kept = report["kept_aside_after_crash"].as_u64().unwrap();
        assert!(kept >= missing, "{last}");
        assert!(report["agent_peak_rss_bytes"].as_u64().unwrap() > 0);
    });
}

/// Writes `size` bytes of test content to `path` in 8 MiB pieces: the
/// test's own memory stays small too.
fn write_big(path: &Path, size: u64) {
    let piece = content(2, 8 << 20);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut left = size;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        file.write_all(&piece[..n]).unwrap();
        left -= n as u64;
    }
    file.into_inner().unwrap().sync_all().unwrap();
}

/// Whether `path` holds what `write_big` wrote.
fn same_big(path: &Path, size: u64) -> bool {
    let piece = content(2, 8 << 20);
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut buffer = vec![0u8; piece.len()];
    let mut left = size;
    while left > 0 {
        let n = left.min(piece.len() as u64) as usize;
        if file.read_exact(&mut buffer[..n]).is_err() || buffer[..n] != piece[..n] {
            return false;
        }
        left -= n as u64;
    }
    file.read(&mut buffer).is_ok_and(|n| n == 0)
}

#[test]
fn a_hundred_thousand_files_and_a_2_gb_file_replicate_in_bounded_memory() {
    if !runnable() {
        return;
    }
    let lab = Lab::create(3).expect("building the network namespaces");
    netns::enter(&format!("/run/netns/{}", lab.client())).unwrap();
    cluster_test(async move {
        let mut h = LabFiles::start(lab, "files-big");
        let leader = h.lab.healthy(Duration::from_secs(120)).await.unwrap();
        let l = h.lab.index(&leader).unwrap();
        let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
        let root = h.lab.root(l).to_path_buf();

        const MANY: usize = 100_000;
        let started = Instant::now();
        for d in 0..1_000 {
            let dir = root.join("many").join(format!("{d:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..MANY / 1_000 {
                let k = d * (MANY / 1_000) + f;
                std::fs::write(dir.join(format!("{k:06}")), content(k as u64, 1_024)).unwrap();
            }
        }
        h.lab
            .caught_up(l, &others, true, Duration::from_secs(600))
            .await
            .unwrap();
        let many_took = started.elapsed();
        let peak_many = (0..3).map(|i| h.lab.agent_peak_rss(i)).max().unwrap();
        for &r in &others {
            let status = h.lab.status(r).await.unwrap();
            assert_eq!(status["files_received"], MANY as u64, "{status}");
            let copy = h.lab.root(r).join("many/999/099999");
            assert_eq!(std::fs::read(copy).unwrap(), content(99_999, 1_024));
        }

        const BIG: u64 = 2 << 30;
        let started = Instant::now();
        write_big(&root.join("big"), BIG);
        h.lab
            .caught_up(l, &others, true, Duration::from_secs(600))
            .await
            .unwrap();
        let big_took = started.elapsed();
        let peak_big = (0..3).map(|i| h.lab.agent_peak_rss(i)).max().unwrap();
        for &r in &others {
            assert!(same_big(&h.lab.root(r).join("big"), BIG));
        }
        eprintln!(
            "100,000 files of 1 kB on two receivers in {:.1} s, agents' peak {:.1} MB; \
             a 2 GiB file in {:.1} s, agents' peak {:.1} MB",
            many_took.as_secs_f64(),
            peak_many as f64 / 1e6,
            big_took.as_secs_f64(),
            peak_big as f64 / 1e6
        );
        // The tree's size shows in memory (its manifest, the hash cache,
        // the change log, an offer's JSON: a few kB a file at the peak, in
        // a debug build); a file's size never does: it is streamed in 64
        // KiB pieces at both ends.
        assert!(peak_many < 400_000_000, "{peak_many} bytes");
        // Loaded whole, the file alone would add 2,147 MB; the offers of
        // the 100,000-file tree while it changed add some tens.
        assert!(
            peak_big < peak_many + 200_000_000,
            "the 2 GiB file raised the peak from {peak_many} to {peak_big} bytes"
        );
        // The copies go at once: 6 GiB of memory (the lab lives on tmpfs).
        for i in 0..3 {
            let _ = std::fs::remove_file(h.lab.root(i).join("big"));
        }
        h.passed = true;
    });
}

/// The lab cluster, stopped when dropped; its files removed when the test
/// passed, kept (logs of every agent) when it failed.
struct LabFiles {
    lab: FilesLab,
    dir: std::path::PathBuf,
    passed: bool,
}

impl LabFiles {
    fn start(lab: Lab, name: &str) -> LabFiles {
        let dir = test_dir(name);
        let files = FilesLab::start(
            &dir,
            lab,
            Path::new(env!("CARGO_BIN_EXE_mainstay")),
            3,
            &FilesOptions::default(),
        )
        .unwrap();
        LabFiles {
            lab: files,
            dir,
            passed: false,
        }
    }
}

impl Drop for LabFiles {
    fn drop(&mut self) {
        self.lab.cluster.stop_all();
        if self.passed && std::env::var_os("MAINSTAY_KEEP_TEST_FILES").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("test files kept in {}", self.dir.display());
        }
    }
}
