//! `mainstay bench install`: three bare namespaced hosts (two data nodes
//! and a witness) brought to a cluster with a VIP by exactly the commands
//! the README lists (`mainstay init` with the first node's flags, then
//! with the join token on the others; `systemctl enable --now`, done here
//! by running the unit's `ExecStart` line as systemd would), then the four
//! failures of a two-server site, each with the time it took:
//! - `witness_down`: the witness's host dies; the leader keeps writing and
//!   raises an `etcd_member` alert (ms: until the alert);
//! - `data_link_cut`: the data nodes cannot reach each other, the witness
//!   reaches both, for 3 ttl; no failover (ms: the window);
//! - `primary_cut_off`: the primary's host reaches neither other host; the
//!   replica takes over (ms: until a write through the VIP lands there);
//! - `primary_and_witness_down`: both hosts die; for 4 ttl the replica
//!   stays a replica and says it has no quorum; both come back and the
//!   cluster heals (ms: the whole case).
//!
//! Reported: commands per node, first command to first write through the
//! VIP, the idle witness's memory (its process and its etcd member's).

use crate::bench::client_of_new_lab;
use mainstay_agent::api_client::ApiClient;
use mainstay_testkit::netns::Lab;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct InstallArgs {
    /// Print one JSON object as the last line of standard output.
    #[arg(long)]
    pub json: bool,
    /// Where the hosts' files live (default: /dev/shm when it exists).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the directory instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

const VIP: &str = "10.213.0.50";
const NAMES: [&str; 3] = ["node1", "node2", "witness"];
const WITNESS: usize = 2;
/// The default profile's lease.
const TTL: Duration = Duration::from_secs(4);
/// The lab's ports (never the defaults).
const PG_PORT: u16 = 15432;
const API_PORT: u16 = 18008;

pub struct Installed {
    pub commands_per_node: usize,
    pub install_to_first_write_ms: u64,
    pub witness_rss_bytes: u64,
    /// (name, ok, ms, what was seen)
    pub scenarios: Vec<(&'static str, bool, u64, String)>,
}

pub async fn run(args: InstallArgs) -> ExitCode {
    if let Some(why) = mainstay_testkit::netns::unavailable() {
        eprintln!("error: bench install: {why}");
        return ExitCode::from(1);
    }
    let exe = match crate::demo::own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let results = super::each_run(
        1,
        "install",
        args.dir.as_deref(),
        args.keep,
        move |dir| one_run(dir, &exe),
        |r: &Installed| {
            format!(
                "{} commands per node, first write through the VIP {} ms after the first \
                 command, witness {:.1} MB",
                r.commands_per_node,
                r.install_to_first_write_ms,
                r.witness_rss_bytes as f64 / 1e6
            )
        },
    )
    .await;
    let Ok(mut results) = results else {
        return ExitCode::from(1);
    };
    let r = results.remove(0);
    for (name, ok, ms, seen) in &r.scenarios {
        println!(
            "{name}: {} in {ms} ms: {seen}",
            if *ok { "ok" } else { "FAILED" }
        );
    }
    let all_ok = r.scenarios.iter().all(|s| s.1);
    if args.json {
        let scenarios: serde_json::Map<String, Value> = r
            .scenarios
            .iter()
            .map(|(name, ok, ms, _)| (name.to_string(), json!({"ok": ok, "ms": ms})))
            .collect();
        println!(
            "{}",
            json!({
                "commands_per_node": r.commands_per_node,
                "install_to_first_write_ms": r.install_to_first_write_ms,
                "witness_rss_bytes": r.witness_rss_bytes,
                "scenarios": scenarios,
            })
        );
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

struct Host {
    ns: String,
    ip: String,
    etc: PathBuf,
    var: PathBuf,
    units: PathBuf,
    log: PathBuf,
    process: Option<Child>,
}

/// The lab's hosts; every process in them is killed when dropped.
struct Site {
    lab: Lab,
    hosts: Vec<Host>,
}

impl Drop for Site {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            let _ = mainstay_testkit::crash::crash_namespace(&host.ns);
            if let Some(mut child) = host.process.take() {
                let _ = child.wait();
            }
        }
    }
}

impl Site {
    fn run(&self, i: usize, exe: &Path, args: &[&str]) -> Result<String, String> {
        let host = &self.hosts[i];
        let output = Lab::command(&host.ns, exe)
            .args(args)
            .output()
            .map_err(|e| format!("running mainstay on {}: {e}", NAMES[i]))?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        if !output.status.success() {
            return Err(format!(
                "`mainstay {}` on {} failed: {stdout}{}",
                args.first().unwrap_or(&""),
                NAMES[i],
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(stdout)
    }

    /// `systemctl enable --now`: the unit's ExecStart, as systemd runs it.
    fn start(&mut self, i: usize) -> Result<(), String> {
        let unit = if i == WITNESS {
            "mainstay-witness.service"
        } else {
            "mainstay.service"
        };
        let host = &mut self.hosts[i];
        let text = std::fs::read_to_string(host.units.join(unit))
            .map_err(|e| format!("{}'s unit: {e}", NAMES[i]))?;
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .ok_or_else(|| format!("{}'s unit has no ExecStart", NAMES[i]))?;
        let mut words = exec.split_whitespace();
        let program = words.next().unwrap_or_default();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&host.log)
            .map_err(|e| e.to_string())?;
        let mut command = Lab::command(&host.ns, program);
        mainstay_sys::process::signal_on_parent_death(&mut command, libc::SIGTERM);
        let child = command
            .args(words)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", NAMES[i]))?;
        host.process = Some(child);
        Ok(())
    }

    fn crash(&mut self, i: usize) {
        let _ = mainstay_testkit::crash::crash_namespace(&self.hosts[i].ns);
        if let Some(mut child) = self.hosts[i].process.take() {
            let _ = child.wait();
        }
    }
}

fn one_run(dir: &Path, exe: &Path) -> Result<Installed, String> {
    let (lab, runtime) = client_of_new_lab(3)?;
    let hosts = (0..3)
        .map(|i| {
            let base = dir.join(NAMES[i]);
            Host {
                ns: lab.host(i).to_string(),
                ip: lab.host_ip(i).to_string(),
                etc: base.join("etc"),
                var: base.join("var"),
                units: base.join("units"),
                log: base.join("mainstay.log"),
                process: None,
            }
        })
        .collect();
    let mut site = Site { lab, hosts };
    let mut commands = [0usize; 3];
    let started = Instant::now();
    let dirs = |site: &Site, i: usize| -> [String; 8] {
        let h = &site.hosts[i];
        [
            "--config-dir".into(),
            h.etc.display().to_string(),
            "--data-root".into(),
            h.var.display().to_string(),
            "--unit-dir".into(),
            h.units.display().to_string(),
            // Whatever this machine has installed: init writes its own unit.
            "--packaged-unit-dir".into(),
            h.units.join("no-package").display().to_string(),
        ]
    };
    let first_dirs = dirs(&site, 0);
    let (peer, witness, vip) = (
        format!("node2={}", site.hosts[1].ip),
        format!("witness={}", site.hosts[WITNESS].ip),
        format!("{VIP}/24"),
    );
    let mut first: Vec<&str> = vec!["init"];
    first.extend(first_dirs.iter().map(String::as_str));
    first.extend([
        "--cluster",
        "ship",
        "--name",
        "node1",
        "--address",
        &site.hosts[0].ip,
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
    let printed = site.run(0, exe, &first)?;
    commands[0] += 1;
    let token = printed
        .lines()
        .find_map(|l| l.strip_prefix("TOKEN='"))
        .map(|t| t.trim_end_matches('\'').to_string())
        .ok_or("node1's init printed no token")?;
    for i in [1, WITNESS] {
        let host_dirs = dirs(&site, i);
        let mut args: Vec<&str> = vec!["init"];
        args.extend(host_dirs.iter().map(String::as_str));
        args.extend(["--name", NAMES[i], "--join", &token]);
        site.run(i, exe, &args)?;
        commands[i] += 1;
    }
    for (i, count) in commands.iter_mut().enumerate() {
        site.start(i)?;
        *count += 1;
    }
    let config = mainstay_agent::config::Config::load(&site.hosts[0].etc.join("mainstay.toml"))
        .map_err(|e| e.to_string())?;
    let password = config.postgresql.superuser.password.clone();
    let (user, api_password) = config.api.basic.clone().ok_or("no API credentials")?;
    let ca = config.api.ca_file.clone().ok_or("no API CA")?;
    let apis: Vec<ApiClient> = (0..3)
        .map(|i| {
            ApiClient::new(&format!("https://{}:{API_PORT}", site.hosts[i].ip))
                .with_ca_file(&ca)
                .map(|c| {
                    c.with_basic_auth(&user, &api_password)
                        .with_timeout(Duration::from_secs(3))
                })
                .map_err(|e| e.to_string())
        })
        .collect::<Result<_, _>>()?;
    let vip_conninfo = conninfo(VIP, &password);
    runtime.block_on(write_at(&vip_conninfo, None, Duration::from_secs(300)))?;
    let install_to_first_write_ms = started.elapsed().as_millis() as u64;

    // The idle witness: its process and its etcd member.
    std::thread::sleep(Duration::from_secs(10));
    let witness_pid = site.hosts[WITNESS].process.as_ref().map_or(0, Child::id);
    let rss = |pid: i32| crate::replicated::proc_status_bytes(pid as u32, "VmRSS:");
    let own = rss(witness_pid as i32);
    let etcd: u64 = mainstay_testkit::crash::children_of(witness_pid as i32)
        .into_iter()
        .map(rss)
        .sum();
    eprintln!(
        "witness idle: {:.1} MB resident ({:.1} MB the witness, {:.1} MB its etcd member)",
        (own + etcd) as f64 / 1e6,
        own as f64 / 1e6,
        etcd as f64 / 1e6
    );
    let witness_rss_bytes = own + etcd;

    let mut scenarios = Vec::new();
    let check = Checks {
        apis: &apis,
        password: &password,
        ips: site.hosts.iter().map(|h| h.ip.clone()).collect(),
    };
    scenarios.push(runtime.block_on(witness_down(&mut site, &check))?);
    scenarios.push(runtime.block_on(data_link_cut(&mut site, &check))?);
    scenarios.push(runtime.block_on(primary_cut_off(&mut site, &check))?);
    scenarios.push(runtime.block_on(primary_and_witness_down(&mut site, &check))?);
    Ok(Installed {
        commands_per_node: commands.into_iter().max().unwrap_or(0),
        install_to_first_write_ms,
        witness_rss_bytes,
        scenarios,
    })
}

fn conninfo(host: &str, password: &str) -> String {
    format!(
        "host={host} port={PG_PORT} user=postgres password={password} dbname=postgres connect_timeout=2"
    )
}

struct Checks<'a> {
    apis: &'a [ApiClient],
    password: &'a str,
    ips: Vec<String>,
}

impl Checks<'_> {
    /// The leader as a data node's `/cluster` shows it, and that node's
    /// entry (alerts included).
    async fn leader(&self) -> Option<(usize, Value)> {
        for api in &self.apis[..2] {
            let Ok(answer) = api.get("/cluster").await else {
                continue;
            };
            let member = answer.body["members"]
                .as_array()?
                .iter()
                .find(|m| m["role"] == "leader" && m["state"] == "running")?
                .clone();
            let index = NAMES.iter().position(|n| member["name"] == *n)?;
            return Some((index, member));
        }
        None
    }

    /// Every data node running, the replica streaming from `leader`, and
    /// the witness listed (apart from the data nodes).
    async fn healthy(&self, timeout: Duration) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some((leader, _)) = self.leader().await
                && let Ok(answer) = self.apis[leader].get("/cluster").await
            {
                let members = answer.body["members"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let streaming = members.iter().filter(|m| m["state"] == "streaming").count();
                let witnesses = answer.body["witnesses"].as_array().map_or(0, Vec::len);
                if streaming == 1 && members.len() == 2 && witnesses == 1 {
                    return Some(leader);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        None
    }
}

/// Writes through `conninfo` until one commits (on node `on`, if given),
/// within `timeout`; returns the node that took it (from its data
/// directory's path: through the VIP, the server's address is the VIP's).
async fn write_at(conninfo: &str, on: Option<&str>, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = async {
            let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            client
                .batch_execute(
                    "CREATE TABLE IF NOT EXISTS installed (at timestamptz); \
                     INSERT INTO installed VALUES (now())",
                )
                .await
                .map_err(|e| e.to_string())?;
            let row = client
                .query_one("SELECT current_setting('data_directory')", &[])
                .await
                .map_err(|e| e.to_string())?;
            let data_dir: String = row.get(0);
            let node = NAMES
                .iter()
                .find(|n| {
                    Path::new(&data_dir)
                        .components()
                        .any(|c| c.as_os_str() == **n)
                })
                .map_or(data_dir.clone(), |n| n.to_string());
            Ok::<String, String>(node)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(server)) if on.is_none_or(|want| want == server) => return Ok(server),
            Ok(Ok(server)) => last = format!("the write landed on {server}"),
            Ok(Err(e)) => last = e,
            Err(_) => last = "no answer within 5 s".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!(
        "no write through {conninfo:?} within {timeout:?}: {last}"
    ))
}

type Case = (&'static str, bool, u64, String);

async fn witness_down(site: &mut Site, check: &Checks<'_>) -> Result<Case, String> {
    let (leader, _) = check.leader().await.ok_or("no leader before the case")?;
    let at = Instant::now();
    site.crash(WITNESS);
    let mut alerted = None;
    while at.elapsed() < Duration::from_secs(30) {
        if let Some((now, member)) = check.leader().await
            && now == leader
            && member["alerts"].to_string().contains("etcd member witness")
        {
            alerted = Some(at.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let vip = conninfo(VIP, check.password);
    let wrote = write_at(&vip, Some(NAMES[leader]), Duration::from_secs(10)).await;
    let same = check.leader().await.map(|l| l.0) == Some(leader);
    site.start(WITNESS)?;
    let back = check.healthy(Duration::from_secs(60)).await == Some(leader);
    let ok = alerted.is_some() && wrote.is_ok() && same && back;
    let ms = alerted.unwrap_or(at.elapsed()).as_millis() as u64;
    Ok((
        "witness_down",
        ok,
        ms,
        format!(
            "leader unchanged: {same}, writes go on: {}, alert after {ms} ms, healthy once it is back: {back}",
            wrote.is_ok()
        ),
    ))
}

async fn data_link_cut(site: &mut Site, check: &Checks<'_>) -> Result<Case, String> {
    let (leader, _) = check.leader().await.ok_or("no leader before the case")?;
    let at = Instant::now();
    site.lab.cut_between(0, 1).map_err(|e| e.to_string())?;
    tokio::time::sleep(TTL * 3).await;
    let same = check.leader().await.map(|l| l.0) == Some(leader);
    let vip = conninfo(VIP, check.password);
    let wrote = write_at(&vip, Some(NAMES[leader]), Duration::from_secs(5)).await;
    let ms = at.elapsed().as_millis() as u64;
    site.lab.heal(0);
    site.lab.heal(1);
    let back = check.healthy(Duration::from_secs(60)).await == Some(leader);
    Ok((
        "data_link_cut",
        same && wrote.is_ok() && back,
        ms,
        format!(
            "no failover: {same}, writes go on: {}, streaming again: {back}",
            wrote.is_ok()
        ),
    ))
}

async fn primary_cut_off(site: &mut Site, check: &Checks<'_>) -> Result<Case, String> {
    let (leader, _) = check.leader().await.ok_or("no leader before the case")?;
    let other = 1 - leader;
    let at = Instant::now();
    site.lab
        .cut_between(leader, other)
        .map_err(|e| e.to_string())?;
    site.lab
        .cut_between(leader, WITNESS)
        .map_err(|e| e.to_string())?;
    let vip = conninfo(VIP, check.password);
    let moved = write_at(&vip, Some(NAMES[other]), Duration::from_secs(60)).await;
    let ms = at.elapsed().as_millis() as u64;
    for host in [leader, other, WITNESS] {
        site.lab.heal(host);
    }
    let back = check.healthy(Duration::from_secs(90)).await == Some(other);
    Ok((
        "primary_cut_off",
        moved.is_ok() && back,
        ms,
        format!(
            "{} took over: {}, the old primary rejoined as a replica: {back}",
            NAMES[other],
            moved.is_ok()
        ),
    ))
}

async fn primary_and_witness_down(site: &mut Site, check: &Checks<'_>) -> Result<Case, String> {
    let (leader, _) = check.leader().await.ok_or("no leader before the case")?;
    let replica = 1 - leader;
    let at = Instant::now();
    site.crash(leader);
    site.crash(WITNESS);
    tokio::time::sleep(TTL * 4).await;
    let direct = conninfo(&check.ips[replica], check.password);
    let in_recovery = async {
        let (client, connection) = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
            .await
            .ok()?;
        tokio::spawn(connection);
        let row = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .ok()?;
        Some(row.get::<_, bool>(0))
    }
    .await;
    let status = check.apis[replica]
        .get("/patroni")
        .await
        .map(|a| a.text)
        .unwrap_or_default();
    let says = status.contains("no quorum");
    site.start(WITNESS)?;
    site.start(leader)?;
    let back = check.healthy(Duration::from_secs(120)).await.is_some();
    let ms = at.elapsed().as_millis() as u64;
    Ok((
        "primary_and_witness_down",
        in_recovery == Some(true) && says && back,
        ms,
        format!(
            "{} stayed a replica: {}, said it has no quorum: {says}, healthy once both were back: {back}",
            NAMES[replica],
            in_recovery == Some(true)
        ),
    ))
}
