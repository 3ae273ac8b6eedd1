//! TLS for the REST API (server) and its clients (`mainstay ctl`, agents
//! asking each other in failsafe mode), with rustls and the ring provider.

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::rustls;

/// A certificate, key or CA file that cannot be used: which file, and why.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificates from {}: {source}", .path.display())]
    Read { path: PathBuf, source: pem::Error },
    #[error("{}: not a PEM certificate: {source}", .path.display())]
    NotACertificate { path: PathBuf, source: pem::Error },
    #[error("{}: no certificate in the file", .path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: not a PEM private key: {source}", .path.display())]
    NotAKey { path: PathBuf, source: pem::Error },
    #[error(
        "{} and {} do not make a usable certificate: {source}",
        .cert_file.display(),
        .key_file.display()
    )]
    UnusableCertificate {
        cert_file: PathBuf,
        key_file: PathBuf,
        source: rustls::Error,
    },
    #[error("{}: unusable CA certificate: {source}", .path.display())]
    UnusableCa {
        path: PathBuf,
        source: rustls::Error,
    },
    /// A build of rustls without the protocol versions asked for: no file
    /// can fix that.
    #[error("the TLS library offers no safe protocol version: {source}")]
    Protocols { source: rustls::Error },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })?
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::NotACertificate {
            path: path.into(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: path.into() });
    }
    Ok(certs)
}

/// The server side, from a PEM certificate chain and its PEM private key.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let certs = certificates(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|source| TlsError::NotAKey {
        path: key_file.into(),
        source,
    })?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Protocols { source })?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::UnusableCertificate {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            source,
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The client side, trusting the CA certificates in `ca_file`.
pub fn connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_file)? {
        roots.add(cert).map_err(|source| TlsError::UnusableCa {
            path: ca_file.into(),
            source,
        })?;
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Protocols { source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = connector(&missing).err().unwrap();
        assert!(matches!(err, TlsError::Read { .. }), "{err:?}");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot read certificates from {}: ",
                missing.display()
            )),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "no PEM here\n").unwrap();
        let err = connector(&empty).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("{}: no certificate in the file", empty.display())
        );
        let err = acceptor(&empty, &empty).err().unwrap();
        assert!(matches!(err, TlsError::NoCertificate { .. }), "{err:?}");
    }
}
