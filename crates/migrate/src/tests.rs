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
    let migration = from_patroni(PATRONI, Dynamic::Bootstrap).unwrap();
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
    assert_eq!(pg["parameters"]["cluster_name"].as_str(), Some("ship"));
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
    let migration = from_patroni(&yaml, Dynamic::Bootstrap).unwrap();
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
        let refused = from_patroni(text, Dynamic::Bootstrap)
            .unwrap_err()
            .to_string();
        assert!(refused.contains(why), "{text:?}: {refused}");
    }
}

#[test]
fn missing_credentials_or_etcd_are_refused_with_the_key() {
    let no_replication = PATRONI.replace(
        "    replication:\n      username: replicator\n      password: \"rep-secret\"\n",
        "",
    );
    let refused = from_patroni(&no_replication, Dynamic::Bootstrap).unwrap_err();
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
    let refused = from_patroni(&consul, Dynamic::Bootstrap).unwrap_err();
    assert!(refused.to_string().contains("etcd3.hosts"), "{refused}");
    let bad_port = PATRONI.replace("listen: \"*:5432\"", "listen: \"*:postgres\"");
    let refused = from_patroni(&bad_port, Dynamic::Bootstrap).unwrap_err();
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

/// The note about `key`.
fn note<'a>(migration: &'a Migration, key: &str) -> &'a Note {
    migration
        .notes
        .iter()
        .find(|n| n.key == key)
        .unwrap_or_else(|| panic!("no note for {key}: {:?}", migration.notes))
}

#[test]
fn a_node_value_patroni_ignored_is_dropped_and_what_ran_is_carried() {
    let yaml = PATRONI.replace(
        "    shared_buffers: 1GB\n",
        "    shared_buffers: 1GB\n    max_connections: 50\n    wal_keep_segments: 4\n    port: 6543\n",
    );
    let migration = from_patroni(&yaml, Dynamic::Bootstrap).unwrap();
    let file: toml::Table = toml::from_str(&migration.node_file).unwrap();
    let parameters = file["postgresql"]["parameters"].as_table().unwrap();
    assert_eq!(
        parameters.keys().collect::<Vec<_>>(),
        ["cluster_name", "shared_buffers", "unix_socket_directories"],
        "only what Patroni let the node set"
    );
    let ignored = note(&migration, "postgresql.parameters.max_connections");
    assert_eq!(ignored.disposition, Disposition::Dropped);
    assert_eq!(
        ignored.reason,
        "Patroni takes it only from the cluster-wide configuration and ignored this node's 50: \
         it ran max_connections = 200 (bootstrap.dcs), which the dynamic configuration carries"
    );
    assert!(
        note(&migration, "postgresql.parameters.wal_keep_segments")
            .reason
            .contains("it ran wal_keep_size = 128MB (Patroni's default)"),
        "{:?}",
        migration.notes
    );
    assert!(
        note(&migration, "postgresql.parameters.port")
            .reason
            .contains("postgresql.listen")
    );
    // Every such parameter is written as it ran, set or not.
    let dynamic = &migration.dynamic["postgresql"]["parameters"];
    assert_eq!(dynamic["max_connections"], 200);
    assert_eq!(dynamic["max_locks_per_transaction"], 64);
    assert_eq!(dynamic["wal_level"], "replica");
    assert_eq!(dynamic["wal_keep_size"], "128MB");
    assert_eq!(dynamic.as_object().unwrap().len(), 10, "{dynamic}");
    let defaults: Vec<&str> = migration
        .cluster_parameters
        .iter()
        .filter(|p| p.origin == Origin::Default)
        .map(|p| p.name)
        .collect();
    assert!(defaults.contains(&"max_worker_processes"), "{defaults:?}");
    assert!(!defaults.contains(&"max_connections"), "{defaults:?}");
}

#[test]
fn cluster_wide_values_patroni_never_used_are_not_carried() {
    let yaml = PATRONI.replace(
        "        max_connections: 200\n",
        "        max_connections: 10\n        hot_standby: \"on\"\n        wal_keep_segments: 16\n",
    );
    let migration = from_patroni(&yaml, Dynamic::Bootstrap).unwrap();
    assert_eq!(migration.unmapped().count(), 0, "{:?}", migration.notes);
    let dynamic = &migration.dynamic["postgresql"]["parameters"];
    // Below Patroni's minimum of 25: it ran its default.
    assert_eq!(dynamic["max_connections"], 100);
    assert_eq!(dynamic["wal_keep_size"], "256MB");
    assert!(dynamic.get("hot_standby").is_none(), "{dynamic}");
    assert!(dynamic.get("wal_keep_segments").is_none(), "{dynamic}");
    let refused = note(
        &migration,
        "bootstrap.dcs.postgresql.parameters.max_connections",
    );
    assert!(
        refused
            .reason
            .starts_with("Patroni refused 10: it ran max_connections = 100 (Patroni's default"),
        "{refused:?}"
    );
}

