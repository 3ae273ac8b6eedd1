//! A throwaway CA and one API certificate it signed for the lab's
//! addresses, made with the `openssl` command (installed by the set-up
//! script), so that lab clusters can run their REST API, and what travels
//! over it (replicated files), over HTTPS as production does.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The PEM files the API's `cert_file`, `key_file` and `ca_file` name.
#[derive(Clone, Debug)]
pub struct ApiCertificates {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a CA and a certificate valid for every address in `ips` into
/// `dir` (two days: long enough for any test or benchmark).
pub fn make(dir: &Path, ips: &[String]) -> io::Result<ApiCertificates> {
    std::fs::create_dir_all(dir)?;
    let run = |args: &[&str]| -> io::Result<()> {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| {
                io::Error::other(format!(
                    "running openssl (scripts/setup.sh installs it): {e}"
                ))
            })?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("openssl {args:?} failed")))
        }
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=mainstay-lab-ca"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca-key.pem", "-out", "ca.pem"]);
    run(&ca)?;
    let mut csr = vec!["req", "-subj", "/CN=mainstay-lab"];
    csr.extend(ec);
    csr.extend(["-keyout", "api-key.pem", "-out", "api.csr"]);
    run(&csr)?;
    let names: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName={}\n", names.join(",")),
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "api.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "api-cert.pem",
    ])?;
    Ok(ApiCertificates {
        ca: dir.join("ca.pem"),
        cert: dir.join("api-cert.pem"),
        key: dir.join("api-key.pem"),
    })
}
