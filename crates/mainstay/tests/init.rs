//! Three bare (namespaced) hosts, two data nodes and a witness, set up
//! with nothing but `mainstay init` (the first node's flags, then the join
//! token on the others) and started from what it wrote: etcd over TLS
//! with the certificates init made, the API over HTTPS, a write accepted
//! through the VIP. Needs root (network namespaces); without it the test
//! fails, unless `MAINSTAY_ALLOW_SKIP=1` lets it say it was skipped.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_testkit::netns::{self, Lab};
use mainstay_testkit::skip;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const VIP: &str = "10.213.0.50";

fn mainstay(ns: &str, args: &[&str]) -> Output {
    Lab::command(ns, env!("CARGO_BIN_EXE_mainstay"))
        .args(args)
        .output()
        .unwrap()
}

fn dirs(base: &Path, host: usize) -> [String; 4] {
    let host = base.join(format!("host{host}"));
    ["etc", "var", "units", "no-package"].map(|d| host.join(d).display().to_string())
}

fn init_args(dirs: &[String; 4]) -> Vec<&str> {
    vec![
        "init",
        "--config-dir",
        &dirs[0],
        "--data-root",
        &dirs[1],
        "--unit-dir",
        &dirs[2],
        // Whatever this machine has installed: init writes its own unit.
        "--packaged-unit-dir",
        &dirs[3],
    ]
}

/// Kills every process of the lab's hosts when dropped, test failed or not.
struct Hosts<'a> {
    lab: &'a Lab,
    children: Vec<Child>,
}

impl Drop for Hosts<'_> {
    fn drop(&mut self) {
        for i in 0..3 {
            let _ = mainstay_testkit::crash::crash_namespace(self.lab.host(i));
        }
        for child in &mut self.children {
            let _ = child.wait();
        }
    }
}

