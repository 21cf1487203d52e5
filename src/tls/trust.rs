//! Client trust: the client CA bundle (`tls.client_ca`) and the CRLs (`tls.client_crl`) in
//! force, reloaded together, and the check that keeps open connections honest.
//!
//! Both files are read and checked as one unit ([`ClientTrust::load`]): a CRL file is
//! checked against the bundle it will be used with, so a new bundle and its CRLs can be put
//! in place one after the other and the pair is taken once it is consistent. Until then,
//! and whenever either file is broken or missing, the trust in force stays.
//!
//! A handshake uses the trust in force when it starts. A connection outlives its handshake,
//! so before each request the connection's certificate chain is checked again
//! ([`ConnTrust::check`]) whenever the trust has changed since its last check, every
//! [`RECHECK_EVERY`] (intermediate certificates and CRLs expire too), and once its own
//! certificate has expired. Revoking a certificate, removing its CA from the bundle, or
//! letting it expire thus stops it at its next request, without a restart or a reconnect.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use rustls::{
    CertificateError, ServerConfig,
    pki_types::{CertificateDer, UnixTime},
    server::danger::ClientCertVerifier,
};
use sha2::{Digest, Sha256};

use super::{ClientCas, ClientCrl, Loader, ServerCertHandle, TlsError, verifier::IdentityVerifier};
use crate::{config::TlsConfig, reload::Reloadable};

/// How often an open connection's chain is checked again when nothing else changed.
pub const RECHECK_EVERY: Duration = Duration::from_secs(60);

/// The client CA bundle and CRLs in force, with the rustls configuration built on them.
pub struct ClientTrust {
    cas: ClientCas,
    crl: Option<ClientCrl>,
    /// webpki's verifier for the bundle and the CRLs (the one handshakes use).
    verifier: Arc<dyn ClientCertVerifier>,
    config: Arc<ServerConfig>,
    bundle_version: String,
    /// The stored version, when it came from the store.
    stored: Option<u64>,
}

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The trust in force, shared by the accept loop and every connection.
pub type TrustHandle = Arc<Reloadable<ClientTrust>>;

impl ClientTrust {
    /// Reads the client CA bundle and, when `tls.client_crl` is set, the CRLs (checked
    /// against that bundle), and builds the listener's configuration presenting `cert`.
    pub fn load(tls: &TlsConfig, cert: &ServerCertHandle) -> Result<Self, TlsError> {
        let cas = ClientCas::read(&tls.client_ca)?;
        let crl = if tls.client_crl.as_os_str().is_empty() {
            None
        } else {
            Some(ClientCrl::load(&tls.client_crl, &cas)?)
        };
        Self::build(tls, cert, cas, crl)
    }

    /// The trust of a CA bundle and CRLs given as PEM text (`crl` empty: no CRLs), named in
    /// errors after `origin` (the stored trust version).
    pub fn from_pem(
        tls: &TlsConfig,
        cert: &ServerCertHandle,
        ca: &str,
        crl: &str,
        origin: &str,
    ) -> Result<Self, TlsError> {
        let cas = ClientCas::from_pem(ca.as_bytes(), Path::new(&format!("{origin} client CA")))?;
        let crl = match crl.trim().is_empty() {
            true => None,
            false => {
                let named = format!("{origin} client CRL");
                Some(ClientCrl::from_pem(crl.as_bytes(), Path::new(&named), &cas)?)
            }
        };
        Self::build(tls, cert, cas, crl)
    }

    fn build(
        tls: &TlsConfig,
        cert: &ServerCertHandle,
        cas: ClientCas,
        crl: Option<ClientCrl>,
    ) -> Result<Self, TlsError> {
        let verifier = match &crl {
            Some(crl) => Arc::clone(crl.verifier()),
            None => cas.verifier(Vec::new()).map_err(|e| TlsError::Rustls(e.to_string()))?,
        };
        let identity = Arc::new(IdentityVerifier::new(Arc::clone(&verifier)));
        let config = super::server_config(tls, identity, Arc::clone(cert))?;
        let mut h = Sha256::new();
        for ca in cas.certs() {
            h.update(ca);
        }
        let bundle_version = hex::encode(&h.finalize()[..6]);
        Ok(Self { cas, crl, verifier, config, bundle_version, stored: None })
    }

    /// The rustls configuration for handshakes under this trust.
    pub(super) fn config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.config)
    }

    /// Checks a client's chain (leaf first, as it sent it) against this trust at `now`:
    /// signed by a CA of the bundle, every certificate within its validity, none revoked
    /// (when CRLs are configured).
    pub fn verify(&self, chain: &[CertificateDer<'_>], now: SystemTime) -> Result<(), Untrusted> {
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or(Untrusted::Other("the connection has no client certificate".into()))?;
        let now = UnixTime::since_unix_epoch(
            now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default(),
        );
        match self.verifier.verify_client_cert(leaf, intermediates, now) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(e)) => Err(Untrusted::from(e)),
            Err(e) => Err(Untrusted::Other(e.to_string())),
        }
    }

    /// A warning when a CRL in force is near its next update (see [`ClientCrl::due`]).
    pub fn due(&self, now: SystemTime) -> Option<&str> {
        self.crl.as_ref()?.due(now)
    }

    /// The earliest next update of the CRLs in force (none without CRLs).
    pub fn crl_next_update(&self) -> Option<SystemTime> {
        self.crl.as_ref()?.next_update()
    }

    /// The same trust labelled as stored version `n` (its description starts `n:`).
    pub fn numbered(mut self, n: u64) -> Self {
        self.stored = Some(n);
        self
    }

    /// For the log: the bundle's digest and size, and the CRLs' (after `N:` for stored
    /// version N).
    pub fn describe(&self) -> String {
        let crl = self.crl.as_ref().map_or_else(|| "no CRL".to_owned(), ClientCrl::describe);
        let stored = self.stored.map(|n| format!("{n}:")).unwrap_or_default();
        format!(
            "{stored}CA bundle sha256:{} ({} CAs); CRLs {crl}",
            self.bundle_version,
            self.cas.certs().len()
        )
    }
}

