//! Client certificate → [`Principal`]: who is calling.
//!
//! Runs once per connection, on a leaf certificate that rustls has already verified against
//! the client CA bundle. The name is chosen by a fixed precedence, and a certificate that
//! could be read as more than one identity is refused rather than guessed at:
//!
//! 1. a SPIFFE ID: exactly one `spiffe://` URI SAN → `spiffe://trust.domain/path`;
//!    two or more SPIFFE URIs are refused (an X.509-SVID has exactly one);
//! 2. else exactly one DNS SAN → `dns:<name>` (lower-cased); several DNS SANs are refused;
//! 3. else exactly one subject common name → `cn:<CN>`.
//!
//! The certificate must also carry the `clientAuth` extended key usage. webpki alone accepts
//! a certificate with no EKU extension at all; a gateway that holds secrets should not, so a
//! server certificate or a bare signing certificate cannot be replayed as a client identity.
//! Every name is checked for a strict character set, so a principal is safe to print in a
//! log line or use as a policy subject.

use std::{
    fmt,
    time::{Duration, SystemTime},
};

use sha2::{Digest, Sha256};
use x509_parser::{
    prelude::{FromDer, GeneralName, X509Certificate},
    time::ASN1Time,
};

/// Longest accepted principal text, in bytes.
const MAX_PRINCIPAL_BYTES: usize = 1024;

/// The authenticated name of a caller, e.g. `spiffe://prod.example/payments`,
/// `dns:billing.internal` or `cn:backup-job`. Only [`PeerIdentity::from_der`] builds one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal(String);

/// What the gateway knows about the peer of one connection: its principal, and the
/// certificate facts the audit log records with every request.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Who is calling.
    pub principal: Principal,
    /// SHA-256 of the leaf certificate's DER, lower-case hex.
    pub fingerprint: String,
    /// The certificate serial number, colon-separated hex.
    pub serial: String,
    /// When the certificate expires (its notAfter).
    pub expires: SystemTime,
}

/// Why a verified certificate still cannot name a caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The DER does not parse as an X.509 certificate.
    #[error("client certificate does not parse")]
    Malformed,
    /// The certificate lacks the clientAuth extended key usage.
    #[error("client certificate does not allow client authentication (no clientAuth EKU)")]
    NotForClientAuth,
    /// More than one SPIFFE URI SAN.
    #[error("client certificate has {0} SPIFFE IDs; exactly one is allowed")]
    SeveralSpiffeIds(usize),
    /// More than one DNS SAN (and no SPIFFE ID).
    #[error("client certificate has {0} DNS names and no SPIFFE ID; the identity is ambiguous")]
    SeveralDnsNames(usize),
    /// More than one subject CN (and no SAN to use instead).
    #[error("client certificate has several common names; the identity is ambiguous")]
    SeveralCommonNames,
    /// No SPIFFE ID, DNS SAN or CN.
    #[error("client certificate names no identity (no SPIFFE ID, DNS SAN or common name)")]
    NoName,
    /// A name with characters outside the allowed set.
    #[error("client certificate {0} is not well-formed")]
    BadName(&'static str),
}

impl PeerIdentity {
    /// Derives the identity of a verified leaf certificate (DER).
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Malformed)?;
        // The fingerprint covers `der` whole: bytes after the certificate would change it.
        if !rest.is_empty() {
            return Err(IdentityError::Malformed);
        }
        let eku = cert
            .extended_key_usage()
            .map_err(|_| IdentityError::Malformed)?
            .ok_or(IdentityError::NotForClientAuth)?;
        if !eku.value.client_auth {
            return Err(IdentityError::NotForClientAuth);
        }
        let principal = principal_of(&cert)?;
        Ok(Self {
            principal,
            fingerprint: hex::encode(Sha256::digest(der)),
            serial: cert.raw_serial_as_string(),
            expires: system_time(cert.validity().not_after),
        })
    }
}

