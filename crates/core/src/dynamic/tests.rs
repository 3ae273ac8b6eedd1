use super::*;
use serde_json::json;

/// Parses `document` and expects it refused at `key`; returns the
/// message so that a test can check it says what to do.
#[track_caller]
fn refused(document: Value, key: &str) -> String {
    match DynamicConfig::from_json(&document) {
        Ok(config) => panic!("{document} was accepted as {config:?}"),
        Err(problem) => {
            assert_eq!(problem.key, key, "{document}: {problem}");
            problem.message
        }
    }
}

#[track_caller]
fn accepted(document: Value) -> DynamicConfig {
    DynamicConfig::from_json(&document)
        .unwrap_or_else(|problem| panic!("{document} was refused: {problem}"))
}

#[track_caller]
fn parameter_refused(name: &str, value: Value) -> String {
    let key = format!("postgresql.parameters.{name}");
    refused(json!({"postgresql": {"parameters": {name: value}}}), &key)
}

#[track_caller]
fn parameter_accepted(name: &str, value: Value) {
    accepted(json!({"postgresql": {"parameters": {name: value}}}));
}

#[test]
fn empty_document_gives_the_defaults() {
    let config = accepted(json!({}));
    assert_eq!(config, DynamicConfig::default());
    assert!(!config.pause);
    assert_eq!(config.maximum_lag_on_failover, 1_048_576);
    assert!(!config.synchronous_mode);
    assert!(!config.synchronous_mode_strict);
    assert_eq!(config.synchronous_node_count, 1);
    assert!(!config.failsafe_mode);
    assert_eq!(config.member_slots_ttl, 1800);
    assert!(config.postgresql.parameters.is_empty());
    // A partial section gets defaults too.
    assert_eq!(accepted(json!({"postgresql": {}})), config);
}

#[test]
fn full_document_is_read_and_round_trips() {
    let document = json!({
        "pause": true,
        "maximum_lag_on_failover": 16777216,
        "synchronous_mode": true,
        "synchronous_mode_strict": true,
        "synchronous_node_count": 2,
        "failsafe_mode": true,
        "member_slots_ttl": 600,
        "scheduled_switchover_horizon": 3600,
        "postgresql": {"parameters": {
            "shared_buffers": "1GB",
            "max_connections": 200,
            "random_page_cost": 1.1,
            "jit": false,
            "pg_stat_statements.max": 5000,
            "wal_level": "logical",
            "max_wal_senders": 10,
        }},
    });
    let config = accepted(document.clone());
    assert!(config.pause && config.synchronous_mode_strict && config.failsafe_mode);
    assert_eq!(config.maximum_lag_on_failover, 16_777_216);
    assert_eq!(config.synchronous_node_count, 2);
    assert_eq!(config.member_slots_ttl, 600);
    assert_eq!(config.scheduled_switchover_horizon, 3600);
    assert_eq!(config.postgresql.parameters.len(), 7);
    let written = serde_json::to_value(&config).unwrap();
    assert_eq!(written, document);
    assert_eq!(accepted(written), config);
}

#[test]
fn wrong_types_and_unknown_keys_name_the_key() {
    let message = refused(json!({"pause": "yes"}), "pause");
    assert!(message.contains("boolean"), "{message}");
    let message = refused(json!({"paws": true}), "paws");
    assert!(message.contains("unknown field"), "{message}");
    assert!(message.contains("`pause`"), "{message}");
    refused(
        json!({"pause": false, "synchronous_node_count": -1}),
        "synchronous_node_count",
    );
    refused(
        json!({"maximum_lag_on_failover": "1MB"}),
        "maximum_lag_on_failover",
    );
    refused(json!({"member_slots_ttl": 1.5}), "member_slots_ttl");
    refused(json!({"postgresql": []}), "postgresql");
    refused(json!({"postgresql": [{"work_mem": "1MB"}]}), "postgresql");
    refused(json!({"postgresql": 5}), "postgresql");
    refused(json!({"postgresql": {"params": {}}}), "postgresql.params");
    refused(
        json!({"postgresql": {"parameters": [1]}}),
        "postgresql.parameters",
    );
}

#[test]
fn timing_keys_point_to_the_node_file() {
    for key in ["ttl", "loop_wait"] {
        let message = refused(json!({key: 10}), key);
        assert!(message.contains("[timing]"), "{message}");
    }
}

#[test]
fn document_must_be_an_object() {
    let message = refused(json!([]), "");
    assert!(message.contains("an array"), "{message}");
    refused(json!(null), "");
    let problem = DynamicConfig::from_json(&json!("x")).unwrap_err();
    assert!(!problem.to_string().starts_with(':'), "{problem}");
}

