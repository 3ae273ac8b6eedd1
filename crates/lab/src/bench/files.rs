//! `mainstay bench files`: replicated directories (`[[replicate]]`) in the
//! namespace lab (three hosts, the REST API over HTTPS), in three parts per
//! run:
//! - lag: 1 MB files written on the leader's node one every 100 ms; for
//!   each file and each receiver, the time from the writer's close to the
//!   file's appearance under its name there (the receiver renames a
//!   complete, checked copy into place, so appearing means complete);
//! - resync: a tree of 10,000 files of mixed sizes replicated; the
//!   leader's host crashes 15 s later (an older tree's hashes are
//!   trusted and saved by then); on the new leader 1 % of the files change;
//!   the old leader comes back and resyncs. Mainstay's figure is the
//!   receiver's own account of that round (offer asked -> last write,
//!   its local tree hashed from a cold cache included); rsync's is
//!   `rsync -a --delete` of the same change, from the new leader's tree
//!   into a copy of the old leader's tree as the crash left it;
//! - crash window: a writer in the leader's namespace writes 256 kB
//!   uploads in 64 kB pieces, ten a second, and prints each one it has
//!   closed; the leader's host crashes mid-stream. Counted: printed
//!   (acknowledged) uploads missing on the new leader, and files under a
//!   real name on any survivor whose bytes are not a whole upload (must
//!   be 0: the run fails otherwise). Then the old leader comes back: the
//!   files only it had are moved aside there (counted); an acknowledged
//!   upload neither on the new leader nor kept aside fails the run.
//!
//! Peak agent memory (VmHWM) is read before each crash and at the end.

use super::distribution;
use crate::replicated::{FilesLab, FilesOptions, content};
use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct FilesArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Files in the resync tree (1 % of them change).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(100..=1_000_000))]
    pub tree_files: u32,
    /// 1 MB files written for the lag figure.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub stream_files: u32,
    /// Where the clusters live (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep each run's directory instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// One run's figures.
pub struct FilesRun {
    /// One per (file, receiver).
    pub lag_ms: Vec<u64>,
    pub resync_mainstay_ms: u64,
    pub resync_rsync_ms: u64,
    pub resync_files_mainstay: u64,
    pub resync_files_rsync: u64,
    pub tree_bytes: u64,
    pub acked_uploads: usize,
    pub missing_after_crash: usize,
    /// Files the old leader, back as a receiver, moved aside.
    pub kept_aside_after_crash: usize,
    pub agent_peak_rss: u64,
}

const STREAM_FILE: usize = 1 << 20;
/// How long the tree stands, replicated, before the crash.
const TREE_AGE: Duration = Duration::from_secs(15);
const UPLOAD: usize = 256 << 10;

pub async fn run(args: FilesArgs) -> ExitCode {
    if let Some(why) = unavailable() {
        eprintln!("error: bench files: {why}");
        return ExitCode::from(1);
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let (tree_files, stream_files) = (args.tree_files as usize, args.stream_files as usize);
    let results = super::each_run(
        args.runs,
        "files",
        args.dir.as_deref(),
        args.keep,
        move |dir| one_run_in_lab(dir, &exe, tree_files, stream_files),
        |r| {
            let lag = distribution(&r.lag_ms);
            format!(
                "lag median {} ms, max {} ms; resync of {} changed files in {} ms (rsync: {} files, \
                 {} ms); {} of {} acknowledged uploads missing after the crash, {} files kept \
                 aside on the old leader; agent peak {:.1} MB",
                lag["median"],
                lag["max"],
                r.resync_files_mainstay,
                r.resync_mainstay_ms,
                r.resync_files_rsync,
                r.resync_rsync_ms,
                r.missing_after_crash,
                r.acked_uploads,
                r.kept_aside_after_crash,
                r.agent_peak_rss as f64 / 1e6
            )
        },
    )
    .await;
    let results = match results {
        Ok(results) => results,
        Err(code) => return code,
    };
    let report = report(&results, tree_files, stream_files);
    println!(
        "files ({} runs): lag p50 {} ms, p99 {} ms; resync {} ms (rsync -a --delete: {} ms); \
         {} acknowledged uploads missing after a crash; agent peak {:.1} MB",
        results.len(),
        report["lag_ms"]["p50"],
        report["lag_ms"]["p99"],
        report["resync_ms"]["mainstay"],
        report["resync_ms"]["rsync"],
        report["files_missing_after_crash"],
        report["agent_peak_rss_bytes"].as_u64().unwrap_or(0) as f64 / 1e6,
    );
    if args.json {
        println!("{report}");
    }
    ExitCode::SUCCESS
}

/// Why the lab cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    mainstay_testkit::netns::unavailable().or_else(|| {
        for tool in ["rsync", "python3", "openssl"] {
            let found = std::process::Command::new(tool)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok();
            if !found {
                return Some(format!("{tool} is not installed: run scripts/setup.sh"));
            }
        }
        None
    })
}

