//! The only way from a request handler to the store and the keyring.
//!
//! Every method that touches a secret takes the [`Permit`] for exactly what it does and
//! reads the path *from* the permit, so a handler cannot read, write or decrypt anything it
//! was not authorized for; every method that changes the store also takes the durable
//! [`Intent`] record of the change, consuming it. Values are sealed before they are written
//! and opened after they are read (application-layer encryption, `crate::crypto`).
//!
//! A permit for one action does not open another:
//!
//! ```
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Read>(who, path).unwrap();
//!     let _ = vault.read(&permit, None).await;
//! }
//! ```
//!
//! ```compile_fail,E0308
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Write>(who, path).unwrap();
//!     let _ = vault.read(&permit, None).await;
//! }
//! ```
//!
//! and a permit for one secret cannot be used for another: the path comes from the permit,
//! there is no path to pass beside it.
//!
//! ```
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let other = SecretPath::parse("/root/master-key").unwrap();
//!     let permit = authz.authorize::<act::Read>(who, path).unwrap();
//!     let _ = vault.read(&permit, None).await;
//! #   drop(other);
//! }
//! ```
//!
//! ```compile_fail,E0061
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let other = SecretPath::parse("/root/master-key").unwrap();
//!     let permit = authz.authorize::<act::Read>(who, path).unwrap();
//!     let _ = vault.read(&permit, &other, None).await;
//! }
//! ```
//!
//! A permit cannot be copied to serve a second request, nor made by hand:
//!
//! ```
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Read>(who, path).unwrap();
//!     let copy = &permit;
//!     let _ = vault.read(copy, None).await;
//! }
//! ```
//!
//! ```compile_fail,E0599
//! # use secretgate::{Principal, SecretPath, Vault, authz::{Authorizer, act}};
//! async fn get(vault: &Vault, authz: &Authorizer, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Read>(who, path).unwrap();
//!     let copy = permit.clone();
//!     let _ = vault.read(&copy, None).await;
//! }
//! ```
//!
//! ```compile_fail,E0624
//! # use secretgate::{SecretPath, authz::{Permit, act}};
//! let path = SecretPath::parse("/app/db/password").unwrap();
//! let permit: Permit<act::Read> = Permit::new(path, 1, String::new());
//! ```
//!
//! The store and the keyring are not reachable from outside the crate but through the vault:
//!
//! ```
//! use secretgate::Vault;
//! ```
//!
//! ```compile_fail,E0603
//! use secretgate::store::StoredValue;
//! ```
//!
//! ```compile_fail,E0603
//! use secretgate::crypto::Keyring;
//! ```
//!
//! A write needs the durable record of its intent, once per write:
//!
//! ```
//! # use secretgate::{Principal, SecretPath, Vault, audit::{AuditLog, Record, Kind}};
//! # use secretgate::authz::{Authorizer, act};
//! async fn put(vault: &Vault, authz: &Authorizer, log: &AuditLog, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Write>(who, path).unwrap();
//!     let intent = log.append_intent(Record::new(Kind::Request)).await.unwrap();
//!     let _ = vault.write(&permit, intent, None, b"v1").await;
//! }
//! ```
//!
//! ```compile_fail,E0382
//! # use secretgate::{Principal, SecretPath, Vault, audit::{AuditLog, Record, Kind}};
//! # use secretgate::authz::{Authorizer, act};
//! async fn put(vault: &Vault, authz: &Authorizer, log: &AuditLog, who: &Principal) {
//!     let path = SecretPath::parse("/app/db/password").unwrap();
//!     let permit = authz.authorize::<act::Write>(who, path).unwrap();
//!     let intent = log.append_intent(Record::new(Kind::Request)).await.unwrap();
//!     let _ = vault.write(&permit, intent, None, b"v1").await;
//!     let _ = vault.write(&permit, intent, None, b"v2").await;
//! }
//! ```

use std::{ops::ControlFlow, sync::Arc};

use zeroize::Zeroizing;

