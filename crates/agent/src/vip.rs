//! The virtual IP that follows the primary: the node that leads with a
//! running primary adds the address to its interface over netlink and
//! announces it with gratuitous ARP; every other node removes it if it finds
//! it. The address is added with a valid lifetime no longer than what is
//! left of the leader's lease and extended at each renewal, so a killed or
//! frozen agent loses it by itself: the kernel drops it, no agent needed.

use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, CacheInfo};
use rtnetlink::packet_route::link::LinkAttribute;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

pub use crate::config::VipSpec;

/// Why the VIP cannot be managed: a startup error for the agent, or a
/// failed netlink call the VIP task logs and retries.
#[derive(Debug, thiserror::Error)]
pub enum VipError {
    #[error("cannot read /proc/self/status to check capabilities: {0}")]
    Status(#[source] std::io::Error),
    #[error("cannot read the effective capabilities from /proc/self/status")]
    NoCapabilities,
    #[error(
        "vip is set but the agent lacks {missing}: run it as root, or grant them \
         (systemd: AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW), or remove vip from the \
         configuration"
    )]
    MissingCapabilities { missing: String },
    #[error("cannot open a netlink socket: {0}")]
    Netlink(#[source] std::io::Error),
    #[error("vip_interface = {interface:?}: no such interface on this host (see `ip link`)")]
    NoInterface { interface: String },
    #[error("listing the addresses of {interface}: {source}")]
    List {
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("adding {cidr} to {interface}: {source}")]
    Add {
        cidr: String,
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("removing {cidr} from {interface}: {source}")]
    Remove {
        cidr: String,
        interface: String,
        source: rtnetlink::Error,
    },
}

/// The effective capabilities the VIP needs: CAP_NET_ADMIN (12) to change
/// addresses, CAP_NET_RAW (13) for gratuitous ARP.
pub fn check_capabilities() -> Result<(), VipError> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(VipError::Status)?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or(VipError::NoCapabilities)?;
    let missing: Vec<&str> = [(12, "CAP_NET_ADMIN"), (13, "CAP_NET_RAW")]
        .into_iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(VipError::MissingCapabilities {
            missing: missing.join(" and "),
        })
    }
}

/// The interface the VIP lives on, reached over netlink.
pub struct Vip {
    spec: VipSpec,
    handle: rtnetlink::Handle,
    index: u32,
    mac: [u8; 6],
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for Vip {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl Vip {
    /// Opens netlink and finds the interface; a missing interface is an
    /// error naming it.
    pub async fn open(spec: VipSpec) -> Result<Vip, VipError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(VipError::Netlink)?;
        let connection = tokio::spawn(connection.in_current_span());
        let mut links = handle
            .link()
            .get()
            .match_name(spec.interface.clone())
            .execute();
        let link = match futures_util::TryStreamExt::try_next(&mut links).await {
            Ok(Some(link)) => link,
            Ok(None) | Err(_) => {
                connection.abort();
                return Err(VipError::NoInterface {
                    interface: spec.interface,
                });
            }
        };
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => <[u8; 6]>::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Vip {
            index: link.header.index,
            spec,
            handle,
            mac,
            connection,
        })
    }

    /// The address as the kernel has it on the interface, if it does.
    async fn find(&self) -> Result<Option<AddressMessage>, VipError> {
        let mut addresses = self
            .handle
            .address()
            .get()
            .set_link_index_filter(self.index)
            .set_address_filter(IpAddr::V4(self.spec.address))
            .execute();
        futures_util::TryStreamExt::try_next(&mut addresses)
            .await
            .map_err(|source| VipError::List {
                interface: self.spec.interface.clone(),
                source,
            })
    }

    pub async fn present(&self) -> Result<bool, VipError> {
        Ok(self.find().await?.is_some())
    }