/// The `p`th percentile (nearest rank) of `values`.
pub fn percentile(values: &[u64], p: f64) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn report(results: &[FilesRun], tree_files: usize, stream_files: usize) -> serde_json::Value {
    let lags: Vec<u64> = results.iter().flat_map(|r| r.lag_ms.clone()).collect();
    let median = |f: &dyn Fn(&FilesRun) -> u64| -> u64 {
        distribution(&results.iter().map(f).collect::<Vec<_>>())["median"]
            .as_u64()
            .unwrap_or(0)
    };
    serde_json::json!({
        "lag_ms": {
            "p50": percentile(&lags, 50.0),
            "p99": percentile(&lags, 99.0),
            "max": lags.iter().max().copied().unwrap_or(0),
            "samples": lags.len(),
        },
        "resync_ms": {
            "mainstay": median(&|r| r.resync_mainstay_ms),
            "rsync": median(&|r| r.resync_rsync_ms),
        },
        "resync_files": {
            "mainstay": median(&|r| r.resync_files_mainstay),
            "rsync": median(&|r| r.resync_files_rsync),
        },
        "files_missing_after_crash": results.iter().map(|r| r.missing_after_crash).sum::<usize>(),
        "acknowledged_uploads": results.iter().map(|r| r.acked_uploads).sum::<usize>(),
        "kept_aside_after_crash": results.iter().map(|r| r.kept_aside_after_crash).sum::<usize>(),
        "agent_peak_rss_bytes": results.iter().map(|r| r.agent_peak_rss).max().unwrap_or(0),
        "runs": results.len(),
        "settings": {
            "hosts": 3,
            "transport": "the agents' REST API over HTTPS (lab CA), between network namespaces",
            "stream": format!("{stream_files} files of 1 MB, one every 100 ms"),
            "tree": format!("{tree_files} files of 0.5 kB to 1 MB ({} MB), the old leader crashes {} s after it is replicated, then 1 % changes on the new leader", results.first().map_or(0, |r| r.tree_bytes / 1_000_000), TREE_AGE.as_secs()),
            "uploads": "256 kB written in 64 kB pieces, 10 a second, by a process on the leader's host that the crash kills",
            "settle": "1s",
            "mainstay": env!("CARGO_PKG_VERSION"),
        }
    })
}

/// One run on a thread that lives in the lab's client namespace.
pub fn one_run_in_lab(
    dir: &Path,
    exe: &Path,
    tree_files: usize,
    stream_files: usize,
) -> Result<FilesRun, String> {
    let (lab, runtime) = super::client_of_new_lab(3)?;
    runtime.block_on(async {
        let mut lab = FilesLab::start(dir, lab, exe, 3, &FilesOptions::default())?;
        let result = measure(&mut lab, dir, tree_files, stream_files).await;
        lab.cluster.stop_all();
        result
    })
}