use super::{ApiError, rotation};
use crate::{
    audit::Intent,
    authz::{Permit, act},
    crypto::{self, Keyring, KeyringHandle},
    identity::Principal,
    path::{MAX_PATH_BYTES, PathPrefix, SecretPath},
    store::{SecretMeta, Store, StoreError, StoredValue, VersionMeta},
};

/// How often an unconditional write retries after losing a race to another writer.
const PUT_RETRIES: usize = 16;
/// How often a write refused by the write fence follows the keyring and tries again.
const FENCED_RETRIES: usize = 3;

/// Store and keyring, behind permits.
#[derive(Clone)]
pub struct Vault {
    store: Arc<dyn Store>,
    keys: KeyringHandle,
    /// The keyring kept in the store, when it is (`crypto.source = "store"`).
    stored_keyring: Option<Arc<crate::control::StoredKeyring>>,
}

/// A value read and opened.
pub struct Opened {
    /// Metadata of the version read.
    pub entry: StoredValue,
    /// The plaintext.
    pub value: Zeroizing<Vec<u8>>,
    /// The key that opened it.
    pub key_id: String,
}

/// The keyring in force and which keys the stored records use (admin on `/`).
pub struct KeyStatus {
    /// The keyring in force.
    pub ring: Arc<Keyring>,
    /// Records per key.
    pub usage: rotation::KeyUsage,
    /// Why the last keyring reload was refused, if it was.
    pub reload_error: Option<String>,
}

impl Vault {
    /// A vault over `store`, sealing with `keys`.
    pub fn new(store: Arc<dyn Store>, keys: KeyringHandle) -> Self {
        Self { store, keys, stored_keyring: None }
    }

    /// The same vault, following the keyring kept in the store when a write is fenced.
    pub(crate) fn following(mut self, stored: Option<Arc<crate::control::StoredKeyring>>) -> Self {
        self.stored_keyring = stored;
        self
    }

    /// Reads and opens a version (`None`: current) of the permit's secret.
    pub async fn read(
        &self,
        permit: &Permit<act::Read>,
        version: Option<u64>,
    ) -> Result<Opened, ApiError> {
        let path = permit.path();
        let entry =
            self.store.get(path, version).await.map_err(|e| ApiError::from_store(e, path))?;
        let undecryptable = |e: crypto::EnvelopeError| {
            tracing::error!(%path, version = entry.version, error = %e, "stored value does not open");
            ApiError::Undecryptable { path: path.clone(), version: entry.version }
        };
        let key_id = crypto::parse_header(&entry.value).map_err(undecryptable)?.key_id.to_owned();
        let value = crypto::open(&self.keys.current(), path, entry.version, &entry.value)
            .map_err(undecryptable)?;
        Ok(Opened { entry, value, key_id })
    }

    /// The kept versions of the permit's secret.
    pub async fn versions(&self, permit: &Permit<act::Read>) -> Result<SecretMeta, ApiError> {
        let path = permit.path();
        self.store.versions(path).await.map_err(|e| ApiError::from_store(e, path))
    }

    /// Seals and writes a new version of the permit's secret; `expected` makes it a
    /// compare-and-set. Returns the version written and the id of the key that sealed it.
    /// When the write fence refuses it (the stored keyring moved on: another primary), the
    /// vault follows the keyring and seals again.
    pub async fn write(
        &self,
        permit: &Permit<act::Write>,
        _intent: Intent,
        expected: Option<u64>,
        value: &[u8],
    ) -> Result<(VersionMeta, String), ApiError> {
        let path = permit.path();
        let mut fenced = 0;
        loop {
            match self.write_once(path, expected, value).await? {
                Err(StoreError::Fenced { .. }) if fenced < FENCED_RETRIES => {
                    fenced += 1;
                    self.catch_up().await;
                }
                result => return result.map_err(|e| ApiError::from_store(e, path)),
            }
        }
    }

