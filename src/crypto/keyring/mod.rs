//! The keyring: the 256-bit keys that seal secret values, with their lifecycle states.
//!
//! States follow Knox: exactly one **primary** key seals new writes; **active** keys still
//! open what they sealed; **retired** keys are kept in the file (so a retirement can be
//! undone from a backup) but never loaded into memory by the gateway.
//!
//! The file is TOML, one `[[keys]]` table per key (`id`, `state`, `created`, `secret` in
//! base64). Loading refuses a file readable by group or others, and a file with no or several
//! primary keys, duplicate ids, or keys of the wrong length — each with its own message,
//! none of which ever contains key material. Key bytes live in [`Zeroizing`] buffers and
//! have no `Debug` that prints them.

use std::{fmt, path::Path};

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

/// Bytes in a key.
pub const KEY_LEN: usize = 32;
/// Longest key id.
const MAX_ID_LEN: usize = 64;

/// A key id: 1–64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(String);

/// A key's place in the rotation lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyState {
    /// Seals new writes and opens; exactly one.
    Primary,
    /// Opens only.
    Active,
    /// Not loaded.
    Retired,
}

impl KeyState {
    /// The name in the keyring file and in `keys status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Active => "active",
            Self::Retired => "retired",
        }
    }
}

/// 256 bits of key material, wiped from memory on drop.
pub struct KeyMaterial(Zeroizing<[u8; KEY_LEN]>);

/// One key of the ring. Retired keys carry no material in memory.
pub struct Key {
    /// Its id.
    pub id: KeyId,
    /// Its state.
    pub state: KeyState,
    /// When it was created (RFC 3339).
    pub created: String,
    material: Option<KeyMaterial>,
    /// The base64 text as read, kept (zeroized) only so `save` can write retired keys back.
    encoded: Zeroizing<String>,
}

/// A validated keyring.
pub struct Keyring {
    keys: Vec<Key>,
    version: String,
}

/// Why a keyring cannot be loaded or changed. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The file cannot be read or written.
    #[error("keyring {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "keyring {path} has mode {mode:04o}: it must not be readable by group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Not valid TOML or a field has the wrong type.
    #[error("keyring is not valid: {0}")]
    Parse(String),
    /// No key at all.
    #[error("keyring has no keys")]
    Empty,
    /// No primary key.
    #[error("keyring has no primary key; exactly one key must have state = \"primary\"")]
    NoPrimary,
    /// More than one primary key.
    #[error("keyring has several primary keys ({0}); exactly one is allowed")]
    SeveralPrimaries(String),
    /// The same id twice.
    #[error("keyring has key id {0} more than once")]
    DuplicateId(String),
    /// A malformed key id.
    #[error("keyring has an invalid key id {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadId(String),
    /// A secret that is not base64.
    #[error("key {0}: secret is not valid base64")]
    BadBase64(String),
    /// A secret of the wrong length.
    #[error("key {id}: secret is {len} bytes; keys must be exactly 32 bytes (256 bits)")]
    BadLength {
        /// The key.
        id: String,
        /// Its decoded length.
        len: usize,
    },
    /// A creation time that is not RFC 3339.
    #[error("key {0}: created is not an RFC 3339 time")]
    BadCreated(String),
    /// An operation named a key that is not in the ring.
    #[error("no key {0} in the keyring")]
    UnknownKey(String),
    /// An operation that cannot apply to this key in its state.
    #[error("key {id} is {state:?}: {reason}")]
    WrongState {
        /// The key.
        id: String,
        /// Its current state.
        state: KeyState,
        /// Why the operation is refused.
        reason: &'static str,
    },
    /// The system random generator failed.
    #[error("cannot generate a key: {0}")]
    Random(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRecord {
    id: String,
    state: KeyState,
    created: String,
    secret: String,
}

impl Drop for KeyRecord {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl KeyId {
    /// Parses a key id.
    pub fn parse(s: &str) -> Result<Self, KeyringError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(KeyringError::BadId(s.chars().take(80).collect()))
        }
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn generate() -> Result<Self, KeyringError> {
        let mut rand = [0u8; 4];
        getrandom::fill(&mut rand).map_err(|e| KeyringError::Random(e.to_string()))?;
        let date = time::OffsetDateTime::now_utc().date();
        let (y, m, d) = (date.year(), u8::from(date.month()), date.day());
        Ok(Self(format!("k{y:04}{m:02}{d:02}-{}", hex::encode(rand))))
    }
}

impl KeyMaterial {
    /// The raw key bytes, for the AEAD only.
    pub(super) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    fn random() -> Result<Self, KeyringError> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        getrandom::fill(&mut *k).map_err(|e| KeyringError::Random(e.to_string()))?;
        Ok(Self(k))
    }

    /// Builds key material from bytes (tests and benchmarks).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(Zeroizing::new(bytes))
    }
}

