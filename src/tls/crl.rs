//! Client certificate revocation (`tls.client_crl`): certificate revocation lists from the
//! client CAs, checked in every handshake and again on every request.
//!
//! The file holds one PEM `X509 CRL` block per CA. It is checked whole before it is put in
//! force: every block parses, no issuer appears twice, a CRL from a CA of the client CA
//! bundle carries that CA's signature, none is past its next update, and every CA of the
//! bundle has one (without it, rustls could not tell whether that CA's certificates are
//! revoked and would refuse them all). A file that fails any check is refused with an error
//! naming the CRL at fault; on reload the CRLs in force stay.
//!
//! In the handshake rustls checks the whole chain against the CRLs (a certificate whose
//! status is unknown is refused, and so is every certificate once a CRL is past its next
//! update). Connections outlive handshakes: each connection's chain is checked again when
//! the CRLs change ([`super::trust`]), so revoking a certificate stops it at its next
//! request, without a restart or a reconnect.

use std::{path::Path, sync::Arc, time::SystemTime};

use rustls::{
    pki_types::{CertificateRevocationListDer, pem::PemObject},
    server::danger::ClientCertVerifier,
};
use sha2::{Digest, Sha256};
use x509_parser::{
    prelude::{FromDer, X509Certificate},
    revocation_list::CertificateRevocationList,
};

use super::{ClientCas, TlsError, pem_error, read};
use crate::identity::system_time;

const WHAT: &str = "client CRL";

/// A checked set of CRLs, and the verifier rustls uses with them.
pub struct ClientCrl {
    verifier: Arc<dyn ClientCertVerifier>,
    /// Revoked certificates listed, over every CRL.
    revoked: usize,
    version: String,
    crls: usize,
    next_update: Option<String>,
    /// The same, for metrics.
    next_update_at: Option<SystemTime>,
    /// The CRL due first: when a warning is due (a quarter of its validity left), and what
    /// to say.
    due: Option<(SystemTime, String)>,
}

impl std::fmt::Debug for ClientCrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl ClientCrl {
    /// Reads and checks the CRL file at `path` against the client CA bundle `cas` (see the
    /// module docs for the checks).
    pub fn load(path: &Path, cas: &ClientCas) -> Result<Self, TlsError> {
        Self::from_pem(&read(path, WHAT)?, path, cas)
    }

