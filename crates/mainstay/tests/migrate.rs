//! `mainstay migrate from-patroni` as an operator runs it: the files it
//! writes are ones mainstay accepts, a setting it cannot map is refused
//! unless accepted, and nothing is written or overwritten on a refusal.

#![forbid(unsafe_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

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

fn migrate(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mainstay"))
        .current_dir(dir)
        .args(["migrate", "from-patroni", "--patroni-config", "patroni.yml"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
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
    patroni_file(dir.path(), "tags:\n  replicatefrom: node2\n");
    let (code, err) = migrate(dir.path(), &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tags.replicatefrom"), "{err}");
    assert!(
        !dir.path().join("mainstay.toml").exists(),
        "nothing written"
    );

    let (code, err) = migrate(dir.path(), &["--accept-unmapped"]);
    assert_eq!(code, 0, "{err}");
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

    // Never overwritten: a second run changes nothing.
    let before = std::fs::read(&node_file).unwrap();
    let (code, err) = migrate(dir.path(), &["--accept-unmapped"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists"), "{err}");
    assert_eq!(std::fs::read(&node_file).unwrap(), before);

    // Not a Patroni file.
    std::fs::write(dir.path().join("patroni.yml"), "cluster = \"x\"\n").unwrap();
    let (code, err) = migrate(dir.path(), &["--output", "other.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a Patroni configuration"), "{err}");
}
