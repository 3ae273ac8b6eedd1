//! The cluster's certificate authority and each node's certificate. One
//! certificate per node, valid for server and client use and naming the
//! node's address: etcd's peers and clients and the REST API all use it,
//! so there is no second set of secrets.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;

/// Long enough that no ship's crew ever meets an expired certificate.
const VALID_YEARS: i32 = 25;

/// The CA's parameters: the same for a cluster on every node, so that a
/// node given the CA's key signs as the CA.
fn ca_params(cluster: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("mainstay cluster {cluster} CA"));
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = rcgen::date_time_ymd(2026, 1, 1);
    params.not_before = now;
    params.not_after = rcgen::date_time_ymd(2026 + VALID_YEARS, 1, 1);
    params
}

/// A new CA for `cluster`: (certificate, key), PEM.
pub fn new_ca(cluster: &str) -> Result<(String, String), String> {
    let key = KeyPair::generate().map_err(|e| format!("cannot make the CA's key: {e}"))?;
    let cert = ca_params(cluster)
        .self_signed(&key)
        .map_err(|e| format!("cannot make the CA's certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A certificate for node `name` at `address`, signed by the cluster's CA
/// (its key in `ca_key_pem`): (certificate, key), PEM.
pub fn node_certificate(
    cluster: &str,
    ca_key_pem: &str,
    name: &str,
    address: IpAddr,
) -> Result<(String, String), String> {
    let ca_key =
        KeyPair::from_pem(ca_key_pem).map_err(|e| format!("the CA's key does not load: {e}"))?;
    let issuer = Issuer::new(ca_params(cluster), ca_key);
    let mut params = CertificateParams::default();
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, name);
    params.distinguished_name = subject;
    params.subject_alt_names = vec![
        SanType::IpAddress(address),
        SanType::IpAddress(IpAddr::from([127, 0, 0, 1])),
        SanType::DnsName(name.try_into().map_err(|e| format!("{name}: {e}"))?),
        SanType::DnsName("localhost".try_into().expect("a valid name")),
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = rcgen::date_time_ymd(2026, 1, 1);
    params.not_after = rcgen::date_time_ymd(2026 + VALID_YEARS, 1, 1);
    let key = KeyPair::generate().map_err(|e| format!("cannot make {name}'s key: {e}"))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| format!("cannot sign {name}'s certificate: {e}"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_is_signed_by_the_cluster_ca() {
        let (ca, ca_key) = new_ca("ship").unwrap();
        assert!(ca.contains("BEGIN CERTIFICATE"));
        let (cert, key) =
            node_certificate("ship", &ca_key, "node2", "10.0.0.2".parse().unwrap()).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        // A second node signed elsewhere from the same key has the same issuer.
        let (other, _) =
            node_certificate("ship", &ca_key, "node3", "10.0.0.3".parse().unwrap()).unwrap();
        assert_ne!(cert, other);
        assert!(node_certificate("ship", "not a key", "n", "10.0.0.1".parse().unwrap()).is_err());
    }
}