async fn measure(
    lab: &mut FilesLab,
    dir: &Path,
    tree_files: usize,
    stream_files: usize,
) -> Result<FilesRun, String> {
    let first = lab.healthy(Duration::from_secs(120)).await?;
    let l = lab.index(&first)?;
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let mut peak = 0;

    let lag_ms = stream_lag(lab, l, &others, stream_files)?;

    // Resync after a failback.
    let tree_bytes = write_tree(lab.root(l), tree_files)?;
    lab.caught_up(l, &others, true, Duration::from_secs(300))
        .await?;
    // A media store is not all written in the seconds before a crash:
    // give the tree the time a node needs to trust and save its hashes
    // (two seconds, then a save every ten), as an older tree would have.
    tokio::time::sleep(TREE_AGE).await;
    peak = peak.max((0..3).map(|i| lab.agent_peak_rss(i)).max().unwrap_or(0));
    lab.cluster
        .crash_host(l)
        .map_err(|e| format!("crashing {first}'s host: {e}"))?;
    let second = lab.new_leader(&first, Duration::from_secs(60)).await?;
    let n = lab.index(&second)?;
    let third = 3 - l - n;
    let changed = change_tree(lab.root(n), tree_files)?;
    lab.caught_up(n, &[third], true, Duration::from_secs(120))
        .await?;
    let copy = dir.join("rsync-copy");
    copy_tree(lab.root(l), &copy)?;
    lab.revive(l)?;
    lab.caught_up(n, &[third, l], false, Duration::from_secs(300))
        .await?;
    let back = lab.status(l).await?;
    let resync_mainstay_ms = back["last_change_ms"]
        .as_u64()
        .ok_or_else(|| format!("{first} reports no resync round: {back}"))?;
    let resync_files_mainstay = back["files_received"].as_u64().unwrap_or(0);
    if resync_files_mainstay != changed as u64 || back["moved_aside_files"] != 0 {
        return Err(format!(
            "{first} should have received exactly the {changed} changed files and moved nothing \
             aside: {back}"
        ));
    }
    let (resync_rsync_ms, resync_files_rsync) = rsync(lab.root(n), &copy)?;

    // The crash window.
    peak = peak.max((0..3).map(|i| lab.agent_peak_rss(i)).max().unwrap_or(0));
    let (acked, missing, kept_aside) = crash_window(lab, n).await?;
    peak = peak.max((0..3).map(|i| lab.agent_peak_rss(i)).max().unwrap_or(0));
    Ok(FilesRun {
        lag_ms,
        resync_mainstay_ms,
        resync_rsync_ms,
        resync_files_mainstay,
        resync_files_rsync,
        tree_bytes,
        acked_uploads: acked,
        missing_after_crash: missing,
        kept_aside_after_crash: kept_aside,
        agent_peak_rss: peak,
    })
}

/// Writes `count` 1 MB files on the source, one every 100 ms, while this
/// thread watches the receivers: close -> visible there, per file and
/// receiver.
fn stream_lag(
    lab: &FilesLab,
    source: usize,
    receivers: &[usize],
    count: usize,
) -> Result<Vec<u64>, String> {
    let written = lab.root(source).join("stream");
    std::fs::create_dir_all(&written).map_err(|e| e.to_string())?;
    let closed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let closed = closed.clone();
        std::thread::spawn(move || -> Result<(), String> {
            for k in 0..count {
                let bytes = content(k as u64, STREAM_FILE);
                std::fs::write(written.join(format!("{k:05}")), bytes)
                    .map_err(|e| e.to_string())?;
                mainstay_core::poison::lock(&closed).push(Instant::now());
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        })
    };
    let copies: Vec<PathBuf> = receivers
        .iter()
        .map(|&r| lab.root(r).join("stream"))
        .collect();
    let mut pending: BTreeSet<(usize, usize)> = (0..count)
        .flat_map(|k| (0..copies.len()).map(move |r| (k, r)))
        .collect();
    let mut lags = Vec::new();
    let deadline =
        Instant::now() + Duration::from_millis(100) * count as u32 + Duration::from_secs(60);
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(format!(
                "{} of {} copies of the stream still missing after 60 s",
                pending.len(),
                count * copies.len()
            ));
        }
        let closed_now = mainstay_core::poison::lock(&closed).clone();
        let arrived: Vec<(usize, usize)> = pending
            .iter()
            .filter(|(k, r)| *k < closed_now.len() && copies[*r].join(format!("{k:05}")).exists())
            .copied()
            .collect();
        for (k, r) in arrived {
            lags.push(closed_now[k].elapsed().as_millis() as u64);
            pending.remove(&(k, r));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    writer
        .join()
        .map_err(|_| "the stream writer panicked".to_string())??;
    Ok(lags)
}

