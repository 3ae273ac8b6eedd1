//! `mainstay demo --with-synapse`: the loopback demo's nodes each get a
//! `with-leader` Synapse section, on a port of their own (they share
//! 127.0.0.1), reaching their own node's PostgreSQL.

use crate::demo::LocalCluster;
use std::io;
use std::path::Path;

/// Adds Synapse to every node's configuration (call it before the agents
/// start); returns each node's Synapse URL.
pub fn add_synapse(
    cluster: &mut LocalCluster,
    venv: &Path,
    profile: &str,
) -> io::Result<Vec<(String, String)>> {
    let shared = super::synapse::Shared::create(&cluster.dir.join("synapse"), venv)?;
    let mut urls = Vec::new();
    for i in 0..cluster.nodes.len() {
        let port = mainstay_testkit::free_port();
        let node = &cluster.nodes[i];
        let section = shared.node_service(&node.dir, node.pg_port, &node.host, port, &[])?;
        cluster.nodes[i].extra_config = section;
        let node = &cluster.nodes[i];
        std::fs::write(&node.config, cluster.config_text(node, profile))?;
        urls.push((node.name.clone(), format!("http://{}:{port}", node.host)));
    }
    Ok(urls)
}
