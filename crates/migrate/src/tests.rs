use super::*;

/// A Patroni 4 node file as Patroni's documentation and a typical site
/// write it.
const PATRONI: &str = r#"
scope: ship
namespace: /service/
name: node1
log:
  level: INFO
restapi:
  listen: 0.0.0.0:8008
  connect_address: 10.0.0.1:8008
  authentication:
    username: admin
    password: "api-secret"
etcd3:
  hosts:
    - 10.0.0.1:2379
    - 10.0.0.2:2379
  protocol: https
  cacert: /etc/patroni/ca.pem
bootstrap:
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    synchronous_mode: "on"
    member_slots_ttl: 30min
    failsafe_mode: true
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        wal_log_hints: "on"
        max_connections: 200
  initdb:
    - encoding: UTF8
    - data-checksums
  pg_hba:
    - host replication replicator 10.0.0.0/24 scram-sha-256
postgresql:
  listen: "*:5432"
  connect_address: 10.0.0.1:5432
  data_dir: /var/lib/postgresql/15/main
  bin_dir: /usr/lib/postgresql/15/bin
  pgpass: /tmp/pgpass0
  authentication:
    superuser:
      username: postgres
      password: "pg-secret"
    replication:
      username: replicator
      password: "rep-secret"
  parameters:
    shared_buffers: 1GB
    unix_socket_directories: /var/run/postgresql
  callbacks:
    on_role_change: /usr/local/bin/notify.sh --quiet
watchdog:
  mode: automatic
  device: /dev/watchdog
  safety_margin: 5
tags:
  nofailover: false
  noloadbalance: false
  clonefrom: false
  failover_priority: 2
  dc: one
"#;

