//! `mainstay ctl recover-alone`: asks the node this ctl talks to (its own
//! agent, from the configuration) to re-form its etcd member alone. The
//! agent does every check; this end makes the operator type the cluster's
//! name, says what happens, and records who asked.

use super::{Ctl, Failure, print_table};
use hyper::Method;
use serde_json::{Value, json};
use std::io::{BufRead, IsTerminal, Write};

const WARNING: &str = "\
recover-alone makes this server the whole cluster: its etcd member becomes
the only one, and it leads on its own. Run it only when every other server
(the other data server and the witness) is gone for good: powered off,
burned, drowned. A server that is still running but cut off by the network
would lead too, and both would take writes.";

impl Ctl {
    pub(super) async fn recover_alone(&self, confirm: Option<String>) -> Result<(), Failure> {
        let confirm = match confirm {
            Some(name) => name,
            None => ask_for_the_name()?,
        };
        let body = json!({ "confirm": confirm, "by": who() });
        // Probes, etcd's restart and the record take up to about a minute.
        let api = self
            .api
            .clone()
            .with_timeout(std::time::Duration::from_secs(300));
        let answer = super::call(&api, Method::POST, "/recover-alone", Some(&body))
            .await?
            .body;
        if self.json {
            println!("{answer}");
            return Ok(());
        }
        let removed = answer["removed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{} is now the only etcd member (removed: {removed}).",
            answer["recovered"].as_str().unwrap_or("this node")
        );
        if answer["recorded"] != json!(true) {
            println!(
                "warning: the record of this recovery was not written: {}",
                answer["record_error"].as_str().unwrap_or("unknown error")
            );
        }
        println!("{}", answer["next"].as_str().unwrap_or(""));
        Ok(())
    }
}

fn ask_for_the_name() -> Result<String, Failure> {
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Usage(
            "recover-alone asks for the cluster's name and the input is not a terminal: \
             give it with --confirm CLUSTER"
                .into(),
        ));
    }
    println!("{WARNING}\n");
    print!("Type the cluster's name to go on: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    Ok(line.trim().to_string())
}

/// user@host, for the record: the account behind sudo if there is one.
fn who() -> String {
    let user = ["SUDO_USER", "USER", "LOGNAME"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    format!("{user}@{host}")
}

/// `ctl history`'s second table: every recover-alone in `/cluster`.
pub(super) fn print_recoveries(cluster: &Value) {
    let Some(records) = cluster["recoveries"].as_array().filter(|r| !r.is_empty()) else {
        return;
    };
    println!("\nForced recoveries (recover-alone):");
    let mut rows = vec![[
        "Time".to_string(),
        "Node".into(),
        "By".into(),
        "From".into(),
        "Removed".into(),
    ]];
    for record in records {
        let text = |key: &str| record[key].as_str().unwrap_or("").to_string();
        let removed = record["removed"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(",");
        rows.push([text("at"), text("node"), text("by"), text("from"), removed]);
    }
    print_table(&rows);
}
