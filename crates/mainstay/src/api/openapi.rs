//! The OpenAPI 3 description served at `/openapi.json`, written by hand next
//! to the router so that a route without a description stands out in review.

use serde_json::{Value, json};

fn health(summary: &str) -> Value {
    let operation = json!({
        "summary": summary,
        "parameters": [
            {"name": "lag", "in": "query", "required": false,
             "description": "Largest acceptable replication lag: bytes, or with a unit B, kB, MB, GB, TB (e.g. 10MB).",
             "schema": {"type": "string"}},
            {"name": "tag_<name>", "in": "query", "required": false,
             "description": "Require a tag value, e.g. tag_nofailover=false.",
             "schema": {"type": "string"}}
        ],
        "responses": {
            "200": {"description": "This node fits.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeStatus"}}}},
            "503": {"description": "This node does not fit.", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NodeStatus"}}}},
            "400": {"$ref": "#/components/responses/Error"}
        }
    });
    json!({"get": operation, "head": operation, "options": operation})
}

fn unsafe_op(summary: &str, body: Option<Value>, ok: &str) -> Value {
    let mut operation = json!({
        "summary": summary,
        "security": [{"basic": []}, {"bearer": []}],
        "responses": {
            "200": {"description": ok},
            "400": {"$ref": "#/components/responses/Error"},
            "401": {"$ref": "#/components/responses/Error"},
            "403": {"$ref": "#/components/responses/Error"},
            "409": {"$ref": "#/components/responses/Error"},
            "412": {"$ref": "#/components/responses/Error"},
            "503": {"$ref": "#/components/responses/Error"}
        }
    });
    if let Some(schema) = body {
        operation["requestBody"] =
            json!({"required": false, "content": {"application/json": {"schema": schema}}});
    }
    operation
}

pub fn document() -> Value {
    let read = |summary: &str| json!({"get": {"summary": summary, "responses": {"200": {"description": "OK"}, "503": {"$ref": "#/components/responses/Error"}}}});
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "mainstay agent REST API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Patroni-compatible health checks and status, plus cluster operations. Unsafe methods need HTTP basic or a bearer token from the agent's [api] configuration. Errors are {\"error\": reason}."
        },
        "paths": {
            "/": health("Same as /primary."),
            "/primary": health("200 when this node holds the leader key and runs as primary."),
            "/leader": health("Same as /primary."),
            "/master": health("Same as /primary."),
            "/read-write": health("Same as /primary."),
            "/replica": health("200 on a running replica that streams from the leader (within lag)."),
            "/read-only": health("200 on the primary or a replica as /replica accepts it."),
            "/sync": health("200 on a synchronous standby."),
            "/synchronous": health("Same as /sync."),
            "/async": health("200 on a replica that is not a synchronous standby."),
            "/asynchronous": health("Same as /async."),
            "/health": health("200 when PostgreSQL runs and answers."),
            "/liveness": health("200 when the HA loop turns."),
            "/readiness": health("200 on the leader with a primary, or a streaming replica."),
            "/patroni": read("This node's status document."),
            "/cluster": read("Every member, the pause flag and any pending switchover."),
            "/history": read("Timeline switches: [ended timeline, LSN, reason, time, new leader]."),
            "/metrics": read("Prometheus text exposition."),
            "/openapi.json": read("This document."),
            "/config": {
                "get": {"summary": "The dynamic configuration.", "responses": {"200": {"description": "OK"}}},
                "patch": unsafe_op("Change the dynamic configuration (JSON merge patch).", Some(json!({"type": "object"})), "The stored configuration."),
                "put": unsafe_op("Replace the dynamic configuration.", Some(json!({"type": "object"})), "The stored configuration.")
            },
            "/switchover": {
                "post": unsafe_op("Planned switchover.", Some(json!({
                    "type": "object", "additionalProperties": false,
                    "properties": {
                        "leader": {"type": "string"},
                        "candidate": {"type": "string"},
                        "scheduled_at": {"description": "RFC 3339 time or Unix seconds", "oneOf": [{"type": "string"}, {"type": "integer"}]}
                    }
                })), "Done (or 202: scheduled)."),
                "delete": unsafe_op("Cancel a pending switchover or failover.", None, "Cancelled.")
            },
            "/failover": {
                "post": unsafe_op("Manual failover to a candidate.", Some(json!({
                    "type": "object", "additionalProperties": false, "required": ["candidate"],
                    "properties": {"candidate": {"type": "string"}, "leader": {"type": "string"}}
                })), "Done.")
            },
            "/restart": {"post": unsafe_op("Restart this node's PostgreSQL in its role.", Some(json!({"type": "object", "additionalProperties": false})), "Restarted.")},
            "/reinitialize": {"post": unsafe_op("Re-clone this replica from the leader.", Some(json!({"type": "object", "additionalProperties": false})), "Re-cloned.")},
            "/drill/crash": {"post": unsafe_op("Failover drill (leader only, what `mainstay ctl drill --kind failover` sends): stop PostgreSQL hard and let the lease expire without renewal, as if this host died, until another node leads.", Some(json!({"type": "object", "additionalProperties": false})), "PostgreSQL stopped; a replica takes over.")},
            "/members/{name}": {"delete": {
                "summary": "Forget a member whose agent is gone (leader only).",
                "parameters": [{"name": "name", "in": "path", "required": true, "schema": {"type": "string"}}],
                "security": [{"basic": []}, {"bearer": []}],
                "responses": {"200": {"description": "Removed."}, "404": {"$ref": "#/components/responses/Error"}, "409": {"$ref": "#/components/responses/Error"}}
            }}
        },
        "components": {
            "securitySchemes": {
                "basic": {"type": "http", "scheme": "basic"},
                "bearer": {"type": "http", "scheme": "bearer"}
            },
            "responses": {
                "Error": {"description": "Refused, with the reason.", "content": {"application/json": {"schema": {
                    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}
                }}}}
            },
            "schemas": {
                "NodeStatus": {"type": "object", "properties": {
                    "state": {"type": "string"}, "role": {"type": "string"},
                    "server_version": {"type": "integer"}, "timeline": {"type": "integer"},
                    "xlog": {"type": "object"}, "replication": {"type": "array"},
                    "cluster_unlocked": {"type": "boolean"}, "pause": {"type": "boolean"},
                    "pending_restart": {"type": "boolean"}, "sync_standby": {"type": "boolean"},
                    "patroni": {"type": "object"}, "mainstay": {"type": "object"}
                }}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_path_has_an_operation() {
        let doc = super::document();
        let paths = doc["paths"].as_object().unwrap();
        assert!(paths.len() >= 25);
        for (path, item) in paths {
            assert!(
                item.as_object().is_some_and(|o| !o.is_empty()),
                "{path} has no operation"
            );
        }
    }
}
