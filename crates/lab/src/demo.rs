//! A whole cluster on one machine: one etcd and N agents, each with its own
//! PostgreSQL on free loopback ports. `mainstay demo` shows it to a human;
//! the integration tests and benchmarks drive the same `LocalCluster`.

use mainstay_core::{ClusterView, PgRole};
use mainstay_dcs::{Dcs, EtcdDcs, EtcdSettings};
use mainstay_sys::process;
use mainstay_testkit::{Etcd, free_port};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

pub const SUPERUSER: &str = "postgres";
pub const SUPERUSER_PASSWORD: &str = "demo-superuser-secret";
/// Credentials of the demo agents' REST API for unsafe methods (`mainstay ctl`).
pub const API_USER: &str = "mainstay";
pub const API_PASSWORD: &str = "demo-api-secret";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub nodes: u16,
    /// Where etcd, the configurations and the data directories go (must be
    /// new or empty). Default: a new directory under /tmp.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Timing profile of the agents: default or fast.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Run Synapse (from the virtualenv scripts/setup.sh makes, or
    /// MAINSTAY_SYNAPSE_VENV) as a `with-leader` service: it runs beside
    /// the primary and moves with it.
    #[arg(long)]
    pub with_synapse: bool,
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pg_port: u16,
    pub api_port: u16,
    /// The built-in read-write proxy: connect here to reach the primary.
    pub proxy_port: u16,
    /// The built-in read-only proxy: connect here to reach a replica.
    pub read_only_port: u16,
    /// Where its PostgreSQL and API are reached: 127.0.0.1, or its lab
    /// host's address.
    pub host: String,
    /// Its lab host (network namespace), if it runs in one.
    pub netns: Option<String>,
    data: PathBuf,
    /// The etcd endpoints its agent uses, when not the members' own (a
    /// relay in between).
    etcd_endpoints: Option<Vec<String>>,
    /// Lines at the end of this node's configuration (its own
    /// `[[service]]` sections, say).
    pub extra_config: String,
    /// Its API's TLS files, when it serves HTTPS.
    pub api_tls: Option<crate::certificates::ApiCertificates>,
    agent: Option<Child>,
}

impl Node {
    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }
    pub fn agent_log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres",
            self.host, self.pg_port
        )
    }
    /// A client of this node's REST API with the demo's credentials.
    pub fn api(&self) -> mainstay_agent::api_client::ApiClient {
        use mainstay_agent::api_client::ApiClient;
        let scheme = if self.api_tls.is_some() {
            "https"
        } else {
            "http"
        };
        let mut client = ApiClient::new(&format!("{scheme}://{}:{}", self.host, self.api_port));
        if let Some(tls) = &self.api_tls {
            // The lab made that CA a moment ago: failing to load it is a
            // bug, and an http client would only hide it.
            client = client.with_ca_file(&tls.ca).expect("the lab's CA loads");
        }
        client
            .with_basic_auth(API_USER, API_PASSWORD)
            .with_timeout(Duration::from_secs(5))
    }

    /// The postmaster's PID from `postmaster.pid`, if one runs.
    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        let pid: i32 = text.lines().next()?.trim().parse().ok()?;
        process::alive(pid).then_some(pid)
    }
}

pub struct LocalCluster {
    pub dir: PathBuf,
    pub cluster: String,
    /// One member on loopback, or one per lab host.
    pub etcd: Vec<Etcd>,
    pub nodes: Vec<Node>,
    exe: PathBuf,
    /// Lines placed at the top of every node's configuration.
    extra_config: String,
    /// Filesystems mounted for the nodes' data, unmounted once every
    /// process is gone.
    mounts: Vec<PathBuf>,
    /// With managed etcd: every node's name and address, whose agent runs
    /// that host's member (`etcd` is then empty).
    pub member_hosts: Vec<(String, String)>,
    /// The witness's host, when the lab has one.
    pub witness: Option<crate::witness::WitnessNode>,
    /// Dropped last: the namespaces go once their processes are gone.
    pub lab: Option<mainstay_testkit::netns::Lab>,
}