/// An X.509 time as a [`SystemTime`] (times before 1970 as the epoch).
pub(crate) fn system_time(t: ASN1Time) -> SystemTime {
    let secs = u64::try_from(t.timestamp()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn principal_of(cert: &X509Certificate<'_>) -> Result<Principal, IdentityError> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| IdentityError::Malformed)?
        .map(|ext| ext.value.general_names.as_slice())
        .unwrap_or_default();

    let spiffe: Vec<&str> = sans
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u)
                if u.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("spiffe://")) =>
            {
                Some(*u)
            }
            _ => None,
        })
        .collect();
    match spiffe.as_slice() {
        [one] => return spiffe_principal(one),
        [] => {}
        many => return Err(IdentityError::SeveralSpiffeIds(many.len())),
    }

    let dns: Vec<&str> = sans
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    match dns.as_slice() {
        [one] => return dns_principal(one),
        [] => {}
        many => return Err(IdentityError::SeveralDnsNames(many.len())),
    }

    let mut cns = cert.subject().iter_common_name();
    let Some(cn) = cns.next() else {
        return Err(IdentityError::NoName);
    };
    if cns.next().is_some() {
        return Err(IdentityError::SeveralCommonNames);
    }
    let cn = cn.as_str().map_err(|_| IdentityError::BadName("common name"))?;
    cn_principal(cn)
}

fn spiffe_principal(uri: &str) -> Result<Principal, IdentityError> {
    const BAD: IdentityError = IdentityError::BadName("SPIFFE ID");
    // SPIFFE requires the lower-case scheme; refuse rather than normalize.
    let rest = uri.strip_prefix("spiffe://").ok_or(BAD)?;
    // A path, when there is one, is non-empty: `spiffe://domain/` (a trailing slash) is not a
    // SPIFFE ID, and would name the same workload as `spiffe://domain` in a policy.
    let (domain, path) = rest.split_once('/').map_or((rest, None), |(d, p)| (d, Some(p)));
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = path.is_none_or(|path| {
        path.split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        })
    });
    if !domain_ok || !path_ok || uri.len() > MAX_PRINCIPAL_BYTES {
        return Err(BAD);
    }
    Ok(Principal(uri.to_owned()))
}

fn dns_principal(name: &str) -> Result<Principal, IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    if !ok {
        return Err(IdentityError::BadName("DNS name"));
    }
    Ok(Principal(format!("dns:{}", name.to_ascii_lowercase())))
}

/// A common name of printable ASCII without a comma (`policy.csv` separates its fields with
/// commas, so a name with one could never be granted or denied by name).
fn cn_principal(cn: &str) -> Result<Principal, IdentityError> {
    let ok = !cn.is_empty()
        && cn.len() <= MAX_PRINCIPAL_BYTES
        && cn.bytes().all(|b| (b.is_ascii_graphic() && b != b',') || b == b' ')
        && cn.trim() == cn;
    if !ok {
        return Err(IdentityError::BadName("common name"));
    }
    Ok(Principal(format!("cn:{cn}")))
}