/// Loads the client trust of `tls` (presenting `cert`); returns it in force, watching
/// `tls.client_ca` and `tls.client_crl`, with the loader that reloads it.
pub fn client_trust(
    tls: &TlsConfig,
    cert: &ServerCertHandle,
) -> Result<(TrustHandle, Loader<ClientTrust>), TlsError> {
    let (settings, cert) = (tls.clone(), Arc::clone(cert));
    let load: Loader<ClientTrust> =
        Box::new(move |_bundle: &Path| ClientTrust::load(&settings, &cert));
    let current = load(&tls.client_ca)?;
    let also: Vec<&Path> = if tls.client_crl.as_os_str().is_empty() {
        Vec::new()
    } else {
        vec![tls.client_crl.as_path()]
    };
    let handle = Reloadable::with_files(current, &tls.client_ca, &also, "client trust");
    Ok((handle, load))
}

/// How often the CRLs in force are looked at for a coming next update.
const DUE_CHECK_EVERY: Duration = Duration::from_secs(60);
/// How often the warning of a CRL near its next update is repeated.
const DUE_WARN_EVERY: Duration = Duration::from_secs(3600);

/// Spawns the task that warns in the log (every hour, and at once after each change) while a
/// CRL in force has less than a quarter of its validity left: past its next update it would
/// refuse every certificate of its CA.
pub fn warn_when_crls_are_due(handle: TrustHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(DUE_CHECK_EVERY);
        let mut warned: Option<(Arc<ClientTrust>, std::time::Instant)> = None;
        loop {
            tick.tick().await;
            let current = handle.current();
            let Some(warning) = current.due(SystemTime::now()) else { continue };
            let repeat = warned.as_ref().is_none_or(|(trust, at)| {
                !Arc::ptr_eq(trust, &current) || at.elapsed() >= DUE_WARN_EVERY
            });
            if repeat {
                tracing::warn!("{warning}");
                warned = Some((Arc::clone(&current), std::time::Instant::now()));
            }
        }
    })
}

/// Why a connection's certificate is no longer accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Untrusted {
    /// A certificate of the chain is on a CRL in force.
    #[error("client certificate revoked: it is on the gateway's certificate revocation list")]
    Revoked,
    /// A certificate of the chain is past its validity.
    #[error("client certificate expired")]
    Expired,
    /// The chain no longer leads to a CA of the bundle (the CA was removed).
    #[error(
        "client certificate no longer trusted: its CA is not in the gateway's client CA bundle"
    )]
    UnknownIssuer,
    /// Anything else (e.g. a CRL past its next update: the status cannot be known).
    #[error("client certificate no longer accepted: {0}")]
    Other(String),
}

impl From<CertificateError> for Untrusted {
    fn from(e: CertificateError) -> Self {
        match e {
            CertificateError::Revoked => Self::Revoked,
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => Self::Expired,
            CertificateError::UnknownIssuer => Self::UnknownIssuer,
            other => Self::Other(rustls::Error::InvalidCertificate(other).to_string()),
        }
    }
}

/// One connection's chain, checked against the trust in force before its requests.
pub struct ConnTrust {
    handle: TrustHandle,
    chain: Vec<CertificateDer<'static>>,
    /// When the leaf expires.
    leaf_expires: SystemTime,
    last: Mutex<Checked>,
}

struct Checked {
    against: Arc<ClientTrust>,
    at: SystemTime,
    result: Result<(), Untrusted>,
}

impl std::fmt::Debug for ConnTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTrust").field("chain_len", &self.chain.len()).finish_non_exhaustive()
    }
}

impl ConnTrust {
    /// A connection whose handshake accepted `chain`, with a leaf that expires at
    /// `leaf_expires`, under `trust` (from `handle`).
    pub(super) fn new(
        handle: TrustHandle,
        trust: Arc<ClientTrust>,
        chain: Vec<CertificateDer<'static>>,
        leaf_expires: SystemTime,
    ) -> Self {
        let last = Mutex::new(Checked { against: trust, at: SystemTime::now(), result: Ok(()) });
        Self { handle, chain, leaf_expires, last }
    }

    /// Whether the connection's certificate is still accepted: checked again when the trust
    /// in force changed, every [`RECHECK_EVERY`], and once the leaf has expired.
    pub fn check(&self) -> Result<(), Untrusted> {
        let current = self.handle.current();
        let now = SystemTime::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let stale = !Arc::ptr_eq(&last.against, &current)
            // A clock set back counts as stale too.
            || now.duration_since(last.at).map_or(true, |d| d >= RECHECK_EVERY)
            || now > self.leaf_expires;
        // An expired certificate stays expired; anything else may mend (a CRL entry lifted,
        // a CA put back), so it is checked again like a good one.
        if stale && last.result != Err(Untrusted::Expired) {
            let result = current.verify(&self.chain, now);
            *last = Checked { against: current, at: now, result };
        }
        last.result.clone()
    }
}
