//! `mainstay init`: on each server, from a few flags, the node's commented
//! configuration, its certificate and the systemd unit, and the next
//! command to run. The first node makes the cluster's secrets and CA and
//! prints a one-line join token; the others take it (`--join`), so nothing
//! is copied by hand.
//!
//! - `token`: the join token (the shared part of the cluster);
//! - `pki`: the CA and each node's certificate;
//! - `render`: the files' text, pure;
//! - here: the flags, the refusals, and the writes.

#![forbid(unsafe_code)]

pub mod pki;
pub mod render;
pub mod token;

use render::Layout;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use token::{Member, Ports, Secrets, Token};

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// The first node: the cluster's name (letters, digits, - _ .). With
    /// --join: the cluster the token must be for.
    #[arg(long)]
    pub cluster: Option<String>,
    /// The other nodes: the token the first node's init printed.
    #[arg(long)]
    pub join: Option<String>,
    /// This node's name.
    #[arg(long, required_unless_present = "new_token", default_value = "")]
    pub name: String,
    /// This node's address (first node; a joining node's is in the token).
    #[arg(long)]
    pub address: Option<IpAddr>,
    /// The other data nodes, NAME=ADDRESS (first node only; repeat).
    #[arg(long = "peer", value_name = "NAME=ADDRESS")]
    pub peers: Vec<String>,
    /// The witness, NAME=ADDRESS (first node only).
    #[arg(long, value_name = "NAME=ADDRESS")]
    pub witness: Option<String>,
    /// The virtual IP the leader holds, e.g. 10.0.0.50/24 (first node only).
    #[arg(long, requires = "vip_interface")]
    pub vip: Option<String>,
    #[arg(long)]
    pub vip_interface: Option<String>,
    /// Where the configuration and certificates go.
    #[arg(long, default_value = "/etc/mainstay")]
    pub config_dir: PathBuf,
    /// Where PostgreSQL's and etcd's data go (postgresql/data, etcd/).
    #[arg(long, default_value = "/var/lib/mainstay")]
    pub data_root: PathBuf,
    /// Where the systemd unit goes.
    #[arg(long, default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Where the Debian package puts its units: when this node's is there,
    /// the agent runs as the package's `mainstay` account with that unit
    /// (init writes none, and gives the account the data and read access
    /// to the configuration).
    #[arg(long, default_value = "/lib/systemd/system")]
    pub packaged_unit_dir: PathBuf,
    /// Ports (first node only; every node uses the same).
    #[arg(long, default_value_t = 5432)]
    pub pg_port: u16,
    #[arg(long, default_value_t = 8008)]
    pub api_port: u16,
    #[arg(long, default_value_t = 2379)]
    pub etcd_client_port: u16,
    #[arg(long, default_value_t = 2380)]
    pub etcd_peer_port: u16,
    #[arg(long, default_value_t = 5000)]
    pub proxy_port: u16,
    #[arg(long, default_value_t = 5001)]
    pub read_only_port: u16,
    /// Replace an existing configuration (a dated copy of it is kept).
    #[arg(long)]
    pub force: bool,
    /// Print a new join token (valid 24 hours) from this node's files, to
    /// set up another server later; changes nothing.
    #[arg(long, conflicts_with_all = ["cluster", "join", "force"])]
    pub new_token: bool,
}

/// Runs `init`; every refusal says what and how to fix it, and changes
/// nothing.
pub fn run(args: InitArgs) -> ExitCode {
    let outcome = if args.new_token {
        new_token_from(&args.config_dir, unix_now())
    } else {
        init(&args, unix_now())
    };
    match outcome {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("error: {why}");
            ExitCode::from(2)
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn valid_name(what: &str, name: &str) -> Result<(), String> {
    if mainstay_agent::config::valid_name(name) {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?} is not a valid name: use 1-63 letters, digits, '-', '_' or '.'"
        ))
    }
}

fn member(flag: &str, text: &str, witness: bool) -> Result<Member, String> {
    let (name, address) = text.split_once('=').ok_or_else(|| {
        format!("{flag} {text:?} is not NAME=ADDRESS: write e.g. {flag} node2=10.0.0.2")
    })?;
    valid_name(flag, name)?;
    let address = address
        .parse()
        .map_err(|_| format!("{flag} {text:?}: {address:?} is not an IP address"))?;
    Ok(Member {
        name: name.to_string(),
        address,
        witness,
    })
}

