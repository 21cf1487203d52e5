//! The key-encryption key (KEK): a 32-byte secret every gateway replica holds locally
//! (`crypto.kek`, a file of mode 0600), never stored in etcd. From it the gateway derives
//! (HKDF-SHA256, one label per use) the key that authenticates the control state it keeps in
//! the store, so that someone who can write etcd but does not hold the KEK cannot forge a
//! policy or a keyring.

use std::path::Path;

use ring::{aead, hkdf, hmac};
use zeroize::{Zeroize, Zeroizing};

/// HKDF label of the control-state MAC key.
const MAC_LABEL: &[u8] = b"secretgate control-state mac v1";
/// HKDF label of the key that encrypts secret control state (the keyring's data keys).
const ENC_LABEL: &[u8] = b"secretgate control-state encryption v1";
/// ChaCha20-Poly1305 nonce bytes (random per encryption: keyring changes are rare).
const NONCE_LEN: usize = 12;
/// KEK length in bytes.
pub const KEK_LEN: usize = 32;

/// The loaded KEK, as the keys derived from it. Never printed; the raw bytes are wiped once
/// the keys are derived.
pub struct Kek {
    mac: hmac::Key,
    enc: aead::LessSafeKey,
    /// Identifies the KEK without revealing it (the first bytes of a MAC over a fixed
    /// label), for error messages and status.
    id: String,
    /// The KEK before it, during a KEK rotation (`crypto.previous_kek`): still accepted for
    /// verifying and decrypting, never used to seal.
    previous: Option<Box<Kek>>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish_non_exhaustive()
    }
}

/// Why the KEK file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KekError {
    /// The file cannot be read.
    #[error("crypto.kek {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is readable by others.
    #[error("crypto.kek {path}: mode {mode:o} lets others read the KEK; chmod 600 it")]
    Shared {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// The file does not hold 32 bytes (raw, or 64 hex digits).
    #[error("crypto.kek {path}: must hold exactly 32 bytes (raw, or as 64 hex digits)")]
    Length {
        /// The file.
        path: String,
    },
}

impl Kek {
    /// Loads the KEK from `path`: 32 raw bytes, or 64 hex digits and an optional newline.
    pub fn load(path: &Path) -> Result<Self, KekError> {
        let shown = path.display().to_string();
        let read = |source| KekError::Read { path: shown.clone(), source };
        if let Some(mode) = crate::fs::shared_mode(path).map_err(read)? {
            return Err(KekError::Shared { path: shown, mode });
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(read)?);
        let raw: Zeroizing<Vec<u8>> = match bytes.len() {
            KEK_LEN => Zeroizing::new(bytes.to_vec()),
            _ => {
                let text = std::str::from_utf8(&bytes).unwrap_or_default().trim_end();
                Zeroizing::new(hex::decode(text).unwrap_or_default())
            }
        };
        if raw.len() != KEK_LEN {
            return Err(KekError::Length { path: shown });
        }
        Ok(Self::from_bytes(&raw))
    }