    /// Adds the address, or extends it, valid for `valid` (whole seconds,
    /// as the kernel counts them).
    async fn hold(&self, valid: u32) -> Result<(), VipError> {
        let mut request = self
            .handle
            .address()
            .add(
                self.index,
                IpAddr::V4(self.spec.address),
                self.spec.prefix_len,
            )
            .replace();
        let mut lifetime = CacheInfo::default();
        lifetime.ifa_preferred = valid;
        lifetime.ifa_valid = valid;
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::CacheInfo(lifetime));
        request.execute().await.map_err(|source| VipError::Add {
            cidr: self.spec.cidr(),
            interface: self.spec.interface.clone(),
            source,
        })
    }

    /// Removes the address; true if it was there.
    pub async fn release(&self) -> Result<bool, VipError> {
        let Some(message) = self.find().await? else {
            return Ok(false);
        };
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(|source| VipError::Remove {
                cidr: self.spec.cidr(),
                interface: self.spec.interface.clone(),
                source,
            })?;
        Ok(true)
    }

    /// One gratuitous ARP request ("who has VIP? tell VIP", from this
    /// interface's MAC) broadcast on the interface, so that neighbours
    /// update their caches at once instead of when their entry goes stale.
    fn announce(&self) -> std::io::Result<()> {
        let ip = self.spec.address.octets();
        let mut packet = [0u8; 28];
        packet[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        packet[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        packet[4] = 6;
        packet[5] = 4;
        packet[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
        packet[8..14].copy_from_slice(&self.mac);
        packet[14..18].copy_from_slice(&ip);
        packet[24..28].copy_from_slice(&ip);
        mainstay_sys::net::send_link_broadcast(self.index, libc::ETH_P_ARP as u16, &packet)
    }
}

/// Whole seconds the address may live when the lease is safe until
/// `deadline`: never past it (the kernel may drop it up to a second late,
/// which the lease's margin over the fencing deadline absorbs); `None` when
/// less than a second is left.
pub fn valid_lifetime(deadline: Instant, now: Instant) -> Option<u32> {
    let secs = deadline.saturating_duration_since(now).as_secs();
    (secs >= 1).then(|| secs.min(u32::MAX as u64) as u32)
}

/// Gratuitous ARP after taking the address, spaced out: the first reaches
/// neighbours at once, the later ones those that missed it.
const ANNOUNCE_AT_MS: [u64; 5] = [0, 100, 300, 700, 1500];

/// Keeps the address on this node exactly while `hold_until` names a
/// deadline in the future (the lease's fencing deadline while this node
/// leads with a running primary), checks the interface every `recheck`,
/// and removes the address when `stop` fires. `held` reports the state.
pub async fn run(
    vip: Vip,
    mut hold_until: watch::Receiver<Option<Instant>>,
    held: watch::Sender<bool>,
    recheck: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let vip = std::sync::Arc::new(vip);
    let mut announcer: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let wanted =
            (*hold_until.borrow_and_update()).and_then(|d| valid_lifetime(d, Instant::now()));
        let present = match vip.present().await {
            Ok(present) => present,
            Err(err) => {
                warn!("VIP: {err}");
                *held.borrow()
            }
        };
        match wanted {
            Some(valid) => match vip.hold(valid).await {
                Ok(()) => {
                    if !present {
                        info!(vip = %vip.spec.cidr(), interface = %vip.spec.interface, "VIP added: this node leads with a running primary");
                        if let Some(previous) = announcer.take() {
                            previous.abort();
                        }
                        let vip = vip.clone();
                        let announce = async move {
                            let start = Instant::now();
                            for at in ANNOUNCE_AT_MS {
                                tokio::time::sleep_until(start + Duration::from_millis(at)).await;
                                if let Err(err) = vip.announce() {
                                    warn!("VIP: gratuitous ARP failed: {err}");
                                }
                            }
                        };
                        announcer = Some(tokio::spawn(announce.in_current_span()));
                    }
                    held.send_replace(true);
                }
                Err(err) => warn!("VIP: {err}"),
            },
            None if present => {
                if let Some(announcer) = announcer.take() {
                    announcer.abort();
                }
                match vip.release().await {
                    Ok(_) => {
                        info!(vip = %vip.spec.cidr(), "VIP removed: this node does not lead with a running primary, or its lease may expire");
                        held.send_replace(false);
                    }
                    Err(err) => warn!("VIP: {err}"),
                }
            }
            None => {
                if held.send_replace(false) {
                    info!(vip = %vip.spec.cidr(), "VIP gone: its lifetime ran out with the lease (the kernel dropped it)");
                }
            }
        }
        tokio::select! {
            changed = hold_until.changed() => {
                if changed.is_err() {
                    break;
                }
            }
            _ = tokio::time::sleep(recheck) => {}
            _ = &mut stop => break,
        }
    }
    if let Some(announcer) = announcer.take() {
        announcer.abort();
    }
    match vip.release().await {
        Ok(true) => info!(vip = %vip.spec.cidr(), "VIP removed: the agent stops"),
        Ok(false) => {}
        Err(err) => warn!("VIP: {err}"),
    }
    held.send_replace(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lifetime_never_outlasts_the_lease() {
        let now = Instant::now();
        assert_eq!(
            valid_lifetime(now + Duration::from_millis(2999), now),
            Some(2)
        );
        assert_eq!(
            valid_lifetime(now + Duration::from_millis(1000), now),
            Some(1)
        );
        assert_eq!(valid_lifetime(now + Duration::from_millis(999), now), None);
        assert_eq!(valid_lifetime(now - Duration::from_millis(5), now), None);
    }
}
