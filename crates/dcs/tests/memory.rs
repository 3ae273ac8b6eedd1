//! The DCS contract checks run against `MemoryDcs`, on paused tokio time so
//! that lease expiry costs nothing.

#![forbid(unsafe_code)]

mod common;

use common::RawWriter;
use mainstay_dcs::MemoryDcs;

impl RawWriter for MemoryDcs {
    async fn put_raw(&self, key: &str, value: &[u8]) {
        MemoryDcs::put_raw(self, key, value);
    }
}

#[tokio::test(start_paused = true)]
async fn leader_election() {
    common::check_leader_election(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn members() {
    common::check_members(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn lease_expiry() {
    let delay = common::check_lease_expiry(&MemoryDcs::new(), 2).await;
    // On tokio's clock expiry is exact.
    assert_eq!(delay, tokio::time::Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn keep_alive_holds() {
    common::check_keep_alive_holds(&MemoryDcs::new(), 1).await;
}

#[tokio::test(start_paused = true)]
async fn initialize() {
    common::check_initialize(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn history() {
    common::check_history(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn config() {
    common::check_config(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn watch() {
    common::check_watch(&MemoryDcs::new()).await;
}

#[tokio::test(start_paused = true)]
async fn corrupt_values() {
    let dcs = MemoryDcs::new();
    common::check_corrupt_values(&dcs, &dcs).await;
}
