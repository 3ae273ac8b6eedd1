//! `mainstay migrate from-patroni` as an operator runs it: the files it
//! writes are ones mainstay accepts, a setting it cannot map is refused
//! unless accepted, a Patroni it cannot reach is refused unless --offline,
//! and nothing is written or overwritten on a refusal. (Against a running
//! Patroni cluster it is exercised by the takeover test.)

#![forbid(unsafe_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn patroni_file(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("patroni.yml");
    let data = dir.join("data");
    std::fs::write(
        &path,
        format!(
            "scope: ship
name: node1
restapi:
  listen: 127.0.0.1:8008
  connect_address: 127.0.0.1:8008
etcd3:
  hosts: 127.0.0.1:2379
bootstrap:
  dcs:
    ttl: 30
    maximum_lag_on_failover: 1048576
    synchronous_mode: true
postgresql:
  listen: 127.0.0.1:5432
  connect_address: 127.0.0.1:5432
  data_dir: {}
  bin_dir: /usr/lib/postgresql/15/bin
  authentication:
    superuser: {{username: postgres, password: pg-secret}}
    replication: {{username: replicator, password: rep-secret}}
{extra}",
            data.display()
        ),
    )
    .unwrap();
    path
}

/// The command's exit code, standard output and standard error; killed
/// (and the test failed) if it runs longer than a minute.
fn migrate(dir: &Path, args: &[&str]) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .current_dir(dir)
        .args(["migrate", "from-patroni", "--patroni-config", "patroni.yml"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`migrate from-patroni {args:?}` ran over a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn migrate_from_patroni_writes_what_mainstay_accepts_and_refuses_what_it_cannot_map() {
    if !Path::new("/usr/lib/postgresql/15/bin/postgres").exists() {
        mainstay_testkit::skip("needs PostgreSQL 15 (its bin_dir is checked)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    patroni_file(
        dir.path(),
        "  parameters:\n    shared_buffers: 64MB\n    max_connections: 50\n\
         tags:\n  replicatefrom: node2\n",
    );
    let (code, _, err) = migrate(dir.path(), &["--offline"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tags.replicatefrom"), "{err}");
    assert!(
        !dir.path().join("mainstay.toml").exists(),
        "nothing written"
    );

    let (code, out, err) = migrate(dir.path(), &["--offline", "--accept-unmapped"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("the cluster's health was not checked") && err.contains("bootstrap.dcs"),
        "{err}"
    );
    assert!(!out.contains("leader:"), "nothing of a live cluster: {out}");
    // Patroni's API had no credentials: mainstay's needs some on every node.
    assert!(out.contains("no restapi.authentication"), "{out}");
    assert!(out.contains("  username = \"mainstay\"\n"), "{out}");
    let node_file = dir.path().join("mainstay.toml");
    let mode = std::fs::metadata(&node_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "it holds passwords: {mode:o}");
    let check = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .args(["config", "check"])
        .arg(&node_file)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let dynamic: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("mainstay-dynamic.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(dynamic["synchronous_mode"], true);
    // Patroni ignored the node's max_connections and ran its default.
    let node: toml::Table = toml::from_str(&std::fs::read_to_string(&node_file).unwrap()).unwrap();
    let parameters = node["postgresql"]["parameters"].as_table().unwrap();
    assert!(
        !parameters.contains_key("max_connections"),
        "{parameters:?}"
    );
    assert_eq!(parameters["shared_buffers"].as_str(), Some("64MB"));
    assert_eq!(dynamic["postgresql"]["parameters"]["max_connections"], 100);
    assert!(
        err.contains("ignored this node's 50: it ran max_connections = 100 (Patroni's default)"),
        "{err}"
    );

    // Never overwritten: a second run changes nothing.
    let before = std::fs::read(&node_file).unwrap();
    let (code, _, err) = migrate(dir.path(), &["--offline", "--accept-unmapped"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&node_file).unwrap(), before);

    // Not a Patroni file.
    std::fs::write(dir.path().join("patroni.yml"), "cluster = \"x\"\n").unwrap();
    let (code, _, err) = migrate(dir.path(), &["--offline", "--output", "other.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a Patroni configuration"), "{err}");
}

#[test]
fn a_patroni_that_cannot_be_reached_is_refused_unless_offline() {
    let dir = tempfile::tempdir().unwrap();
    patroni_file(dir.path(), "");
    // A loopback port nobody listens on any more.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let (code, out, err) = migrate(dir.path(), &["--patroni-url", &url]);
    assert_eq!(code, 1, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "bounded: {:?}",
        started.elapsed()
    );
    assert!(
        err.contains(&format!("cannot reach Patroni at {url}")),
        "{err}"
    );
    assert!(
        err.contains("--patroni-url") && err.contains("--offline"),
        "{err}"
    );
    assert!(err.contains("Nothing was written"), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(!dir.path().join("mainstay.toml").exists());
    assert!(!dir.path().join("mainstay-dynamic.json").exists());
    // The address in the file (restapi.connect_address) is the default.
    std::fs::write(
        dir.path().join("patroni.yml"),
        std::fs::read_to_string(dir.path().join("patroni.yml"))
            .unwrap()
            .replace("127.0.0.1:8008", &format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let (code, _, err) = migrate(dir.path(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("cannot reach Patroni at {url}")),
        "{err}"
    );
    // https needs the CA that signed Patroni's certificate.
    let (code, _, err) = migrate(dir.path(), &["--patroni-url", "https://127.0.0.1:1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--patroni-ca-file"), "{err}");
    // --offline with an address is a contradiction.
    let (code, _, err) = migrate(dir.path(), &["--offline", "--patroni-url", &url]);
    assert_eq!(code, 2, "{err}");
}
