//! The envelope: what the store holds instead of a secret value.
//!
//! ```text
//! "sg" | format 0x01 | key id length (1 byte) | key id | 24-byte nonce | ciphertext | 16-byte tag
//! ```
//!
//! Sealed with XChaCha20-Poly1305 under one key of the keyring, with a fresh random nonce
//! (192 bits: random nonces never realistically collide, so no counter state is needed
//! across replicas). XChaCha20-Poly1305 is built as draft-irtf-cfrg-xchacha specifies:
//! HChaCha20(key, nonce[0..16]) gives a one-message subkey, then IETF ChaCha20-Poly1305
//! under that subkey with nonce `0000 || nonce[16..24]`. The bulk AEAD is ring's assembly
//! (about 3× the throughput of the pure-Rust `chacha20poly1305` crate on this hardware,
//! see `benches/crypto.rs`); a differential test checks that every envelope is
//! byte-for-byte what the `chacha20poly1305` crate's `XChaCha20Poly1305` produces and opens.
//! The associated data binds the ciphertext to where it belongs:
//!
//! ```text
//! "secretgate envelope v1\0" | header (magic .. key id) | path length (u16 BE) | path | version (u64 BE)
//! ```
//!
//! so a ciphertext copied to another path, or put back under another version, fails to
//! authenticate instead of decrypting to the wrong secret, and a header edited to name
//! another key fails too. Parsing checks every length before slicing; nothing here panics
//! on input.

use chacha20::cipher::{consts::U10, generic_array::GenericArray};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use zeroize::{Zeroize, Zeroizing};

use super::keyring::{Key, KeyMaterial, Keyring};
use crate::path::SecretPath;

/// The two magic bytes every envelope starts with.
pub const MAGIC: &[u8; 2] = b"sg";
/// The only format version so far.
pub const FORMAT_V1: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const AAD_CONTEXT: &[u8] = b"secretgate envelope v1\0";
/// Largest envelope accepted: the largest configurable value plus every overhead.
pub const MAX_ENVELOPE_LEN: usize = (16 << 20) + 4 + 255 + NONCE_LEN + TAG_LEN;

/// Why an envelope cannot be sealed or opened. Internal detail: clients only ever learn
/// that a stored value could not be decrypted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Does not start with the magic bytes.
    #[error("not a secretgate envelope (bad magic)")]
    BadMagic,
    /// A format version this build does not know.
    #[error("unsupported envelope format version {0}")]
    UnsupportedFormat(u8),
    /// Shorter than its header says.
    #[error("envelope is truncated")]
    Truncated,
    /// Longer than any valid envelope.
    #[error("envelope is {0} bytes, over the maximum")]
    TooLong(usize),
    /// The key id in the header is malformed.
    #[error("envelope key id is malformed")]
    BadKeyId,
    /// The key is not loaded (unknown or retired).
    #[error("envelope key {0} is not in the keyring (unknown or retired)")]
    UnknownKey(String),
    /// The key has no material (retired) and cannot seal.
    #[error("key {0} cannot seal: it is not loaded")]
    KeyNotLoaded(String),
    /// The operating system's random generator failed; nothing was sealed.
    #[error("system random generator unavailable")]
    Random,
    /// Authentication failed: wrong path, version, key, or altered bytes.
    #[error(
        "envelope failed authentication (altered, moved to another path or version, or wrong key)"
    )]
    Forged,
}

/// The parsed header of an envelope (no decryption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// The id of the key that sealed it.
    pub key_id: &'a str,
    header_len: usize,
}

