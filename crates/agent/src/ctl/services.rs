//! `mainstay ctl services` and `restart-service`: every member's supervised
//! services, asked of each member's own API (a service's pid, restarts and
//! last check live only there), and an operator's restart of one.

use super::{Ctl, Failure, call, client_for, print_table};
use hyper::Method;
use serde_json::{Map, Value};
use std::time::Duration;

impl Ctl {
    pub(super) async fn services(&self) -> Result<(), Failure> {
        let cluster = self.call(Method::GET, "/cluster", None).await?.body;
        let mut rows = vec![[
            "Member".to_string(),
            "Service".into(),
            "Placement".into(),
            "State".into(),
            "PID".into(),
            "Restarts".into(),
            "Last check".into(),
            "Why".into(),
        ]];
        let mut every = Map::new();
        // A witness runs no services.
        let members = cluster["members"].as_array().into_iter().flatten();
        for member in members.filter(|m| m["role"] != "witness") {
            let name = member["name"].as_str().unwrap_or("?").to_string();
            let Some(url) = member["api_url"].as_str() else {
                continue;
            };
            let api = client_for(url, Duration::from_secs(5), &self.auth, &self.ca_file)?;
            let services = match call(&api, Method::GET, "/services", None).await {
                Ok(answer) => answer.body["services"].clone(),
                Err(_) => {
                    rows.push([
                        name.clone(),
                        String::new(),
                        String::new(),
                        "unreachable".into(),
                        String::new(),
                        String::new(),
                        String::new(),
                        format!("no answer from {url}"),
                    ]);
                    continue;
                }
            };
            for service in services.as_array().into_iter().flatten() {
                let text = |v: &Value| match v {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                rows.push([
                    name.clone(),
                    text(&service["name"]),
                    text(&service["placement"]),
                    text(&service["state"]),
                    text(&service["pid"]),
                    text(&service["restarts"]),
                    text(&service["last_check"]),
                    text(&service["reason"]),
                ]);
            }
            every.insert(name, services);
        }
        if self.json {
            println!("{}", Value::Object(every));
        } else {
            print_table(&rows);
        }
        Ok(())
    }

    pub(super) async fn restart_service(&self, node: &str, service: &str) -> Result<(), Failure> {
        let valid = !service.is_empty()
            && service
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return Err(Failure::Usage(format!(
                "{service:?} is not a service name (letters, digits, '-', '_', '.'): see \
                 `mainstay ctl services`"
            )));
        }
        self.on_node(node, &format!("/services/{service}/restart"))
            .await
    }
}