/// Test file `k`'s size: mostly small (thumbnails), some medium, a few up
/// to 1 MB.
fn tree_file_size(k: usize) -> usize {
    let r = (k.wrapping_mul(2_654_435_761)) % 1000;
    if r < 800 {
        512 + k.wrapping_mul(97) % 7_680
    } else if r < 980 {
        8_192 + k.wrapping_mul(7_919) % 122_880
    } else {
        131_072 + k.wrapping_mul(104_729) % 917_504
    }
}

fn tree_file(root: &Path, k: usize) -> PathBuf {
    root.join("tree")
        .join(format!("{:02}", k % 100))
        .join(format!("{k:06}"))
}

/// The tree's bytes.
fn write_tree(root: &Path, count: usize) -> Result<u64, String> {
    let mut bytes = 0;
    for k in 0..count {
        let path = tree_file(root, k);
        if k < 100 {
            std::fs::create_dir_all(path.parent().unwrap_or(root)).map_err(|e| e.to_string())?;
        }
        let size = tree_file_size(k);
        std::fs::write(&path, content(k as u64, size))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        bytes += size as u64;
    }
    Ok(bytes)
}

/// Rewrites 1 % of the tree with other bytes of the same size; how many.
fn change_tree(root: &Path, count: usize) -> Result<usize, String> {
    let mut changed = 0;
    for k in (0..count).step_by(100) {
        let path = tree_file(root, k);
        std::fs::write(&path, content(k as u64 + 1_000_000_007, tree_file_size(k)))
            .map_err(|e| format!("changing {}: {e}", path.display()))?;
        changed += 1;
    }
    Ok(changed)
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .map_err(|e| format!("cp: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("cp -a {} {} failed", from.display(), to.display()))
}

/// `rsync -a --delete from/ to/`: how long, how many files it sent.
fn rsync(from: &Path, to: &Path) -> Result<(u64, u64), String> {
    let started = Instant::now();
    let output = std::process::Command::new("rsync")
        .args(["-a", "--delete", "--stats"])
        .arg(format!("{}/", from.display()))
        .arg(format!("{}/", to.display()))
        .output()
        .map_err(|e| format!("rsync: {e}"))?;
    let elapsed = started.elapsed().as_millis() as u64;
    if !output.status.success() {
        return Err(format!(
            "rsync failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let stats = String::from_utf8_lossy(&output.stdout);
    let files = stats
        .lines()
        .find_map(|l| l.strip_prefix("Number of regular files transferred: "))
        .and_then(|n| n.trim().replace(',', "").parse().ok())
        .ok_or_else(|| format!("rsync's statistics did not say how many files it sent: {stats}"))?;
    Ok((elapsed, files))
}

/// The uploader that runs on the leader's host: each 256 kB upload
/// written in four pieces (bytes `k % 251`), its number printed once it
/// is closed. Bounded: 60 s or 100,000 uploads.
const UPLOADER: &str = r#"
import os, sys, time
root, size, piece = sys.argv[1], int(sys.argv[2]), 65536
os.makedirs(root, exist_ok=True)
started = time.monotonic()
for k in range(100000):
    if time.monotonic() - started > 60:
        break
    block = bytes([k % 251]) * piece
    with open(os.path.join(root, "upload-%06d" % k), "wb") as f:
        for _ in range(size // piece):
            f.write(block)
            f.flush()
            time.sleep(0.005)
    print(k, flush=True)
    time.sleep(0.08)
"#;

/// Uploads on leader `n` for 4 s, then its host crashes: (acknowledged
/// uploads, how many of them the new leader lacks, files moved aside on
/// the old leader once it is back). Fails if any survivor has a file under
/// a real name that is not a whole upload, or if an acknowledged upload is
/// neither on the new leader nor kept aside on the old one.
async fn crash_window(lab: &mut FilesLab, n: usize) -> Result<(usize, usize, usize), String> {
    let leader = lab.cluster.nodes[n].name.clone();
    let ns = lab.cluster.nodes[n].netns.clone().ok_or("not a lab node")?;
    let uploads = |root: &Path| root.join("uploads");
    let mut uploader = mainstay_testkit::netns::Lab::command(&ns, "python3")
        .arg("-c")
        .arg(UPLOADER)
        .arg(uploads(lab.root(n)))
        .arg(UPLOAD.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the uploader: {e}"))?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    lab.cluster
        .crash_host(n)
        .map_err(|e| format!("crashing {leader}'s host: {e}"))?;
    // The crash killed the uploader with everything else on the host.
    let _ = uploader.kill();
    let _ = uploader.wait();
    let acked: Vec<usize> = uploader
        .stdout
        .take()
        .map(|out| {
            std::io::BufReader::new(out)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default();
    if acked.is_empty() {
        return Err("the uploader acknowledged nothing in 4 s".into());
    }
    let next = lab.new_leader(&leader, Duration::from_secs(60)).await?;
    let m = lab.index(&next)?;
    // Once it is the source, no receiver round of its own is still
    // renaming files into place.
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.status(m).await.map(|s| s["role"] == "source") != Ok(true) {
        if Instant::now() > deadline {
            return Err(format!("{next} did not become the files' source"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for survivor in (0..3).filter(|&i| i != n) {
        let broken = partial_uploads(&uploads(lab.root(survivor)))?;
        if !broken.is_empty() {
            return Err(format!(
                "{} has files that are not whole uploads: {broken:?}",
                lab.cluster.nodes[survivor].name
            ));
        }
    }
    let there = uploads(lab.root(m));
    let name = |k: &usize| format!("upload-{k:06}");
    let missing: Vec<usize> = acked
        .iter()
        .filter(|k| !there.join(name(k)).exists())
        .copied()
        .collect();
    // The old leader comes back as a receiver: what only it had (the
    // uploads nobody received, the one cut mid-write) is moved aside
    // there, never deleted.
    lab.revive(n)?;
    let others: Vec<usize> = (0..3).filter(|&i| i != m).collect();
    lab.caught_up(m, &others, false, Duration::from_secs(120))
        .await?;
    let aside = crate::replicated::moved_aside(lab.root(n));
    let lost: Vec<&usize> = missing
        .iter()
        .filter(|k| {
            !aside
                .iter()
                .any(|p| p.ends_with(format!("uploads/{}", name(k))))
        })
        .collect();
    if !lost.is_empty() {
        return Err(format!(
            "acknowledged uploads {lost:?} are neither on {next} nor kept aside on {leader}"
        ));
    }
    Ok((acked.len(), missing.len(), aside.len()))
}

/// Files under a real name in `dir` whose bytes are not a whole upload
/// (hidden temporary names are the receiver's own and never a real name).
pub fn partial_uploads(dir: &Path) -> Result<Vec<String>, String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut broken = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(k) = name
            .strip_prefix("upload-")
            .and_then(|k| k.parse::<usize>().ok())
        else {
            continue;
        };
        let bytes = match std::fs::read(entry.path()) {
            Ok(bytes) => bytes,
            // Moved aside meanwhile (a receiver of a new source keeps what
            // only it has there): not a file under its real name any more.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("reading {name}: {e}")),
        };
        if bytes.len() != UPLOAD || bytes.iter().any(|b| *b as usize != k % 251) {
            broken.push(format!("{name} ({} bytes)", bytes.len()));
        }
    }
    Ok(broken)
}
