//! The OpenAPI 3.1 description served at `/openapi.json`, written by hand next
//! to the router so that a route without a description stands out in review.
//!
//! It is a contract, not a sketch: `tests/api_fuzz.rs` runs schemathesis
//! against a real cluster with this document, and fails on any answer whose
//! status code, content type or body it does not describe, on a request it
//! calls valid that the server refuses for its shape, and on one it calls
//! invalid that the server accepts. Every status code an operation can
//! answer is listed with when it happens. The unit tests below tie the
//! dynamic configuration's schema to `DynamicConfig` itself.

use serde_json::{Value, json};

/// `{"error": reason}`, the body of every refusal.
fn err(when: &str) -> Value {
    json!({"description": when, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

/// A JSON answer described by `schema`.
fn ok(what: &str, schema: Value) -> Value {
    json!({"description": what, "content": {"application/json": {"schema": schema}}})
}

fn schema(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

/// The answer of an unauthenticated or wrongly authenticated unsafe request.
fn unauthorized() -> Value {
    let mut response = err(
        "No or wrong credentials: HTTP basic (api.username/api.password) or a bearer token (api.token).",
    );
    response["headers"] = json!({"WWW-Authenticate": {
        "description": "Basic realm=\"mainstay\"",
        "schema": {"type": "string"}
    }});
    response
}

/// The responses every unsafe operation shares: authentication comes
/// first, then (for operations with a body) reading the body.
fn guarded(mut responses: Value, body: bool) -> Value {
    let map = responses.as_object_mut().expect("an object");
    map.insert("401".into(), unauthorized());
    map.insert(
        "403".into(),
        err("Unsafe methods are disabled: the agent's [api] section sets no credentials."),
    );
    if body {
        map.entry("400").or_insert_with(|| {
            err("The body is not JSON or not what this operation takes (unknown field, wrong type).")
        });
        map.insert(
            "408".into(),
            err("The body did not arrive within api.header_timeout."),
        );
        map.insert("413".into(), err("The body is over 2 MiB."));
    }
    responses
}

fn unsafe_op(summary: &str, body: Option<(Value, bool)>, responses: Value) -> Value {
    let with_body = body.is_some();
    let mut operation = json!({
        "summary": summary,
        "security": [{"basic": []}, {"bearer": []}],
        "responses": guarded(responses, with_body)
    });
    if let Some((schema, required)) = body {
        operation["requestBody"] =
            json!({"required": required, "content": {"application/json": {"schema": schema}}});
    }
    operation
}

/// A command the HA loop runs between turns (`POST /restart` and the like).
fn command(summary: &str, done: &str, more: &[(&str, &str)]) -> Value {
    let mut responses = json!({
        "200": ok(done, schema("Message")),
        "400": err("The body is not empty, `{}` or whitespace."),
        "409": err("Refused in this node's state (see the reason), or another command (restart, reinitialize, crash drill, member removal) is still running on this node."),
        "500": err("PostgreSQL could not be stopped or started (the reason and the agent's log say why)."),
        "503": err("The agent is shutting down, or did not finish the command within 600 s."),
    });
    for (code, when) in more {
        responses[*code] = err(when);
    }
    let body = json!({"$ref": "#/components/schemas/Empty"});
    unsafe_op(summary, Some((body, false)), responses)
}

/// The query parameters of every health check.
fn health_parameters() -> Value {
    let tag = |name: &str, example: &str| {
        json!({"name": format!("tag_{name}"), "in": "query", "required": false,
               "description": format!("Require the node's {name} tag to have this value (compared without case; no match answers 503)."),
               "schema": {"type": "string"}, "example": example})
    };
    json!([
        {"name": "lag", "in": "query", "required": false,
         "description": "Largest acceptable replication lag: bytes, or a number with a unit B, kB (or KB), MB, GB, TB, e.g. 10MB. A size over 2^64-1 bytes is refused with 400.",
         "schema": {"type": "string", "pattern": lag_pattern()}, "example": "10MB"},
        tag("nofailover", "false"),
        tag("nosync", "false"),
        tag("noloadbalance", "false"),
        tag("priority", "0")
    ])
}

/// The sizes `config::parse_size` takes, as a regular expression: digits
/// and a unit, with white space around either (Rust's `trim`). The number of
/// digits is bounded per unit so that the size fits in 64 bits (leading
/// zeros aside); a larger size is refused with 400.
fn lag_pattern() -> String {
    let space =
        "[\\t-\\r \\u0085\\u00a0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]*";
    let sizes = [
        ("B?", 19),
        ("(kB|KB)", 16),
        ("MB", 13),
        ("GB", 10),
        ("TB", 7),
    ]
    .map(|(unit, digits)| format!("0*[0-9]{{1,{digits}}}{space}{unit}"))
    .join("|");
    format!("^{space}({sizes}){space}$")
}

fn health(summary: &str) -> Value {
    let operation = json!({
        "summary": summary,
        "description": "Patroni's health check: the status code is the answer, the body this node's status document. Never refused for the node's state: 503 means \"not this node\" (or not now). Unknown query parameters are ignored, as Patroni does; a tag_<name> for another tag never matches (503).",
        "parameters": health_parameters(),
        "responses": {
            "200": ok("This node fits.", schema("NodeStatus")),
            "503": ok("This node does not fit (now).", schema("NodeStatus")),
            "400": err("A malformed query: a lag that is not a size.")
        }
    });
    json!({"get": operation, "head": operation, "options": operation})
}

/// A read-only document, for GET and HEAD.
/// A supervised service's status (`mainstay_services::ServiceStatus`).
fn service_status_schema() -> Value {
    json!({
        "type": "object",
        "required": ["name", "placement", "state", "pid", "restarts", "check_failures", "last_check", "since", "reason"],
        "properties": {
            "name": {"type": "string"},
            "placement": {"enum": ["with-leader", "everywhere", "with-replica"]},
            "state": {"enum": ["stopped", "waiting", "starting", "running", "backing_off", "failed", "stopping"]},
            "pid": {"type": ["integer", "null"]},
            "restarts": {"type": "integer", "minimum": 0},
            "check_failures": {"type": "integer", "minimum": 0},
            "last_check": {"type": ["string", "null"]},
            "since": {"type": "integer", "minimum": 0},
            "reason": {"type": ["string", "null"]}
        }
    })
}

/// `GET /services`.
fn services_schema() -> Value {
    json!({
        "type": "object", "required": ["name", "services"],
        "properties": {
            "name": {"type": "string"},
            "services": {"type": "array", "items": schema("ServiceStatus")}
        }
    })
}

fn read(summary: &str, answer: Value, unavailable: Option<&str>) -> Value {
    let mut operation = json!({"summary": summary, "responses": {"200": answer}});
    if let Some(when) = unavailable {
        operation["responses"]["503"] = err(when);
    }
    json!({"get": operation, "head": operation})
}

const NO_DCS_YET: &str = "This agent has not read the DCS since it started.";

/// PostgreSQL parameters a cluster-wide value may not set: the agent sets
/// them per node (`managed_reason` in `mainstay_core::dynamic`).
const MANAGED_PARAMETERS: &[&str] = &[
    "cluster_name",
    "config_file",
    "data_directory",
    "hba_file",
    "hot_standby",
    "ident_file",
    "listen_addresses",
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "unix_socket_directories",
];

/// What `mainstay_core::dynamic` accepts as a parameter name.
const PARAMETER_NAME: &str = "^[a-z_][a-z0-9_.]*$";

/// Integer keys of the dynamic configuration and their ranges (inclusive).
const INTEGER_KEYS: &[(&str, u64, u64, &str)] = &[
    (
        "maximum_lag_on_failover",
        0,
        1 << 40,
        "Bytes: a replica further behind is not promoted automatically (default 1048576).",
    ),
    (
        "synchronous_node_count",
        1,
        16,
        "Standbys that confirm each commit in synchronous mode (default 1).",
    ),
    (
        "member_slots_ttl",
        0,
        7 * 24 * 3600,
        "Seconds the leader keeps a vanished member's slot (default 1800).",
    ),
    (
        "scheduled_switchover_horizon",
        60,
        366 * 24 * 3600,
        "Seconds: how far ahead a switchover may be scheduled (default 604800).",
    ),
];

/// Boolean keys of the dynamic configuration.
const BOOLEAN_KEYS: &[(&str, &str)] = &[
    (
        "pause",
        "Maintenance mode: no automatic action (default false).",
    ),
    (
        "synchronous_mode",
        "Commits wait for the standbys in the sync key (default false).",
    ),
    (
        "synchronous_mode_strict",
        "Block commits rather than replicate asynchronously when no synchronous standby is there; needs synchronous_mode (default false).",
    ),
    (
        "failsafe_mode",
        "A leader that loses the DCS keeps running while every member confirms it (default false).",
    ),
];

/// The dynamic configuration as stored and as `PUT /config` takes it, or
/// (`patch`) as a JSON merge patch of it, where `null` removes a key.
fn dynamic_config(patch: bool) -> Value {
    // In a patch every value may be null: the key goes back to its default.
    let nullable = |mut schema: Value| {
        if patch {
            schema = json!({"anyOf": [schema, {"type": "null"}]});
        }
        schema
    };
    let mut properties = serde_json::Map::new();
    for (key, description) in BOOLEAN_KEYS {
        properties.insert(
            key.to_string(),
            nullable(json!({"type": "boolean", "description": description})),
        );
    }
    for (key, minimum, maximum, description) in INTEGER_KEYS {
        properties.insert(
            key.to_string(),
            nullable(json!({"type": "integer", "minimum": minimum, "maximum": maximum, "description": description})),
        );
    }
    // One value on one line of postgresql.conf: no control character.
    let text = json!({"type": "string", "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]*$"});
    let value = json!({"anyOf": [text, {"type": "number"}, {"type": "boolean"}]});
    let mut known = json!({
        "wal_level": nullable(json!({"enum": ["replica", "logical"], "description": "Replicas and pg_rewind need at least replica."})),
        "max_wal_senders": nullable(json!({"description": "A replica streams through one sender and a clone needs another: 2 or more.", "anyOf": [
            {"type": "integer", "minimum": 2, "maximum": i64::MAX},
            {"type": "string", "pattern": "^\\s*\\+?0*([2-9]|[1-9][0-9]+)\\s*$"}
        ]}))
    });
    let description = "PostgreSQL parameters set on every node: name to value (a string, a number or a boolean, which is written on/off). Parameters the agent sets per node are refused; names, types, units, ranges and enum values are checked by each member's own server before anything is stored (400 naming parameter and member).";
    let parameters = if patch {
        // Removing a parameter that is not there changes nothing, whatever
        // its name: null is accepted for any name, a value only for a
        // valid name that the agent does not manage.
        for name in MANAGED_PARAMETERS {
            known[*name] = json!({"type": "null"});
        }
        json!({
            "type": "object",
            "description": description,
            "properties": known,
            "patternProperties": {PARAMETER_NAME: nullable(value)},
            "additionalProperties": {"type": "null"}
        })
    } else {
        json!({
            "type": "object",
            "description": description,
            "propertyNames": {"pattern": PARAMETER_NAME, "not": {"enum": MANAGED_PARAMETERS}},
            "properties": known,
            "additionalProperties": value
        })
    };
    // In a patch, null for a key that does not exist removes nothing: it
    // is accepted, whatever the key.
    let unknown = if patch {
        json!({"type": "null"})
    } else {
        json!(false)
    };
    let postgresql = json!({
        "type": "object",
        "additionalProperties": unknown,
        "properties": {"parameters": nullable(parameters)}
    });
    properties.insert("postgresql".into(), nullable(postgresql));
    // Shown as Patroni shows them; a body may repeat them unchanged.
    for (key, file_key) in [
        ("ttl", "ttl"),
        ("loop_wait", "loop_wait"),
        ("retry_timeout", "dcs_timeout"),
    ] {
        properties.insert(
            key.into(),
            nullable(json!({"type": "number", "exclusiveMinimum": 0, "description": format!("Seconds: this node's [timing] {file_key}, set in each node's file. A body may repeat this node's value (GET then PUT works); any other value is refused with 400.")})),
        );
    }
    let description = if patch {
        "A JSON merge patch (RFC 7396) of the dynamic configuration: keys given replace, objects merge, null removes a key (back to its default; null for a key that is not there changes nothing). The merged document must be valid as a whole (synchronous_mode_strict needs synchronous_mode)."
    } else {
        "The cluster-wide dynamic configuration; every key has a default, so {} is valid. synchronous_mode_strict needs synchronous_mode."
    };
    json!({
        "type": "object",
        "description": description,
        "additionalProperties": unknown,
        "properties": properties
    })
}

fn tags_schema() -> Value {
    json!({"type": "object", "description": "The built-in tags when set, and the node's own ([tags] dc = \"one\"): a string, a number or a boolean each.",
        "properties": {
            "nofailover": {"type": "boolean"}, "nosync": {"type": "boolean"},
            "noloadbalance": {"type": "boolean"}, "priority": {"type": "integer"}
        },
        "additionalProperties": {"type": ["string", "number", "boolean"]}
    })
}

fn components() -> Value {
    let lsn = json!({"type": ["integer", "null"], "minimum": 0});
    // PostgreSQL's text form, as Patroni writes LSNs in /cluster.
    let pg_lsn = json!({"anyOf": [{"type": "string", "pattern": "^[0-9A-F]+/[0-9A-F]+$"}, {"const": "unknown"}]});
    json!({
        "securitySchemes": {
            "basic": {"type": "http", "scheme": "basic"},
            "bearer": {"type": "http", "scheme": "bearer"}
        },
        "schemas": {
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
            "Message": {"type": "object", "required": ["message"], "properties": {"message": {"type": "string"}}},
            "Empty": {
                "description": "No parameters: an empty body, whitespace or {}.",
                "type": "object", "additionalProperties": false, "maxProperties": 0
            },
            "Tags": tags_schema(),
            "ServiceStatus": service_status_schema(),
            "Services": services_schema(),
            "NodeStatus": {
                "type": "object",
                "required": ["state", "role", "patroni", "mainstay"],
                "properties": {
                    "state": {"enum": ["running", "starting", "stopped"]},
                    "postmaster_start_time": {"type": "string", "description": "When the postmaster started, as Patroni writes it (2026-12-07 10:02:55.355211+00:00)."},
                    "role": {"enum": ["primary", "replica"], "description": "What PostgreSQL runs as; when it does not run, what it would run as."},
                    "server_version": {"type": "integer"},
                    "timeline": {"type": "integer", "minimum": 0},
                    "database_system_identifier": {"type": "string"},
                    "services": {"type": "array", "items": schema("ServiceStatus")},
                    "alerts": {"type": "array", "items": {"type": "object", "required": ["alert", "subject", "message"], "properties": {
                        "alert": {"enum": ["replication_lag", "data_disk", "replicated_files"]}, "subject": {"type": "string"}, "message": {"type": "string"}
                    }}},
                    "xlog": {"type": "object", "properties": {
                        "location": lsn, "received_location": lsn, "replayed_location": lsn,
                        "replayed_timestamp": {"type": ["string", "null"]}, "paused": {"type": "boolean"}
                    }},
                    "replication": {"type": "array", "items": {"type": "object", "properties": {
                        "usename": {"type": ["string", "null"]},
                        "application_name": {"type": "string"},
                        "sync_priority": {"type": ["integer", "null"]},
                        "client_addr": {"type": ["string", "null"]},
                        "state": {"type": ["string", "null"]},
                        "sync_state": {"type": ["string", "null"]},
                        "sent_location": lsn, "flush_location": lsn, "replay_location": lsn
                    }}},
                    "replication_state": {"type": "string"},
                    "replay_delay_seconds": {"type": "number"},
                    "cluster_unlocked": {"type": "boolean"},
                    "pause": {"type": "boolean"},
                    "pending_restart": {"type": "boolean"},
                    "pending_restart_reason": {"type": "object", "description": "Each parameter the server keeps until a restart: the value it runs and the one it will run.",
                        "additionalProperties": {"type": "object", "required": ["old_value", "new_value"], "properties": {
                            "old_value": {"type": "string"}, "new_value": {"type": ["string", "null"]}
                        }}},
                    "failsafe_mode_is_active": {"type": "boolean"},
                    "dcs_last_seen": {"type": "integer", "description": "Unix seconds."},
                    "tags": schema("Tags"),
                    "watchdog_failed": {"type": "boolean"},
                    "watchdog_failed_reason": {"type": "string"},
                    "sync_standby": {"type": "boolean"},
                    "config_warning": {"type": "string", "description": "The cluster's PostgreSQL parameters are refused here, or PostgreSQL runs on the last parameters it started with."},
                    "patroni": {"type": "object", "required": ["version", "scope", "name"], "properties": {
                        "version": {"type": "string"}, "scope": {"type": "string"}, "name": {"type": "string"}
                    }},
                    "mainstay": {"type": "object", "required": ["version", "leader", "dcs_reachable", "last_decision"], "properties": {
                        "version": {"type": "string", "description": "mainstay's own version (patroni.version is the Patroni API version its documents follow)."},
                        "leader": {"type": "boolean"}, "dcs_reachable": {"type": "boolean"}, "last_decision": {"type": "string"}
                    }}
                }
            },
            "Cluster": {
                "type": "object",
                "required": ["members", "scope"],
                "properties": {
                    "scope": {"type": "string"},
                    "pause": {"type": "boolean"},
                    "members": {"type": "array", "items": {
                        "type": "object",
                        "required": ["name", "role", "state", "api_url", "host", "port", "tags"],
                        "properties": {
                            "name": {"type": "string"},
                            "role": {"enum": ["leader", "sync_standby", "replica"]},
                            "state": {"enum": ["stopped", "streaming", "running"]},
                            "api_url": {"type": "string"},
                            "host": {"type": "string"},
                            "port": {"type": "integer", "minimum": 0, "maximum": 65535},
                            "timeline": {"type": "integer", "minimum": 1, "description": "Absent while the member reports none (stopped)."},
                            "tags": schema("Tags"),
                            "pending_restart": {"type": "boolean"},
                            "pending_restart_reason": {"type": "object"},
                            "vip": {"type": "string"},
                            "warning": {"type": "string", "description": "What the member reports wrong with it (e.g. parameters it refused)."},
                            "alerts": {"type": "array", "items": {"type": "string"}, "description": "What the member alerts its operators to ([alerts])."},
                            "files": {"type": "object", "description": "The member's replicated directories: path to where it stands (source, in sync, N failed, error, idle).", "additionalProperties": {"type": "string"}},
                            "services": {"type": "object", "description": "The member's supervised services: name to state.", "additionalProperties": {"enum": ["stopped", "waiting", "starting", "running", "backing_off", "failed", "stopping"]}},
                            "lag": {"description": "Bytes behind the leader's last published position, or unknown.",
                                    "anyOf": [{"type": "integer", "minimum": 0}, {"const": "unknown"}]},
                            "receive_lag": {"anyOf": [{"type": "integer", "minimum": 0}, {"const": "unknown"}]},
                            "replay_lag": {"anyOf": [{"type": "integer", "minimum": 0}, {"const": "unknown"}]},
                            "lsn": pg_lsn.clone(),
                            "receive_lsn": pg_lsn.clone(),
                            "replay_lsn": pg_lsn
                        }
                    }},
                    "witnesses": {"type": "array", "description": "Witnesses (etcd members without PostgreSQL), listed apart from the members as Patroni has none.", "items": {
                        "type": "object", "required": ["name", "api_url", "state"],
                        "properties": {"name": {"type": "string"}, "api_url": {"type": "string"}, "state": {"const": "running"}, "version": {"type": "string"}}
                    }},
                    "recoveries": {"type": "array"},
                    "dcs_reachable": {"type": "boolean"},
                    "dcs_last_seen": {"type": "integer"},
                    "scheduled_switchover": {"description": "A pending switchover or failover request.", "anyOf": [
                        {"type": "object", "required": ["kind"], "properties": {
                            "kind": {"enum": ["switchover", "failover"]},
                            "at": {"description": "RFC 3339; Unix seconds when beyond what RFC 3339 writes; null: now.",
                                   "type": ["string", "integer", "null"]},
                            "from": {"type": ["string", "null"]},
                            "to": {"type": ["string", "null"]}
                        }},
                        {"type": "object", "required": ["unreadable"], "properties": {"unreadable": {"type": "string"}}}
                    ]}
                }
            },
            "History": {
                "description": "Timeline switches, oldest first: [ended timeline, LSN where it ended, reason, time, new leader].",
                "type": "array",
                "items": {"type": "array", "minItems": 5, "maxItems": 5, "items": {"type": ["integer", "string"]}}
            },
            "DynamicConfig": dynamic_config(false),
            "DynamicConfigPatch": dynamic_config(true),
            "SwitchoverRequest": {
                "type": "object", "additionalProperties": false,
                "properties": {
                    "leader": {"type": ["string", "null"], "description": "Refused with 412 unless it names the current leader."},
                    "candidate": {"type": ["string", "null"], "description": "The member to take over; without one the best replica does."},
                    "scheduled_at": {
                        "description": "When: RFC 3339 in UTC (2026-12-24T03:00:00Z; a space for T and no Z are accepted) or Unix seconds. Refused with 400 when more than 30 s in the past or beyond the dynamic configuration's scheduled_switchover_horizon.",
                        "anyOf": [
                            {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?(Z|\\+00:00)?$"},
                            {"type": "integer", "minimum": 0, "maximum": u64::MAX},
                            {"type": "null"}
                        ]
                    }
                }
            },
            "FailoverRequest": {
                "type": "object", "additionalProperties": false, "required": ["candidate"],
                "properties": {
                    "candidate": {"type": "string", "description": "The member to promote."},
                    "leader": {"type": ["string", "null"], "description": "Refused with 412 unless it names the current leader (when there is one)."}
                }
            },
            "FailsafeRequest": {
                "type": "object", "additionalProperties": false, "required": ["leader"],
                "properties": {"leader": {"type": "string", "description": "The leader asking to be confirmed."}}
            },
            "SwitchoverDone": {
                "type": "object", "required": ["message", "leader", "timeline"],
                "properties": {"message": {"type": "string"}, "leader": {"type": "string"}, "timeline": {"type": "integer", "minimum": 0}}
            },
            "ConfigCheck": {
                "type": "object", "required": ["member", "problems"],
                "properties": {
                    "member": {"type": "string"},
                    "problems": {"type": "array", "items": {
                        "type": "object", "required": ["parameter", "message"],
                        "properties": {"parameter": {"type": "string", "description": "Empty when the problem is not one parameter's."}, "message": {"type": "string"}}
                    }}
                }
            },
            "FailsafeAccepted": {
                "type": "object", "required": ["accepted", "member"],
                "properties": {"accepted": {"const": true}, "member": {"type": "string"}}
            }
        }
    })
}

pub fn document() -> Value {
    let mut remove_member = unsafe_op(
        "Forget a member whose agent is gone (leader only): its replication slot goes now.",
        None,
        json!({
            "200": ok("Removed.", schema("Message")),
            "404": err("The leader keeps nothing for this member."),
            "409": err("This node is not the leader, name is the leader itself, the member's agent still runs (its key is live), or another command is running on this node."),
            "503": err("The DCS did not answer, or the agent is shutting down.")
        }),
    );
    remove_member["parameters"] = json!([
        {"name": "name", "in": "path", "required": true, "description": "The member's node name.", "schema": {"type": "string", "minLength": 1}}
    ]);
    let etcd_member = json!({"type": "object", "required": ["id", "name", "peer_urls", "client_urls", "leader", "learner", "answers"], "properties": {
        "id": {"type": "string", "description": "etcd's member id in hex."},
        "name": {"type": "string", "description": "Empty until an added member starts."},
        "peer_urls": {"type": "array", "items": {"type": "string"}},
        "client_urls": {"type": "array", "items": {"type": "string"}},
        "leader": {"type": "boolean", "description": "etcd's raft leader (not the database's)."},
        "learner": {"type": "boolean"},
        "answers": {"type": ["boolean", "null"], "description": "Answered a status request within dcs_timeout; null before it started."}
    }});
    let etcd_members = json!({
        "get": {"summary": "etcd's own members, whether each answers, and this node's member process when the agent runs one ([etcd] member = true).", "responses": {
            "200": ok("The members.", json!({"type": "object", "required": ["members", "local"], "properties": {"members": {"type": "array", "items": etcd_member}, "local": {"type": ["object", "null"]}}})),
            "503": err("etcd did not answer in time.")
        }},
        "post": unsafe_op("Let a new etcd member in (a replaced node's): it joins when it starts with initial_cluster_state = \"existing\" and the initial_cluster answered here.", Some((json!({"type": "object", "additionalProperties": false, "required": ["name", "peer_url"], "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": "^[A-Za-z0-9_.-]+$"}, "peer_url": {"type": "string", "pattern": "^https?://[0-9.]+:[0-9]+$", "description": "http(s)://ADDRESS:PORT"}}}), true)), json!({
            "200": ok("Added; what to put in the new node's [etcd] section.", json!({"type": "object", "required": ["members", "initial_cluster", "initial_cluster_state", "next"]})),
            "400": err("name is not a node name, or peer_url is not http(s)://ADDRESS:PORT."),
            "409": err("A member has that name or peer URL already, another member does not answer, the new member would leave etcd without a quorum until it runs, or etcd refused the change."),
            "503": err("etcd did not answer in time.")
        }))
    });
    let mut remove_etcd_member = unsafe_op(
        "Remove an etcd member (a dead or replaced node's). A member that answers is removed only with force=true: a removed member stops for good.",
        None,
        json!({
            "200": ok("Removed.", json!({"type": "object", "required": ["removed"]})),
            "400": err("The query is not force=true or force=false."),
            "404": err("etcd has no member of that name, id or peer URL."),
            "409": err("It is the only member, its agent runs (its member key is live) or it answers (without force=true), or etcd refused (the change would break the quorum)."),
            "503": err("etcd did not answer in time.")
        }),
    );
    remove_etcd_member["parameters"] = json!([
        {"name": "name", "in": "path", "required": true, "description": "The member's name, id, or peer URL while it has not started.", "schema": {"type": "string", "minLength": 1}},
        {"name": "force", "in": "query", "required": false, "description": "Remove a member that answers.", "schema": {"type": "boolean"}}
    ]);
    let recover_alone = unsafe_op(
        "The way back when this node is the only server left: re-form its etcd member as the only member of its cluster (etcd --force-new-cluster, data kept) and record who asked in `recoveries`. The node then leads under the usual rules; returning servers join again by themselves. Refused without the cluster's name as confirmation, while the cluster is paused, and while any other etcd member answers.",
        Some((
            json!({"type": "object", "additionalProperties": false, "required": ["confirm"], "properties": {"confirm": {"type": "string", "description": "The cluster's name, typed by the operator."}, "by": {"type": "string", "description": "Who asks (user@host), for the record."}}}),
            true,
        )),
        json!({
            "200": ok("Re-formed; whether the record was written.", json!({"type": "object", "required": ["recovered", "removed", "recorded", "next"]})),
            "400": err("The body is not {\"confirm\": ..., \"by\": ...}, or the confirmation is not the cluster's name."),
            "409": err("This node runs no etcd member of its own, the cluster is paused, its member is already alone, or another member answers."),
            "500": err("etcd could not be restarted alone (see the agent's log)."),
            "503": err("This node's etcd member does not answer.")
        }),
    );
    let mut restart_service = unsafe_op(
        "Restart this node's service now, forgetting its restart history (a failed service gets another chance); it starts again only if it belongs on this node.",
        Some((schema("Empty"), false)),
        json!({
            "200": ok("Restarting.", schema("Message")),
            "400": err("The body is not empty, `{}` or whitespace."),
            "404": err("This node has no such service."),
            "409": err("Another command is running on this node."),
            "503": err("The agent is shutting down.")
        }),
    );
    restart_service["parameters"] = json!([
        {"name": "name", "in": "path", "required": true, "description": "The service's name ([[service]] name).", "schema": {"type": "string", "minLength": 1}}
    ]);
    let index = json!({"name": "index", "in": "path", "required": true, "description": "The directory's position among the [[replicate]] sections (from 0).", "schema": {"type": "integer", "minimum": 0, "maximum": usize::MAX}});
    let mut files_offer = unsafe_op(
        "A replicated directory's offer, for the other agents (the API's credentials even on GET: these are the files).",
        None,
        json!({
            "200": ok("The tree as the source serves it: version, entries, paths deleted.", json!({"type": "object", "required": ["path", "instance", "version", "entries", "deleted"]})),
            "304": {"description": "The asker has applied this instance and version already."},
            "400": err("The index or the query is not what this operation takes."),
            "409": err("This node is not the source of that directory (not the leader, or no such directory).")
        }),
    );
    files_offer["parameters"] = json!([
        index,
        {"name": "receiver", "in": "query", "required": false, "description": "The asking node's name (its progress is noted).", "schema": {"type": "string"}},
        {"name": "full", "in": "query", "required": false, "description": "The whole offer even if the asker has applied it.", "schema": {"type": "boolean"}},
        {"name": "instance", "in": "query", "required": false, "description": "The source instance the asker applied.", "schema": {"type": "string"}},
        {"name": "version", "in": "query", "required": false, "description": "The version the asker applied.", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}},
        {"name": "wait", "in": "query", "required": false, "description": "Milliseconds (at most 10,000) to hold the question while the offer does not move: the answer comes as soon as it does (a long poll).", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}}
    ]);
    let mut files_file = unsafe_op(
        "A file of a replicated directory's current offer, streamed.",
        None,
        json!({
            "200": {"description": "The file's bytes.", "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
            "400": err("The index or the path is not what this operation takes."),
            "404": err("Not a file this node offers."),
            "409": err("This node is not the source of that directory.")
        }),
    );
    files_file["parameters"] = json!([
        index,
        {"name": "path", "in": "query", "required": true, "description": "The file's path relative to the directory.", "schema": {"type": "string", "minLength": 1}},
        {"name": "offset", "in": "query", "required": false, "description": "The first byte to send (a cut transfer resumes past what it received).", "schema": {"type": "integer", "minimum": 0, "maximum": u64::MAX}}
    ]);
    let text = |what: &str| json!({"description": what, "content": {"text/plain": {"schema": {"type": "string"}}}});
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "mainstay agent REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Patroni-compatible health checks and status, plus cluster operations. Unsafe methods (POST, PUT, PATCH, DELETE) need HTTP basic or a bearer token from the agent's [api] configuration; authentication is checked before anything else. Errors are {\"error\": reason}. Every request is answered 413 when its body is over 2 MiB and 408 when the body does not arrive within api.header_timeout; unknown paths are answered 404 and unknown methods 405."
        },
        "paths": {
            "/": health("Same as /primary."),
            "/primary": health("200 when this node holds the leader key and runs as primary."),
            "/leader": health("Same as /primary."),
            "/master": health("Same as /primary."),
            "/read-write": health("Same as /primary."),
            "/replica": health("200 on a running replica that streams from the leader (within lag), unless tagged noloadbalance."),
            "/read-only": health("200 on the primary or a replica as /replica accepts it."),
            "/sync": health("200 on a synchronous standby."),
            "/synchronous": health("Same as /sync."),
            "/quorum": health("Same as /sync (mainstay's synchronous standbys are a quorum)."),
            "/read-only-sync": health("200 on the primary or a replica as /sync accepts it."),
            "/read-only-synchronous": health("Same as /read-only-sync."),
            "/read-only-quorum": health("Same as /read-only-sync."),
            "/standby-leader": health("200 on the leader of a standby cluster, which mainstay does not run: always 503."),
            "/standby_leader": health("Same as /standby-leader."),
            "/async": health("200 on a replica that is not a synchronous standby."),
            "/asynchronous": health("Same as /async."),
            "/health": health("200 when PostgreSQL runs and answers."),
            "/liveness": health("200 when the HA loop turns."),
            "/readiness": health("200 on the leader with a primary, or a streaming replica."),
            "/patroni": {
                "get": {"summary": "This node's status document.", "responses": {"200": ok("This node's status.", schema("NodeStatus"))}},
                "head": {"summary": "This node's status document.", "responses": {"200": ok("This node's status.", schema("NodeStatus"))}},
                "options": {"summary": "This node's status document.", "responses": {"200": ok("This node's status.", schema("NodeStatus"))}}
            },
            "/cluster": read("Every member, the pause flag and any pending switchover.", ok("The cluster as the DCS holds it now (as this agent last read it if the DCS does not answer in time).", schema("Cluster")), Some(NO_DCS_YET)),
            "/services": read("This node's supervised services ([[service]]), in start order.", ok("Each service's state.", schema("Services")), None),
            "/replication/files": read("This node's replicated directories ([[replicate]]): source or receiver, versions, files received and moved aside, errors.", ok("Each directory's state.", json!({"type": "object", "required": ["directories"], "properties": {"directories": {"type": "array", "items": {"type": "object", "required": ["role", "path"], "properties": {"role": {"enum": ["source", "receiver", "idle"]}, "path": {"type": "string"}}}}}})), None),
            "/replication/files/{index}/offer": {"get": files_offer},
            "/replication/files/{index}/file": {"get": files_file},
            "/history": read("Timeline switches.", ok("Timeline switches, oldest first.", schema("History")), Some(NO_DCS_YET)),
            "/metrics": read("Prometheus text exposition.", text("Metrics in Prometheus' text format 0.0.4."), None),
            "/openapi.json": read("This document.", ok("This document.", json!({"type": "object", "required": ["openapi", "paths"]})), None),
            "/config": {
                "get": {"summary": "The dynamic configuration in effect: the stored keys, every default, and this node's ttl, loop_wait and retry_timeout.", "responses": {
                    "200": ok("The configuration in effect.", schema("DynamicConfig")),
                    "503": err("The DCS did not answer, or not within dcs_timeout.")
                }},
                "head": {"summary": "The dynamic configuration in effect: the stored keys, every default, and this node's ttl, loop_wait and retry_timeout.", "responses": {
                    "200": ok("The configuration in effect.", schema("DynamicConfig")),
                    "503": err("The DCS did not answer, or not within dcs_timeout.")
                }},
                "patch": unsafe_op("Change the dynamic configuration (JSON merge patch). Changed PostgreSQL parameters are first checked by every member's own server (POST /config/check).", Some((schema("DynamicConfigPatch"), true)), json!({
                    "200": ok("The configuration in effect after the change.", schema("DynamicConfig")),
                    "400": err("An empty body, a body that is not a JSON object, a merged configuration that is not valid (the reason names the key), or PostgreSQL parameters a member's server would not accept (the reason names parameter and member). Nothing is stored."),
                    "409": err("The configuration changed between reading and writing it: read it again and retry."),
                    "503": err("The DCS did not answer in time, or a member could not check changed PostgreSQL parameters. Nothing is stored.")
                })),
                "put": unsafe_op("Replace the dynamic configuration. Changed PostgreSQL parameters are first checked by every member's own server (POST /config/check).", Some((schema("DynamicConfig"), true)), json!({
                    "200": ok("The configuration in effect after the change.", schema("DynamicConfig")),
                    "400": err("An empty body, a body that is not a JSON object, a configuration that is not valid (the reason names the key), or PostgreSQL parameters a member's server would not accept (the reason names parameter and member). Nothing is stored."),
                    "409": err("The configuration changed between reading and writing it: read it again and retry."),
                    "503": err("The DCS did not answer in time, or a member could not check changed PostgreSQL parameters. Nothing is stored.")
                }))
            },
            "/config/check": {
                "post": unsafe_op("This member's verdict on a whole dynamic configuration: would its PostgreSQL server accept the parameters (postgres -C), with this node's own file parameters on top? Changes nothing. The agent handling PATCH or PUT /config asks every member. An empty body is {}.", Some((schema("DynamicConfig"), false)), json!({
                    "200": ok("The verdict: no problems, or each one.", schema("ConfigCheck")),
                    "400": err("The body is not JSON, or not a valid dynamic configuration (the reason names the key)."),
                    "503": err("The check could not run here (the server's binary could not be run).")
                }))
            },
            "/switchover": {
                "post": unsafe_op("Planned switchover: now (answered once done) or at scheduled_at. An empty body is {}.", Some((schema("SwitchoverRequest"), false)), json!({
                    "200": ok("Done: the candidate leads.", schema("SwitchoverDone")),
                    "202": ok("Scheduled.", schema("Message")),
                    "400": err("The body is not a switchover request, or scheduled_at is not a time, lies in the past or beyond scheduled_switchover_horizon."),
                    "409": err("Another switchover or failover is pending."),
                    "412": err("The cluster has no leader, leader names another member, the candidate may not take over (not a member, tagged nofailover, not streaming, too far behind, not synchronous in synchronous mode), no replica could, or the cluster is paused and no candidate is named."),
                    "503": err("The DCS did not answer, or the switchover did not happen or finish in time (the leader refused or aborted it: see its log).")
                })),
                "delete": unsafe_op("Cancel a pending switchover or failover.", None, json!({
                    "200": ok("Cancelled.", schema("Message")),
                    "404": err("No switchover or failover is pending."),
                    "409": err("The request changed or ran meanwhile."),
                    "503": err("The DCS did not answer, or not within dcs_timeout.")
                }))
            },
            "/failover": {
                "post": unsafe_op("Manual failover to a candidate (runs as a switchover while the leader is healthy); answered once done.", Some((schema("FailoverRequest"), true)), json!({
                    "200": ok("Done: the candidate leads.", schema("SwitchoverDone")),
                    "400": err("The body is not a failover request, or names no candidate."),
                    "409": err("Another switchover or failover is pending."),
                    "412": err("leader names another member than the leader, or the candidate may not take over (not a member, nothing to promote, tagged nofailover, too far behind, not synchronous in synchronous mode)."),
                    "503": err("The DCS did not answer, or the failover did not happen or finish in time.")
                }))
            },
            "/failsafe": {
                "post": unsafe_op("Failsafe mode: a leader that lost the DCS asks this member to confirm it; confirming promises not to take over for a ttl.", Some((schema("FailsafeRequest"), true)), json!({
                    "200": ok("Confirmed.", schema("FailsafeAccepted")),
                    "409": err("This member reads another leader from the DCS (the caller must fence itself), or the failsafe list it last read does not name the caller as leader.")
                }))
            },
            "/restart": {"post": command("Restart this node's PostgreSQL in its role.", "Restarted.", &[
                ("409", "PostgreSQL is not running here, this primary does not hold the leader key, PostgreSQL would not start with its configuration files as they are (not restarted), it restarted but on the last parameters it started with (the cluster's did not start: see config_warning in /patroni), or another command is running on this node.")
            ])},
            "/reinitialize": {"post": command("Re-clone this replica from the leader (the old data directory is moved aside).", "Re-cloned and started.", &[
                ("409", "This node is the leader (or still writable): switch over first; or another command is running on this node."),
                ("503", "There is no leader to clone from or its PostgreSQL does not run as primary yet, the agent is shutting down, or the command did not finish within 600 s.")
            ])},
            "/drill/crash": {"post": command("Failover drill (leader only, what `mainstay ctl drill --kind failover` sends): stop PostgreSQL hard and let the lease expire without renewal, as if this host died, until another node leads.", "PostgreSQL stopped; a replica takes over.", &[
                ("409", "This node is not the leader, a drill already runs here, the cluster is paused, no streaming replica could take over, or another command is running on this node."),
                ("503", "No view of the cluster yet, the agent is shutting down, or the command did not finish within 600 s.")
            ])},
            "/members/{name}": {"delete": remove_member},
            "/etcd/members": etcd_members,
            "/etcd/members/{name}": {"delete": remove_etcd_member},
            "/recover-alone": {"post": recover_alone},
            "/services/{name}/restart": {"post": restart_service}
        },
        "components": components()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mainstay_core::DynamicConfig;

    #[test]
    fn every_path_has_an_operation_and_every_operation_answers() {
        let doc = document();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 28);
        for (path, item) in paths {
            let item = item.as_object().unwrap();
            assert!(!item.is_empty(), "{path} has no operation");
            for (method, operation) in item {
                let responses = operation["responses"].as_object();
                assert!(
                    responses.is_some_and(|r| r.contains_key("200")),
                    "{method} {path} has no 200"
                );
                if operation.get("security").is_some() {
                    assert!(operation["responses"].get("401").is_some(), "{path}");
                }
            }
        }
        for unsafe_path in [
            "/failsafe",
            "/drill/crash",
            "/members/{name}",
            "/services/{name}/restart",
            "/config",
            "/config/check",
        ] {
            assert!(paths.contains_key(unsafe_path), "{unsafe_path}");
        }
    }

    #[test]
    fn every_reference_resolves() {
        fn walk(value: &Value, doc: &Value) {
            match value {
                Value::Object(map) => {
                    if let Some(Value::String(target)) = map.get("$ref") {
                        let pointer = target.strip_prefix('#').expect("a local reference");
                        assert!(doc.pointer(pointer).is_some(), "{target} does not resolve");
                    }
                    map.values().for_each(|v| walk(v, doc));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, doc)),
                _ => {}
            }
        }
        let doc = document();
        walk(&doc, &doc);
    }

    /// The document lists exactly `DynamicConfig`'s keys: a key added there
    /// must be described here (the fuzz test would find it refused as
    /// "unknown" otherwise, or accepted when the schema says it is not).
    #[test]
    fn the_config_schema_lists_exactly_the_dynamic_configuration_keys() {
        let doc = document();
        let defaults = serde_json::to_value(DynamicConfig::default()).unwrap();
        // The per-node timing keys `GET /config` shows beside them.
        let timing = [
            "loop_wait".to_string(),
            "retry_timeout".into(),
            "ttl".into(),
        ];
        let mut expected: Vec<&String> = defaults
            .as_object()
            .unwrap()
            .keys()
            .chain(timing.iter())
            .collect();
        expected.sort();
        for (name, unknown) in [
            ("DynamicConfig", json!(false)),
            ("DynamicConfigPatch", json!({"type": "null"})),
        ] {
            let schema = &doc["components"]["schemas"][name];
            let mut listed: Vec<&String> =
                schema["properties"].as_object().unwrap().keys().collect();
            listed.sort();
            assert_eq!(listed, expected, "{name}");
            assert_eq!(schema["additionalProperties"], unknown, "{name}");
        }
        // Types follow the defaults.
        for (key, value) in defaults.as_object().unwrap() {
            let documented = &doc["components"]["schemas"]["DynamicConfig"]["properties"][key];
            let kind = match value {
                Value::Bool(_) => "boolean",
                Value::Number(_) => "integer",
                Value::Object(_) => "object",
                other => panic!("{key}: a {other} default is not described"),
            };
            assert_eq!(documented["type"], kind, "{key}");
        }
    }

    /// Every documented range is the one `DynamicConfig` enforces.
    #[test]
    fn documented_ranges_and_refusals_are_the_validations() {
        let accepts = |doc: Value| DynamicConfig::from_json(&doc).is_ok();
        for (key, minimum, maximum, _) in INTEGER_KEYS {
            assert!(accepts(json!({ *key: minimum })), "{key} = {minimum}");
            assert!(accepts(json!({ *key: maximum })), "{key} = {maximum}");
            assert!(
                !accepts(json!({ *key: maximum + 1 })),
                "{key} = {maximum} + 1"
            );
            if *minimum > 0 {
                assert!(
                    !accepts(json!({ *key: minimum - 1 })),
                    "{key} = {minimum} - 1"
                );
            }
        }
        let parameter = |name: &str, value: Value| {
            accepts(json!({"postgresql": {"parameters": {name: value}}}))
        };
        for name in MANAGED_PARAMETERS {
            assert!(!parameter(name, json!("x")), "{name} is managed");
        }
        for name in ["work_mem", "_x", "a.b", "x9"] {
            assert!(parameter(name, json!("4MB")), "{name}");
        }
        for name in ["Work_mem", "9x", "a-b", ""] {
            assert!(!parameter(name, json!("4MB")), "{name:?}");
        }
        assert!(parameter("wal_level", json!("logical")));
        assert!(!parameter("wal_level", json!("minimal")));
        assert!(parameter("max_wal_senders", json!(2)));
        assert!(parameter("max_wal_senders", json!(" 10 ")));
        assert!(!parameter("max_wal_senders", json!(1)));
        assert!(!parameter("max_wal_senders", json!("1")));
        assert!(!parameter("work_mem", json!("4MB\nport = 1")));
        assert!(!parameter("work_mem", json!([])));
        assert!(!parameter("work_mem", json!({})));
        assert!(!accepts(json!({"synchronous_mode_strict": true})));
        assert!(accepts(
            json!({"synchronous_mode_strict": true, "synchronous_mode": true})
        ));
        assert!(accepts(json!({})));
        // A patch may remove what is not there, under any name.
        let patched = |patch: Value| {
            let merged = mainstay_core::dynamic::merge_patch(&json!({}), &patch);
            DynamicConfig::from_json(&merged).is_ok()
        };
        assert!(patched(json!({"": null, "ttl": null})));
        assert!(patched(
            json!({"postgresql": {"x": null, "parameters": {"Bad-Name": null, "port": null}}})
        ));
        assert!(!patched(
            json!({"postgresql": {"parameters": {"port": 5432}}})
        ));
    }
}
