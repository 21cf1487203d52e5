//! The audit signing key (Ed25519): it signs checkpoint records so that an auditor holding
//! only the public key can tell the log up to a checkpoint is exactly what the gateway wrote.
//!
//! The private key file holds the 32-byte seed in base64 after a comment line; it must be
//! mode 0600 (refused otherwise) and is kept in zeroizing memory. The public key file
//! (`.pub`) holds the 32-byte public key in base64 and may be shared freely.

use std::{fmt, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use zeroize::Zeroizing;

const HEADER: &str = "# secretgate audit signing key (Ed25519 seed, base64). Keep private.";

/// Why a signing or public key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The private key file is readable by group or others.
    #[error("{path}: mode {mode:o} lets others read the audit signing key; chmod 600 it")]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold a key of the right form.
    #[error("{path}: {reason}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong (never the key bytes).
        reason: String,
    },
    /// No randomness available.
    #[error("cannot generate a key: no system randomness")]
    Random,
}

/// The private signing key.
pub struct SigningKey {
    seed: Zeroizing<[u8; 32]>,
    pair: Ed25519KeyPair,
}

/// A public key that verifies checkpoint signatures.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyingKey([u8; 32]);

impl SigningKey {
    /// A new random key.
    pub fn generate() -> Result<Self, SigningError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut *seed).map_err(|_| SigningError::Random)?;
        Self::from_seed(seed)
    }

    fn from_seed(seed: Zeroizing<[u8; 32]>) -> Result<Self, SigningError> {
        let pair = Ed25519KeyPair::from_seed_unchecked(&*seed).map_err(|_| SigningError::Random)?;
        Ok(Self { seed, pair })
    }

    /// Loads the key file at `path`, refusing one that others can read.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let p = path.display().to_string();
        let io = |source| SigningError::Io { path: p.clone(), source };
        if let Some(mode) = crate::fs::shared_mode(path).map_err(io)? {
            return Err(SigningError::Permissions { path: p, mode });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let malformed =
            |reason: &str| SigningError::Malformed { path: p.clone(), reason: reason.into() };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| malformed("no key in the file"))?;
        let bytes =
            Zeroizing::new(B64.decode(line).map_err(|_| malformed("the key is not valid base64"))?);
        let mut seed = Zeroizing::new([0u8; 32]);
        if bytes.len() != 32 {
            return Err(malformed("the key is not 32 bytes (an Ed25519 seed)"));
        }
        seed.copy_from_slice(&bytes);
        Self::from_seed(seed)
    }

    /// Writes the key to `path` (mode 0600, refusing to overwrite) and the public key to
    /// `path` + `.pub`.
    pub fn save(&self, path: &Path) -> Result<(), SigningError> {
        let p = path.display().to_string();
        let io = |source| SigningError::Io { path: p.clone(), source };
        let text = Zeroizing::new(format!("{HEADER}\n{}\n", B64.encode(*self.seed)));
        crate::fs::write_new(path, text.as_bytes(), 0o600).map_err(io)?;
        self.verifying_key().save(&pub_path(path))
    }

    /// The matching public key.
    pub fn verifying_key(&self) -> VerifyingKey {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        VerifyingKey(pk)
    }

    /// Signs `message`; the signature in base64.
    pub fn sign(&self, message: &[u8]) -> String {
        B64.encode(self.pair.sign(message).as_ref())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.verifying_key()).finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Parses a base64 public key.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bytes = B64.decode(text.trim()).map_err(|_| "not valid base64".to_owned())?;
        let bytes: [u8; 32] =
            bytes.try_into().map_err(|_| "not 32 bytes (an Ed25519 public key)".to_owned())?;
        Ok(Self(bytes))
    }

    /// Loads a `.pub` file.
    pub fn load(path: &Path) -> Result<Self, SigningError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SigningError::Io { path: p.clone(), source })?;
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#'));
        Self::parse(line.unwrap_or_default())
            .map_err(|reason| SigningError::Malformed { path: p, reason })
    }

    /// Writes the public key file, refusing to replace one (it may belong to another key).
    fn save(&self, path: &Path) -> Result<(), SigningError> {
        use std::io::Write;
        let io = |source| SigningError::Io { path: path.display().to_string(), source };
        let text = format!("# secretgate audit public key (Ed25519, base64)\n{self}\n");
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)
    }

    /// Whether `sig` (base64) is this key's signature over `message`.
    pub fn verify(&self, message: &[u8], sig: &str) -> bool {
        let Ok(sig) = B64.decode(sig) else { return false };
        UnparsedPublicKey::new(&ED25519, &self.0).verify(message, &sig).is_ok()
    }
}