/// How to build a lab cluster.
pub struct LabOptions {
    pub hosts: usize,
    pub profile: String,
    /// Lines at the top of every configuration (e.g. `vip = ...`).
    pub extra_config: String,
    /// Each node's data directory on a filesystem of its own of this many
    /// MiB (a tmpfs), so that a test can fill one node's disk.
    pub disk_mib: Option<u64>,
    /// Per node, the etcd endpoints its agent uses instead of the members'
    /// own addresses (e.g. relays that add latency).
    pub etcd_endpoints: Option<Vec<Vec<String>>>,
    /// Per node (by index), lines at the end of its configuration.
    pub node_config: Vec<String>,
    /// The REST API over HTTPS, with a lab CA's certificate for every
    /// host's address.
    pub api_tls: bool,
    /// Each agent runs its host's etcd member itself (`[etcd] member =
    /// true`) instead of the lab starting etcd beside it.
    pub managed_etcd: bool,
    /// One more host runs `mainstay witness` (an etcd member, no
    /// PostgreSQL); needs `managed_etcd` and a lab of `hosts + 1`.
    pub witness: bool,
}

impl LabOptions {
    pub fn new(hosts: usize, profile: &str, extra_config: &str) -> LabOptions {
        LabOptions {
            hosts,
            profile: profile.into(),
            extra_config: extra_config.into(),
            disk_mib: None,
            etcd_endpoints: None,
            node_config: Vec::new(),
            api_tls: false,
            managed_etcd: false,
            witness: false,
        }
    }
}

/// Ports of every lab node (each host has its own addresses, so they are
/// the same on every host; none is a default port).
pub const LAB_PG_PORT: u16 = 15432;
pub const LAB_API_PORT: u16 = 18008;
pub const LAB_PROXY_PORT: u16 = 15000;
pub const LAB_READ_ONLY_PORT: u16 = 15001;
/// A managed etcd member's client and peer ports on every lab host.
pub const LAB_ETCD_CLIENT_PORT: u16 = 12379;
pub const LAB_ETCD_PEER_PORT: u16 = 12380;

