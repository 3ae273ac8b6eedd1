//! `mainstay ctl etcd-member list|add|remove`: etcd's own membership, for
//! replacing a dead node's member (remove it, then add the new node's
//! before its agent starts).

use super::{Ctl, Failure, confirm, print_table};
use hyper::Method;
use serde_json::{Value, json};

#[derive(clap::Subcommand, Debug)]
pub enum EtcdMemberCommand {
    /// etcd's members: name, id, peer and client URLs, who leads etcd,
    /// whether each answers.
    List,
    /// Let a new node's member in; prints what its [etcd] section needs.
    Add {
        /// The new node's name.
        name: String,
        /// Its etcd.peer_url, e.g. http://10.0.0.4:2380.
        peer_url: String,
        #[arg(long)]
        force: bool,
    },
    /// Remove a member (a dead or replaced node's) by name or id.
    Remove {
        name: String,
        /// Also a member that still answers (it then stops for good).
        #[arg(long)]
        live: bool,
        #[arg(long)]
        force: bool,
    },
}

impl Ctl {
    pub(super) async fn etcd_member(&self, command: EtcdMemberCommand) -> Result<(), Failure> {
        match command {
            EtcdMemberCommand::List => {
                let body = self.call(Method::GET, "/etcd/members", None).await?.body;
                if self.json {
                    println!("{body}");
                    return Ok(());
                }
                let mut rows = vec![[
                    "Member".to_string(),
                    "ID".into(),
                    "Peer URL".into(),
                    "Client URL".into(),
                    "etcd leader".into(),
                    "Answers".into(),
                ]];
                for member in body["members"].as_array().into_iter().flatten() {
                    let name = member["name"].as_str().unwrap_or("");
                    let list = |v: &Value| {
                        v.as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    rows.push([
                        if name.is_empty() {
                            "(not started)".into()
                        } else {
                            name.to_string()
                        },
                        member["id"].as_str().unwrap_or("").to_string(),
                        list(&member["peer_urls"]),
                        list(&member["client_urls"]),
                        if member["leader"] == true {
                            "*".into()
                        } else {
                            String::new()
                        },
                        match member["answers"].as_bool() {
                            Some(true) => "yes".into(),
                            Some(false) => "NO".into(),
                            None => "-".into(),
                        },
                    ]);
                }
                print_table(&rows);
                Ok(())
            }
            EtcdMemberCommand::Add {
                name,
                peer_url,
                force,
            } => {
                confirm(
                    force,
                    &format!("Add {name} at {peer_url} to etcd (it joins when its agent starts)?"),
                )?;
                let body = json!({ "name": name, "peer_url": peer_url });
                let answer = self
                    .call(Method::POST, "/etcd/members", Some(&body))
                    .await?
                    .body;
                if self.json {
                    println!("{answer}");
                    return Ok(());
                }
                let members: Vec<String> = answer["initial_cluster"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, url)| format!("{name} = {url}"))
                    .collect();
                println!("{name} added. In {name}'s configuration:");
                println!("[etcd]");
                println!("member = true");
                println!("initial_cluster_state = \"existing\"");
                println!("initial_cluster = {{ {} }}", members.join(", "));
                println!("then start its agent (its etcd.data_dir must be new).");
                Ok(())
            }
            EtcdMemberCommand::Remove { name, live, force } => {
                confirm(
                    force,
                    &format!("Remove {name} from etcd (a removed member stops for good)?"),
                )?;
                let path = if live {
                    format!("/etcd/members/{name}?force=true")
                } else {
                    format!("/etcd/members/{name}")
                };
                let answer = self.call(Method::DELETE, &path, None).await?.body;
                self.report(&answer, &format!("{name} removed from etcd"));
                Ok(())
            }
        }
    }
}