    /// The KEK from its 32 bytes.
    pub fn from_bytes(raw: &[u8]) -> Self {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"secretgate").extract(raw);
        let derive = |label: &[u8]| {
            let mut key = Zeroizing::new([0u8; 32]);
            // Expanding 32 bytes of SHA-256 output cannot fail (the limit is 255 blocks).
            let info = [label];
            let okm = prk.expand(&info, hkdf::HKDF_SHA256).expect("32 bytes from HKDF-SHA256");
            okm.fill(&mut *key).expect("32 bytes from HKDF-SHA256");
            key
        };
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &*derive(MAC_LABEL));
        // A 32-byte key is exactly what ChaCha20-Poly1305 takes.
        let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &*derive(ENC_LABEL))
            .expect("a 32-byte ChaCha20-Poly1305 key");
        let enc = aead::LessSafeKey::new(unbound);
        let id = hex::encode(&hmac::sign(&mac, b"secretgate kek id").as_ref()[..4]);
        Self { mac, enc, id, previous: None }
    }

    /// This KEK, also accepting what `previous` sealed (a KEK rotation in progress).
    pub fn with_previous(mut self, previous: Kek) -> Self {
        self.previous = Some(Box::new(previous));
        self
    }

    /// A new random KEK written to `path` (mode 0600; an existing file is kept, not replaced).
    pub fn generate(path: &Path) -> std::io::Result<()> {
        let mut raw = Zeroizing::new([0u8; KEK_LEN]);
        getrandom::fill(&mut *raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        crate::fs::write_new(path, hex::encode(*raw).as_bytes(), 0o600)
    }

    /// A short public name of this KEK (not derivable into the key).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The MAC of `parts` (each length-prefixed, so no two lists share an encoding).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.mac);
        for p in parts {
            ctx.update(&(p.len() as u64).to_be_bytes());
            ctx.update(p);
        }
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Encrypts `plain` bound to `context` (authenticated, not secret): nonce, ciphertext, tag.
    pub fn encrypt(&self, context: &[u8], plain: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + aead::MAX_TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plain);
        let mut body = out.split_off(NONCE_LEN);
        self.enc
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(context),
                &mut body,
            )
            .map_err(|_| std::io::Error::other("encryption failed"))?;
        out.extend_from_slice(&body);
        body.zeroize();
        Ok(out)
    }

    /// Decrypts what [`Kek::encrypt`] made with the same `context`; `None` when it does not
    /// authenticate (another KEK, another context, altered).
    pub fn decrypt(&self, context: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + aead::MAX_TAG_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = Zeroizing::new(body.to_vec());
        match self.enc.open_in_place(nonce, aead::Aad::from(context), &mut buf) {
            Ok(plain) => {
                let plain_len = plain.len();
                buf.truncate(plain_len);
                Some(buf)
            }
            Err(_) => self.previous.as_ref()?.decrypt(context, sealed),
        }
    }

    /// Whether `tag` is the MAC of `parts` (compared in constant time).
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        use subtle::ConstantTimeEq;
        let mine = tag.len() == 32 && bool::from(self.mac(parts).as_slice().ct_eq(tag));
        mine || self.previous.as_ref().is_some_and(|p| p.verify(parts, tag))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_generated_kek_loads_and_its_macs_verify_only_for_the_same_parts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        Kek::generate(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let kek = Kek::load(&path).unwrap();
        let tag = kek.mac(&[b"policy", b"7", b"body"]);
        assert!(kek.verify(&[b"policy", b"7", b"body"], &tag));
        assert!(!kek.verify(&[b"policy", b"8", b"body"], &tag));
        assert!(!kek.verify(&[b"policy7", b"", b"body"], &tag), "parts are length-prefixed");
        let other = Kek::from_bytes(&[9u8; 32]);
        assert!(!other.verify(&[b"policy", b"7", b"body"], &tag));
        assert_ne!(kek.id(), other.id());
        assert!(!format!("{kek:?}").contains(&hex::encode(tag)));
        assert!(Kek::generate(&path).is_err(), "an existing KEK is never replaced");
        let sealed = kek.encrypt(b"keyring 3", b"key material").unwrap();
        assert!(!sealed.windows(12).any(|w| w == b"key material"));
        assert_eq!(&*kek.decrypt(b"keyring 3", &sealed).unwrap(), b"key material");
        assert!(kek.decrypt(b"keyring 4", &sealed).is_none(), "bound to its context");
        assert!(other.decrypt(b"keyring 3", &sealed).is_none(), "bound to its KEK");
        // During a KEK rotation the new KEK still accepts what the previous one sealed, and
        // seals only under itself.
        let rotated = Kek::from_bytes(&[9u8; 32]).with_previous(Kek::load(&path).unwrap());
        assert!(rotated.verify(&[b"policy", b"7", b"body"], &tag));
        assert_eq!(&*rotated.decrypt(b"keyring 3", &sealed).unwrap(), b"key material");
        let new_tag = rotated.mac(&[b"policy", b"7", b"body"]);
        assert!(!kek.verify(&[b"policy", b"7", b"body"], &new_tag));
        assert!(kek.decrypt(b"k", &rotated.encrypt(b"k", b"x").unwrap()).is_none());
    }

    #[test]
    fn a_shared_or_short_kek_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kek");
        std::fs::write(&path, [1u8; 31]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(Kek::load(&path), Err(KekError::Length { .. })));
        std::fs::write(&path, [1u8; 32]).unwrap();
        assert!(Kek::load(&path).is_ok());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(Kek::load(&path), Err(KekError::Shared { mode: 0o640, .. })));
    }
}