/// A new cluster's token from the first node's flags.
fn new_token(args: &InitArgs, cluster: &str, now: u64) -> Result<Token, String> {
    valid_name("--cluster", cluster)?;
    let address = args.address.ok_or(
        "the first node needs --address: this server's address on the network the nodes share",
    )?;
    let mut members = vec![Member {
        name: args.name.clone(),
        address,
        witness: false,
    }];
    for peer in &args.peers {
        members.push(member("--peer", peer, false)?);
    }
    if let Some(witness) = &args.witness {
        members.push(member("--witness", witness, true)?);
    }
    for (i, m) in members.iter().enumerate() {
        if let Some(same) = members[..i]
            .iter()
            .find(|o| o.name == m.name || o.address == m.address)
        {
            return Err(format!(
                "{} and {} share a name or an address: each node has its own",
                same.name, m.name
            ));
        }
    }
    if members.len() % 2 == 0 {
        return Err(format!(
            "{} voters: an even number cannot tell a dead node from a cut cable (two \
             nodes lose their quorum with either); add --witness NAME=ADDRESS (a small \
             third machine: the bridge PC, a Raspberry Pi, a VM) or another --peer",
            members.len()
        ));
    }
    let vip = match (&args.vip, &args.vip_interface) {
        (Some(vip), Some(interface)) => {
            mainstay_agent::config::VipSpec::parse(vip, interface)
                .map_err(|why| format!("--vip {vip}: {why}"))?;
            Some((vip.clone(), interface.clone()))
        }
        _ => None,
    };
    let (ca_cert_pem, ca_key_pem) = pki::new_ca(cluster)?;
    Ok(Token {
        cluster: cluster.to_string(),
        expires: now + token::LIFETIME_SECS,
        members,
        ports: Ports {
            postgresql: args.pg_port,
            api: args.api_port,
            etcd_client: args.etcd_client_port,
            etcd_peer: args.etcd_peer_port,
            proxy: args.proxy_port,
            read_only_proxy: args.read_only_port,
        },
        vip,
        secrets: Secrets {
            superuser_password: secret()?,
            replication_password: secret()?,
            api_password: secret()?,
        },
        ca_cert_pem,
        ca_key_pem,
    })
}

