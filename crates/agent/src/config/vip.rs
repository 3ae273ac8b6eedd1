//! `vip` and `vip_interface`: the virtual IP as the file gives it, parsed
//! into the address, prefix and interface the VIP task manages.

use std::net::Ipv4Addr;

/// `vip = "10.0.0.50/24"` on `vip_interface`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub interface: String,
}

impl VipSpec {
    /// Parses "A.B.C.D/N"; the error says what is wrong (no I/O).
    pub fn parse(text: &str, interface: &str) -> Result<VipSpec, String> {
        let (address, prefix) = text.split_once('/').ok_or_else(|| {
            format!("{text:?} has no prefix length: write the address with its network, e.g. \"10.0.0.50/24\"")
        })?;
        let address: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IPv4 address"))?;
        let prefix_len: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("/{prefix} is not a prefix length between 1 and 32"))?;
        if address.is_unspecified() || address.is_loopback() || address.is_multicast() {
            return Err(format!(
                "{address} cannot be a virtual IP: give a unicast address of the clients' network"
            ));
        }
        if interface.is_empty() || interface.len() > 15 || interface.contains(['/', ' ']) {
            return Err(format!(
                "vip_interface = {interface:?} is not an interface name (e.g. \"eth0\")"
            ));
        }
        Ok(VipSpec {
            address,
            prefix_len,
            interface: interface.to_string(),
        })
    }

    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_vips_are_refused_with_the_reason() {
        let ok = VipSpec::parse("10.0.0.50/24", "eth0").unwrap();
        assert_eq!(
            (ok.cidr(), ok.interface.as_str()),
            ("10.0.0.50/24".into(), "eth0")
        );
        for (text, interface, says) in [
            ("10.0.0.50", "eth0", "no prefix length"),
            ("10.0.0.500/24", "eth0", "not an IPv4 address"),
            ("10.0.0.50/33", "eth0", "between 1 and 32"),
            ("127.0.0.5/8", "eth0", "cannot be a virtual IP"),
            ("10.0.0.50/24", "", "not an interface name"),
            (
                "10.0.0.50/24",
                "a-very-long-interface-name",
                "not an interface name",
            ),
        ] {
            let err = VipSpec::parse(text, interface).unwrap_err();
            assert!(err.contains(says), "{text} on {interface:?}: {err}");
        }
    }
}
