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
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("network namespace tests need root (CI runs them as root)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("network namespace tests need the `ip` command (package iproute2)".into()),
    }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
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
    // SAFETY: a valid descriptor for the call's duration; setns affects
    // only the calling thread for CLONE_NEWNET.
    let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let all: Vec<String> = self.namespaces().map(String::from).collect();
        for ns in all {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}