    /// One try of [`Vault::write`] under the keyring in force: the store's answer.
    async fn write_once(
        &self,
        path: &SecretPath,
        expected: Option<u64>,
        value: &[u8],
    ) -> Result<Result<(VersionMeta, String), StoreError>, ApiError> {
        let keys = self.keys.current();
        let key_id = keys.primary().id.to_string();
        if let Some(expected) = expected {
            let sealed = seal(&keys, path, expected.saturating_add(1), value)?;
            let info = self.store.put(path, expected, &sealed).await;
            return Ok(info.map(|info| (info, key_id)));
        }
        // Without a version guard the write is still compare-and-set underneath, so the
        // version (bound into the envelope) is known before the write; losing a race to
        // another writer just means trying again.
        for _ in 0..PUT_RETRIES {
            let current = match self.store.current_version(path).await {
                Ok(c) => c,
                Err(e) => return Ok(Err(e)),
            };
            let sealed = seal(&keys, path, current.saturating_add(1), value)?;
            match self.store.put(path, current, &sealed).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return Ok(other.map(|info| (info, key_id))),
            }
        }
        Err(ApiError::Contended(path.clone()))
    }

    /// Brings the keyring in force up to the store's (when it is kept there).
    async fn catch_up(&self) {
        let Some(stored) = &self.stored_keyring else { return };
        if let Err(e) = stored.refresh().await {
            tracing::warn!(error = %e, "cannot read the stored keyring");
        }
    }

    /// Soft-deletes the current version of the permit's secret.
    pub async fn delete(
        &self,
        permit: &Permit<act::Delete>,
        _intent: Intent,
    ) -> Result<VersionMeta, ApiError> {
        let path = permit.path();
        self.store.delete(path).await.map_err(|e| ApiError::from_store(e, path))
    }

    /// Restores soft-deleted `version` of the permit's secret.
    pub async fn undelete(
        &self,
        permit: &Permit<act::Delete>,
        _intent: Intent,
        version: u64,
    ) -> Result<VersionMeta, ApiError> {
        let path = permit.path();
        self.store.undelete(path, version).await.map_err(|e| ApiError::from_store(e, path))
    }

    /// Removes `version` of the permit's secret for good.
    pub async fn destroy(
        &self,
        permit: &Permit<act::Destroy>,
        _intent: Intent,
        version: u64,
    ) -> Result<VersionMeta, ApiError> {
        let path = permit.path();
        self.store.destroy(path, version).await.map_err(|e| ApiError::from_store(e, path))
    }

    /// Live paths at or below `prefix`, after `after`. Names only, no values: the caller
    /// filters them through the policy before they leave the gateway.
    pub async fn list_names(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
    ) -> Result<Vec<SecretPath>, ApiError> {
        self.store.list(prefix, after, limit).await.map_err(ApiError::from_store_fault)
    }

    /// A List page token for `principal` listing `prefix`: the last path the List looked
    /// at, which may be one the caller may not see. It is sealed (encrypted and authenticated)
    /// under the primary key, so it is opaque and cannot be forged or altered; it is bound to
    /// the principal and the prefix, so it opens for no other caller or prefix; and every
    /// token has the same size, so its length says nothing about the path inside.
    pub fn seal_page_token(
        &self,
        principal: &Principal,
        prefix: &PathPrefix,
        last: &SecretPath,
    ) -> Result<String, ApiError> {
        use base64::Engine;
        let cursor = last.as_str().as_bytes();
        let mut plain = Zeroizing::new(Vec::with_capacity(TOKEN_PLAINTEXT_BYTES));
        plain.extend_from_slice(&token_binding(principal, prefix));
        // A canonical path is at most MAX_PATH_BYTES (512) long: it fits in two bytes.
        plain.extend_from_slice(&(cursor.len() as u16).to_be_bytes());
        plain.extend_from_slice(cursor);
        plain.resize(TOKEN_PLAINTEXT_BYTES, 0);
        let keys = self.keys.current();
        let sealed = seal(&keys, &page_token_path(), 0, &plain)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed))
    }

    /// The path inside a page token that [`Vault::seal_page_token`] made for this principal
    /// and prefix; `None` for anything else (forged, altered, or another's).
    pub fn open_page_token(
        &self,
        principal: &Principal,
        prefix: &PathPrefix,
        token: &str,
    ) -> Option<SecretPath> {
        use base64::Engine;
        use subtle::ConstantTimeEq;
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
        let keys = self.keys.current();
        let plain = crypto::open(&keys, &page_token_path(), 0, &sealed).ok()?;
        if plain.len() != TOKEN_PLAINTEXT_BYTES {
            return None;
        }
        let (binding, rest) = plain.split_at(32);
        if !bool::from(binding.ct_eq(&token_binding(principal, prefix))) {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let cursor = rest.get(2..2 + len)?;
        SecretPath::parse(std::str::from_utf8(cursor).ok()?).ok()
    }

    /// Which keys the stored records use, and the keyring in force.
    pub async fn key_status(&self, _permit: &Permit<act::Admin>) -> Result<KeyStatus, ApiError> {
        let usage = rotation::key_usage(&*self.store).await.map_err(ApiError::from_store_fault)?;
        Ok(KeyStatus { ring: self.keys.current(), usage, reload_error: self.keys.last_error() })
    }

    /// The latest audit checkpoint the store keeps for `log_id`.
    pub async fn audit_checkpoint(
        &self,
        _permit: &Permit<act::Admin>,
        log_id: &str,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        self.store.audit_checkpoint(log_id).await.map_err(ApiError::from_store_fault)
    }

    /// The store's change feed, for Watch. It holds paths and versions, never a value, so
    /// it needs no permit: each event is authorized as it is sent.
    pub fn changes(&self) -> Arc<crate::store::Changes> {
        self.store.changes()
    }

    /// The tier's live replicas' records, as (id, record).
    pub async fn replicas(
        &self,
        _permit: &Permit<act::Admin>,
    ) -> Result<Vec<(String, Vec<u8>)>, ApiError> {
        self.store.replicas().await.map_err(ApiError::from_store_fault)
    }

    /// The store's backend and cache state (see [`crate::store::StoreStatus`]).
    pub fn store_status(&self, _permit: &Permit<act::Admin>) -> crate::store::StoreStatus {
        self.store.status()
    }

    /// Re-seals every stored record not under the primary key (see [`rotation::rewrap`]);
    /// `on_progress` may stop it early.
    pub async fn rewrap(
        &self,
        _permit: &Permit<act::Admin>,
        _intent: Intent,
        on_progress: impl FnMut(&rotation::RewrapCounts) -> ControlFlow<()>,
    ) -> Result<rotation::RewrapCounts, ApiError> {
        rotation::rewrap(&*self.store, &self.keys, on_progress)
            .await
            .map_err(ApiError::from_store_fault)
    }
}

fn seal(
    keys: &Keyring,
    path: &SecretPath,
    version: u64,
    value: &[u8],
) -> Result<Vec<u8>, ApiError> {
    crypto::seal(keys.primary(), path, version, value).map_err(|e| {
        tracing::error!(%path, version, error = %e, "cannot seal a value");
        ApiError::Internal
    })
}

/// A page token's plaintext: the binding, the cursor's length, the cursor padded to the
/// longest path.
const TOKEN_PLAINTEXT_BYTES: usize = 32 + 2 + MAX_PATH_BYTES;

/// What a page token is bound to: SHA-256 over the principal and the canonical prefix.
fn token_binding(principal: &Principal, prefix: &PathPrefix) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"secretgate list page token v1\0");
    h.update(principal.as_str().as_bytes());
    h.update(b"\0");
    h.update(prefix.as_str().as_bytes());
    h.finalize().into()
}

/// The associated-data path page tokens are sealed for: version 0 is never a stored
/// version, so no stored envelope opens as a token or the other way round.
fn page_token_path() -> SecretPath {
    // A constant canonical path: parsing cannot fail.
    SecretPath::parse("/.page-token").unwrap_or_else(|_| unreachable!("canonical constant"))
}