impl fmt::Display for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerifyingKey({self})")
    }
}

/// Where the public key of the key file `path` goes: `path` with `.pub` appended.
pub fn pub_path(path: &Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".pub");
    p.into()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sign_verify_and_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        let key = SigningKey::generate().unwrap();
        key.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = SigningKey::load(&path).unwrap();
        let public = VerifyingKey::load(&pub_path(&path)).unwrap();
        assert_eq!(public, key.verifying_key());
        let sig = loaded.sign(b"hello");
        assert!(public.verify(b"hello", &sig));
        assert!(!public.verify(b"hellO", &sig));
        assert!(!public.verify(b"hello", "bm90IGEgc2lnbmF0dXJl"));
        assert!(!SigningKey::generate().unwrap().verifying_key().verify(b"hello", &sig));
        assert!(key.save(&path).is_err(), "never overwrites a key");
        assert!(!format!("{loaded:?}").contains(&B64.encode(*loaded.seed)));
    }

    #[test]
    fn a_readable_or_malformed_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.key");
        SigningKey::generate().unwrap().save(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(SigningKey::load(&path), Err(SigningError::Permissions { .. })));
        std::fs::write(&path, "# c\nAAAA\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = SigningKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("32 bytes"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn verifying_key_parse_never_panics_and_round_trips(
            text in prop_oneof![
                any::<String>(),
                "[A-Za-z0-9+/=]{0,60}",
                // A real key's text with spaces around it, or with one character replaced.
                ("[ \t\n]{0,2}", any::<[u8; 32]>(), "[ \t\n]{0,2}")
                    .prop_map(|(a, k, b)| format!("{a}{}{b}", B64.encode(k))),
                (any::<[u8; 32]>(), any::<proptest::sample::Index>(), any::<char>()).prop_map(
                    |(k, at, c)| {
                        let mut chars: Vec<char> = B64.encode(k).chars().collect();
                        let i = at.index(chars.len());
                        chars[i] = c;
                        chars.into_iter().collect()
                    }
                ),
            ],
        ) {
            match VerifyingKey::parse(&text) {
                Ok(key) => {
                    let shown = key.to_string();
                    prop_assert_eq!(shown.len(), 44);
                    prop_assert_eq!(B64.decode(&shown).unwrap(), key.0.to_vec());
                    prop_assert_eq!(VerifyingKey::parse(&shown).unwrap(), key.clone());
                    // What was parsed is the canonical text, give or take surrounding space.
                    prop_assert_eq!(shown.as_str(), text.trim());
                }
                Err(reason) => {
                    let known = ["not valid base64", "not 32 bytes (an Ed25519 public key)"];
                    prop_assert!(known.contains(&reason.as_str()), "{}", reason);
                }
            }
        }

        #[test]
        fn any_key_displays_as_text_that_parses_back(bytes in any::<[u8; 32]>()) {
            let key = VerifyingKey(bytes);
            prop_assert_eq!(VerifyingKey::parse(&key.to_string()).unwrap(), key.clone());
            prop_assert_eq!(VerifyingKey::parse(&format!(" {key}\n")).unwrap(), key);
        }
    }
}
