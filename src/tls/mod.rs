//! TLS for the gateway's listener: rustls server configuration, client certificate
//! verification, and our own accept loop.
//!
//! Guarantees: TLS 1.3 only unless `tls.min_version = "1.2"`; a client certificate is
//! required and must chain to the configured client CA, be within its validity period,
//! carry the clientAuth EKU and name exactly one identity ([`crate::identity`]) — otherwise
//! the handshake itself fails with an alert, before any request is read. A handshake that
//! does not finish within the timeout is dropped. The accept loop is ours (not tonic's) so
//! refused handshakes are observable, and each connection carries its chain and the client
//! trust in force ([`trust`]: CA bundle and CRLs, reloaded together), so its requests are
//! refused once the certificate is revoked, its CA removed, or it expires.

mod acceptor;
mod connection;
pub mod crl;
mod pending;
mod proxy;
mod refusals;
pub mod trust;
mod verifier;

use std::{path::Path, sync::Arc};

use rustls::{
    RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject},
    server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier, danger::ClientCertVerifier},
    sign::CertifiedKey,
};

pub use acceptor::{HandshakeLimits, TlsIncoming};
pub use connection::{ConnInfo, TlsConnection};
pub use crl::ClientCrl;
#[cfg(feature = "testing")]
pub use proxy::header as proxy_header;
pub use refusals::{REFUSAL_BURST, REFUSALS_PER_SEC};
pub use trust::{
    ClientTrust, ConnTrust, TrustHandle, Untrusted, client_trust, warn_when_crls_are_due,
};

use crate::config::{TlsConfig, TlsVersion};

/// Why a TLS configuration cannot be built. Messages name the file at fault and never
/// include key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which file it is (e.g. "server certificate").
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the expected kind.
    #[error("{what} {path}: {reason}")]
    Pem {
        /// Which file it is.
        what: &'static str,
        /// Its path.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the assembled configuration (e.g. key does not match certificate).
    #[error("TLS configuration rejected: {0}")]
    Rustls(String),
}

/// The crypto provider used everywhere in the gateway (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads a TLS file again, for [`crate::reload::Reloadable::watch`].
pub type Loader<T> = Box<dyn Fn(&Path) -> Result<T, TlsError> + Send + Sync>;

/// The client CA bundle (`tls.client_ca`), read once: its certificates, and the trust anchors
/// client chains are verified against (with or without CRLs).
#[derive(Clone)]
pub struct ClientCas {
    der: Arc<[CertificateDer<'static>]>,
    roots: Arc<RootCertStore>,
}

impl ClientCas {
    /// Reads the bundle at `path`; at least one usable CA certificate is required.
    pub fn read(path: &Path) -> Result<Self, TlsError> {
        Self::from_der(read_certs(path, "client CA bundle")?, path)
    }

    /// The bundle in PEM text `pem` (from `origin`, named in errors).
    pub fn from_pem(pem: &[u8], origin: &Path) -> Result<Self, TlsError> {
        Self::from_der(parse_certs(pem, origin, "client CA bundle")?, origin)
    }

    /// The bundle of `der` (read from `path`, named in errors).
    pub fn from_der(der: Vec<CertificateDer<'static>>, path: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &der {
            roots.add(ca.clone()).map_err(|e| {
                pem_error(path, "client CA bundle", format!("not a usable CA certificate: {e}"))
            })?;
        }
        Ok(Self { der: der.into(), roots: Arc::new(roots) })
    }

    /// The bundle's certificates.
    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.der
    }

    /// webpki's verifier of client chains against these CAs and, unless empty, `crls`: the
    /// whole chain is checked, and an unknown status or an expired CRL is a refusal.
    fn verifier(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
    ) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
        let builder = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider());
        if crls.is_empty() {
            builder.build()
        } else {
            builder.with_crls(crls).enforce_revocation_expiration().build()
        }
    }
}

/// The server certificate chain and key in force (`tls.cert`, `tls.key`).
pub struct ServerCert {
    key: Arc<CertifiedKey>,
    described: String,
    expires: Option<std::time::SystemTime>,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.described)
    }
}

impl ServerCert {
    /// Reads the chain at `cert` and the private key at `key`; refuses a key that does not
    /// belong to the chain's first certificate.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain = read_certs(cert, "server certificate")?;
        let private = read_key(key, "server private key")?;
        let (described, expires) = match x509_parser::parse_x509_certificate(&chain[0]) {
            Ok((_, c)) => {
                let not_after = c.validity().not_after;
                let described =
                    format!("serial {}, valid until {not_after}", c.raw_serial_as_string());
                (described, Some(crate::identity::system_time(not_after)))
            }
            Err(_) => ("a certificate x509-parser cannot read".to_owned(), None),
        };
        let certified = CertifiedKey::from_der(chain, private, &provider()).map_err(|e| {
            pem_error(
                key,
                "server private key",
                format!("cannot be used with the server certificate {}: {e}", cert.display()),
            )
        })?;
        Ok(Self { key: Arc::new(certified), described, expires })
    }

    /// When the leaf expires (`None` if x509-parser cannot read it).
    pub fn expires(&self) -> Option<std::time::SystemTime> {
        self.expires
    }

    /// For the log: the leaf's serial number and expiry.
    pub fn describe(&self) -> String {
        self.described.clone()
    }
}

/// The server certificate in force, reloaded when `tls.cert` or `tls.key` changes.
pub type ServerCertHandle = Arc<crate::reload::Reloadable<ServerCert>>;

/// Loads `tls.cert` and `tls.key`; returns them with the loader that reloads them.
pub fn server_cert(tls: &TlsConfig) -> Result<(ServerCertHandle, Loader<ServerCert>), TlsError> {
    let key = tls.key.clone();
    let load: Loader<ServerCert> = Box::new(move |cert: &Path| ServerCert::load(cert, &key));
    let current = load(&tls.cert)?;
    let handle = crate::reload::Reloadable::with_files(
        current,
        &tls.cert,
        &[&tls.key],
        "server certificate",
    );
    Ok((handle, load))
}

/// Hands every handshake the server certificate in force.
#[derive(Debug)]
struct ReloadingCert(ServerCertHandle);

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current().key))
    }
}

/// Builds the listener's rustls configuration from `[tls]`: it presents `cert` (the one in
/// force at each handshake) and checks client certificates with `verifier`.
fn server_config(
    tls: &TlsConfig,
    verifier: Arc<dyn ClientCertVerifier>,
    cert: ServerCertHandle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = if tls.min_version == TlsVersion::Tls12 {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(ReloadingCert(cert)));
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A rustls configuration presenting `cert` (the one in force at each handshake) without
/// asking for a client certificate, for HTTP/1.1: the metrics listener's (`metrics.tls`).
pub fn metrics_server_config(cert: ServerCertHandle) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ReloadingCert(cert)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Reads every certificate in a PEM file; at least one is required.
pub fn read_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(&read(path, what)?, path, what)
}

/// Every certificate in PEM text (read from `path`, named in errors); at least one.
pub fn parse_certs(
    pem: &[u8],
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, what, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(path, what, "no CERTIFICATE found".into()));
    }
    Ok(certs)
}

/// Reads the first private key in a PEM file.
pub fn read_key(path: &Path, what: &'static str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(read(path, what)?);
    // The pem error type prints no key bytes, only what kind of item was missing or broken.
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| pem_error(path, what, e.to_string()))
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn pem_error(path: &Path, what: &'static str, reason: String) -> TlsError {
    TlsError::Pem { what, path: path.display().to_string(), reason }
}