#[test]
fn display_names_the_key() {
    let problem = DynamicConfig::from_json(&json!({"pause": 1})).unwrap_err();
    assert!(problem.to_string().starts_with("pause: "), "{problem}");
    let _: &dyn std::error::Error = &problem;
}

#[test]
fn synchronous_node_count_is_bounded() {
    refused(
        json!({"synchronous_node_count": 0}),
        "synchronous_node_count",
    );
    refused(
        json!({"synchronous_node_count": 17}),
        "synchronous_node_count",
    );
    accepted(json!({"synchronous_node_count": 1}));
    accepted(json!({"synchronous_node_count": 16}));
}

#[test]
fn strict_needs_synchronous_mode() {
    let message = refused(
        json!({"synchronous_mode_strict": true}),
        "synchronous_mode_strict",
    );
    assert!(message.contains("synchronous_mode to true"), "{message}");
    accepted(json!({"synchronous_mode": true, "synchronous_mode_strict": true}));
}

#[test]
fn limits_on_lag_and_slot_lifetime() {
    accepted(json!({"maximum_lag_on_failover": 0}));
    accepted(json!({"maximum_lag_on_failover": 1u64 << 40}));
    refused(
        json!({"maximum_lag_on_failover": (1u64 << 40) + 1}),
        "maximum_lag_on_failover",
    );
    accepted(json!({"member_slots_ttl": 0}));
    accepted(json!({"member_slots_ttl": 604800}));
    refused(json!({"member_slots_ttl": 604801}), "member_slots_ttl");
    accepted(json!({"scheduled_switchover_horizon": 60}));
    accepted(json!({"scheduled_switchover_horizon": 366 * 86400}));
    for bad in [0, 59, 366 * 86400 + 1] {
        refused(
            json!({"scheduled_switchover_horizon": bad}),
            "scheduled_switchover_horizon",
        );
    }
}

#[test]
fn values_that_would_break_the_configuration_file_are_refused() {
    for value in [
        "4MB\nwork_mem = 'x'",
        "4MB\r",
        "a\u{0}b",
        "tab\there",
        "\u{7f}",
    ] {
        let message = parameter_refused("work_mem", json!(value));
        assert!(message.contains("control character"), "{message}");
    }
    // Quotes and backslashes are escaped when the file is written.
    parameter_accepted("application_name", json!("it's a \\ path"));
    parameter_accepted("search_path", json!("\"$user\", public"));
}

#[test]
fn parameter_names_must_look_like_postgresql_names() {
    for name in ["Shared_buffers", "1abc", "", "work-mem", "a b", ".x", "é"] {
        parameter_refused(name, json!("1"));
    }
    for name in [
        "_x",
        "work_mem",
        "pg_stat_statements.max",
        "auto_explain.log_min_duration",
    ] {
        parameter_accepted(name, json!("1"));
    }
}

#[test]
fn parameter_values_are_scalars() {
    for value in [json!(null), json!([1]), json!({"a": 1})] {
        let message = parameter_refused("work_mem", value);
        assert!(
            message.contains("string, a number or a boolean"),
            "{message}"
        );
    }
    for value in [
        json!("4MB"),
        json!(4096),
        json!(1.5),
        json!(true),
        json!(-1),
    ] {
        parameter_accepted("work_mem", value);
    }
}

#[test]
fn parameters_mainstay_manages_are_refused() {
    for name in [
        "listen_addresses",
        "port",
        "hba_file",
        "ident_file",
        "data_directory",
        "config_file",
        "primary_conninfo",
        "primary_slot_name",
        "synchronous_standby_names",
        "hot_standby",
        "cluster_name",
        "unix_socket_directories",
    ] {
        let message = parameter_refused(name, json!("x"));
        assert!(message.contains("mainstay manages it"), "{name}: {message}");
    }
}

#[test]
fn wal_level_must_keep_replication_possible() {
    for level in [
        json!("minimal"),
        json!("archive"),
        json!("Replica"),
        json!(1),
    ] {
        let message = parameter_refused("wal_level", level);
        assert!(message.contains("mainstay manages it"), "{message}");
    }
    parameter_accepted("wal_level", json!("replica"));
    parameter_accepted("wal_level", json!("logical"));
}