#[test]
fn three_bare_hosts_become_a_cluster_from_init_alone() {
    if let Some(why) = netns::unavailable() {
        skip(&why);
        return;
    }
    if !prerequisites() {
        return;
    }
    let _alone = alone();
    let lab = Lab::create(3).expect("building the network namespaces");
    netns::enter(&format!("/run/netns/{}", lab.client())).unwrap();
    let base: PathBuf = test_dir("init");
    std::fs::create_dir_all(&base).unwrap();
    let ips: Vec<String> = (0..3).map(|i| lab.host_ip(i).to_string()).collect();
    let started = Instant::now();

    // The first node: the cluster, its members and the ports (the lab's,
    // never the defaults).
    let first_dirs = dirs(&base, 0);
    let mut args = init_args(&first_dirs);
    let peer = format!("node2={}", ips[1]);
    let witness = format!("witness={}", ips[2]);
    let vip = format!("{VIP}/24");
    args.extend([
        "--cluster",
        "lab",
        "--name",
        "node1",
        "--address",
        &ips[0],
        "--peer",
        &peer,
        "--witness",
        &witness,
        "--vip",
        &vip,
        "--vip-interface",
        "eth0",
        "--pg-port",
        "15432",
        "--api-port",
        "18008",
        "--etcd-client-port",
        "12379",
        "--etcd-peer-port",
        "12380",
        "--proxy-port",
        "15000",
        "--read-only-port",
        "15001",
    ]);
    let out = mainstay(lab.host(0), &args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("TOKEN='"))
        .map(|t| t.trim_end_matches('\'').to_string())
        .unwrap_or_else(|| panic!("no token in {stdout}"));
    // The others join with the token; the wrong name is refused.
    for (host, name) in [(1, "node2"), (2, "witness")] {
        let host_dirs = dirs(&base, host);
        let mut args = init_args(&host_dirs);
        args.extend(["--name", name, "--join", &token]);
        let wrong = mainstay(lab.host(host), &{
            let mut wrong = args.clone();
            let at = wrong.len() - 3;
            wrong[at] = if name == "node2" { "witness" } else { "node2" };
            wrong
        });
        assert_eq!(
            wrong.status.code(),
            Some(2),
            "init for another host's name was accepted"
        );
        let out = mainstay(lab.host(host), &args);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let units = [
        "mainstay.service",
        "mainstay.service",
        "mainstay-witness.service",
    ];
    // The units init wrote are ones systemd reads without a complaint.
    for (host, unit) in units.iter().enumerate() {
        let path = Path::new(&dirs(&base, host)[2]).join(unit);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("KillMode=mixed") && text.contains("Type=notify"),
            "{text}"
        );
        let verify = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze (Debian's systemd package) runs");
        let complaints = String::from_utf8_lossy(&verify.stderr);
        assert!(
            verify.status.success() && complaints.trim().is_empty(),
            "systemd-analyze verify {}: {complaints}",
            path.display()
        );
    }
    // node1's agent talks to systemd as under Type=notify with a watchdog.
    let notify_path = base.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();

    // Started as the units would start them.
    let mut hosts = Hosts {
        lab: &lab,
        children: Vec::new(),
    };
    for (host, command) in [(0, "agent"), (1, "agent"), (2, "witness")] {
        let config = Path::new(&dirs(&base, host)[0]).join("mainstay.toml");
        let log = std::fs::File::create(base.join(format!("host{host}.log"))).unwrap();
        let mut child = Lab::command(lab.host(host), env!("CARGO_BIN_EXE_mainstay"));
        mainstay_sys::process::signal_on_parent_death(&mut child, libc::SIGTERM);
        if host == 0 {
            child
                .env("NOTIFY_SOCKET", &notify_path)
                .env("WATCHDOG_USEC", "2000000");
        }
        hosts.children.push(
            child
                .args([command, "--config"])
                .arg(&config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    // The first write accepted through the VIP, with the superuser init made.
    let config =
        mainstay_agent::config::Config::load(&Path::new(&first_dirs[0]).join("mainstay.toml"))
            .unwrap();
    let conninfo = format!(
        "host={VIP} port=15432 user=postgres password={} dbname=postgres connect_timeout=2",
        config.postgresql.superuser.password
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let client = loop {
        let attempt = async {
            let client = connect(&conninfo).await.map_err(|e| e.to_string())?;
            client
                .batch_execute("CREATE TABLE IF NOT EXISTS installed (at timestamptz); INSERT INTO installed VALUES (now())")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(client)
        };
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(attempt);
        match result {
            Ok(client) => break client,
            Err(e) => {
                if Instant::now() > deadline {
                    for host in 0..3 {
                        let log = std::fs::read_to_string(base.join(format!("host{host}.log")))
                            .unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        eprintln!(
                            "--- host{host} ---\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        );
                    }
                    panic!("no write through the VIP after 180 s: {e}");
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    drop(client);
    let mut said = Vec::new();
    let mut buffer = [0u8; 256];
    while !said.iter().any(|m: &String| m == "WATCHDOG=1") {
        let n = notify
            .recv(&mut buffer)
            .expect("node1's agent notifies systemd");
        said.push(String::from_utf8_lossy(&buffer[..n]).into_owned());
    }
    assert!(said[0].starts_with("READY=1\nSTATUS="), "{said:?}");
    eprintln!(
        "from the first init to the first write through the VIP: {} ms",
        started.elapsed().as_millis()
    );

    // ctl with the node's file: HTTPS with init's CA and credentials. The
    // first write may come before the witness's first member key.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_mainstay"))
            .args(["ctl", "--config"])
            .arg(Path::new(&first_dirs[0]).join("mainstay.toml"))
            .arg("list")
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{listing}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if ["node1", "node2", "witness"]
            .iter()
            .all(|name| listing.contains(name))
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ctl list lacks a member after 30 s: {listing}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(hosts);
    let _ = std::fs::remove_dir_all(&base);
}

/// `mainstay bench install` as a user runs it: the same set-up, then the
/// four failures of a two-server site on the cluster init made (TLS
/// everywhere), each of which must end as it should.
#[test]
fn the_install_benchmark_runs_and_every_case_ends_as_it_should() {
    if let Some(why) = netns::unavailable() {
        skip(&why);
        return;
    }
    if !prerequisites() {
        return;
    }
    let _alone = alone();
    let output = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .args(["bench", "install", "--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(last).unwrap();
    assert!(
        report["commands_per_node"].as_u64().unwrap() <= 3,
        "{report}"
    );
    assert!(
        report["install_to_first_write_ms"].as_u64().unwrap() < 600_000,
        "{report}"
    );
    for case in [
        "witness_down",
        "data_link_cut",
        "primary_cut_off",
        "primary_and_witness_down",
    ] {
        assert_eq!(report["scenarios"][case]["ok"], true, "{case}: {stdout}");
    }
}
