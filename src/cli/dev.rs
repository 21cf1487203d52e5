//! The development PKI written by `secretgate dev`: a CA, a server certificate for the local
//! machine, two client identities, and the CA's (empty) certificate revocation list. Throw-away material: regenerated as a whole when any
//! file is missing or a certificate expires within a week.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The dev identities: (file stem, SPIFFE ID).
const CLIENTS: &[(&str, &str)] =
    &[("admin", "spiffe://dev.secretgate/admin"), ("app", "spiffe://dev.secretgate/app")];

/// Where the dev PKI files are.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// `certs-dev/`
    pub dir: PathBuf,
}

impl DevPki {
    /// `certs-dev/<stem>.pem`
    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.pem"))
    }

    /// `certs-dev/<stem>-key.pem`
    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}-key.pem"))
    }

    /// `certs-dev/client-crl.pem`: the CA's CRL, revoking nothing.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("client-crl.pem")
    }

    fn stems() -> impl Iterator<Item = &'static str> {
        ["ca", "server"].into_iter().chain(CLIENTS.iter().map(|(s, _)| *s))
    }

    /// Whether every file exists and no certificate expires within a week (the CRL's next
    /// update is the CA's expiry).
    fn is_usable(&self) -> bool {
        let soon = OffsetDateTime::now_utc() + Duration::days(7);
        self.crl().is_file()
            && Self::stems().all(|stem| {
                self.key(stem).is_file()
                    && fs::read(self.cert(stem)).ok().is_some_and(|pem| {
                        rustls::pki_types::CertificateDer::pem_slice_iter(&pem).next().is_some_and(
                            |der| {
                                der.ok().is_some_and(|der| {
                                    X509Certificate::from_der(&der).is_ok_and(|(_, c)| {
                                        c.validity().not_after.timestamp() > soon.unix_timestamp()
                                    })
                                })
                            },
                        )
                    })
            })
    }
}

use rustls::pki_types::pem::PemObject;

/// Creates the dev PKI under `dir` unless a usable one is there. Returns where it is and
/// whether it was (re)generated.
pub fn ensure_dev_pki(dir: &Path) -> anyhow::Result<(DevPki, bool)> {
    let pki = DevPki { dir: dir.to_owned() };
    if pki.is_usable() {
        return Ok((pki, false));
    }
    create_private_dir(dir)?;
    let now = OffsetDateTime::now_utc();
    let validity = |p: &mut CertificateParams| {
        p.not_before = now - Duration::hours(1);
        p.not_after = now + Duration::days(365);
    };

    let mut ca = CertificateParams::default();
    ca.distinguished_name = rcgen::DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "secretgate development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut ca);
    let ca_key = KeyPair::generate()?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key)?;
    write_pair(&pki, "ca", &issuer.pem(), &ca_key_pem)?;

    let mut server =
        CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into(), "::1".into()])?;
    server.distinguished_name = rcgen::DistinguishedName::new();
    server.distinguished_name.push(DnType::CommonName, "secretgate development server");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut server);
    let key = KeyPair::generate()?;
    write_pair(&pki, "server", &server.signed_by(&key, &issuer)?.pem(), &key.serialize_pem())?;

    for (stem, spiffe) in CLIENTS {
        let mut client = CertificateParams::default();
        client.distinguished_name = rcgen::DistinguishedName::new();
        client.distinguished_name.push(DnType::CommonName, *stem);
        client.subject_alt_names = vec![SanType::URI((*spiffe).try_into()?)];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        validity(&mut client);
        let key = KeyPair::generate()?;
        write_pair(&pki, stem, &client.signed_by(&key, &issuer)?.pem(), &key.serialize_pem())?;
    }
    let crl = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + Duration::days(365),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: vec![],
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&issuer)?;
    write_file(&pki.crl(), crl.pem()?.as_bytes(), 0o644)?;
    Ok((pki, true))
}

fn write_pair(pki: &DevPki, stem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<()> {
    write_file(&pki.cert(stem), cert_pem.as_bytes(), 0o644)?;
    let key_pem = zeroize::Zeroizing::new(key_pem.to_owned());
    write_file(&pki.key(stem), key_pem.as_bytes(), 0o600)
}

/// Creates `dir` (and parents) if needed and makes it private to the owner (0700).
pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    crate::fs::create_private_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::fs::restrict(dir, 0o700).with_context(|| format!("chmod 700 {}", dir.display()))
}

/// Writes `bytes` to `path` through a fresh file created with `mode`, then renames it into
/// place, so a key is never readable by others, not even for an instant.
pub(super) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    crate::fs::write_atomic(path, bytes, mode)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn dev_pki_is_complete_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (pki, created) = ensure_dev_pki(dir.path()).unwrap();
        assert!(created);
        for stem in DevPki::stems() {
            let mode = fs::metadata(pki.key(stem)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{stem}");
        }
        let admin = fs::read(pki.cert("admin")).unwrap();
        let der = rustls::pki_types::CertificateDer::from_pem_slice(&admin).unwrap();
        let id = crate::PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.principal.as_str(), "spiffe://dev.secretgate/admin");
        let cas = crate::tls::ClientCas::read(&pki.cert("ca")).unwrap();
        let crl = crate::tls::ClientCrl::load(&pki.crl(), &cas).unwrap();
        assert!(crl.describe().contains("0 revoked"), "the dev CRL revokes nothing");
        let (_, again) = ensure_dev_pki(dir.path()).unwrap();
        assert!(!again, "a usable PKI must be kept");
        fs::remove_file(pki.key("app")).unwrap();
        assert!(ensure_dev_pki(dir.path()).unwrap().1, "a missing key regenerates the PKI");
        fs::remove_file(pki.crl()).unwrap();
        assert!(ensure_dev_pki(dir.path()).unwrap().1, "a missing CRL regenerates the PKI");
    }
}
