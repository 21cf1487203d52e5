//! The only way from a request handler to the store and the keyring: every method takes the
//! [`Permit`] for exactly what it does, so a handler cannot read, write or decrypt anything
//! it was not authorized for. Values are sealed before they are written and opened after
//! they are read (application-layer encryption, `crate::crypto`).

use std::sync::Arc;

use zeroize::Zeroizing;

use super::ApiError;
use crate::{
    authz::{Action, Permit},
    crypto::{self, KeyringHandle, rotation},
    path::{PathPrefix, SecretPath},
    store::{Entry, SecretMeta, Store, StoreError, VersionInfo},
};

/// How often an unconditional write retries after losing a race to another writer.
const PUT_RETRIES: usize = 16;

/// Store and keyring, behind permits.
#[derive(Clone)]
pub struct Vault {
    store: Arc<dyn Store>,
    keys: KeyringHandle,
}

/// A value read and opened.
pub struct Opened {
    /// Metadata of the version read.
    pub entry: Entry,
    /// The plaintext.
    pub value: Zeroizing<Vec<u8>>,
    /// The key that opened it.
    pub key_id: String,
}

impl Vault {
    /// A vault over `store`, sealing with `keys`.
    pub fn new(store: Arc<dyn Store>, keys: KeyringHandle) -> Self {
        Self { store, keys }
    }

    /// The keyring in force.
    pub fn keys(&self) -> &KeyringHandle {
        &self.keys
    }

    /// Reads and opens a version (`None`: current).
    pub async fn read(
        &self,
        permit: &Permit,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<Opened, ApiError> {
        check(permit, path.as_str(), Action::Read)?;
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

    /// The kept versions of a secret.
    pub async fn versions(
        &self,
        permit: &Permit,
        path: &SecretPath,
    ) -> Result<SecretMeta, ApiError> {
        check(permit, path.as_str(), Action::Read)?;
        self.store.versions(path).await.map_err(|e| ApiError::from_store(e, path))
    }

    /// Seals and writes a new version; `expected` makes it a compare-and-set. Returns the
    /// version written and the id of the key that sealed it.
    pub async fn write(
        &self,
        permit: &Permit,
        path: &SecretPath,
        expected: Option<u64>,
        value: &[u8],
    ) -> Result<(VersionInfo, String), ApiError> {
        check(permit, path.as_str(), Action::Write)?;
        let keys = self.keys.current();
        let key_id = keys.primary().id.to_string();
        let store_err = |e| ApiError::from_store(e, path);
        if let Some(expected) = expected {
            let sealed = self.seal(&keys, path, expected.saturating_add(1), value)?;
            let info = self.store.put(path, expected, &sealed).await.map_err(store_err)?;
            return Ok((info, key_id));
        }
        // Without a version guard the write is still compare-and-set underneath, so the
        // version (bound into the envelope) is known before the write; losing a race to
        // another writer just means trying again.
        for _ in 0..PUT_RETRIES {
            let current = self.store.current_version(path).await.map_err(store_err)?;
            let sealed = self.seal(&keys, path, current.saturating_add(1), value)?;
            match self.store.put(path, current, &sealed).await {
                Err(StoreError::Conflict { .. }) => continue,
                other => return other.map(|info| (info, key_id)).map_err(store_err),
            }
        }
        Err(ApiError::Contended(path.clone()))
    }

    /// Soft-deletes the current version.
    pub async fn delete(
        &self,
        permit: &Permit,
        path: &SecretPath,
    ) -> Result<VersionInfo, ApiError> {
        check(permit, path.as_str(), Action::Delete)?;
        self.store.delete(path).await.map_err(|e| ApiError::from_store(e, path))
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

    /// Which keys the stored records use (admin on `/`).
    pub async fn key_usage(&self, permit: &Permit) -> Result<rotation::KeyUsage, ApiError> {
        check(permit, "/", Action::Admin)?;
        rotation::key_usage(&*self.store).await.map_err(ApiError::from_store_fault)
    }

    /// The latest audit checkpoint the store keeps for `log_id` (admin on `/`).
    pub async fn audit_checkpoint(
        &self,
        permit: &Permit,
        log_id: &str,
    ) -> Result<Option<Vec<u8>>, ApiError> {
        check(permit, "/", Action::Admin)?;
        self.store.audit_checkpoint(log_id).await.map_err(ApiError::from_store_fault)
    }

    /// The store, for a rewrap authorized by an admin permit on `/`.
    pub fn store_for_rewrap(&self, permit: &Permit) -> Result<Arc<dyn Store>, ApiError> {
        check(permit, "/", Action::Admin)?;
        Ok(Arc::clone(&self.store))
    }

    fn seal(
        &self,
        keys: &crypto::Keyring,
        path: &SecretPath,
        version: u64,
        value: &[u8],
    ) -> Result<Vec<u8>, ApiError> {
        crypto::seal(keys.primary(), path, version, value).map_err(|e| {
            tracing::error!(%path, version, error = %e, "cannot seal a value");
            ApiError::Internal
        })
    }
}

/// A permit for something else is a bug in the handler, never the client's doing.
fn check(permit: &Permit, target: &str, action: Action) -> Result<(), ApiError> {
    if permit.target() == target && permit.action() == action {
        Ok(())
    } else {
        tracing::error!(
            permit_target = permit.target(), permit_action = %permit.action(), target, %action,
            "permit does not cover the operation"
        );
        Err(ApiError::Internal)
    }
}
