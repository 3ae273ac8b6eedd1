//! A real HAProxy process (Debian's `haproxy` package) for tests and
//! benchmarks that compare with it or check that it works with mainstay.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub const HAPROXY: &str = "/usr/sbin/haproxy";

/// The `global` and `defaults` sections of Patroni's haproxy.cfg (TCP,
/// long client and server timeouts), with a stats socket at `socket`
/// when given and the log on standard output.
pub fn config_head(maxconn: u32, socket: Option<&Path>) -> String {
    let socket = socket.map_or(String::new(), |s| {
        format!(
            "    stats socket {} mode 600 level admin\n    log stdout format raw local0\n",
            s.display()
        )
    });
    let log = if socket.is_empty() {
        ""
    } else {
        "    log global\n"
    };
    format!(
        "global
    maxconn {maxconn}
{socket}
defaults
{log}    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s
"
    )
}

/// `server` lines as Patroni's documentation writes them: traffic to each
/// node's PostgreSQL port, health checked on its REST API port.
pub fn health_checked_servers<'a>(nodes: impl IntoIterator<Item = (&'a str, u16, u16)>) -> String {
    nodes
        .into_iter()
        .map(|(name, pg_port, api_port)| {
            format!("    server {name} 127.0.0.1:{pg_port} maxconn 100 check port {api_port}\n")
        })
        .collect()
}

/// Killed (by PID) when dropped, and when the thread that started it dies.
pub struct Haproxy {
    child: Child,
    log: PathBuf,
}

impl Haproxy {
    /// Writes `config` to `<dir>/haproxy.cfg`, has HAProxy check it, and
    /// starts it in the foreground with its output in `<dir>/haproxy.log`.
    /// Whether it serves yet is for the caller to wait for.
    pub fn start(dir: &Path, config: &str) -> io::Result<Haproxy> {
        std::fs::create_dir_all(dir)?;
        let file = dir.join("haproxy.cfg");
        std::fs::write(&file, config)?;
        let check = Command::new(HAPROXY)
            .arg("-c")
            .arg("-f")
            .arg(&file)
            .output()?;
        if !check.status.success() {
            return Err(io::Error::other(format!(
                "haproxy -c refuses {}: {}{}",
                file.display(),
                String::from_utf8_lossy(&check.stdout),
                String::from_utf8_lossy(&check.stderr)
            )));
        }
        let log = dir.join("haproxy.log");
        let output = std::fs::File::create(&log)?;
        let mut command = Command::new(HAPROXY);
        // Should the caller die without unwinding, HAProxy goes with it
        // (the signal follows the thread that started it).
        mainstay_sys::process::signal_on_parent_death(&mut command, libc::SIGKILL);
        let child = command
            .arg("-f")
            .arg(&file)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()?;
        Ok(Haproxy { child, log })
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An error with the log if HAProxy has exited.
    pub fn check_alive(&mut self) -> io::Result<()> {
        match self.child.try_wait()? {
            None => Ok(()),
            Some(status) => Err(io::Error::other(format!(
                "haproxy exited ({status}):\n{}",
                self.log()
            ))),
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