impl Principal {
    /// The principal's text, as policies and audit records name it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Principal({})", self.0)
    }
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("principal", &self.principal.0)
            .field("fingerprint", &self.fingerprint)
            .field("serial", &self.serial)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::{prelude::*, sample::Index, test_runner::TestCaseError};
    use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, SanType};

    fn cert(f: impl FnOnce(&mut CertificateParams)) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        f(&mut p);
        let key = KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(s.try_into().unwrap())
    }

    fn dns(s: &str) -> SanType {
        SanType::DnsName(s.try_into().unwrap())
    }

    fn principal(der: &[u8]) -> Result<String, IdentityError> {
        PeerIdentity::from_der(der).map(|p| p.principal.0)
    }

    #[test]
    fn spiffe_id_wins_over_dns_and_cn() {
        let der = cert(|p| {
            p.subject_alt_names = vec![dns("a.example"), uri("spiffe://prod.example/payments/api")];
            p.distinguished_name.push(DnType::CommonName, "ignored");
        });
        assert_eq!(principal(&der).unwrap(), "spiffe://prod.example/payments/api");
    }

    #[test]
    fn the_expiry_is_the_certificates_not_after() {
        let not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let der = cert(|p| {
            p.subject_alt_names = vec![uri("spiffe://prod.example/payments/api")];
            p.not_after = not_after;
        });
        let expires = PeerIdentity::from_der(&der).unwrap().expires;
        assert_eq!(expires, SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000));
    }

    #[test]
    fn cert_with_two_spiffe_ids_is_refused() {
        let der = cert(|p| {
            p.subject_alt_names = vec![uri("spiffe://a/x"), uri("SPIFFE://a/y")];
        });
        assert_eq!(principal(&der), Err(IdentityError::SeveralSpiffeIds(2)));
    }

    #[test]
    fn non_spiffe_uris_are_ignored() {
        let der =
            cert(|p| p.subject_alt_names = vec![uri("https://x.example/"), dns("Svc.Example")]);
        assert_eq!(principal(&der).unwrap(), "dns:svc.example");
    }

    #[test]
    fn malformed_spiffe_id_is_refused() {
        for bad in [
            "spiffe://",
            "spiffe://UPPER/x",
            "spiffe://d/../x",
            "spiffe://d/a//b",
            "spiffe://d/x?q",
            "spiffe://d/",
            "spiffe://d/app/",
        ] {
            let der = cert(|p| p.subject_alt_names = vec![uri(bad)]);
            assert_eq!(principal(&der), Err(IdentityError::BadName("SPIFFE ID")), "{bad}");
        }
    }

    #[test]
    fn several_dns_names_are_ambiguous() {
        let der = cert(|p| p.subject_alt_names = vec![dns("a.example"), dns("b.example")]);
        assert_eq!(principal(&der), Err(IdentityError::SeveralDnsNames(2)));
    }

    #[test]
    fn cn_is_the_last_resort() {
        let der = cert(|p| p.distinguished_name.push(DnType::CommonName, "backup job"));
        let id = PeerIdentity::from_der(&der).unwrap();
        assert_eq!(id.principal.as_str(), "cn:backup job");
        assert_eq!(id.fingerprint, hex::encode(Sha256::digest(&der)));
        assert!(!id.serial.is_empty());
    }

    #[test]
    fn cn_with_a_comma_is_refused() {
        let der = cert(|p| p.distinguished_name.push(DnType::CommonName, "backup, admin"));
        assert_eq!(principal(&der), Err(IdentityError::BadName("common name")));
    }

    #[test]
    fn cn_with_control_characters_is_refused() {
        let der = cert(|p| p.distinguished_name.push(DnType::CommonName, "evil\nINFO forged"));
        assert_eq!(principal(&der), Err(IdentityError::BadName("common name")));
    }

    #[test]
    fn cert_without_a_name_is_refused() {
        assert_eq!(principal(&cert(|_| {})), Err(IdentityError::NoName));
    }

    #[test]
    fn cert_without_client_auth_eku_is_refused() {
        let none = cert(|p| {
            p.extended_key_usages.clear();
            p.distinguished_name.push(DnType::CommonName, "x");
        });
        assert_eq!(principal(&none), Err(IdentityError::NotForClientAuth));
        let server = cert(|p| {
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            p.distinguished_name.push(DnType::CommonName, "x");
        });
        assert_eq!(principal(&server), Err(IdentityError::NotForClientAuth));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        assert_eq!(principal(b"\x30\x03\x02\x01"), Err(IdentityError::Malformed));
        assert_eq!(principal(&[]), Err(IdentityError::Malformed));
        // A good certificate with bytes after it: the fingerprint would cover them.
        let mut trailing = cert(|p| p.distinguished_name.push(DnType::CommonName, "x"));
        assert!(principal(&trailing).is_ok());
        trailing.extend_from_slice(b"garbage");
        assert_eq!(principal(&trailing), Err(IdentityError::Malformed));
    }

    /// Good certificates to mutate, made once: one of each kind of identity, plus one whose
    /// only problem is two DNS names (so a mutation may make it name exactly one).
    fn seeds() -> &'static [Vec<u8>] {
        static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        SEEDS.get_or_init(|| {
            vec![
                cert(|p| {
                    p.subject_alt_names =
                        vec![dns("a.example"), uri("spiffe://prod.example/payments/api")];
                    p.distinguished_name.push(DnType::CommonName, "backup job");
                }),
                cert(|p| {
                    p.subject_alt_names = vec![dns("Svc.Example")];
                    p.distinguished_name.push(DnType::CommonName, "svc");
                }),
                cert(|p| p.distinguished_name.push(DnType::CommonName, "backup job")),
                cert(|p| {
                    p.subject_alt_names = vec![dns("a.example"), dns("b.example")];
                    p.distinguished_name.push(DnType::CommonName, "ab");
                }),
            ]
        })
    }

    /// What a certificate `from_der` accepted must satisfy, checked against the DER on its
    /// own terms: the fingerprint is of these bytes, the serial is colon-separated hex, and
    /// the principal is the one name of the highest-precedence kind the certificate carries
    /// (no other SPIFFE ID, DNS name or CN that could also have been chosen), made only of
    /// printable ASCII, and present in the DER.
    fn assert_names_exactly_one(der: &[u8], id: &PeerIdentity) -> Result<(), TestCaseError> {
        prop_assert_eq!(&id.fingerprint, &hex::encode(Sha256::digest(der)));
        prop_assert!(
            !id.serial.is_empty()
                && id.serial.split(':').all(|b| b.len() == 2
                    && b.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))),
            "serial {:?}",
            id.serial
        );
        let p = id.principal.as_str();
        prop_assert!(p.len() <= MAX_PRINCIPAL_BYTES + 4, "{} bytes", p.len());
        prop_assert!(p.bytes().all(|b| b.is_ascii_graphic() || b == b' '), "{:?}", p);

        let (_, cert) = X509Certificate::from_der(der).expect("accepted, so it parses");
        prop_assert!(cert.extended_key_usage().unwrap().unwrap().value.client_auth);
        let sans = cert
            .subject_alternative_name()
            .unwrap()
            .map(|e| e.value.general_names.clone())
            .unwrap_or_default();
        let spiffe: Vec<&str> = sans
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) if u.to_ascii_lowercase().starts_with("spiffe://") => Some(*u),
                _ => None,
            })
            .collect();
        let dns: Vec<&str> = sans
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(*d),
                _ => None,
            })
            .collect();
        let cns = cert.subject().iter_common_name().count();
        let contains = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        if p.starts_with("spiffe://") {
            prop_assert_eq!(spiffe, vec![p]);
            prop_assert!(contains(p.as_bytes()));
            prop_assert!(!p.ends_with('/'), "{:?} ends with a slash", p);
        } else if let Some(name) = p.strip_prefix("dns:") {
            prop_assert!(spiffe.is_empty(), "{} chosen over {:?}", p, spiffe);
            prop_assert_eq!(dns.len(), 1, "{} chosen among {:?}", p, dns);
            prop_assert_eq!(dns[0].to_ascii_lowercase(), name);
            prop_assert!(der.windows(name.len()).any(|w| w.eq_ignore_ascii_case(name.as_bytes())));
        } else if let Some(cn) = p.strip_prefix("cn:") {
            prop_assert!(spiffe.is_empty() && dns.is_empty(), "{} chosen over SANs {:?}", p, sans);
            prop_assert_eq!(cns, 1, "{} chosen among {} CNs", p, cns);
            prop_assert!(!cn.is_empty() && cn.trim() == cn, "{:?}", cn);
            prop_assert!(!cn.contains(','), "{:?} could not be named in policy.csv", cn);
            prop_assert!(contains(cn.as_bytes()));
        } else {
            prop_assert!(false, "principal {:?} has no known kind", p);
        }
        Ok(())
    }

    #[test]
    fn the_seeds_are_accepted_as_the_checker_expects() {
        for (i, der) in seeds().iter().enumerate() {
            match PeerIdentity::from_der(der) {
                Ok(id) => assert_names_exactly_one(der, &id).unwrap(),
                Err(e) => assert_eq!((i, e), (3, IdentityError::SeveralDnsNames(2))),
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn from_der_never_panics_on_arbitrary_bytes(
            der in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            if let Ok(id) = PeerIdentity::from_der(&der) {
                assert_names_exactly_one(&der, &id)?;
            }
        }

        #[test]
        fn mutated_certificates_are_refused_or_name_exactly_one_identity(
            seed in 0..4usize,
            edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<Index>()),
        ) {
            let mut der = seeds()[seed].clone();
            for (at, byte) in &edits {
                let i = at.index(der.len());
                der[i] = *byte;
            }
            if let Some(cut) = cut {
                der.truncate(cut.index(der.len()));
            }
            let result = PeerIdentity::from_der(&der);
            if edits.is_empty() && cut.is_some() {
                // Any strict prefix of a certificate is cut short inside its outer SEQUENCE.
                prop_assert_eq!(result.clone().err(), Some(IdentityError::Malformed), "{:?}", cut);
            }
            match result {
                Ok(id) => assert_names_exactly_one(&der, &id)?,
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}