/// `mainstay SUBCOMMAND --config FILE` (an agent, a witness), in a lab
/// host's namespace if given, its output appended to `log`.
pub fn spawn_mainstay(
    exe: &Path,
    netns: Option<&str>,
    subcommand: &str,
    config: &Path,
    log: &Path,
) -> io::Result<Child> {
    let log = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut command = match netns {
        Some(ns) => mainstay_testkit::netns::Lab::command(ns, exe),
        None => Command::new(exe),
    };
    // If whoever started the cluster dies, its agents shut down cleanly
    // instead of running on unattended.
    process::signal_on_parent_death(&mut command, libc::SIGTERM);
    // Each agent leads a process group of its own, as a service manager
    // or a shell's job control would start it: a test can stop that
    // group (Ctrl-Z's SIGTSTP/SIGSTOP to the job) without stopping
    // itself, and a terminal's Ctrl-C reaches the demo alone, which
    // stops its agents with SIGTERM.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .args([subcommand, "--config"])
        .arg(config)
        .env(
            "MAINSTAY_LOG",
            std::env::var("MAINSTAY_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

/// SIGTERM, then SIGKILL after `timeout`; whether it exited cleanly.
pub fn stop_child(mut child: Child, timeout: Duration) -> bool {
    let _ = process::kill(child.id() as i32, libc::SIGTERM);
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            // Killed by the signal (no handler yet) or a fatal error is
            // not a clean stop.
            return status.success();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

pub(crate) fn make_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    // PostgreSQL runs as `postgres` when we are root; it writes beside its
    // data directory (password file, log, socket).
    if process::geteuid() == 0
        && let Ok(Some(pw)) = mainstay_sys::user::by_name(c"postgres")
    {
        std::os::unix::fs::chown(path, Some(pw.uid), Some(pw.gid))?;
    }
    Ok(())
}

impl LocalCluster {
    /// Writes the configurations and starts etcd and every agent.
    pub fn start(dir: &Path, nodes: usize, exe: &Path, profile: &str) -> io::Result<LocalCluster> {
        let mut cluster = LocalCluster::prepare(dir, nodes, exe, profile)?;
        for i in 0..nodes {
            cluster.start_agent(i)?;
        }
        Ok(cluster)
    }

    /// Starts etcd and writes every node's configuration, but no agent (a
    /// test may edit a configuration first).
    pub fn prepare(
        dir: &Path,
        nodes: usize,
        exe: &Path,
        profile: &str,
    ) -> io::Result<LocalCluster> {
        make_dir(dir)?;
        let etcd = Etcd::start(&dir.join("etcd"))?;
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            cluster: "demo".into(),
            etcd: vec![etcd],
            nodes: Vec::new(),
            exe: exe.to_path_buf(),
            extra_config: String::new(),
            mounts: Vec::new(),
            member_hosts: Vec::new(),
            witness: None,
            lab: None,
        };
        for i in 1..=nodes {
            let name = format!("node{i}");
            let node_dir = dir.join(&name);
            make_dir(&node_dir)?;
            let node = Node {
                config: node_dir.join("mainstay.toml"),
                data: node_dir.join("data"),
                dir: node_dir,
                etcd_endpoints: None,
                pg_port: free_port(),
                api_port: free_port(),
                proxy_port: free_port(),
                read_only_port: free_port(),
                host: "127.0.0.1".into(),
                netns: None,
                name,
                extra_config: String::new(),
                api_tls: None,
                agent: None,
            };
            fs::write(&node.config, cluster.config_text(&node, profile))?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// One host per lab namespace, each with an etcd member, an agent and
    /// PostgreSQL listening on every address of its host (so also on a
    /// VIP), reached at the host's address. `extra_config` goes at the top
    /// of every configuration (e.g. `vip = ...`). Call it from a thread in
    /// a namespace that reaches the hosts (the lab's client).
    pub fn start_in_lab(
        dir: &Path,
        lab: mainstay_testkit::netns::Lab,
        hosts: usize,
        exe: &Path,
        profile: &str,
        extra_config: &str,
    ) -> io::Result<LocalCluster> {
        let options = LabOptions::new(hosts, profile, extra_config);
        LocalCluster::start_in_lab_with(dir, lab, exe, &options)
    }

    pub fn start_in_lab_with(
        dir: &Path,
        lab: mainstay_testkit::netns::Lab,
        exe: &Path,
        options: &LabOptions,
    ) -> io::Result<LocalCluster> {
        let (hosts, profile) = (options.hosts, options.profile.as_str());
        make_dir(dir)?;
        let placements: Vec<(String, std::net::Ipv4Addr)> = (0..hosts)
            .map(|i| (lab.host(i).to_string(), lab.host_ip(i)))
            .collect();
        let etcd = if options.managed_etcd {
            Vec::new()
        } else {
            Etcd::start_in_namespaces(&dir.join("etcd"), &placements)?
        };
        let api_tls = if options.api_tls {
            let ips: Vec<String> = placements.iter().map(|(_, ip)| ip.to_string()).collect();
            Some(crate::certificates::make(&dir.join("tls"), &ips)?)
        } else {
            None
        };
        let mut member_hosts: Vec<(String, String)> = if options.managed_etcd {
            placements
                .iter()
                .enumerate()
                .map(|(i, (_, ip))| (format!("node{}", i + 1), ip.to_string()))
                .collect()
        } else {
            Vec::new()
        };
        let witness = if options.witness {
            let witness = crate::witness::WitnessNode::place(dir, &lab, hosts)?;
            member_hosts.push((witness.name.clone(), witness.host.clone()));
            Some(witness)
        } else {
            None
        };
        let mut cluster = LocalCluster {
            dir: dir.to_path_buf(),
            cluster: "lab".into(),
            etcd,
            nodes: Vec::new(),
            exe: exe.to_path_buf(),
            extra_config: options.extra_config.clone(),
            mounts: Vec::new(),
            member_hosts,
            witness,
            lab: None,
        };
        for (i, (ns, address)) in placements.into_iter().enumerate() {
            let name = format!("node{}", i + 1);
            let node_dir = dir.join(&name);
            make_dir(&node_dir)?;
            let data = match options.disk_mib {
                Some(mib) => {
                    let disk = node_dir.join("disk");
                    make_dir(&disk)?;
                    mount_tmpfs(&disk, mib)?;
                    cluster.mounts.push(disk.clone());
                    make_dir(&disk)?;
                    disk.join("data")
                }
                None => node_dir.join("data"),
            };
            let node = Node {
                config: node_dir.join("mainstay.toml"),
                dir: node_dir,
                pg_port: LAB_PG_PORT,
                api_port: LAB_API_PORT,
                proxy_port: LAB_PROXY_PORT,
                read_only_port: LAB_READ_ONLY_PORT,
                host: address.to_string(),
                netns: Some(ns),
                name,
                data,
                etcd_endpoints: options
                    .etcd_endpoints
                    .as_ref()
                    .and_then(|e| e.get(i).cloned()),
                extra_config: options.node_config.get(i).cloned().unwrap_or_default(),
                api_tls: api_tls.clone(),
                agent: None,
            };
            fs::write(&node.config, cluster.config_text(&node, profile))?;
            cluster.nodes.push(node);
        }
        cluster.lab = Some(lab);
        if cluster.witness.is_some() {
            cluster.write_witness_config(profile)?;
            cluster.start_witness()?;
        }
        for i in 0..hosts {
            cluster.start_agent(i)?;
        }
        Ok(cluster)
    }

    pub fn config_text(&self, node: &Node, profile: &str) -> String {
        // In a lab, servers listen on every address of their host (a VIP
        // included); on loopback, only on 127.0.0.1.
        let any = if node.netns.is_some() {
            "0.0.0.0"
        } else {
            node.host.as_str()
        };
        let endpoints: Vec<String> = match &node.etcd_endpoints {
            Some(endpoints) => endpoints.iter().map(|e| format!("\"{e}\"")).collect(),
            None => self
                .etcd_endpoints()
                .iter()
                .map(|e| format!("\"{e}\""))
                .collect(),
        };
        let member = if self.member_hosts.is_empty() {
            String::new()
        } else {
            let initial: Vec<String> = self
                .member_hosts
                .iter()
                .map(|(name, ip)| format!("{name} = \"http://{ip}:{LAB_ETCD_PEER_PORT}\""))
                .collect();
            format!(
                "member = true\ndata_dir = \"{}\"\nclient_url = \"http://{host}:{LAB_ETCD_CLIENT_PORT}\"\n\
                 peer_url = \"http://{host}:{LAB_ETCD_PEER_PORT}\"\ninitial_cluster = {{ {} }}\n",
                node.dir.join("etcd").display(),
                initial.join(", "),
                host = node.host,
            )
        };
        let api_tls = node.api_tls.as_ref().map_or(String::new(), |tls| {
            format!(
                "cert_file = \"{}\"\nkey_file = \"{}\"\nca_file = \"{}\"\n",
                tls.cert.display(),
                tls.key.display(),
                tls.ca.display()
            )
        });
        format!(
            r#"# Written by `mainstay demo`; see docs/configuration.md.
cluster = "{cluster}"
name = "{name}"
{extra}
[etcd]
endpoints = [{endpoints}]
{member}
[postgresql]
data_dir = "{data}"
listen = "{any}"
connect_address = "{host}"
port = {port}
superuser = {{ username = "{SUPERUSER}", password = "{SUPERUSER_PASSWORD}" }}
replication = {{ username = "replicator", password = "demo-replication-secret" }}
# mmap: dynamic shared memory lives in the data directory, so a killed
# server leaves nothing behind in /dev/shm.
parameters = {{ shared_buffers = "32MB", max_connections = "50", dynamic_shared_memory_type = "mmap" }}

[api]
listen = "{host}:{api}"
username = "{API_USER}"
password = "{API_PASSWORD}"
{api_tls}
[proxy]
listen = "{any}:{proxy}"
read_only_listen = "{any}:{read_only}"

[timing]
profile = "{profile}"
{node_extra}"#,
            cluster = self.cluster,
            name = node.name,
            extra = self.extra_config,
            endpoints = endpoints.join(", "),
            host = node.host,
            data = node.data_dir().display(),
            port = node.pg_port,
            api = node.api_port,
            proxy = node.proxy_port,
            read_only = node.read_only_port,
            node_extra = node.extra_config,
        )
    }

    pub fn start_agent(&mut self, i: usize) -> io::Result<()> {
        let node = &mut self.nodes[i];
        let child = spawn_mainstay(
            &self.exe,
            node.netns.as_deref(),
            "agent",
            &node.config,
            &node.agent_log(),
        )?;
        node.agent = Some(child);
        Ok(())
    }

    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i].agent.as_ref().map(|c| c.id())
    }

    pub fn agent_running(&mut self, i: usize) -> bool {
        match &mut self.nodes[i].agent {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The node crashes: agent, fencing guard and the postmaster's whole
    /// process group SIGKILLed at one instant, as a host losing power.
    pub fn kill_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        mainstay_testkit::crash::crash_node(
            node.agent.as_ref().map(|c| c.id()),
            node.postmaster_pid(),
        );
        if let Some(mut child) = node.agent.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Lab node `i`'s host loses power: every process in its namespace
    /// (agent, guards, PostgreSQL, its etcd member, its services) stops and
    /// is SIGKILLed at one instant. Returns how many processes died.
    pub fn crash_host(&mut self, i: usize) -> io::Result<usize> {
        let ns = self.nodes[i]
            .netns
            .clone()
            .ok_or_else(|| io::Error::other("crash_host: not a lab node"))?;
        let killed = mainstay_testkit::crash::crash_namespace(&ns)?;
        if let Some(mut child) = self.nodes[i].agent.take() {
            let _ = child.wait();
        }
        Ok(killed)
    }

    /// The fencing guard of node `i`'s running postmaster.
    pub fn guard_pid(&self, i: usize) -> Option<u32> {
        let postmaster = self.nodes[i].postmaster_pid()?;
        let parent = mainstay_testkit::crash::parent_of(postmaster)?;
        (Some(parent as u32) != self.agent_pid(i) && parent > 1).then_some(parent as u32)
    }

    /// SIGTERM the agent and wait (bounded) for its clean exit.
    pub fn stop_agent(&mut self, i: usize, timeout: Duration) -> bool {
        match self.nodes[i].agent.take() {
            Some(child) => stop_child(child, timeout),
            None => true,
        }
    }

    pub fn stop_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_agent(i, Duration::from_secs(30));
        }
        self.stop_witness();
        for etcd in &mut self.etcd {
            let _ = etcd.stop();
        }
    }

    /// The agents' binary.
    pub fn exe(&self) -> &Path {
        &self.exe
    }

    /// The etcd client URLs: the lab's members, or the agents' own.
    pub fn etcd_endpoints(&self) -> Vec<String> {
        if self.member_hosts.is_empty() {
            self.etcd.iter().map(Etcd::endpoint).collect()
        } else {
            self.member_hosts
                .iter()
                .map(|(_, ip)| format!("http://{ip}:{LAB_ETCD_CLIENT_PORT}"))
                .collect()
        }
    }

    pub async fn dcs(&self) -> Result<EtcdDcs, String> {
        let endpoints = self.etcd_endpoints();
        let mut settings = EtcdSettings::new(endpoints, self.cluster.clone());
        settings.request_timeout = Duration::from_secs(2);
        EtcdDcs::connect(settings).await.map_err(|e| e.to_string())
    }

    /// libpq multi-host string that always lands on the writable node.
    pub fn multi_host_conninfo(&self) -> String {
        let hosts: Vec<&str> = self.nodes.iter().map(|n| n.host.as_str()).collect();
        let hosts = hosts.join(",");
        let ports: Vec<String> = self.nodes.iter().map(|n| n.pg_port.to_string()).collect();
        format!(
            "host={hosts} port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres target_session_attrs=read-write connect_timeout=2",
            ports.join(",")
        )
    }

    /// Unmounts the nodes' tmpfs data disks (call it once every process
    /// is stopped, before removing the directory: a mounted disk would
    /// keep it, and its etcd data, on /dev/shm).
    pub fn unmount_disks(&mut self) {
        for mount in std::mem::take(&mut self.mounts) {
            // Lazy: a process that has not quite exited must not keep the
            // test's directory from going.
            let _ = Command::new("umount").arg("-l").arg(&mount).status();
        }
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // Agents take their postmasters with them (their guards stop them);
        // kill stragglers by PID anyway so that nothing outlives a test.
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        self.unmount_disks();
    }
}

/// A tmpfs of `mib` MiB at `dir`: a small disk of its own.
fn mount_tmpfs(dir: &Path, mib: u64) -> io::Result<()> {
    let status = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0755"),
            "tmpfs",
        ])
        .arg(dir)
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mount -t tmpfs on {}: {status}",
            dir.display()
        )))
    }
}

