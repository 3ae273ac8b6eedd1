//! Forwarding DCS watch events to the HA loop: the keys that matter now
//! wake it; the rest are ignored.

use super::*;

/// Member keys whose changes wake the HA loop at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum MemberInterest {
    /// No leader: an election waits for every member's status.
    All,
    /// A new leader that does not run as primary yet.
    One(String),
    None,
}

/// Turns DCS watch events into wake-ups of the HA loop. Member changes only
/// matter during an election or while a new leader is starting.
pub(super) async fn forward_watch<D: Dcs>(
    dcs: Arc<D>,
    interest: Arc<std::sync::Mutex<MemberInterest>>,
    wake: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match dcs.watch().await {
            Ok(mut events) => {
                debug!("DCS watch open");
                while let Some(event) = events.recv().await {
                    match event {
                        WatchEvent::Changed {
                            key:
                                KeyKind::Leader
                                | KeyKind::Initialize
                                | KeyKind::Failover
                                | KeyKind::Sync
                                | KeyKind::Config,
                            ..
                        } => {
                            backoff = Duration::from_millis(100);
                            wake.notify_one();
                        }
                        WatchEvent::Changed {
                            key: KeyKind::Member(name),
                            ..
                        } => {
                            let wanted = match &*poison::lock(&interest) {
                                MemberInterest::All => true,
                                MemberInterest::One(leader) => *leader == name,
                                MemberInterest::None => false,
                            };
                            if wanted {
                                wake.notify_one();
                            }
                        }
                        WatchEvent::Changed { .. } => {}
                        WatchEvent::Error(reason) => {
                            warn!("DCS watch failed: {reason}");
                            break;
                        }
                    }
                }
            }
            Err(err) => warn!("cannot open the DCS watch: {err}"),
        }
        wake.notify_one();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