/// 24 random bytes as 32 URL-safe characters.
fn secret() -> Result<String, String> {
    use base64::Engine;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("cannot read random bytes from /dev/urandom: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

fn init(args: &InitArgs, now: u64) -> Result<String, String> {
    valid_name("--name", &args.name)?;
    let (token, first) = match (&args.cluster, &args.join) {
        (Some(cluster), None) => (new_token(args, cluster, now)?, true),
        (expected, Some(line)) => {
            let first_only = [
                ("--peer", !args.peers.is_empty()),
                ("--witness", args.witness.is_some()),
                ("--vip", args.vip.is_some()),
            ];
            if let Some((flag, _)) = first_only.iter().find(|(_, set)| *set) {
                return Err(format!(
                    "{flag} is the first node's to give: a joining node takes the cluster \
                     from the token; leave it out"
                ));
            }
            let token = Token::decode(line, now)?;
            if let Some(expected) = expected
                && *expected != token.cluster
            {
                return Err(format!(
                    "this join token is for cluster {}, not {expected}: use the token printed \
                     by {expected}'s first node",
                    token.cluster
                ));
            }
            (token, false)
        }
        (None, None) => {
            return Err(
                "say which: --cluster NAME on the first node, or --join TOKEN (printed by the \
                 first node's init) on the others"
                    .into(),
            );
        }
    };
    let me = token.member(&args.name).cloned().ok_or_else(|| {
        let names: Vec<&str> = token.members.iter().map(|m| m.name.as_str()).collect();
        format!(
            "the token's cluster {} has no node {:?}: its nodes are {}; give one of them \
             as --name",
            token.cluster,
            args.name,
            names.join(", ")
        )
    })?;
    if let Some(address) = args.address
        && address != me.address
    {
        return Err(format!(
            "--address {address} is not {}'s address in the token ({}): leave it out or \
             check the name",
            me.name, me.address
        ));
    }
    let local = mainstay_sys::net::local_ip_addresses()
        .map_err(|e| format!("cannot list this host's addresses: {e}"))?;
    if !local.contains(&me.address) {
        return Err(format!(
            "{} is not an address of this host (it has {}): run init for {} on that server, \
             or give this server's address",
            me.address,
            local
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            me.name
        ));
    }
    let layout = Layout {
        config_dir: &args.config_dir,
        data_root: &args.data_root,
    };
    let config_path = layout.config();
    if config_path.exists() && !args.force {
        return Err(format!(
            "{} exists: this node was set up already. Nothing was changed; add --force to \
             replace it (a dated copy is kept)",
            config_path.display()
        ));
    }
    // The programs the configuration names, before anything is written.
    let needed: &[(&str, &str)] = if me.witness {
        &[("/usr/bin/etcd", "etcd-server")]
    } else {
        &[
            ("/usr/bin/etcd", "etcd-server"),
            ("/usr/lib/postgresql/15/bin/postgres", "postgresql-15"),
        ]
    };
    if let Some((path, package)) = needed.iter().find(|(p, _)| !Path::new(p).exists()) {
        return Err(format!(
            "{path} is not installed: apt-get install {package} first (nothing was written)"
        ));
    }
    let unit_name = if me.witness {
        "mainstay-witness.service"
    } else {
        "mainstay.service"
    };
    let runner = Runner::of(args, unit_name)?;
    let (cert, key) =
        pki::node_certificate(&token.cluster, &token.ca_key_pem, &me.name, me.address)?;
    let text = if me.witness {
        render::witness_config(&token, &me, &layout)
    } else {
        render::node_config(&token, &me, &layout)
    };
    write(&layout.ca(), &token.ca_cert_pem, 0o644)?;
    write(&layout.cert(), &cert, 0o644)?;
    write(&layout.key(), &key, 0o600)?;
    runner.share(&layout.key())?;
    runner.open_dir(&args.config_dir)?;
    if let Some(tls) = layout.key().parent() {
        runner.open_dir(tls)?;
    }
    // What is written must be what the agent accepts: checked before the
    // configuration goes in place (it names the certificates just written).
    let checked = if me.witness {
        mainstay_agent::config::WitnessConfig::parse(&config_path, &text).map(|_| ())
    } else {
        mainstay_agent::config::Config::parse(&config_path, &text).map(|_| ())
    };
    checked.map_err(|e| format!("the configuration made does not load (a bug): {e}"))?;
    let kept = keep_existing(&config_path, now)?;
    write(&config_path, &text, 0o600)?;
    runner.share(&config_path)?;
    match &runner {
        Runner::Root if !me.witness => prepare_data_root(&args.data_root)?,
        Runner::Root => {}
        Runner::Package { uid, gid, .. } => give_data_root(&args.data_root, *uid, *gid)?,
    }
    let shared = serde_json::to_string_pretty(&token).expect("a token serializes");
    write(&shared_file(&args.config_dir), &shared, 0o600)?;
    let unit_path = match &runner {
        Runner::Package { unit, .. } => unit.clone(),
        Runner::Root => {
            let program = std::env::current_exe()
                .map_err(|e| format!("cannot tell where this program is: {e}"))?;
            let unit_path = args.unit_dir.join(unit_name);
            write(
                &unit_path,
                &render::unit(&program, &config_path, me.witness, None),
                0o644,
            )?;
            unit_path
        }
    };

    let mut report = String::new();
    let shadow = args.unit_dir.join(unit_name);
    if matches!(runner, Runner::Package { .. }) && shadow.exists() {
        report += &format!(
            "warning: {} (an earlier init's) shadows the package's unit: remove it, then \
             systemctl daemon-reload\n",
            shadow.display()
        );
    }
    if let Some(kept) = kept {
        report += &format!("kept the previous configuration as {}\n", kept.display());
    }
    report += &format!(
        "wrote {} ({}), its certificate in {}, {} {}\n",
        config_path.display(),
        if me.witness { "witness" } else { "data node" },
        args.config_dir.join("tls").display(),
        match runner {
            Runner::Root => "and",
            Runner::Package { .. } => "for the package's unit",
        },
        unit_path.display()
    );
    report += &format!(
        "next on {}: mainstay check --config {} && systemctl daemon-reload && systemctl enable --now {unit_name}\n",
        me.name,
        config_path.display()
    );
    if first {
        let others: Vec<&Member> = token.members.iter().filter(|m| m.name != me.name).collect();
        if !others.is_empty() {
            report += "\nthe join token (a secret: it holds the cluster's keys; valid 24 hours, \
                       `mainstay init --new-token` prints another):\n";
            report += &format!("TOKEN='{}'\n", token.encode());
            for other in others {
                report += &format!(
                    "on {}: mainstay init --name {} --join \"$TOKEN\"\n",
                    other.name, other.name
                );
            }
        }
    }
    Ok(report.trim_end().to_string())
}

/// PostgreSQL's data directory, socket and log go in `<data_root>/postgresql`,
/// given to PostgreSQL's account when init runs as root; `data_root` itself
/// (and etcd's data beside) stays root's.
fn prepare_data_root(root: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let pg = root.join("postgresql");
    std::fs::create_dir_all(&pg).map_err(|e| format!("cannot create {}: {e}", pg.display()))?;
    if mainstay_sys::process::geteuid() != 0 {
        return Ok(());
    }
    let Ok(Some(postgres)) = mainstay_sys::user::by_name(c"postgres") else {
        return Err("there is no postgres account: apt-get install postgresql-15 first".into());
    };
    std::os::unix::fs::chown(&pg, Some(postgres.uid), Some(postgres.gid))
        .and_then(|()| std::fs::set_permissions(&pg, std::fs::Permissions::from_mode(0o750)))
        .map_err(|e| format!("cannot give {} to postgres: {e}", pg.display()))
}

/// The packaged agent runs as its own account: the data root (PostgreSQL's
/// data, etcd's) is that account's, 0750.
fn give_data_root(root: &Path, uid: u32, gid: u32) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    for dir in [root.to_path_buf(), root.join("postgresql")] {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::os::unix::fs::chown(&dir, Some(uid), Some(gid)))
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)))
            .map_err(|e| format!("cannot give {} to {PACKAGE_ACCOUNT}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The cluster's shared part, kept by `init` on every node (0600, like the
/// configuration that holds the same passwords).
fn shared_file(config_dir: &Path) -> PathBuf {
    config_dir.join("cluster.json")
}

fn new_token_from(config_dir: &Path, now: u64) -> Result<String, String> {
    let path = shared_file(config_dir);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        format!(
            "cannot read {}: {e}; run this on a node set up with `mainstay init` (or give              its --config-dir)",
            path.display()
        )
    })?;
    let mut token: Token = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not init's file: {e}", path.display()))?;
    token.expires = now + token::LIFETIME_SECS;
    Ok(token.encode())
}