/// Seals `plaintext` for `path` at `version` under `key`.
pub fn seal(
    key: &Key,
    path: &SecretPath,
    version: u64,
    plaintext: &[u8],
) -> Result<Vec<u8>, EnvelopeError> {
    let material = key.material().ok_or_else(|| EnvelopeError::KeyNotLoaded(key.id.to_string()))?;
    let id = key.id.as_str().as_bytes();
    let id_len = u8::try_from(id.len()).map_err(|_| EnvelopeError::BadKeyId)?;
    let header_len = MAGIC.len() + 2 + id.len();
    let mut out = Vec::with_capacity(header_len + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.extend_from_slice(MAGIC);
    out.push(FORMAT_V1);
    out.push(id_len);
    out.extend_from_slice(id);
    let mut nonce = [0u8; NONCE_LEN];
    // The OS random generator failing is not recoverable for a secrets service; refusing
    // to seal (rather than using a weak nonce) is the only safe answer, and it surfaces as
    // an internal error on this one request.
    getrandom::fill(&mut nonce).map_err(|_| EnvelopeError::Random)?;
    out.extend_from_slice(&nonce);
    let aad = associated_data(&out[..header_len], path, version);
    let body_start = out.len();
    out.extend_from_slice(plaintext);
    let tag = message_key(material, &nonce)
        .seal_in_place_separate_tag(ietf_nonce(&nonce), Aad::from(&aad), &mut out[body_start..])
        .map_err(|_| EnvelopeError::TooLong(plaintext.len()))?;
    out.extend_from_slice(tag.as_ref());
    Ok(out)
}

/// Opens an envelope stored for `path` at `version`, with whichever loaded key sealed it.
pub fn open(
    keyring: &Keyring,
    path: &SecretPath,
    version: u64,
    envelope: &[u8],
) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let header = parse_header(envelope)?;
    let key = keyring
        .opener(header.key_id)
        .ok_or_else(|| EnvelopeError::UnknownKey(header.key_id.to_owned()))?;
    // Invariant: `opener` only returns keys with material.
    let material =
        key.material().ok_or_else(|| EnvelopeError::UnknownKey(header.key_id.to_owned()))?;
    let rest = &envelope[header.header_len..];
    if rest.len() < NONCE_LEN + TAG_LEN {
        return Err(EnvelopeError::Truncated);
    }
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
    let aad = associated_data(&envelope[..header.header_len], path, version);
    let nonce: &[u8; NONCE_LEN] = nonce.try_into().map_err(|_| EnvelopeError::Truncated)?;
    let tag = Tag::try_from(tag).map_err(|_| EnvelopeError::Truncated)?;
    let mut plaintext = Zeroizing::new(Vec::with_capacity(ciphertext.len()));
    plaintext.extend_from_slice(ciphertext);
    message_key(material, nonce)
        .open_in_place_separate_tag(ietf_nonce(nonce), Aad::from(&aad), tag, &mut plaintext, 0..)
        .map_err(|_| EnvelopeError::Forged)?;
    Ok(plaintext)
}

/// Reads the header of an envelope: which key sealed it. Checks magic, format and lengths.
pub fn parse_header(envelope: &[u8]) -> Result<Header<'_>, EnvelopeError> {
    if envelope.len() > MAX_ENVELOPE_LEN {
        return Err(EnvelopeError::TooLong(envelope.len()));
    }
    match envelope {
        [] | [_] => return Err(EnvelopeError::Truncated),
        [a, b, ..] if [*a, *b] != *MAGIC => return Err(EnvelopeError::BadMagic),
        [_, _] | [_, _, _] => return Err(EnvelopeError::Truncated),
        [_, _, format, ..] if *format != FORMAT_V1 => {
            return Err(EnvelopeError::UnsupportedFormat(*format));
        }
        _ => {}
    }
    let id_len = usize::from(envelope[3]);
    let header_len = 4 + id_len;
    let id = envelope.get(4..header_len).ok_or(EnvelopeError::Truncated)?;
    let key_id = std::str::from_utf8(id).map_err(|_| EnvelopeError::BadKeyId)?;
    if key_id.is_empty()
        || !key_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(EnvelopeError::BadKeyId);
    }
    Ok(Header { key_id, header_len })
}