#[test]
fn a_typical_patroni_node_maps_without_loss() {
    let migration = from_patroni(PATRONI).unwrap();
    assert_eq!(migration.unmapped().count(), 0, "{:?}", migration.notes);
    let file: toml::Table = toml::from_str(&migration.node_file).unwrap();
    assert_eq!(file["cluster"].as_str(), Some("ship"));
    assert_eq!(file["name"].as_str(), Some("node1"));
    let etcd = file["etcd"].as_table().unwrap();
    assert_eq!(
        etcd["endpoints"].as_array().unwrap()[1].as_str(),
        Some("https://10.0.0.2:2379")
    );
    assert_eq!(etcd["ca_file"].as_str(), Some("/etc/patroni/ca.pem"));
    let pg = file["postgresql"].as_table().unwrap();
    assert_eq!(pg["listen"].as_str(), Some("0.0.0.0"));
    assert_eq!(pg["port"].as_integer(), Some(5432));
    assert_eq!(pg["connect_address"].as_str(), Some("10.0.0.1"));
    assert_eq!(pg["superuser"]["password"].as_str(), Some("pg-secret"));
    assert_eq!(pg["replication"]["username"].as_str(), Some("replicator"));
    assert_eq!(pg["parameters"]["shared_buffers"].as_str(), Some("1GB"));
    let api = file["api"].as_table().unwrap();
    assert_eq!(api["connect_url"].as_str(), Some("http://10.0.0.1:8008"));
    assert_eq!(api["username"].as_str(), Some("admin"));
    assert_eq!(file["watchdog"]["mode"].as_str(), Some("automatic"));
    let tags = file["tags"].as_table().unwrap();
    assert_eq!(tags["priority"].as_integer(), Some(2));
    assert_eq!(tags["dc"].as_str(), Some("one"));
    assert_eq!(
        file["callbacks"]["on_role_change"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let dynamic = &migration.dynamic;
    assert_eq!(dynamic["synchronous_mode"], true);
    assert_eq!(dynamic["member_slots_ttl"], 1800);
    assert_eq!(dynamic["failsafe_mode"], true);
    assert_eq!(dynamic["postgresql"]["parameters"]["max_connections"], 200);
    // What mainstay does its own way is said, not silently dropped.
    let dropped: Vec<&str> = migration.notes.iter().map(|n| n.key.as_str()).collect();
    for key in [
        "namespace",
        "bootstrap.dcs.ttl",
        "bootstrap.initdb",
        "postgresql.pgpass",
    ] {
        assert!(dropped.contains(&key), "{key} not listed: {dropped:?}");
    }
}

#[test]
fn settings_whose_behaviour_would_be_lost_are_listed_each() {
    let yaml = format!("{PATRONI}\nstandby_cluster_extra: 1\n")
        .replace("  clonefrom: false\n", "  replicatefrom: node2\n")
        .replace("  callbacks:\n", "  callbacks:\n    on_reload: /bin/true\n")
        .replace(
            "    synchronous_mode: \"on\"",
            "    synchronous_mode: quorum",
        );
    let migration = from_patroni(&yaml).unwrap();
    let unmapped: Vec<&str> = migration.unmapped().map(|n| n.key.as_str()).collect();
    assert_eq!(
        unmapped,
        [
            "bootstrap.dcs.synchronous_mode",
            "postgresql.callbacks.on_reload",
            "standby_cluster_extra",
            "tags.replicatefrom"
        ]
    );
    assert!(migration.unmapped().all(|n| !n.reason.is_empty()));
}

#[test]
fn a_file_that_is_not_patroni_is_refused() {
    for (text, why) in [
        ("scope: [unclosed", "not YAML"),
        ("- a\n- b\n", "not a mapping"),
        ("cluster = \"toml\"\n", "not a mapping"),
        ("cluster: toml\n", "no `scope`"),
        ("scope: s\nname: n\n", "no `postgresql.data_dir`"),
        (
            "scope: s\nname: 3\npostgresql: {data_dir: /d}\n",
            "no `name`",
        ),
    ] {
        let refused = from_patroni(text).unwrap_err().to_string();
        assert!(refused.contains(why), "{text:?}: {refused}");
    }
}

#[test]
fn missing_credentials_or_etcd_are_refused_with_the_key() {
    let no_replication = PATRONI.replace(
        "    replication:\n      username: replicator\n      password: \"rep-secret\"\n",
        "",
    );
    let refused = from_patroni(&no_replication).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("postgresql.authentication.replication"),
        "{refused}"
    );
    let consul = PATRONI.replace(
        "etcd3:\n  hosts:\n    - 10.0.0.1:2379\n    - 10.0.0.2:2379\n  protocol: https\n  cacert: /etc/patroni/ca.pem\n",
        "consul:\n  host: 127.0.0.1:8500\n",
    );
    let refused = from_patroni(&consul).unwrap_err();
    assert!(refused.to_string().contains("etcd3.hosts"), "{refused}");
    let bad_port = PATRONI.replace("listen: \"*:5432\"", "listen: \"*:postgres\"");
    let refused = from_patroni(&bad_port).unwrap_err();
    assert!(
        refused.to_string().starts_with("postgresql.listen"),
        "{refused}"
    );
}

#[test]
fn patroni_values_read_as_patroni_reads_them() {
    use values::{boolean, host_and_port, seconds};
    assert_eq!(seconds(&serde_json::json!("30min")), Some(1800));
    assert_eq!(seconds(&serde_json::json!(90)), Some(90));
    assert_eq!(seconds(&serde_json::json!("2h")), Some(7200));
    assert_eq!(seconds(&serde_json::json!("soon")), None);
    assert_eq!(boolean(&serde_json::json!("off")), Some(false));
    assert_eq!(boolean(&serde_json::json!("maybe")), None);
    assert_eq!(
        host_and_port("[::1]:5432").unwrap(),
        ("::1".to_string(), Some(5432))
    );
    assert_eq!(host_and_port("db").unwrap(), ("db".to_string(), None));
    assert!(host_and_port(":5432").is_err());
}