/// An existing configuration (replaced with `--force`) is renamed to a
/// dated copy, never deleted.
fn keep_existing(path: &Path, now: u64) -> Result<Option<PathBuf>, String> {
    if !path.exists() {
        return Ok(None);
    }
    let kept = path.with_extension(format!("toml.{now}"));
    std::fs::rename(path, &kept)
        .map_err(|e| format!("cannot keep {} as {}: {e}", path.display(), kept.display()))?;
    Ok(Some(kept))
}

/// The account the packaged agent runs as.
pub const PACKAGE_ACCOUNT: &str = "mainstay";

/// Who runs the agent: root, with the unit init writes, or the package's
/// account, with the package's unit.
enum Runner {
    Root,
    Package { unit: PathBuf, uid: u32, gid: u32 },
}

impl Runner {
    fn of(args: &InitArgs, unit_name: &str) -> Result<Runner, String> {
        let unit = args.packaged_unit_dir.join(unit_name);
        if !unit.exists() {
            return Ok(Runner::Root);
        }
        match mainstay_sys::user::by_name(c"mainstay") {
            Ok(Some(account)) => {
                // Data of a node set up to run as root (PostgreSQL's
                // account owns it) is not the package account's to use.
                use std::os::unix::fs::MetadataExt;
                for dir in [
                    args.data_root.join("postgresql/data"),
                    args.data_root.join("etcd"),
                ] {
                    if let Ok(meta) = std::fs::metadata(&dir)
                        && meta.uid() != account.uid
                    {
                        return Err(format!(
                            "{} belongs to uid {}, not to the package's {PACKAGE_ACCOUNT} \
                             account the agent now runs as: `chown -R {PACKAGE_ACCOUNT}: {}` \
                             first (or move it aside). Nothing was written",
                            dir.display(),
                            meta.uid(),
                            args.data_root.display()
                        ));
                    }
                }
                Ok(Runner::Package {
                    unit,
                    uid: account.uid,
                    gid: account.gid,
                })
            }
            _ => Err(format!(
                "{} is installed but the {PACKAGE_ACCOUNT} account is missing (a half-installed \
                 package): run dpkg --configure mainstay, then init again. Nothing was written",
                unit.display()
            )),
        }
    }

    /// Lets the account reach the files of `dir` (0755: they keep their
    /// own modes).
    fn open_dir(&self, dir: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        if let Runner::Root = self {
            return Ok(());
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("cannot let {PACKAGE_ACCOUNT} into {}: {e}", dir.display()))
    }

    /// Gives a file the agent must read to its account's group (0640).
    fn share(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let Runner::Package { gid, .. } = self else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, None, Some(*gid))
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o640)))
            .map_err(|e| format!("cannot let {PACKAGE_ACCOUNT} read {}: {e}", path.display()))
    }
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    // Created with its mode: a key or a password is never readable by
    // others, not even for an instant.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.set_permissions(std::fs::Permissions::from_mode(mode))?;
            file.write_all(text.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests;
