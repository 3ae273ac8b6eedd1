//! Hosts as network namespaces on a private bridge, for tests of what only
//! real networks show (a virtual IP moving, a host's link going down).
//!
//! A lab is one "switch" namespace holding a bridge, `hosts` host
//! namespaces and one client namespace, each with an `eth0` plugged into
//! the bridge. Every address lives inside these namespaces: nothing is
//! added to the machine's own namespace and no packet can leave the
//! machine. Dropping the lab deletes the namespaces; the caller stops the
//! processes it started in them first.

use std::io;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

static LABS: AtomicU32 = AtomicU32::new(0);

/// The lab's network: hosts at .11, .12..., the client at .100.
pub const PREFIX: [u8; 3] = [10, 213, 0];
pub const PREFIX_LEN: u8 = 24;

pub struct Lab {
    switch: String,
    hosts: Vec<String>,
    client: String,
}

/// Why netns tests cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    if mainstay_sys::process::geteuid() != 0 {
        return Some("network namespace tests need root (CI runs them as root)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("network namespace tests need the `ip` command (package iproute2)".into()),
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    run("ip", args)
}

/// Runs `program args`; its standard error is the error.
fn run(program: &str, args: &[&str]) -> io::Result<()> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

impl Lab {
    pub fn create(hosts: usize) -> io::Result<Lab> {
        let id = format!(
            "ms{}x{}",
            std::process::id(),
            LABS.fetch_add(1, Ordering::Relaxed)
        );
        let mut lab = Lab {
            switch: format!("{id}-sw"),
            hosts: (1..=hosts).map(|i| format!("{id}-h{i}")).collect(),
            client: format!("{id}-c"),
        };
        // Registered before creation, so a half-built lab is still removed.
        let all: Vec<String> = lab.namespaces().map(String::from).collect();
        let mut created = Vec::new();
        let built = (|| -> io::Result<()> {
            for ns in &all {
                ip(&["netns", "add", ns])?;
                created.push(ns.clone());
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
            }
            let sw = lab.switch.as_str();
            ip(&["-n", sw, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", sw, "link", "set", "br0", "up"])?;
            let ends: Vec<(String, String, Ipv4Addr)> = lab
                .hosts
                .iter()
                .enumerate()
                .map(|(i, h)| (h.clone(), format!("p{}", i + 1), lab.host_ip(i)))
                .chain([(lab.client.clone(), "pc".into(), lab.client_ip())])
                .collect();
            for (ns, port, address) in ends {
                ip(&[
                    "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                    "netns", &ns,
                ])?;
                ip(&["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{address}/{PREFIX_LEN}"),
                    "dev",
                    "eth0",
                ])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            }
            Ok(())
        })();
        if let Err(err) = built {
            for ns in created {
                let _ = ip(&["netns", "del", &ns]);
            }
            lab.hosts.clear();
            lab.switch.clear();
            lab.client.clear();
            return Err(err);
        }
        Ok(lab)
    }

    fn namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.switch.as_str())
            .chain(self.hosts.iter().map(String::as_str))
            .chain(std::iter::once(self.client.as_str()))
            .filter(|ns| !ns.is_empty())
    }

    pub fn host(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    pub fn host_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], PREFIX[2], 11 + i as u8)
    }

    pub fn client(&self) -> &str {
        &self.client
    }

    pub fn client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(PREFIX[0], PREFIX[1], PREFIX[2], 100)
    }

    /// `program` run inside namespace `ns` (`ip netns exec` execs it, so
    /// the child's PID is the program's).
    pub fn command(ns: &str, program: impl AsRef<Path>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).arg(program.as_ref());
        command
    }

    /// Plugs host `i`'s cable in or out (its switch port up or down): the
    /// host itself keeps running and keeps its addresses.
    pub fn set_link(&self, i: usize, up: bool) -> io::Result<()> {
        let port = format!("p{}", i + 1);
        ip(&[
            "-n",
            &self.switch,
            "link",
            "set",
            &port,
            if up { "up" } else { "down" },
        ])
    }

    /// The IPv4 addresses on host `i`'s eth0 ("10.213.0.11/24", ...).
    pub fn addresses(&self, i: usize) -> io::Result<Vec<String>> {
        let output = Command::new("ip")
            .args([
                "-n",
                &self.hosts[i],
                "-4",
                "-o",
                "addr",
                "show",
                "dev",
                "eth0",
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "inet")?;
                words.next().map(String::from)
            })
            .collect())
    }

    /// Degrades host `i`'s link (both directions of its eth0): drops
    /// `loss_percent` of the packets at random (nftables `numgen`; this
    /// kernel has no netem) and, if `rate_kbit` is set, squeezes what it
    /// sends through a token bucket of that rate.
    pub fn impair(&self, i: usize, loss_percent: u32, rate_kbit: Option<u32>) -> io::Result<()> {
        let ns = &self.hosts[i];
        nft(
            ns,
            &format!(
                "table inet impair {{\n\
                 chain input {{ type filter hook input priority 0; iifname \"eth0\" numgen random mod 100 < {loss_percent} drop; }}\n\
                 chain output {{ type filter hook output priority 0; oifname \"eth0\" numgen random mod 100 < {loss_percent} drop; }}\n\
                 }}\n"
            ),
        )?;
        if let Some(rate) = rate_kbit {
            tc(
                ns,
                &[
                    "qdisc",
                    "replace",
                    "dev",
                    "eth0",
                    "root",
                    "tbf",
                    "rate",
                    &format!("{rate}kbit"),
                    "burst",
                    "16kb",
                    "latency",
                    "300ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Cuts host `i` off from every other host's ports `ports` (and every
    /// other host off from its own), both ways; the rest of its traffic
    /// (clients, replication) still flows.
    pub fn isolate_ports(&self, i: usize, ports: &[u16]) -> io::Result<()> {
        let own = self.host_ip(i);
        let ports = ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        nft(
            &self.hosts[i],
            &format!(
                "table inet isolate {{\n\
                 chain input {{ type filter hook input priority 0; iifname \"eth0\" tcp dport {{ {ports} }} drop; iifname \"eth0\" tcp sport {{ {ports} }} drop; }}\n\
                 chain output {{ type filter hook output priority 0; ip daddr != {own} tcp dport {{ {ports} }} drop; ip daddr != {own} tcp sport {{ {ports} }} drop; }}\n\
                 }}\n"
            ),
        )
    }

    /// Cuts every packet between hosts `i` and `j`, both ways, while both
    /// still reach everyone else (a cable between two rooms, say).
    pub fn cut_between(&self, i: usize, j: usize) -> io::Result<()> {
        for (here, there) in [(i, j), (j, i)] {
            let other = self.host_ip(there);
            nft(
                &self.hosts[here],
                &format!(
                    "table inet cut {{\n\
                     chain input {{ type filter hook input priority 0; ip saddr {other} drop; }}\n\
                     chain output {{ type filter hook output priority 0; ip daddr {other} drop; }}\n\
                     }}\n"
                ),
            )?;
        }
        Ok(())
    }

    /// Removes every impairment and isolation from host `i`.
    pub fn heal(&self, i: usize) {
        let ns = &self.hosts[i];
        // Deleting what is not there fails: each step is attempted on its own.
        let _ = nft(ns, "delete table inet impair\n");
        let _ = nft(ns, "delete table inet isolate\n");
        let _ = nft(ns, "delete table inet cut\n");
        let _ = tc(ns, &["qdisc", "del", "dev", "eth0", "root"]);
    }

    /// Runs `f` on a new thread that lives in namespace `ns`, so that every
    /// socket `f` opens (a runtime it builds included) is in there.
    pub fn run_in<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let path = format!("/run/netns/{ns}");
        let thread = std::thread::spawn(move || -> io::Result<T> {
            enter(&path)?;
            Ok(f())
        });
        match thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter(path: &str) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // Affects only the calling thread.
    mainstay_sys::net::enter_network_namespace(&file)
}

/// Loads an nftables ruleset into namespace `ns` (package nftables).
fn nft(ns: &str, ruleset: &str) -> io::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(ruleset.as_bytes())?;
    let output = child.wait_with_output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft in {ns}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

fn tc(ns: &str, args: &[&str]) -> io::Result<()> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    run("tc", &all)
}

impl Drop for Lab {
    fn drop(&mut self) {
        let all: Vec<String> = self.namespaces().map(String::from).collect();
        for ns in all {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}
