//! The keyring kept in the store (`crypto.source = "store"`): each version holds the keyring
//! (the same TOML as the file) encrypted under a key derived from the KEK, bound to its
//! version. Key steps are Control RPCs run by any replica, each a new keyring version by
//! compare-and-set on the one in force there, and the ones that could leave a replica behind
//! wait for the tier first (through the registry, where each replica lists the keys it holds
//! and its primary):
//!
//! - `add`: a new active key (opens, does not seal yet);
//! - `promote ID`: refused, naming the replicas in the way, until every live replica holds
//!   `ID` (a replica that dies drops out when its lease expires), so no replica is ever
//!   asked to open a value sealed under a key it lacks;
//! - `retire ID`: refused while any record is sealed under `ID` or a live replica still
//!   seals with it (it is that replica's primary).
//!
//! A write also compares the stored keyring's next version is absent (the write fence, see
//! [`crate::store::Store::put`]), so a replica that has not yet followed a promote cannot
//! commit a value sealed under the old primary.

use std::time::Duration;

use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};

use super::{
    ControlError, Kek,
    stored::{Kind, Pushed, Stored, number},
};
use crate::{crypto::Keyring, registry::ReplicaRecord};

/// The keyring as a kind of control object.
#[derive(Debug)]
pub struct KeyringKind;

/// The stored keyring as this replica follows it.
pub type StoredKeyring = Stored<KeyringKind>;

/// A stored keyring version's content: the keyring's TOML encrypted under the KEK.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedKeyring {
    /// Base64 of nonce, ciphertext and tag.
    pub sealed: String,
}

impl std::fmt::Debug for SealedKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedKeyring").finish_non_exhaustive()
    }
}

fn context(version: u64) -> Vec<u8> {
    format!("secretgate keyring version {version}").into_bytes()
}

impl SealedKeyring {
    /// `ring` encrypted as stored version `version`.
    pub fn seal(kek: &Kek, version: u64, ring: &Keyring) -> Result<Self, ControlError> {
        let sealed = kek
            .encrypt(&context(version), ring.to_toml().as_bytes())
            .map_err(|e| ControlError::Keyring(format!("cannot encrypt the keyring: {e}")))?;
        Ok(Self { sealed: B64.encode(sealed) })
    }
}

impl Kind for KeyringKind {
    const NAME: &'static str = "keyring";
    const FENCES_WRITES: bool = true;
    type Value = Keyring;
    type Content = SealedKeyring;

    type Context = ();

    fn build(_: &(), kek: &Kek, version: u64, content: &SealedKeyring) -> Result<Keyring, String> {
        let sealed = B64.decode(&content.sealed).map_err(|_| "not base64".to_owned())?;
        let plain = kek
            .decrypt(&context(version), &sealed)
            .ok_or("the keyring does not decrypt under this gateway's KEK")?;
        let text = std::str::from_utf8(&plain).map_err(|_| "not text".to_owned())?;
        Keyring::parse(text).map(|r| r.numbered(version)).map_err(|e| e.to_string())
    }

    fn reported(record: &ReplicaRecord) -> Option<u64> {
        number(&record.keyring)
    }

    fn rebind(
        ctx: &(),
        kek: &Kek,
        content: &SealedKeyring,
        from: u64,
        to: u64,
    ) -> Result<SealedKeyring, ControlError> {
        // Encrypted bound to its version: opened (under either KEK) and sealed again.
        let ring = Self::build(ctx, kek, from, content).map_err(ControlError::Keyring)?;
        SealedKeyring::seal(kek, to, &ring)
    }
}

fn keyring_error(e: crate::crypto::KeyringError) -> ControlError {
    ControlError::Keyring(e.to_string())
}

impl StoredKeyring {
    /// A copy of the keyring in force, to change (the ring itself is shared and immutable).
    fn copy(&self) -> Result<Keyring, ControlError> {
        Keyring::parse(&self.current().to_toml()).map_err(keyring_error)
    }

    /// Stores the keyring in force changed by `change` as the next version.
    async fn change(
        &self,
        author: &str,
        note: String,
        wait: Duration,
        change: impl FnOnce(&mut Keyring) -> Result<(), ControlError>,
    ) -> Result<Pushed, ControlError> {
        self.refresh().await?;
        let base = self.accepted();
        let mut ring = self.copy()?;
        change(&mut ring)?;
        let content = SealedKeyring::seal(self.kek(), base + 1, &ring)?;
        self.push(content, Some(base), author, note, wait).await
    }

    /// Adds a new active key; its id and the version stored.
    pub async fn add(
        &self,
        author: &str,
        wait: Duration,
    ) -> Result<(String, Pushed), ControlError> {
        let _one = self.changing.lock().await;
        let mut id = String::new();
        let pushed = self
            .change(author, "add a key".into(), wait, |ring| {
                id = ring.add().map_err(keyring_error)?.to_string();
                Ok(())
            })
            .await?;
        Ok((id, pushed))
    }

    /// Makes `id` primary once every live replica holds it (waiting up to `wait`).
    pub async fn promote(
        &self,
        id: &str,
        author: &str,
        wait: Duration,
    ) -> Result<Pushed, ControlError> {
        let _one = self.changing.lock().await;
        // What the keyring itself refuses (an unknown or retired key) is refused at once.
        self.copy()?.promote(id).map_err(keyring_error)?;
        let tier = self.wait_for_tier(wait, |r| r.keyring_keys.iter().any(|k| k == id)).await?;
        if !tier.waiting.is_empty() {
            return Err(ControlError::TierNotReady(format!(
                "refusing to promote {id}: these live replicas do not hold it yet: {} (a replica \
                 that died drops out of the registry when its lease expires)",
                tier.waiting.join(", ")
            )));
        }
        let note = format!("promote {id}");
        self.change(author, note, wait, |ring| ring.promote(id).map_err(keyring_error)).await
    }

    /// Retires `id` once no record is sealed under it (`records`, from a scan) and no live
    /// replica seals with it (waiting up to `wait`).
    pub async fn retire(
        &self,
        id: &str,
        records: u64,
        author: &str,
        wait: Duration,
    ) -> Result<Pushed, ControlError> {
        let _one = self.changing.lock().await;
        if records > 0 {
            return Err(ControlError::Keyring(format!(
                "refusing to retire {id}: {records} stored records are still sealed under it; \
                 run `secretgate keys rewrap` first"
            )));
        }
        // What the keyring itself refuses (an unknown key, the primary) is refused at once.
        self.copy()?.retire(id).map_err(keyring_error)?;
        let tier = self.wait_for_tier(wait, |r| r.keyring_primary != id).await?;
        if !tier.waiting.is_empty() {
            return Err(ControlError::TierNotReady(format!(
                "refusing to retire {id}: these live replicas still seal with it: {}",
                tier.waiting.join(", ")
            )));
        }
        let note = format!("retire {id}");
        self.change(author, note, wait, |ring| ring.retire(id).map_err(keyring_error)).await
    }
}
