//! `mainstay check` and the agent's own preflight, against real files,
//! ports and etcd: a data directory PostgreSQL's account cannot reach
//! blocks both (and the agent creates nothing), a port in use blocks the
//! check, a node with a running etcd passes with every finding said, and a
//! witness's file is checked as one. Needs root (PostgreSQL's account) and
//! etcd; without them it fails, unless `MAINSTAY_ALLOW_SKIP=1`.

#![forbid(unsafe_code)]

mod common;

use common::*;
use mainstay_testkit::{Etcd, free_port};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn check(config: &Path) -> (i32, Value) {
    let output = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .args(["check", "--json", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let doc: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout}{}", String::from_utf8_lossy(&output.stderr)));
    assert_eq!(doc["exit_code"], output.status.code().unwrap(), "{doc}");
    (output.status.code().unwrap(), doc)
}

fn findings<'a>(doc: &'a Value, severity: &str, check: &str) -> Vec<&'a Value> {
    doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == severity && f["check"] == check)
        .collect()
}

fn node_config(data_dir: &Path, etcd: &str, api_port: u16, pg_port: u16) -> String {
    format!(
        "cluster = \"preflight\"\nname = \"node1\"\n[etcd]\nendpoints = [\"{etcd}\"]\n\
         [postgresql]\ndata_dir = \"{}\"\nport = {pg_port}\n\
         superuser = {{ username = \"postgres\", password = \"x\" }}\n\
         replication = {{ username = \"rep\", password = \"y\" }}\n\
         [api]\nlisten = \"127.0.0.1:{api_port}\"\n",
        data_dir.display()
    )
}

#[test]
fn the_preflight_names_what_blocks_and_the_agent_refuses_to_start() {
    if !prerequisites() {
        return;
    }
    if mainstay_sys::process::geteuid() != 0 {
        mainstay_testkit::skip("needs root: PostgreSQL's account differs from the test's");
        return;
    }
    let dir = test_dir("check");
    std::fs::create_dir_all(&dir).unwrap();
    let etcd = Etcd::start(&dir.join("etcd")).unwrap();

    // A data directory under a 0700 directory owned by root.
    let closed = dir.join("closed");
    std::fs::create_dir_all(closed.join("node")).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let data = closed.join("node/data");
    let config = dir.join("closed.toml");
    std::fs::write(
        &config,
        node_config(&data, &etcd.endpoint(), free_port(), free_port()),
    )
    .unwrap();
    let (code, doc) = check(&config);
    assert_eq!(code, 2, "{doc}");
    let blocking = findings(&doc, "blocking", "data_dir");
    assert_eq!(blocking.len(), 1, "{doc}");
    assert!(
        blocking[0]["what"].as_str().unwrap().contains("mode 0700"),
        "{doc}"
    );
    assert!(
        blocking[0]["fix"]
            .as_str()
            .unwrap()
            .contains(&format!("chmod o+x {}", closed.display()))
    );
    let agent = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&agent.stderr);
    assert_eq!(agent.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot start") && stderr.contains("chmod o+x"),
        "{stderr}"
    );
    assert!(
        !data.exists(),
        "the refused agent created its data directory"
    );

    // Opened up, with the node's directory given to postgres: ready, and
    // etcd answers with a quorum.
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o755)).unwrap();
    let postgres = mainstay_sys::user::by_name(c"postgres").unwrap().unwrap();
    std::os::unix::fs::chown(closed.join("node"), Some(postgres.uid), Some(postgres.gid)).unwrap();
    let (code, doc) = check(&config);
    assert!(code < 2, "{doc}");
    assert_eq!(findings(&doc, "ok", "data_dir").len(), 1, "{doc}");
    assert_eq!(findings(&doc, "ok", "postgresql").len(), 1, "{doc}");
    let etcd_ok = findings(&doc, "ok", "quorum");
    assert!(
        etcd_ok
            .first()
            .is_some_and(|f| f["what"].as_str().unwrap().contains("quorum")),
        "{doc}"
    );

    // A port in use blocks, naming the key.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    std::fs::write(
        &config,
        node_config(&data, &etcd.endpoint(), port, free_port()),
    )
    .unwrap();
    let (code, doc) = check(&config);
    assert_eq!(code, 2, "{doc}");
    let ports = findings(&doc, "blocking", "ports");
    assert!(
        ports
            .iter()
            .any(|f| f["what"].as_str().unwrap().contains("api.listen")),
        "{doc}"
    );

    // A witness's file is checked as one: its member's ports and peers.
    let witness = dir.join("witness.toml");
    let (client, peer) = (free_port(), free_port());
    std::fs::write(
        &witness,
        format!(
            "cluster = \"preflight\"\nname = \"witness\"\n[etcd]\nendpoints = [\"http://127.0.0.1:{client}\"]\n\
             member = true\ndata_dir = \"{}\"\nclient_url = \"http://127.0.0.1:{client}\"\n\
             peer_url = \"http://127.0.0.1:{peer}\"\n\
             initial_cluster = {{ witness = \"http://127.0.0.1:{peer}\", node1 = \"http://127.0.0.1:1\" }}\n\
             [api]\nlisten = \"127.0.0.1:{}\"\n",
            dir.join("witness-etcd").display(),
            free_port()
        ),
    )
    .unwrap();
    let (code, doc) = check(&witness);
    assert_eq!(code, 1, "{doc}");
    assert_eq!(findings(&doc, "ok", "etcd").len(), 1, "{doc}");
    assert!(
        findings(&doc, "warning", "peers")
            .iter()
            .any(|f| f["what"].as_str().unwrap().contains("node1's etcd member")),
        "{doc}"
    );
    assert!(!dir.join("witness-etcd").exists(), "check started etcd");
    drop(taken);
    drop(etcd);
    let _ = std::fs::remove_dir_all(&dir);
}
