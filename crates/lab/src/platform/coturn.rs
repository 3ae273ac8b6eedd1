//! coturn (Debian's `turnserver`) as an `everywhere` service, and a STUN
//! probe that proves a node's relay answers.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::time::Duration;

pub const TURNSERVER: &str = "/usr/bin/turnserver";
/// coturn's port on every lab host (a default port nowhere).
pub const PORT: u16 = 13478;

/// Why coturn cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    (!Path::new(TURNSERVER).exists()).then(|| {
        format!(
            "{TURNSERVER} is missing: install coturn (apt-get install coturn, or scripts/setup.sh)"
        )
    })
}

/// The node's `[[service]]` section: coturn on the host's own address
/// (TURN clients are given every node's address, not the VIP: a relay
/// holds allocations, and each node's serves its own), with the TURN REST
/// API secret Synapse hands credentials out with. Its state (pid file,
/// user database) stays in `node_dir`.
pub fn node_service(node_dir: &Path, address: &str, secret: &str) -> io::Result<String> {
    let dir = node_dir.join("coturn");
    std::fs::create_dir_all(&dir)?;
    let args = [
        "-n",
        "--listening-ip",
        address,
        "--relay-ip",
        address,
        "--listening-port",
        &PORT.to_string(),
        "--min-port",
        "49152",
        "--max-port",
        "49407",
        "--realm",
        super::synapse::SERVER_NAME,
        "--use-auth-secret",
        "--static-auth-secret",
        secret,
        "--fingerprint",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-software-attribute",
        "--log-file",
        "stdout",
        "--simple-log",
        "--pidfile",
        &dir.join("turnserver.pid").display().to_string(),
        "--userdb",
        &dir.join("turndb").display().to_string(),
    ];
    let command: Vec<String> = std::iter::once(TURNSERVER)
        .chain(args)
        .map(|a| format!("\"{a}\""))
        .collect();
    Ok(format!(
        r#"
[[service]]
name = "coturn"
command = [{command}]
placement = "everywhere"
working_directory = "{dir}"
stop_grace = 2
[[service.check]]
kind = "tcp"
address = "{address}:{PORT}"
interval = 1
timeout = 1
"#,
        command = command.join(", "),
        dir = dir.display(),
    ))
}

/// Sends a STUN Binding request (RFC 5389) to `server` over UDP and
/// returns the address it says the request came from.
pub fn stun_binding(server: SocketAddr, timeout: Duration) -> io::Result<SocketAddr> {
    const MAGIC: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(timeout))?;
    // Unique enough in a lab: the pid and the time.
    let seed = std::process::id() as u64
        ^ std::time::UNIX_EPOCH
            .elapsed()
            .map_or(0, |d| d.as_nanos() as u64);
    let transaction: [u8; 12] = std::array::from_fn(|i| (seed >> ((i % 8) * 8)) as u8 ^ i as u8);
    let mut request = vec![0x00, 0x01, 0x00, 0x00];
    request.extend_from_slice(&MAGIC);
    request.extend_from_slice(&transaction);
    socket.send_to(&request, server)?;
    let mut answer = [0u8; 512];
    let (n, _) = socket.recv_from(&mut answer)?;
    let answer = &answer[..n];
    let invalid =
        |why: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{server}: {why}"));
    if n < 20 || answer[0..2] != [0x01, 0x01] || answer[8..20] != transaction {
        return Err(invalid("not a Binding success for our request"));
    }
    // Attributes: type (2), length (2), value padded to 4 bytes.
    let mut at = 20;
    while at + 4 <= n {
        let kind = u16::from_be_bytes([answer[at], answer[at + 1]]);
        let len = u16::from_be_bytes([answer[at + 2], answer[at + 3]]) as usize;
        let value = answer
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| invalid("truncated"))?;
        // XOR-MAPPED-ADDRESS, IPv4.
        if kind == 0x0020 && len == 8 && value[1] == 0x01 {
            let port = u16::from_be_bytes([value[2] ^ MAGIC[0], value[3] ^ MAGIC[1]]);
            let ip: [u8; 4] = std::array::from_fn(|i| value[4 + i] ^ MAGIC[i]);
            return Ok(SocketAddr::from((ip, port)));
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    Err(invalid("no XOR-MAPPED-ADDRESS"))
}