/// One line describing who is what.
pub fn describe(view: &ClusterView) -> String {
    let leader = view.leader_name().unwrap_or("none");
    let members: Vec<String> = view
        .members
        .values()
        .map(|m| {
            let s = &m.status;
            let role = match s.role {
                PgRole::Primary => "primary",
                PgRole::Replica if s.streaming => "replica(streaming)",
                PgRole::Replica => "replica",
                PgRole::Stopped => "stopped",
            };
            // Services beside the role, so that a line is printed when
            // one starts or stops (Synapse moving with the leader).
            let services: Vec<String> = s
                .services
                .iter()
                .map(|(name, state)| format!("{name}:{state}"))
                .collect();
            let services = if services.is_empty() {
                String::new()
            } else {
                format!("[{}]", services.join(","))
            };
            format!(
                "{}={}{services} tl{} {}",
                s.name, role, s.timeline, s.received_lsn
            )
        })
        .collect();
    format!("leader={leader} | {}", members.join(" | "))
}

/// This executable, which local clusters run as their agents.
pub fn own_binary() -> Result<PathBuf, ExitCode> {
    std::env::current_exe().map_err(|err| {
        eprintln!("error: cannot find the mainstay binary: {err}");
        ExitCode::from(1)
    })
}

pub async fn run(args: DemoArgs) -> ExitCode {
    if args.profile != "default" && args.profile != "fast" {
        eprintln!(
            "error: --profile {:?}: use `default` or `fast`",
            args.profile
        );
        return ExitCode::from(2);
    }
    let dir = args.dir.clone().unwrap_or_else(|| {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        std::env::temp_dir().join(format!("mainstay-demo-{stamp}"))
    });
    if fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some()) {
        eprintln!(
            "error: --dir {}: the directory is not empty; mainstay never reuses or overwrites data: pick a new directory",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let exe = match own_binary() {
        Ok(exe) => exe,
        Err(code) => return code,
    };
    let synapse_venv = match args.with_synapse.then(crate::platform::synapse::venv) {
        Some(Err(why)) => {
            eprintln!("error: --with-synapse: {why}");
            return ExitCode::from(2);
        }
        Some(Ok(venv)) => Some(venv),
        None => None,
    };
    let started = LocalCluster::prepare(&dir, args.nodes as usize, &exe, &args.profile).and_then(
        |mut cluster| {
            let synapse = match &synapse_venv {
                Some(venv) => {
                    crate::platform::demo::add_synapse(&mut cluster, venv, &args.profile)?
                }
                None => Vec::new(),
            };
            for i in 0..cluster.nodes.len() {
                cluster.start_agent(i)?;
            }
            Ok((cluster, synapse))
        },
    );
    let (mut cluster, synapse) = match started {
        Ok(started) => started,
        Err(err) => {
            eprintln!(
                "error: cannot start the demo cluster in {}: {err}",
                dir.display()
            );
            return ExitCode::from(1);
        }
    };
    println!(
        "mainstay demo: {} nodes, etcd at {}, files in {}",
        args.nodes,
        cluster.etcd[0].endpoint(),
        dir.display()
    );
    for node in &cluster.nodes {
        println!(
            "  {}: psql \"{}\"   (agent log: {})",
            node.name,
            node.conninfo(),
            node.agent_log().display()
        );
    }
    println!(
        "  read-write, whichever node is primary:\n    psql \"{}\"",
        cluster.multi_host_conninfo()
    );
    if let Some(node) = cluster.nodes.first() {
        println!(
            "  or through any node's read-write proxy:\n    psql \"host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres\"",
            node.proxy_port
        );
        println!(
            "  read-only, spread over the replicas (the primary when none qualifies):\n    psql \"host=127.0.0.1 port={} user={SUPERUSER} password={SUPERUSER_PASSWORD} dbname=postgres\"",
            node.read_only_port
        );
    }
    if !synapse.is_empty() {
        println!("  Synapse runs beside the primary only (with-leader); on whichever node leads:");
        for (name, url) in &synapse {
            println!("    {name}: {url}/_matrix/client/versions");
        }
    }
    if let Some(node) = cluster.nodes.first() {
        println!(
            "  operate it:\n    mainstay ctl -c {} list   (or switchover, pause, history...)",
            node.config.display()
        );
    }
    println!("Press Ctrl-C to stop everything.\n");
    let dcs = match cluster.dcs().await {
        Ok(dcs) => dcs,
        Err(err) => {
            eprintln!("error: cannot reach the demo's etcd: {err}");
            cluster.stop_all();
            return ExitCode::from(1);
        }
    };
    let mut last = String::new();
    // An agent that exits (a data directory PostgreSQL cannot reach...)
    // is reported once, with its own words, not left as `leader=none`.
    let mut exit_reported = vec![false; cluster.nodes.len()];
    let (Ok(mut int), Ok(mut term)) = (
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
    ) else {
        eprintln!("error: cannot install signal handlers");
        cluster.stop_all();
        return ExitCode::from(1);
    };
    loop {
        tokio::select! {
            _ = int.recv() => break,
            _ = term.recv() => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        for (i, reported) in exit_reported.iter_mut().enumerate() {
            if !*reported && !cluster.agent_running(i) {
                *reported = true;
                let node = &cluster.nodes[i];
                println!(
                    "{} {}'s agent stopped:\n{}",
                    chrono_now(),
                    node.name,
                    last_error(&node.agent_log())
                );
            }
        }
        let line = match dcs.read_cluster().await {
            Ok(view) => describe(&view),
            Err(err) => format!("etcd: {err}"),
        };
        // Positions change all the time; print when roles change.
        let roles: String = line
            .split(" | ")
            .map(|p| p.split(" tl").next().unwrap_or(p))
            .collect::<Vec<_>>()
            .join("|");
        if roles != last {
            println!("{} {line}", chrono_now());
            last = roles;
        }
    }
    println!("\nstopping agents (each stops its PostgreSQL) and etcd...");
    cluster.stop_all();
    println!(
        "stopped. Data, configurations and logs are kept in {}",
        dir.display()
    );
    ExitCode::SUCCESS
}

/// The end of an agent's log from its last `error:` line (at most a few
/// lines), or its last lines.
fn last_error(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines
        .iter()
        .rposition(|l| l.starts_with("error:"))
        .unwrap_or(lines.len().saturating_sub(5));
    lines[from..]
        .iter()
        .take(8)
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn chrono_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}