/// The one-message ChaCha20-Poly1305 key: HChaCha20 of the key and the first 16 nonce bytes.
fn message_key(material: &KeyMaterial, nonce: &[u8; NONCE_LEN]) -> LessSafeKey {
    let mut subkey =
        chacha20::hchacha::<U10>(material.bytes().into(), GenericArray::from_slice(&nonce[..16]));
    // Invariant: the subkey is 32 bytes, exactly what CHACHA20_POLY1305 takes.
    let key = UnboundKey::new(&CHACHA20_POLY1305, &subkey).expect("a 32-byte ChaCha20 key");
    subkey.as_mut_slice().zeroize();
    // "LessSafe" only means ring cannot enforce nonce uniqueness for us: every subkey here
    // seals exactly one message, so any fixed nonce under it is unique.
    LessSafeKey::new(key)
}

/// The IETF nonce under the subkey: four zero bytes and the last 8 nonce bytes.
fn ietf_nonce(nonce: &[u8; NONCE_LEN]) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&nonce[16..]);
    Nonce::assume_unique_for_key(n)
}

fn associated_data(header: &[u8], path: &SecretPath, version: u64) -> Vec<u8> {
    let p = path.as_str().as_bytes();
    let mut aad = Vec::with_capacity(AAD_CONTEXT.len() + header.len() + 2 + p.len() + 8);
    aad.extend_from_slice(AAD_CONTEXT);
    aad.extend_from_slice(header);
    // Paths are at most 512 bytes (SecretPath invariant), so the length fits in u16.
    aad.extend_from_slice(&(p.len() as u16).to_be_bytes());
    aad.extend_from_slice(p);
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ring() -> Keyring {
        Keyring::generate().unwrap()
    }

    fn path(s: &str) -> SecretPath {
        SecretPath::parse(s).unwrap()
    }

    #[test]
    fn round_trip_and_layout() {
        let ring = ring();
        let env = seal(ring.primary(), &path("/a/b"), 3, b"hunter2").unwrap();
        assert_eq!(&env[..3], b"sg\x01");
        assert_eq!(parse_header(&env).unwrap().key_id, ring.primary().id.as_str());
        let id_len = ring.primary().id.as_str().len();
        assert_eq!(env.len(), 4 + id_len + NONCE_LEN + 7 + TAG_LEN);
        assert!(!env.windows(7).any(|w| w == b"hunter2"), "no plaintext in the envelope");
        assert_eq!(open(&ring, &path("/a/b"), 3, &env).unwrap().as_slice(), b"hunter2");
        let empty = seal(ring.primary(), &path("/a/b"), 1, b"").unwrap();
        assert!(open(&ring, &path("/a/b"), 1, &empty).unwrap().is_empty());
    }

    #[test]
    fn nonces_are_fresh() {
        let ring = ring();
        let a = seal(ring.primary(), &path("/a"), 1, b"same").unwrap();
        let b = seal(ring.primary(), &path("/a"), 1, b"same").unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn another_path_or_version_does_not_open() {
        let ring = ring();
        let env = seal(ring.primary(), &path("/a/b"), 3, b"v").unwrap();
        assert_eq!(open(&ring, &path("/a/c"), 3, &env), Err(EnvelopeError::Forged));
        assert_eq!(open(&ring, &path("/a/b"), 2, &env), Err(EnvelopeError::Forged));
        assert_eq!(open(&ring, &path("/a/b"), 4, &env), Err(EnvelopeError::Forged));
    }

    #[test]
    fn unknown_key_and_malformed_headers_have_their_own_errors() {
        let ring = ring();
        let env = seal(ring.primary(), &path("/a"), 1, b"v").unwrap();
        assert!(matches!(
            open(&Keyring::generate().unwrap(), &path("/a"), 1, &env),
            Err(EnvelopeError::UnknownKey(_))
        ));
        assert_eq!(parse_header(b""), Err(EnvelopeError::Truncated));
        assert_eq!(parse_header(b"s"), Err(EnvelopeError::Truncated));
        assert_eq!(parse_header(b"xx\x01\x01a"), Err(EnvelopeError::BadMagic));
        assert_eq!(parse_header(b"sg\x02\x01a"), Err(EnvelopeError::UnsupportedFormat(2)));
        assert_eq!(parse_header(b"sg\x01\x05ab"), Err(EnvelopeError::Truncated));
        assert_eq!(parse_header(b"sg\x01\x00"), Err(EnvelopeError::BadKeyId));
        assert_eq!(parse_header(b"sg\x01\x01/"), Err(EnvelopeError::BadKeyId));
        let id_len = ring.primary().id.as_str().len();
        assert_eq!(
            open(&ring, &path("/a"), 1, &env[..4 + id_len + 30]),
            Err(EnvelopeError::Truncated)
        );
        let huge = vec![0u8; MAX_ENVELOPE_LEN + 1];
        assert!(matches!(parse_header(&huge), Err(EnvelopeError::TooLong(_))));
    }

    /// Opens an envelope with the `chacha20poly1305` crate's XChaCha20Poly1305, the
    /// reference implementation of the construction.
    fn reference_open(
        ring: &Keyring,
        path: &SecretPath,
        version: u64,
        env: &[u8],
    ) -> Option<Vec<u8>> {
        use chacha20poly1305::{
            KeyInit, XChaCha20Poly1305, XNonce,
            aead::{Aead, Payload},
        };
        let h = parse_header(env).ok()?;
        let key = ring.opener(h.key_id)?.material()?;
        let nonce = &env[h.header_len..h.header_len + NONCE_LEN];
        let aad = associated_data(&env[..h.header_len], path, version);
        XChaCha20Poly1305::new(key.bytes().into())
            .decrypt(
                XNonce::from_slice(nonce),
                Payload { msg: &env[h.header_len + NONCE_LEN..], aad: &aad },
            )
            .ok()
    }

    proptest! {
        #[test]
        fn envelopes_match_the_reference_xchacha20poly1305(
            value in proptest::collection::vec(any::<u8>(), 0..3000),
            version in any::<u64>(),
        ) {
            use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce, aead::{Aead, Payload}};
            let ring = ring();
            let p = path("/diff/x");
            let env = seal(ring.primary(), &p, version, &value).unwrap();
            let reference = reference_open(&ring, &p, version, &env);
            prop_assert_eq!(reference.as_deref(), Some(value.as_slice()));
            // And the other way: the reference seals, we open.
            let h = parse_header(&env).unwrap();
            let nonce = [9u8; NONCE_LEN];
            let aad = associated_data(&env[..h.header_len], &p, version);
            let key = ring.primary().material().unwrap().bytes();
            let ct = XChaCha20Poly1305::new(key.into())
                .encrypt(XNonce::from_slice(&nonce), Payload { msg: &value, aad: &aad })
                .unwrap();
            let mut theirs = env[..h.header_len].to_vec();
            theirs.extend_from_slice(&nonce);
            theirs.extend_from_slice(&ct);
            let opened = open(&ring, &p, version, &theirs).unwrap();
            prop_assert_eq!(opened.as_slice(), value.as_slice());
        }

        #[test]
        fn flipping_any_byte_is_detected(
            value in proptest::collection::vec(any::<u8>(), 0..200),
            pos in any::<proptest::sample::Index>(),
            mask in 1u8..=255,
        ) {
            let ring = ring();
            let mut env = seal(ring.primary(), &path("/p"), 7, &value).unwrap();
            let i = pos.index(env.len());
            env[i] ^= mask;
            prop_assert!(open(&ring, &path("/p"), 7, &env).is_err(), "flip at {} not detected", i);
        }

        #[test]
        fn seal_open_round_trips(value in proptest::collection::vec(any::<u8>(), 0..2000), version in 1u64..) {
            let ring = ring();
            let env = seal(ring.primary(), &path("/p/q"), version, &value).unwrap();
            let opened = open(&ring, &path("/p/q"), version, &env).unwrap();
            prop_assert_eq!(opened.as_slice(), value.as_slice());
        }

        #[test]
        fn open_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = open(&ring(), &path("/p"), 1, &bytes);
        }
    }
}