#[test]
fn max_wal_senders_keeps_room_for_a_replica_and_a_clone() {
    for senders in [
        json!(0),
        json!(1),
        json!("1"),
        json!("ten"),
        json!(2.5),
        json!(true),
    ] {
        let message = parameter_refused("max_wal_senders", senders);
        assert!(message.contains("mainstay manages it"), "{message}");
    }
    parameter_accepted("max_wal_senders", json!(2));
    parameter_accepted("max_wal_senders", json!("20"));
}

/// RFC 7396, appendix A, every example.
#[test]
fn merge_patch_follows_rfc_7396() {
    let cases = [
        (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
        (json!({"a":"b"}), json!({"a":null}), json!({})),
        (
            json!({"a":"b","b":"c"}),
            json!({"a":null}),
            json!({"b":"c"}),
        ),
        (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
        (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
        (
            json!({"a":{"b":"c"}}),
            json!({"a":{"b":"d","c":null}}),
            json!({"a":{"b":"d"}}),
        ),
        (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
        (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
        (json!({"a":"b"}), json!(["c"]), json!(["c"])),
        (json!({"a":"foo"}), json!(null), json!(null)),
        (json!({"a":"foo"}), json!("bar"), json!("bar")),
        (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
        (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
        (
            json!({}),
            json!({"a":{"bb":{"ccc":null}}}),
            json!({"a":{"bb":{}}}),
        ),
    ];
    for (base, patch, expected) in cases {
        assert_eq!(merge_patch(&base, &patch), expected, "{base} + {patch}");
    }
}

#[test]
fn merge_patch_changes_one_parameter_of_a_config() {
    let base = json!({"pause": false, "postgresql": {"parameters": {
        "work_mem": "4MB", "max_connections": 100}}});
    let patch = json!({"pause": true, "postgresql": {"parameters": {
        "work_mem": null, "shared_buffers": "1GB"}}});
    let merged = merge_patch(&base, &patch);
    let config = accepted(merged);
    assert!(config.pause);
    assert_eq!(
        config.postgresql.parameters,
        BTreeMap::from([
            ("max_connections".to_string(), json!(100)),
            ("shared_buffers".to_string(), json!("1GB")),
        ])
    );
}

#[test]
fn restart_list_is_postgresql_15s_postmaster_context() {
    assert_eq!(POSTMASTER_PARAMETERS.len(), 55);
    assert!(
        POSTMASTER_PARAMETERS.windows(2).all(|w| w[0] < w[1]),
        "the list must be sorted and without duplicates for binary search"
    );
    for name in [
        "shared_buffers",
        "max_connections",
        "wal_level",
        "archive_mode",
        "port",
    ] {
        assert!(restart_required(name), "{name}");
    }
    assert!(restart_required("Shared_Buffers"));
    for name in [
        "work_mem",
        "archive_command",
        "primary_conninfo",
        "log_line_prefix",
        "",
    ] {
        assert!(!restart_required(name), "{name}");
    }
}

#[test]
fn changed_parameters_split_reload_from_restart() {
    let config = accepted(json!({"postgresql": {"parameters": {
        "shared_buffers": "1GB",          // restart, changed
        "max_connections": 200,           // restart, unchanged
        "wal_log_hints": true,            // restart, unchanged ("on" vs true)
        "work_mem": "64MB",               // reload, changed
        "random_page_cost": 1.1,          // reload, not applied yet
        "jit": false,                     // reload, changed
        "log_checkpoints": "yes",         // reload, unchanged by meaning
        "track_commit_timestamp": "on",   // restart, changed
    }}}));
    let applied: BTreeMap<String, String> = [
        ("shared_buffers", "128MB"),
        ("max_connections", "200"),
        ("wal_log_hints", "on"),
        ("work_mem", "4MB"),
        ("jit", "on"),
        ("log_checkpoints", "on"),
        ("track_commit_timestamp", "off"),
        ("search_path", "\"$user\", public"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
    assert_eq!(
        config.changed_parameters(&applied),
        ParameterChanges {
            reload: vec![
                pair("jit", "off"),
                pair("random_page_cost", "1.1"),
                pair("work_mem", "64MB"),
            ],
            restart: vec![
                pair("shared_buffers", "1GB"),
                pair("track_commit_timestamp", "on"),
            ],
        }
    );
}

#[test]
fn nothing_changes_when_the_server_runs_the_configuration() {
    let config = accepted(json!({"postgresql": {"parameters": {
        "max_connections": 100, "hot_standby_feedback": true}}}));
    let applied = BTreeMap::from([
        ("max_connections".to_string(), "100".to_string()),
        ("hot_standby_feedback".to_string(), "on".to_string()),
    ]);
    assert_eq!(
        config.changed_parameters(&applied),
        ParameterChanges::default()
    );
}
