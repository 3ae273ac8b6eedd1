//! `mainstay bench proxy`: pgbench select-only (8 clients) against one
//! PostgreSQL directly, through mainstay's read-write proxy, and through
//! HAProxy in TCP mode, alternating in every run so that all three see the
//! same machine. Simple and prepared protocols; TPS per path and the ratio
//! of the medians to the direct path.

use super::distribution;
use crate::demo::{LocalCluster, SUPERUSER, SUPERUSER_PASSWORD};
use mainstay_core::PgRole;
use mainstay_dcs::Dcs;
use mainstay_testkit::{HAPROXY, Haproxy};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const PATHS: [&str; 3] = ["direct", "mainstay", "haproxy"];
const PROTOCOLS: [&str; 2] = ["simple", "prepared"];

#[derive(clap::Args, Debug)]
pub struct ProxyArgs {
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub runs: u32,
    /// Seconds of pgbench per path, protocol and run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=600))]
    pub seconds: u32,
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Where the cluster lives (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: ProxyArgs) -> ExitCode {
    let pgbench = mainstay_agent::config::default_bin_dir().join("pgbench");
    for (binary, package) in [
        (pgbench.as_path(), "postgresql-15"),
        (Path::new(HAPROXY), "haproxy"),
    ] {
        if !binary.exists() {
            eprintln!(
                "error: {} is missing: install it (apt-get install {package}, or scripts/setup.sh)",
                binary.display()
            );
            return ExitCode::from(1);
        }
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let dir = super::scratch_dir(args.dir.as_deref(), "proxy");
    let outcome = measure(&args, &dir, &exe, &pgbench).await;
    match outcome {
        Ok(report) => {
            let _ = std::fs::remove_dir_all(&dir);
            let (tps, prepared) = (&report["tps"], &report["tps_prepared"]);
            println!(
                "proxy ({} runs of {} s, pgbench -S, 8 clients), median TPS simple/prepared: \
                 direct {}/{}, mainstay {}/{} ({:.3} of direct), haproxy {}/{} ({:.3} of direct)",
                args.runs,
                args.seconds,
                tps["direct"]["median"],
                prepared["direct"]["median"],
                tps["mainstay"]["median"],
                prepared["mainstay"]["median"],
                report["ratio_to_direct"]["mainstay"]
                    .as_f64()
                    .unwrap_or(0.0),
                tps["haproxy"]["median"],
                prepared["haproxy"]["median"],
                report["ratio_to_direct"]["haproxy"].as_f64().unwrap_or(0.0),
            );
            if args.json {
                println!("{report}");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err} (files kept in {})", dir.display());
            ExitCode::from(1)
        }
    }
}

async fn measure(
    args: &ProxyArgs,
    dir: &Path,
    exe: &Path,
    pgbench: &Path,
) -> Result<serde_json::Value, String> {
    let mut cluster = LocalCluster::start(dir, 1, exe, "default")
        .map_err(|e| format!("starting the cluster: {e}"))?;
    let dcs = cluster.dcs().await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if Instant::now() > deadline {
            return Err("no primary within 60 s".into());
        }
        if let Ok(view) = dcs.read_cluster().await
            && view
                .leader_status()
                .is_some_and(|s| s.role == PgRole::Primary)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let node = &cluster.nodes[0];
    let ports = [node.pg_port, node.proxy_port, mainstay_testkit::free_port()];
    let mut haproxy = start_haproxy(&dir.join("haproxy"), ports[2], node.pg_port)?;
    // The proxy follows the leader key: wait until it routes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while pgbench_command(pgbench, ports[1], &["-c", "1", "-t", "1", "-S", "-n"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        // pgbench -S fails until the tables exist: create them directly.
        let _ = pgbench_command(pgbench, ports[0], &["-i", "-s", "1", "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if Instant::now() > deadline {
            return Err("pgbench through the mainstay proxy never succeeded".into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    haproxy.check_alive().map_err(|e| e.to_string())?;

    let mut tps = [
        [Vec::new(), Vec::new(), Vec::new()],
        [Vec::new(), Vec::new(), Vec::new()],
    ];
    let seconds = args.seconds.to_string();
    for run in 0..args.runs as usize {
        // Each run starts with a different path, so none always goes first.
        for k in 0..PATHS.len() {
            let path = (run + k) % PATHS.len();
            for (p, protocol) in PROTOCOLS.iter().enumerate() {
                let output = pgbench_command(
                    pgbench,
                    ports[path],
                    &[
                        "-S", "-n", "-c", "8", "-j", "2", "-T", &seconds, "-M", protocol,
                    ],
                )
                .output()
                .map_err(|e| format!("running pgbench: {e}"))?;
                let stdout = String::from_utf8_lossy(&output.stdout);
                let value = parse_tps(&stdout).ok_or_else(|| {
                    format!(
                        "pgbench against {} ({protocol}) reported no tps: {}{}",
                        PATHS[path],
                        stdout,
                        String::from_utf8_lossy(&output.stderr)
                    )
                })?;
                eprintln!(
                    "run {}/{}: {:>8} {protocol:>8}: {value:.0} tps",
                    run + 1,
                    args.runs,
                    PATHS[path]
                );
                tps[p][path].push(value.round() as u64);
            }
        }
    }
    haproxy.check_alive().map_err(|e| e.to_string())?;
    drop(haproxy);
    cluster.stop_all();

    let shape = |by_path: &[Vec<u64>; 3]| {
        let mut object = serde_json::Map::new();
        for (path, values) in PATHS.iter().zip(by_path) {
            object.insert(path.to_string(), distribution(values));
        }
        serde_json::Value::Object(object)
    };
    let ratios = |by_path: &[Vec<u64>; 3]| {
        let median = |values: &Vec<u64>| distribution(values)["median"].as_f64().unwrap_or(0.0);
        let direct = median(&by_path[0]).max(1.0);
        let ratio = |values| (median(values) / direct * 1000.0).round() / 1000.0;
        serde_json::json!({"mainstay": ratio(&by_path[1]), "haproxy": ratio(&by_path[2])})
    };
    Ok(serde_json::json!({
        "runs": args.runs,
        "tps": shape(&tps[0]),
        "ratio_to_direct": ratios(&tps[0]),
        "tps_prepared": shape(&tps[1]),
        "ratio_to_direct_prepared": ratios(&tps[1]),
        "settings": {
            "pgbench": "select-only (-S), 8 clients, 2 threads, scale 1",
            "seconds": args.seconds,
            "haproxy": "mode tcp, one server, no health check",
            "postgresql": "15",
            "mainstay": env!("CARGO_PKG_VERSION"),
        }
    }))
}

fn pgbench_command(pgbench: &Path, port: u16, args: &[&str]) -> Command {
    let mut command = Command::new(pgbench);
    command
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", SUPERUSER_PASSWORD)
        .env("PGCONNECT_TIMEOUT", "5")
        .stdin(Stdio::null());
    command
}

/// pgbench's "tps = 12345.6 (without initial connection time)".
fn parse_tps(output: &str) -> Option<f64> {
    output
        .lines()
        .find(|l| l.starts_with("tps = "))?
        .trim_start_matches("tps = ")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// HAProxy in TCP mode in front of one PostgreSQL, listening on `port`.
fn start_haproxy(dir: &Path, port: u16, server_port: u16) -> Result<Haproxy, String> {
    let config = format!(
        "global\n    maxconn 1000\n\ndefaults\n    mode tcp\n    timeout client 30m\n    \
         timeout connect 4s\n    timeout server 30m\n\nlisten postgres\n    bind \
         127.0.0.1:{port}\n    server pg 127.0.0.1:{server_port}\n"
    );
    let mut haproxy = Haproxy::start(dir, &config).map_err(|e| format!("starting haproxy: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        haproxy.check_alive().map_err(|e| e.to_string())?;
        if Instant::now() > deadline {
            return Err("haproxy does not listen after 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(haproxy)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tps_is_read_from_pgbench_output() {
        let output = "number of failed transactions: 0 (0.000%)\nlatency average = 0.3 ms\n\
                      initial connection time = 12.1 ms\ntps = 23456.789012 (without initial \
                      connection time)\n";
        assert_eq!(super::parse_tps(output), Some(23456.789012));
        assert_eq!(super::parse_tps("pgbench: error: connection failed"), None);
    }
}
