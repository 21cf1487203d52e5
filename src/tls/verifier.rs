//! Client certificate verification: webpki's chain and validity checks, then ours.
//!
//! Wrapping the webpki verifier puts the identity rules ([`PeerIdentity::from_der`]) inside
//! the handshake: a certificate that chains correctly but has no clientAuth EKU or an
//! ambiguous identity is refused with a TLS alert, exactly like one from the wrong CA, and
//! never reaches request handling. The inner verifier is that of the client trust in force
//! when the handshake started (CA bundle, and CRLs when configured: see [`super::trust`]).

use std::sync::Arc;

use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::danger::{ClientCertVerified, ClientCertVerifier},
};

use crate::identity::{IdentityError, PeerIdentity};

#[derive(Debug)]
pub(super) struct IdentityVerifier {
    /// webpki's verifier of the client CA bundle (and CRLs).
    inner: Arc<dyn ClientCertVerifier>,
}

impl IdentityVerifier {
    pub(super) fn new(inner: Arc<dyn ClientCertVerifier>) -> Self {
        Self { inner }
    }
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        match PeerIdentity::from_der(end_entity) {
            Ok(_) => Ok(verified),
            Err(IdentityError::NotForClientAuth) => {
                Err(Error::InvalidCertificate(CertificateError::InvalidPurpose))
            }
            Err(e) => {
                Err(Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