impl Key {
    /// The key material, if this key is loaded (not retired).
    pub fn material(&self) -> Option<&KeyMaterial> {
        self.material.as_ref()
    }

    /// A loaded key built from parts (tests and benchmarks).
    pub fn new(id: KeyId, state: KeyState, material: KeyMaterial) -> Self {
        let encoded = Zeroizing::new(B64.encode(material.bytes()));
        Self {
            id,
            state,
            created: crate::clock::now_rfc3339_secs(),
            material: Some(material),
            encoded,
        }
    }
}

impl Keyring {
    /// A new keyring holding one fresh primary key.
    pub fn generate() -> Result<Self, KeyringError> {
        let key = Key::new(KeyId::generate()?, KeyState::Primary, KeyMaterial::random()?);
        let mut ring = Self { keys: vec![key], version: String::new() };
        ring.version = ring.compute_version();
        Ok(ring)
    }

    /// Loads and validates the keyring file at `path`, refusing one readable by others.
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let io = |source| KeyringError::Io { path: path.display().to_string(), source };
        if let Some(mode) = crate::fs::shared_mode(path).map_err(io)? {
            return Err(KeyringError::Permissions { path: path.display().to_string(), mode });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::parse(&text)
    }

    /// Parses and validates keyring text.
    pub fn parse(text: &str) -> Result<Self, KeyringError> {
        let file: KeyFile = toml::from_str(text).map_err(|e| {
            // toml's Display quotes the offending line, which may hold a secret: report the
            // line number and the message only.
            let line = crate::text::toml_error_line(text, &e);
            KeyringError::Parse(format!("line {line}: {}", e.message()))
        })?;
        if file.keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        let mut keys: Vec<Key> = Vec::with_capacity(file.keys.len());
        for rec in &file.keys {
            let id = KeyId::parse(&rec.id)?;
            if keys.iter().any(|k| k.id == id) {
                return Err(KeyringError::DuplicateId(rec.id.clone()));
            }
            if time::OffsetDateTime::parse(
                &rec.created,
                &time::format_description::well_known::Rfc3339,
            )
            .is_err()
            {
                return Err(KeyringError::BadCreated(rec.id.clone()));
            }
            let decoded = Zeroizing::new(
                B64.decode(rec.secret.trim())
                    .map_err(|_| KeyringError::BadBase64(rec.id.clone()))?,
            );
            let bytes: [u8; KEY_LEN] = decoded
                .as_slice()
                .try_into()
                .map_err(|_| KeyringError::BadLength { id: rec.id.clone(), len: decoded.len() })?;
            let material = KeyMaterial::from_bytes(bytes);
            keys.push(Key {
                id,
                state: rec.state,
                created: rec.created.clone(),
                material: (rec.state != KeyState::Retired).then_some(material),
                encoded: Zeroizing::new(rec.secret.trim().to_owned()),
            });
        }
        let ring = Self::validated(keys)?;
        Ok(ring)
    }

    fn validated(keys: Vec<Key>) -> Result<Self, KeyringError> {
        let primaries: Vec<&str> =
            keys.iter().filter(|k| k.state == KeyState::Primary).map(|k| k.id.as_str()).collect();
        match primaries.len() {
            0 => return Err(KeyringError::NoPrimary),
            1 => {}
            _ => return Err(KeyringError::SeveralPrimaries(primaries.join(", "))),
        }
        let mut ring = Self { keys, version: String::new() };
        ring.version = ring.compute_version();
        Ok(ring)
    }

