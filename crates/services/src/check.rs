//! Health probes: a process alive, a TCP connection accepted, an HTTP
//! status, a command's exit code; each bounded by its timeout. A probe
//! answers `Err(why)` in words an operator can act on.

use crate::spec::CheckProbe;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Runs one probe; `alive` says whether the service's process runs.
pub async fn probe(probe: &CheckProbe, timeout: Duration, alive: bool) -> Result<(), String> {
    match tokio::time::timeout(timeout, run(probe, alive)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {timeout:?}")),
    }
}

async fn run(probe: &CheckProbe, alive: bool) -> Result<(), String> {
    match probe {
        CheckProbe::Process => {
            if alive {
                Ok(())
            } else {
                Err("the process is not running".into())
            }
        }
        CheckProbe::Tcp(address) => TcpStream::connect(address)
            .await
            .map(drop)
            .map_err(|err| format!("connecting to {address}: {err}")),
        CheckProbe::Http { url, status } => {
            let got = http_status(url).await?;
            if got == *status {
                Ok(())
            } else {
                Err(format!("GET {url} answered {got}, not {status}"))
            }
        }
        CheckProbe::Command(argv) => {
            let output = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .output()
                .await
                .map_err(|err| format!("cannot run {}: {err}", argv[0]))?;
            if output.status.success() {
                Ok(())
            } else {
                let said = String::from_utf8_lossy(&output.stderr);
                Err(format!(
                    "{} exited with {}: {}",
                    argv[0],
                    output.status,
                    said.trim().chars().take(200).collect::<String>()
                ))
            }
        }
    }
}

/// The status code of a plain `GET` (HTTP/1.0, so the server closes).
async fn http_status(url: &str) -> Result<u16, String> {
    let rest = url.strip_prefix("http://").ok_or("not an http:// URL")?;
    let (authority, path) = match rest.find('/') {
        Some(at) => (&rest[..at], &rest[at..]),
        None => (rest, "/"),
    };
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(&address)
        .await
        .map_err(|err| format!("connecting to {address}: {err}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nUser-Agent: mainstay\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("sending to {address}: {err}"))?;
    // The status line is all we need; bound what is read.
    let mut head = vec![0u8; 256];
    let mut read = 0;
    while read < head.len() && !head[..read].contains(&b'\n') {
        match stream.read(&mut head[read..]).await {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(err) => return Err(format!("reading from {address}: {err}")),
        }
    }
    let line = String::from_utf8_lossy(&head[..read]);
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .filter(|_| line.starts_with("HTTP/"))
        .ok_or_else(|| format!("GET {url}: not an HTTP answer"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn server(answer: &'static str) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = socket.read(&mut buf).await;
                let _ = socket.write_all(answer.as_bytes()).await;
            }
        });
        address
    }

    #[tokio::test]
    async fn http_tcp_and_command_probes_say_why_they_fail() {
        let second = Duration::from_secs(1);
        let ok = server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let sick = server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let http = |address: std::net::SocketAddr| CheckProbe::Http {
            url: format!("http://{address}/health"),
            status: 200,
        };
        assert_eq!(probe(&http(ok), second, true).await, Ok(()));
        let err = probe(&http(sick), second, true).await.unwrap_err();
        assert!(err.contains("answered 503, not 200"), "{err}");
        assert_eq!(probe(&CheckProbe::Tcp(ok), second, true).await, Ok(()));
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let err = probe(&CheckProbe::Tcp(closed), second, true)
            .await
            .unwrap_err();
        assert!(err.contains(&closed.to_string()), "{err}");
        let fails = CheckProbe::Command(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo broken >&2; exit 3".into(),
        ]);
        let err = probe(&fails, second, true).await.unwrap_err();
        assert!(err.contains("broken"), "{err}");
        let slow = CheckProbe::Command(vec!["/bin/sleep".into(), "5".into()]);
        let err = probe(&slow, Duration::from_millis(100), true)
            .await
            .unwrap_err();
        assert!(err.contains("no answer within"), "{err}");
        assert!(probe(&CheckProbe::Process, second, false).await.is_err());
    }
}