#[test]
fn the_running_configuration_replaces_bootstrap_dcs() {
    // GET /config of a Patroni 4.1.5 cluster: changed since its bootstrap,
    // paused, and with a permanent slot.
    let config: serde_json::Value = serde_json::from_str(include_str!(
        "../testdata/patroni-4.1.5/config_edited_paused.json"
    ))
    .unwrap();
    let yaml = PATRONI.replace(
        "    shared_buffers: 1GB\n",
        "    shared_buffers: 1GB\n    max_connections: 50\n",
    );
    let migration = from_patroni(&yaml, Dynamic::Running(&config)).unwrap();
    assert_eq!(migration.unmapped().count(), 0, "{:?}", migration.notes);
    let dynamic = &migration.dynamic;
    assert_eq!(dynamic["postgresql"]["parameters"]["max_connections"], 150);
    assert_eq!(dynamic["postgresql"]["parameters"]["max_wal_senders"], 12);
    assert_eq!(dynamic["pause"], true);
    assert_eq!(dynamic["maximum_lag_on_failover"], 1_048_576);
    // Nothing of the stale bootstrap.dcs (synchronous_mode, member_slots_ttl).
    assert!(dynamic.get("synchronous_mode").is_none(), "{dynamic}");
    assert!(dynamic.get("member_slots_ttl").is_none(), "{dynamic}");
    let keys: Vec<&str> = migration.notes.iter().map(|n| n.key.as_str()).collect();
    assert!(keys.contains(&"bootstrap.dcs"), "{keys:?}");
    assert!(
        !keys.iter().any(|k| k.starts_with("bootstrap.dcs.")),
        "{keys:?}"
    );
    assert!(keys.contains(&"config.ttl"), "{keys:?}");
    let ignored = note(&migration, "postgresql.parameters.max_connections");
    assert!(
        ignored
            .reason
            .contains("it ran max_connections = 150 (GET /config)"),
        "{ignored:?}"
    );

    let slots: serde_json::Value =
        serde_json::from_str(include_str!("../testdata/patroni-4.1.5/config_slots.json")).unwrap();
    let migration = from_patroni(PATRONI, Dynamic::Running(&slots)).unwrap();
    let unmapped: Vec<&str> = migration.unmapped().map(|n| n.key.as_str()).collect();
    assert_eq!(unmapped, ["config.slots.s1.type"]);
    let empty = from_patroni(PATRONI, Dynamic::Running(&serde_json::json!({}))).unwrap();
    assert_eq!(empty.unmapped().count(), 0, "{:?}", empty.notes);
}

#[test]
fn the_node_and_its_rest_api_are_read_from_the_file() {
    let node = patroni_node(PATRONI).unwrap();
    assert_eq!(node.scope, "ship");
    assert_eq!(node.name, "node1");
    assert_eq!(node.api_url.as_deref(), Some("http://10.0.0.1:8008"));
    assert!(node.api_credentials);
    assert_eq!(node.api_ca_file, None);
    let tls = PATRONI.replace(
        "  connect_address: 10.0.0.1:8008\n",
        "  connect_address: 10.0.0.1:8008\n  certfile: /etc/patroni/api.pem\n  cafile: /etc/patroni/api-ca.pem\n  verify_client: required\n",
    );
    let node = patroni_node(&tls).unwrap();
    assert_eq!(node.api_url.as_deref(), Some("https://10.0.0.1:8008"));
    assert_eq!(node.api_ca_file.as_deref(), Some("/etc/patroni/api-ca.pem"));
    assert!(node.api_client_certificate);
    // patronictl's own order: ctl.cacert first.
    let ctl = format!("{tls}ctl:\n  cacert: /etc/patroni/ctl-ca.pem\n");
    let node = patroni_node(&ctl).unwrap();
    assert_eq!(node.api_ca_file.as_deref(), Some("/etc/patroni/ctl-ca.pem"));
    assert!(patroni_node("scope: s\n").is_err());
}
