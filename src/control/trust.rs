//! The client trust kept in the store (`tls.client_trust_source = "store"`): the client CA
//! bundle and the CRLs, as PEM text, the same for every replica, pushed with `secretgate
//! trust push`. A replica puts in force the newest version whose bundle and CRLs pass the
//! checks a file would (see [`crate::tls`]); a raw write to etcd that brings back an older
//! version (a CRL from before a revocation) is refused like any other (see [`super::stored`]).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{
    Kek,
    stored::{Kind, Stored, number},
};
use crate::{
    config::TlsConfig,
    registry::ReplicaRecord,
    tls::{ClientTrust, ServerCertHandle},
};

/// The client trust as a kind of control object.
#[derive(Debug)]
pub struct TrustKind;

/// The stored client trust as this replica follows it.
pub type StoredTrust = Stored<TrustKind>;

/// A stored client trust version's content.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustFiles {
    /// PEM: the client CA bundle.
    pub client_ca: String,
    /// PEM: the CRLs, one from each client CA; empty for none.
    #[serde(default)]
    pub client_crl: String,
}

impl Kind for TrustKind {
    const NAME: &'static str = "trust";
    type Value = ClientTrust;
    type Content = TrustFiles;
    type Context = (TlsConfig, ServerCertHandle);

    fn build(
        (tls, cert): &Self::Context,
        _kek: &Kek,
        version: u64,
        files: &TrustFiles,
    ) -> Result<ClientTrust, String> {
        let origin = format!("client trust version {version}");
        ClientTrust::from_pem(tls, cert, &files.client_ca, &files.client_crl, &origin)
            .map(|t| t.numbered(version))
            .map_err(|e| e.to_string())
    }

    fn reported(record: &ReplicaRecord) -> Option<u64> {
        number(&record.client_trust)
    }
}

/// The context trust versions are built in: the TLS settings and the server certificate.
pub fn context(tls: &TlsConfig, cert: &ServerCertHandle) -> (TlsConfig, ServerCertHandle) {
    (tls.clone(), Arc::clone(cert))
}
