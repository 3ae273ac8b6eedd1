//! A lab host that runs `mainstay witness`: the third etcd member of two
//! data nodes, with no PostgreSQL. Its member and API listen on the lab's
//! usual ports at its own address.

use crate::demo::{
    API_PASSWORD, API_USER, LAB_API_PORT, LAB_ETCD_CLIENT_PORT, LAB_ETCD_PEER_PORT, LocalCluster,
    make_dir, spawn_mainstay, stop_child,
};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

pub struct WitnessNode {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    /// Its address in the lab.
    pub host: String,
    pub netns: String,
    process: Option<Child>,
}

impl WitnessNode {
    /// The witness on lab host `index`.
    pub(crate) fn place(
        dir: &Path,
        lab: &mainstay_testkit::netns::Lab,
        index: usize,
    ) -> io::Result<WitnessNode> {
        let dir = dir.join("witness");
        make_dir(&dir)?;
        Ok(WitnessNode {
            name: "witness".into(),
            config: dir.join("witness.toml"),
            dir,
            host: lab.host_ip(index).to_string(),
            netns: lab.host(index).to_string(),
            process: None,
        })
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("witness.log")
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// A client of its REST API with the demo's credentials.
    pub fn api(&self) -> mainstay_agent::api_client::ApiClient {
        mainstay_agent::api_client::ApiClient::new(&format!("http://{}:{LAB_API_PORT}", self.host))
            .with_basic_auth(API_USER, API_PASSWORD)
            .with_timeout(Duration::from_secs(5))
    }
}

impl LocalCluster {
    pub(crate) fn write_witness_config(&self, profile: &str) -> io::Result<()> {
        let Some(witness) = &self.witness else {
            return Ok(());
        };
        let endpoints: Vec<String> = self
            .etcd_endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        let initial: Vec<String> = self
            .member_hosts
            .iter()
            .map(|(name, ip)| format!("{name} = \"http://{ip}:{LAB_ETCD_PEER_PORT}\""))
            .collect();
        let text = format!(
            r#"# A witness: this host's etcd member and a small API, no PostgreSQL.
cluster = "{cluster}"
name = "{name}"

[etcd]
endpoints = [{endpoints}]
member = true
data_dir = "{data}"
client_url = "http://{host}:{LAB_ETCD_CLIENT_PORT}"
peer_url = "http://{host}:{LAB_ETCD_PEER_PORT}"
initial_cluster = {{ {initial} }}

[api]
listen = "{host}:{LAB_API_PORT}"
username = "{API_USER}"
password = "{API_PASSWORD}"

[timing]
profile = "{profile}"
"#,
            cluster = self.cluster,
            name = witness.name,
            endpoints = endpoints.join(", "),
            data = witness.dir.join("etcd").display(),
            host = witness.host,
            initial = initial.join(", "),
        );
        fs::write(&witness.config, text)
    }

    pub fn start_witness(&mut self) -> io::Result<()> {
        let exe = self.exe().to_path_buf();
        let Some(witness) = &mut self.witness else {
            return Err(io::Error::other("this lab has no witness"));
        };
        let child = spawn_mainstay(
            &exe,
            Some(&witness.netns),
            "witness",
            &witness.config,
            &witness.log(),
        )?;
        witness.process = Some(child);
        Ok(())
    }

    /// SIGTERM the witness and wait (bounded) for it to exit.
    pub fn stop_witness(&mut self) {
        let Some(witness) = &mut self.witness else {
            return;
        };
        if let Some(child) = witness.process.take() {
            stop_child(child, Duration::from_secs(30));
        }
    }

    /// The witness's host loses power: every process in its namespace
    /// (the witness and its etcd member) SIGKILLed at one instant.
    pub fn crash_witness(&mut self) -> io::Result<usize> {
        let Some(witness) = &mut self.witness else {
            return Err(io::Error::other("this lab has no witness"));
        };
        let killed = mainstay_testkit::crash::crash_namespace(&witness.netns)?;
        if let Some(mut child) = witness.process.take() {
            let _ = child.wait();
        }
        Ok(killed)
    }
}