    /// Checks the CRLs in PEM text `pem` (from `path`, named in errors) against `cas`.
    pub fn from_pem(pem: &[u8], path: &Path, cas: &ClientCas) -> Result<Self, TlsError> {
        let fail = |reason: String| pem_error(path, WHAT, reason);
        let ders = CertificateRevocationListDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(e.to_string()))?;
        if ders.is_empty() {
            return Err(fail("no X509 CRL found (a PEM file of CRLs is expected)".into()));
        }
        let parsed = cas
            .certs()
            .iter()
            .map(|der| X509Certificate::from_der(der).map(|(_, c)| c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("the client CA bundle does not parse: {e}")))?;
        let now = x509_parser::time::ASN1Time::now();
        let mut revoked = 0;
        let mut issuers: Vec<Vec<u8>> = Vec::new();
        let mut next_update: Option<x509_parser::time::ASN1Time> = None;
        let mut due: Option<(SystemTime, String)> = None;
        for (n, der) in ders.iter().enumerate() {
            let which = format!("CRL {} of {}", n + 1, ders.len());
            let crl = match CertificateRevocationList::from_der(der) {
                Ok(([], crl)) => crl,
                Ok(_) => return Err(fail(format!("{which}: bytes after the CRL"))),
                Err(e) => return Err(fail(format!("{which} does not parse: {e}"))),
            };
            let issuer = crl.issuer();
            let which = format!("{which} (issuer {issuer})");
            if issuers.iter().any(|i| i == issuer.as_raw()) {
                return Err(fail(format!(
                    "{which}: a second CRL from the same issuer; keep only the newest"
                )));
            }
            issuers.push(issuer.as_raw().to_vec());
            if let Some(ca) = parsed.iter().find(|c| c.subject().as_raw() == issuer.as_raw()) {
                crl.verify_signature(ca.public_key()).map_err(|e| {
                    fail(format!("{which} is not signed by that client CA's key ({e})"))
                })?;
            }
            if let Some(next) = crl.next_update() {
                if next < now {
                    return Err(fail(format!(
                        "{which} expired at {next} (its next update); install a fresh one"
                    )));
                }
                next_update = Some(next_update.map_or(next, |t| t.min(next)));
                let (this, next_at) = (system_time(crl.last_update()), system_time(next));
                let warn_at = next_at - next_at.duration_since(this).unwrap_or_default() / 4;
                if due.as_ref().is_none_or(|(at, _)| warn_at < *at) {
                    let say = format!(
                        "the client CRL of {issuer} expires at {next} (its next update): publish \
                         a fresh one before then, or every certificate of that CA is refused"
                    );
                    due = Some((warn_at, say));
                }
            }
            revoked += crl.iter_revoked_certificates().count();
        }
        if let Some(ca) = parsed.iter().find(|c| !issuers.iter().any(|i| i == c.subject().as_raw()))
        {
            return Err(fail(format!(
                "no CRL from the client CA {}: the revocation status of every certificate it \
                 issued would be unknown, and each would be refused",
                ca.subject()
            )));
        }
        let verifier = cas.verifier(ders).map_err(|e| fail(format!("refused by rustls: {e}")))?;
        Ok(Self {
            verifier,
            revoked,
            version: hex::encode(&Sha256::digest(pem)[..6]),
            crls: issuers.len(),
            next_update: next_update.map(|t| t.to_string()),
            next_update_at: next_update.map(system_time),
            due,
        })
    }

    /// A warning once a CRL has less than a quarter of its validity (this update to next
    /// update) left at `now` (Unix seconds): its publisher is late, and the CRL will soon
    /// refuse every certificate of its CA.
    pub fn due(&self, now: SystemTime) -> Option<&str> {
        self.due.as_ref().filter(|(at, _)| now >= *at).map(|(_, say)| say.as_str())
    }

    /// The earliest next update of the CRLs, if any gives one.
    pub fn next_update(&self) -> Option<SystemTime> {
        self.next_update_at
    }

    /// The verifier for handshakes: the client CA bundle with these CRLs.
    pub(super) fn verifier(&self) -> &Arc<dyn ClientCertVerifier> {
        &self.verifier
    }

    /// For the log: the file's digest, how many CRLs and revoked certificates, and the
    /// earliest next update.
    pub fn describe(&self) -> String {
        format!(
            "sha256:{} ({} CRLs, {} revoked certificates, next update {})",
            self.version,
            self.crls,
            self.revoked,
            self.next_update.as_deref().unwrap_or("not given")
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use base64::{Engine, engine::general_purpose::STANDARD as B64};
    use proptest::{prelude::*, sample::Index};
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
        IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
    };

    use super::*;
    use crate::text_edits::{apply_edits, edit};

    /// A client CA and the DER of a CRL it signed, revoking two serials.
    static SEED: LazyLock<(rustls::pki_types::CertificateDer<'static>, Vec<u8>)> =
        LazyLock::new(|| {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap();
            let now = time::OffsetDateTime::now_utc();
            let revoked = |n: u64| RevokedCertParams {
                serial_number: SerialNumber::from(n),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            };
            let crl = CertificateRevocationListParams {
                this_update: now - time::Duration::hours(1),
                next_update: now + time::Duration::days(30),
                crl_number: SerialNumber::from(7u64),
                issuing_distribution_point: None,
                revoked_certs: vec![revoked(1000), revoked(1001)],
                key_identifier_method: KeyIdMethod::Sha256,
            }
            .signed_by(&ca)
            .unwrap();
            (ca.der().clone(), crl.der().to_vec())
        });

    fn pem(der: &[u8]) -> String {
        let b64 = B64.encode(der);
        let lines: Vec<&str> =
            b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN X509 CRL-----\n{}\n-----END X509 CRL-----\n", lines.join("\n"))
    }

    fn load(text: &str) -> Result<ClientCrl, TlsError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crl.pem");
        std::fs::write(&path, text).unwrap();
        let cas = ClientCas::from_der(vec![SEED.0.clone()], Path::new("ca.pem")).unwrap();
        ClientCrl::load(&path, &cas)
    }

    #[test]
    fn the_seed_loads_and_is_described() {
        let crl = load(&pem(&SEED.1)).unwrap();
        let shown = crl.describe();
        assert!(shown.starts_with("sha256:") && shown.contains("1 CRLs, 2 revoked"), "{shown}");
        // Valid from an hour ago for 30 days: due for a warning in the last quarter only.
        let (now, day) = (SystemTime::now(), std::time::Duration::from_secs(86_400));
        assert_eq!(crl.due(now), None);
        let late = now + 23 * day;
        let warning = crl.due(late).expect("a quarter of the validity left");
        assert!(warning.contains("expires at") && warning.contains("publish"), "{warning}");
        assert!(crl.due(late - day).is_none(), "{warning}");
        assert_eq!(format!("{crl:?}"), shown);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Bytes of the CRL changed, cut or added: refused with a reason naming the file, or
        /// (a change the signature does not cover) loaded whole; never a panic.
        #[test]
        fn a_damaged_crl_is_refused_never_a_panic(
            changes in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<Index>()),
            extra in proptest::collection::vec(any::<u8>(), 0..3),
        ) {
            let mut der = SEED.1.clone();
            for (at, byte) in &changes {
                let i = at.index(der.len());
                der[i] = *byte;
            }
            if let Some(cut) = cut {
                der.truncate(cut.index(der.len() + 1));
            }
            der.extend(&extra);
            match load(&pem(&der)) {
                Ok(crl) => prop_assert!(crl.revoked <= 2, "{}", crl.describe()),
                Err(e) => prop_assert!(e.to_string().contains("crl.pem"), "{e}"),
            }
        }

        /// The PEM text edited by hand: the same.
        #[test]
        fn an_edited_crl_file_is_refused_never_a_panic(
            edits in proptest::collection::vec(edit(), 1..4),
        ) {
            let text = apply_edits(&pem(&SEED.1), &edits);
            match load(&text) {
                Ok(crl) => prop_assert!(crl.revoked <= 2, "{}", crl.describe()),
                Err(e) => prop_assert!(e.to_string().contains("crl.pem"), "{e}"),
            }
        }
    }
}
