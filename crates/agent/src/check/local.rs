//! This host: programs and their versions, the data directory's
//! permissions, free ports, disk space, the clock, the VIP's capabilities.

use super::access::{self, Account, Meta};
use super::{Finding, Severity};
use crate::config::{Config, WitnessConfig};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

/// Below this much free space on the data directory's file system (or a
/// tenth of it), the node is one burst of WAL away from stopping.
const LOW_DISK_BYTES: u64 = 1 << 30;

fn version_of(program: &Path, flag: &str) -> Option<String> {
    let output = Command::new(program).arg(flag).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.lines().next().map(|l| l.trim().to_string())
}

pub(super) fn postgres_binary(bin_dir: &Path) -> Finding {
    let postgres = bin_dir.join("postgres");
    match version_of(&postgres, "--version") {
        Some(version) if version.contains(" 15.") => {
            Finding::ok("postgresql", format!("{version} in {}", bin_dir.display()))
        }
        Some(version) => Finding::new(
            Severity::Warning,
            "postgresql",
            format!("{} says {version:?}", postgres.display()),
            "mainstay is built and tested for PostgreSQL 15",
            "apt-get install postgresql-15, or point postgresql.bin_dir at its bin directory"
                .into(),
        ),
        None => Finding::new(
            Severity::Blocking,
            "postgresql",
            format!("{} cannot be run", postgres.display()),
            "the agent runs initdb, postgres, pg_basebackup and pg_rewind from there",
            "apt-get install postgresql-15, or set postgresql.bin_dir".into(),
        ),
    }
}

pub(super) fn etcd_binary(binary: &Path) -> Finding {
    match version_of(binary, "--version") {
        Some(version) if version.contains("Version: 3.") => {
            Finding::ok("etcd", format!("{} ({version})", binary.display()))
        }
        Some(version) => Finding::new(
            Severity::Warning,
            "etcd",
            format!("{} says {version:?}", binary.display()),
            "mainstay is tested with etcd 3.4 and 3.5",
            "apt-get install etcd-server".into(),
        ),
        None => Finding::new(
            Severity::Blocking,
            "etcd",
            format!("{} cannot be run", binary.display()),
            "etcd.member = true: the agent runs this node's etcd member",
            "apt-get install etcd-server, or set etcd.bin".into(),
        ),
    }
}

fn stat(path: &Path) -> Option<Meta> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(Meta {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode(),
        is_dir: meta.is_dir(),
    })
}

pub(super) fn data_dir_access(pg: &mainstay_pg::PgSettings) -> Vec<Finding> {
    let agent_is_root = mainstay_sys::process::geteuid() == 0;
    let name = match &pg.run_as {
        Some(name) => name.clone(),
        None => match mainstay_sys::user::by_uid(mainstay_sys::process::geteuid()) {
            Ok(Some(user)) => user.name,
            _ => return vec![],
        },
    };
    let user = std::ffi::CString::new(name.clone())
        .ok()
        .and_then(|c| mainstay_sys::user::by_name(&c).ok().flatten());
    let Some(user) = user else {
        return vec![Finding::new(
            Severity::Blocking,
            "data_dir",
            format!("there is no account {name:?} to run PostgreSQL as"),
            "PostgreSQL refuses to run as root, so the agent runs it as postgresql.run_as",
            "apt-get install postgresql-15 (which makes the postgres account), or set \
             postgresql.run_as"
                .into(),
        )];
    };
    // A root agent switching to the account drops supplementary groups;
    // otherwise PostgreSQL runs with the agent's own.
    let mut groups = vec![user.gid];
    if !agent_is_root {
        groups.extend(own_groups());
    }
    let account = Account {
        name: user.name,
        uid: user.uid,
        groups,
        agent_is_root,
    };
    access::data_dir(&account, &pg.data_dir, stat)
}

/// This process's supplementary groups, from `/proc/self/status`.
fn own_groups() -> Vec<u32> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