    /// The same keyring labelled as stored version `n`: its version becomes `n:FINGERPRINT`.
    pub fn numbered(mut self, n: u64) -> Self {
        self.version = format!("{n}:{}", self.version);
        self
    }

    /// A short fingerprint of the ring's ids and states (not of key material), so operators
    /// can see which keyring each gateway runs (`N:FINGERPRINT` for stored version N).
    pub fn version(&self) -> &str {
        &self.version
    }

    fn compute_version(&self) -> String {
        let mut h = Sha256::new();
        for k in &self.keys {
            h.update(k.id.as_str());
            h.update([0, k.state as u8, 0]);
        }
        hex::encode(&h.finalize()[..6])
    }

    /// The primary key.
    pub fn primary(&self) -> &Key {
        // Invariant: `validated` guarantees exactly one primary key, and every mutation
        // goes through `validated` again.
        self.keys.iter().find(|k| k.state == KeyState::Primary).expect("exactly one primary key")
    }

    /// The loaded key with this id (primary or active), for opening.
    pub fn opener(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.id.as_str() == id && k.material.is_some())
    }

    /// Every key, in file order.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// Adds a new active key and returns its id.
    pub fn add(&mut self) -> Result<KeyId, KeyringError> {
        let key = Key::new(KeyId::generate()?, KeyState::Active, KeyMaterial::random()?);
        let id = key.id.clone();
        self.keys.push(key);
        self.version = self.compute_version();
        Ok(id)
    }

    /// Makes `id` primary; the old primary becomes active. A retired key is loaded again.
    pub fn promote(&mut self, id: &str) -> Result<(), KeyringError> {
        let idx = self.index(id)?;
        if self.keys[idx].material.is_none() {
            let decoded = Zeroizing::new(
                B64.decode(self.keys[idx].encoded.as_bytes())
                    .map_err(|_| KeyringError::BadBase64(id.into()))?,
            );
            let bytes: [u8; KEY_LEN] = decoded
                .as_slice()
                .try_into()
                .map_err(|_| KeyringError::BadLength { id: id.into(), len: decoded.len() })?;
            self.keys[idx].material = Some(KeyMaterial::from_bytes(bytes));
        }
        for k in &mut self.keys {
            if k.state == KeyState::Primary {
                k.state = KeyState::Active;
            }
        }
        self.keys[idx].state = KeyState::Primary;
        self.version = self.compute_version();
        Ok(())
    }

    /// Retires `id`. The primary key cannot be retired. The caller must first make sure no
    /// record in the store still uses it.
    pub fn retire(&mut self, id: &str) -> Result<(), KeyringError> {
        let idx = self.index(id)?;
        let key = &mut self.keys[idx];
        if key.state == KeyState::Primary {
            return Err(KeyringError::WrongState {
                id: id.into(),
                state: key.state,
                reason: "promote another key first; the primary key cannot be retired",
            });
        }
        key.state = KeyState::Retired;
        key.material = None;
        self.version = self.compute_version();
        Ok(())
    }

    fn index(&self, id: &str) -> Result<usize, KeyringError> {
        self.keys
            .iter()
            .position(|k| k.id.as_str() == id)
            .ok_or_else(|| KeyringError::UnknownKey(id.into()))
    }

    /// The file text. Holds key material: zeroized on drop.
    pub fn to_toml(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::from(
            "# secretgate keyring: keep this file mode 0600 and back it up securely.\n\
             # Losing a key makes every value sealed under it unreadable.\n",
        ));
        for k in &self.keys {
            out.push_str(&format!(
                "\n[[keys]]\nid = \"{}\"\nstate = \"{}\"\ncreated = \"{}\"\nsecret = \"",
                k.id.as_str(),
                k.state.as_str(),
                k.created
            ));
            out.push_str(&k.encoded);
            out.push_str("\"\n");
        }
        out
    }

    /// Writes the keyring to `path` atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        crate::fs::write_atomic(path, self.to_toml().as_bytes(), 0o600)
            .map_err(|source| KeyringError::Io { path: path.display().to_string(), source })
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({})", self.0)
    }
}

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(<redacted>)")
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring").field("version", &self.version).field("keys", &self.keys).finish()
    }
}

#[cfg(test)]
mod tests;