pub(super) fn disk(dir: &Path) -> Finding {
    let Some(space) = crate::alerts::disk_space(dir) else {
        return Finding::new(
            Severity::Warning,
            "disk",
            format!("cannot tell the free space for {}", dir.display()),
            "a full disk stops PostgreSQL",
            "check that the path's parent exists".into(),
        );
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let what = format!(
        "{:.1} GiB free of {:.1} GiB for {}",
        gib(space.available),
        gib(space.total),
        dir.display()
    );
    if space.available < LOW_DISK_BYTES || space.available * 10 < space.total {
        Finding::new(
            Severity::Warning,
            "disk",
            what,
            "PostgreSQL stops when its disk fills (WAL grows while a replica is away)",
            "free space or give the data directory a larger file system".into(),
        )
    } else {
        Finding::ok("disk", what)
    }
}

pub(super) fn clock() -> Finding {
    match mainstay_sys::clock::state() {
        Ok(state) if state.synchronized => Finding::ok(
            "clock",
            format!(
                "synchronised (maximum error {} ms)",
                state.max_error_us / 1000
            ),
        ),
        Ok(_) => Finding::new(
            Severity::Warning,
            "clock",
            "the system clock is not synchronised".into(),
            "failover does not depend on wall clocks, but the history, scheduled switchovers, \
             logs and TLS certificates do, and nodes that disagree make incidents hard to read",
            "timedatectl set-ntp true (systemd-timesyncd), or install chrony".into(),
        ),
        Err(err) => Finding::new(
            Severity::Warning,
            "clock",
            format!("cannot read the clock's state: {err}"),
            "",
            String::new(),
        ),
    }
}

pub(super) fn vip(vip: &crate::vip::VipSpec) -> Vec<Finding> {
    let mut findings = Vec::new();
    match crate::vip::check_capabilities() {
        Ok(()) => findings.push(Finding::ok(
            "vip",
            "the agent may manage addresses (CAP_NET_ADMIN, CAP_NET_RAW)".into(),
        )),
        Err(err) => findings.push(Finding::new(
            Severity::Blocking,
            "vip",
            err.to_string(),
            "the leader adds the virtual IP and announces it",
            "run the agent with AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW (the packaged \
             unit does)"
                .into(),
        )),
    }
    let interface = Path::new("/sys/class/net").join(&vip.interface);
    if !interface.exists() {
        findings.push(Finding::new(
            Severity::Blocking,
            "vip",
            format!("there is no interface {:?} on this host", vip.interface),
            "the virtual IP is added on vip_interface",
            "set vip_interface to one of `ip -brief link`".into(),
        ));
    }
    findings
}

/// The addresses a data node listens on, each with the key that sets it.
pub(super) fn node_ports(config: &Config) -> Vec<(String, SocketAddr)> {
    let mut ports = vec![("api.listen".to_string(), config.api.listen)];
    for host in config.postgresql.listen_host.split(',') {
        let host = match host.trim() {
            "*" => "0.0.0.0",
            "localhost" => "127.0.0.1",
            other => other,
        };
        if let Ok(ip) = host.parse() {
            ports.push((
                "postgresql.port".into(),
                SocketAddr::new(ip, config.postgresql.port),
            ));
        }
    }
    for (key, listen) in [
        ("proxy.listen", config.proxy.listen),
        ("proxy.read_only_listen", config.proxy.read_only_listen),
    ] {
        if let Some(listen) = listen {
            ports.push((key.into(), listen));
        }
    }
    if let Some(member) = &config.etcd_member {
        ports.extend(member_ports(member));
    }
    ports
}

pub(super) fn witness_ports(config: &WitnessConfig) -> Vec<(String, SocketAddr)> {
    let mut ports = vec![("api.listen".to_string(), config.api.listen)];
    ports.extend(member_ports(&config.etcd_member));
    ports
}

fn member_ports(member: &mainstay_etcd_member::MemberSpec) -> Vec<(String, SocketAddr)> {
    [
        ("etcd.client_url", &member.client_url),
        ("etcd.peer_url", &member.peer_url),
    ]
    .into_iter()
    .filter_map(|(key, url)| {
        let address = url.split("://").nth(1)?.parse().ok()?;
        Some((key.to_string(), address))
    })
    .collect()
}

/// Binds each address for an instant: in use, or not this host's.
pub(super) fn ports(addresses: &[(String, SocketAddr)]) -> Vec<Finding> {
    addresses
        .iter()
        .map(
            |(key, address)| match std::net::TcpListener::bind(address) {
                Ok(_) => Finding::ok("ports", format!("{address} ({key}) is free")),
                Err(err) if err.kind() == std::io::ErrorKind::AddrInUse => Finding::new(
                    Severity::Blocking,
                    "ports",
                    format!("{address} ({key}) is in use"),
                    "the node must listen there",
                    format!(
                        "find the program with `ss -ltnp 'sport = :{}'` (a mainstay already \
                     running?), stop it, or change {key}",
                        address.port()
                    ),
                ),
                Err(err) if err.kind() == std::io::ErrorKind::AddrNotAvailable => Finding::new(
                    Severity::Blocking,
                    "ports",
                    format!("{} ({key}) is not an address of this host", address.ip()),
                    "a node listens on its own addresses",
                    format!("set {key} to one of `ip -brief address`"),
                ),
                Err(err) => Finding::new(
                    Severity::Warning,
                    "ports",
                    format!("cannot try {address} ({key}): {err}"),
                    "",
                    String::new(),
                ),
            },
        )
        .collect()
}
