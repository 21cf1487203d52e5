//! The secret store: one trait, several backends.
//!
//! The gateway talks to its store only through [`Store`]. Every backend (the embedded redb
//! file, and etcd for production) keeps the same model and passes the same conformance suite
//! (`testkit/src/conformance.rs`):
//!
//! - a secret is a [`SecretPath`] with numbered versions 1, 2, 3, … and a current version;
//! - a write is always compare-and-set on the current version (`expected = 0`: the secret
//!   must never have existed), and commits atomically or not at all — so the caller knows the
//!   version number *before* the write, which lets it seal the value for that exact version;
//! - only the newest `max_versions` versions are kept;
//! - delete is a soft delete of the current version (Vault KV v2): reads answer not-found,
//!   the history stays, the next write creates a new version;
//! - list returns live secrets at or below a prefix in byte order of their paths.
//!
//! The store never sees a caller, a policy or a key. What it holds as a value is opaque bytes.

mod changes;
mod embedded;
mod etcd;
mod metered;

use std::{
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::path::{PathPrefix, SecretPath};

pub use changes::{ChangeEvent, ChangeKind, Changes, Since};
pub use embedded::EmbeddedStore;
pub use etcd::EtcdStore;
pub use metered::Metered;

/// Default number of versions kept per secret.
pub const DEFAULT_MAX_VERSIONS: u32 = 10;
/// Default number of recent changes a store keeps for watchers (`watch.history_events`).
pub const DEFAULT_HISTORY: u64 = 10_000;

/// A point in time with millisecond precision, as stored.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct UnixMillis(pub u64);

/// One kept version of a secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionMeta {
    /// Version number, from 1.
    pub version: u64,
    /// When the version was written.
    pub created: UnixMillis,
    /// When the version was soft-deleted, if it was.
    pub deleted: Option<UnixMillis>,
    /// When the version's value was destroyed (removed for good), if it was. Absent in
    /// metadata written before destroy existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<UnixMillis>,
}

/// A secret's metadata: its current version and the kept versions, newest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SecretMeta {
    /// The newest version number ever written (it stays after pruning and deletion).
    pub current_version: u64,
    /// Kept versions, newest first.
    pub versions: Vec<VersionMeta>,
}

/// A value read from the store. The bytes are wiped from memory when this is dropped.
pub struct StoredValue {
    /// The version read.
    pub version: u64,
    /// When it was written.
    pub created: UnixMillis,
    /// The secret's current version.
    pub current_version: u64,
    /// The stored bytes.
    pub value: Zeroizing<Vec<u8>>,
}

/// One stored version of one secret, as raw bytes: what key rotation walks over.
pub struct StoredVersion {
    /// The secret.
    pub path: SecretPath,
    /// The version.
    pub version: u64,
    /// The stored bytes (an envelope).
    pub value: Zeroizing<Vec<u8>>,
}

/// Why a store operation failed. `Display` texts may carry backend detail for the internal
/// log; they never contain a stored value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The secret has never existed, or its current version is deleted.
    #[error("secret not found")]
    NotFound,
    /// The version asked for was never written or has been pruned.
    #[error("version {0} not found")]
    VersionNotFound(u64),
    /// The version asked for was soft-deleted.
    #[error("version {0} was deleted")]
    VersionDeleted(u64),
    /// The version asked for was destroyed: its value is gone for good.
    #[error("version {0} was destroyed")]
    VersionDestroyed(u64),
    /// Compare-and-set failed: the current version is not the expected one.
    #[error("version conflict: expected {expected}, current is {current}")]
    Conflict {
        /// The version the caller expected.
        expected: u64,
        /// The version actually current.
        current: u64,
    },
    /// The store cannot be reached or cannot answer now; retrying later may succeed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The replicated store has no leader (too few members reachable to form a quorum), so it
    /// can neither read linearizably nor write; retrying later may succeed.
    #[error("store has no quorum: {0}")]
    NoQuorum(String),
    /// A write was sent but not confirmed in time: it may or may not take effect. The caller
    /// must read before retrying, and must not report the write as failed.
    #[error("write outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// A write that stores a sealed value was refused by the write fence: the control object
    /// `kind` has a newer version than this replica enforces (see [`Store::fence_writes`]).
    /// Nothing was written; the caller reloads and seals again.
    #[error("this replica's {kind} is behind the store's (version {version} exists); retry")]
    Fenced {
        /// The control object (`keyring`).
        kind: String,
        /// The version that exists.
        version: u64,
    },
    /// Stored data does not decode: the store was altered outside the gateway, or a bug.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Any other backend failure.
    #[error("store failure: {0}")]
    Backend(String),
}

/// The operations every backend provides. All are atomic; see the module docs.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The secret's current version, 0 if it never existed: the version a write without a
    /// guard builds on. etcd may answer from what this replica last saw, which can lag; a
    /// write built on a stale answer fails its compare with a `Conflict` naming the current
    /// version, and the writer tries again.
    async fn current_version(&self, path: &SecretPath) -> Result<u64, StoreError>;

    /// Writes version `expected + 1` if the current version is `expected`, and prunes
    /// versions beyond the backend's limit. Returns the new version's info.
    async fn put(
        &self,
        path: &SecretPath,
        expected: u64,
        value: &[u8],
    ) -> Result<VersionMeta, StoreError>;

    /// Reads the current version (`None`) or the given version.
    async fn get(&self, path: &SecretPath, version: Option<u64>)
    -> Result<StoredValue, StoreError>;

    /// Soft-deletes the current version and returns it. Deleting a secret whose current
    /// version is already deleted returns that version unchanged.
    async fn delete(&self, path: &SecretPath) -> Result<VersionMeta, StoreError>;

    /// Restores soft-deleted kept `version` and returns it (unchanged if it was not
    /// deleted). `VersionNotFound` if it is not kept, `VersionDestroyed` if destroyed.
    async fn undelete(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError>;

    /// Removes kept `version`'s stored value for good, in the same atomic write that marks it
    /// destroyed in the metadata, and returns it (unchanged if already destroyed).
    /// `VersionNotFound` if it is not kept.
    async fn destroy(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError>;

    /// Up to `limit` live secrets at or below `prefix`, in byte order, strictly after
    /// `after` when given.
    async fn list(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
    ) -> Result<Vec<SecretPath>, StoreError>;

    /// The secret's metadata, deleted or not. `NotFound` only if it never existed.
    async fn versions(&self, path: &SecretPath) -> Result<SecretMeta, StoreError>;

    /// Up to `limit` stored versions of all secrets, live or deleted, strictly after `after`
    /// when given, in the backend's stable key order: by path then version within one
    /// secret, but a secret's subtree may sort before it (etcd: `/a/b@…` < `/a@…`). Paging
    /// with the last record as `after` visits every record exactly once.
    async fn scan(
        &self,
        after: Option<(&SecretPath, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredVersion>, StoreError>;

    /// Replaces the stored bytes of one kept version, only if they are still exactly `old`
    /// (compare-and-set on the value). Returns `false`, changing nothing, if they differ or
    /// the version is gone. Versions, times and the current version are unchanged.
    async fn replace(
        &self,
        path: &SecretPath,
        version: u64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError>;

    /// The store's change feed (see [`Changes`]): every change to a secret's metadata, in
    /// revision order, for `Secrets.Watch`.
    fn changes(&self) -> Arc<Changes>;

    /// Stores `line` as the latest signed checkpoint of the audit log `log_id` (gateway
    /// metadata, outside the secret namespace: no path can name it).
    async fn put_audit_checkpoint(&self, log_id: &str, line: &[u8]) -> Result<(), StoreError>;

    /// The latest checkpoint stored for the audit log `log_id`.
    async fn audit_checkpoint(&self, log_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    /// The latest checkpoint of every audit log the store has seen, as (log id, line), in
    /// log id order: what the gateway checks a log it finds (or does not find) against.
    async fn audit_checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Stores `record` as version `version` of the control object `kind` (`policy`), only if
    /// that version does not exist yet and is the next after the newest (compare-and-set on
    /// the previous version: of two writers building on one version, one wins and the other
    /// gets `Conflict` naming the newest). A retried write that finds its own record there
    /// succeeds. Records are sealed by the caller (`crate::control`); the store keeps bytes.
    async fn put_control(&self, kind: &str, version: u64, record: &[u8]) -> Result<(), StoreError>;

    /// Up to `limit` stored versions of `kind` below `below` (all when `None`), newest first,
    /// as (version, record).
    async fn control_versions(
        &self,
        kind: &str,
        below: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;

    /// From now on, every write that stores a sealed value (`put`, `replace`) commits only
    /// while version `next` of the control object `kind` does not exist, in the same
    /// transaction; else it fails with `Fenced`, changing nothing. The keyring follower sets
    /// it to the version after the one in force, so no replica commits a value sealed under
    /// a key that is no longer primary in the store.
    fn fence_writes(&self, kind: &str, next: u64);

    /// Changes whenever a control object may have changed (on etcd: an event under
    /// `P control/` on the replica's one watch feed, or the feed starting again, so also a
    /// write straight into etcd): the follower then reads the newest versions.
    fn control_changes(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Keeps `record` as this gateway replica's entry `id` in the tier's registry: on etcd
    /// under a lease of `ttl`, renewed by each call (call it every third of `ttl`), so the
    /// entry vanishes within `ttl` of the replica dying or being cut off; the embedded store
    /// serves one gateway, and keeps its entry in memory.
    async fn register_replica(
        &self,
        id: &str,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError>;

    /// Every live replica's entry, as (id, record), in id order.
    async fn replicas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    /// Removes this replica's entry (a clean stop).
    async fn deregister_replica(&self) -> Result<(), StoreError>;

    /// The backend and its read cache, for `Admin/StoreStatus`.
    fn status(&self) -> StoreStatus {
        StoreStatus { backend: "embedded", cache: "off", ..StoreStatus::default() }
    }

    /// Whether the store can serve now (etcd: a linearizable read answers, so a quorum is
    /// reachable): for the readiness probe.
    async fn ready(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// What `Admin/StoreStatus` reports (see its message in admin.proto).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStatus {
    /// `embedded` or `etcd`.
    pub backend: &'static str,
    /// `serving`, `filling`, `over budget` or `off`.
    pub cache: &'static str,
    /// Keys held.
    pub entries: u64,
    /// Bytes counted against the budget.
    pub bytes: u64,
    /// The budget.
    pub max_bytes: u64,
    /// Reads answered from memory since the start.
    pub hits: u64,
    /// etcd: each member's URL, and whether the gateway's last try on it answered.
    pub members: Vec<(String, bool)>,
    /// etcd: the URL of the member known to lead (where requests go), if one is.
    pub leader: Option<String>,
}

impl UnixMillis {
    /// The current wall-clock time.
    pub fn now() -> Self {
        let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        Self(u64::try_from(since.as_millis()).unwrap_or(u64::MAX))
    }
}

impl SecretMeta {
    /// Whether the current version is live (written and not deleted).
    pub fn is_live(&self) -> bool {
        self.versions.first().is_some_and(|v| v.version == self.current_version && v.readable())
    }

    /// Records a new version at the front and returns the versions pruned beyond `keep`.
    pub(crate) fn push_version(&mut self, info: VersionMeta, keep: u32) -> Vec<VersionMeta> {
        self.current_version = info.version;
        self.versions.insert(0, info);
        let keep = usize::try_from(keep.max(1)).unwrap_or(usize::MAX);
        if self.versions.len() > keep { self.versions.split_off(keep) } else { Vec::new() }
    }

    /// Finds the kept version `version`, or the current one for `None`, checking it is
    /// readable (exists and is not deleted).
    pub(crate) fn readable(&self, version: Option<u64>) -> Result<&VersionMeta, StoreError> {
        let wanted = version.unwrap_or(self.current_version);
        let info = self.versions.iter().find(|v| v.version == wanted).ok_or(match version {
            None => StoreError::NotFound,
            Some(v) => StoreError::VersionNotFound(v),
        })?;
        match (info.destroyed, info.deleted, version) {
            (None, None, _) => Ok(info),
            (_, _, None) => Err(StoreError::NotFound),
            (Some(_), _, Some(v)) => Err(StoreError::VersionDestroyed(v)),
            (None, Some(_), Some(v)) => Err(StoreError::VersionDeleted(v)),
        }
    }

    /// Applies `change`: the changed version's info after it, and whether anything changed
    /// (doing a change again changes nothing, which is also how a retried write recognizes
    /// its own earlier try). The backend writes the metadata back only when it changed, and
    /// removes the value [`Change::removes`] names in the same atomic write.
    pub(crate) fn apply(&mut self, change: Change) -> Result<(VersionMeta, bool), StoreError> {
        let version = match change {
            Change::Delete => self.current_version,
            Change::Undelete(v) | Change::Destroy(v) => v,
        };
        let Some(info) = self.versions.iter_mut().find(|v| v.version == version) else {
            return Err(match change {
                Change::Delete => StoreError::NotFound,
                _ => StoreError::VersionNotFound(version),
            });
        };
        let changed = match change {
            Change::Delete => stamp(&mut info.deleted),
            Change::Undelete(_) if info.destroyed.is_some() => {
                return Err(StoreError::VersionDestroyed(version));
            }
            Change::Undelete(_) => info.deleted.take().is_some(),
            Change::Destroy(_) => stamp(&mut info.destroyed),
        };
        Ok((info.clone(), changed))
    }
}

/// Sets `slot` to now unless it is set already; true if it did.
fn stamp(slot: &mut Option<UnixMillis>) -> bool {
    if slot.is_some() {
        return false;
    }
    *slot = Some(UnixMillis::now());
    true
}

/// A change to one version's state in a secret's metadata (see [`SecretMeta::apply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// Soft-delete the current version.
    Delete,
    /// Restore soft-deleted kept version N.
    Undelete(u64),
    /// Remove kept version N's value for good.
    Destroy(u64),
}

impl Change {
    /// The version whose stored value goes in the same write, if any.
    pub(crate) fn removes(self) -> Option<u64> {
        match self {
            Self::Destroy(v) => Some(v),
            Self::Delete | Self::Undelete(_) => None,
        }
    }

    /// For messages and metrics: `delete`, `undelete` or `destroy`.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Delete => "delete",
            Self::Undelete(_) => "undelete",
            Self::Destroy(_) => "destroy",
        }
    }
}

impl VersionMeta {
    /// A version as written: its value is readable (neither deleted nor destroyed).
    pub fn new(version: u64, created: UnixMillis) -> Self {
        Self { version, created, deleted: None, destroyed: None }
    }

    /// Whether its value may be read: neither deleted nor destroyed.
    pub fn readable(&self) -> bool {
        self.deleted.is_none() && self.destroyed.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(version: u64) -> VersionMeta {
        VersionMeta::new(version, UnixMillis(version))
    }

    #[test]
    fn push_version_prunes_the_oldest() {
        let mut meta = SecretMeta { current_version: 0, versions: vec![] };
        for v in 1..=3 {
            assert!(meta.push_version(info(v), 2).len() <= 1);
        }
        assert_eq!(meta.current_version, 3);
        assert_eq!(meta.versions.iter().map(|v| v.version).collect::<Vec<_>>(), [3, 2]);
    }

    #[test]
    fn readable_distinguishes_missing_deleted_and_current() {
        let mut meta = SecretMeta { current_version: 0, versions: vec![] };
        meta.push_version(info(1), 10);
        meta.push_version(info(2), 10);
        meta.versions[0].deleted = Some(UnixMillis(9));
        assert!(matches!(meta.readable(None), Err(StoreError::NotFound)));
        assert!(matches!(meta.readable(Some(2)), Err(StoreError::VersionDeleted(2))));
        assert!(matches!(meta.readable(Some(7)), Err(StoreError::VersionNotFound(7))));
        assert_eq!(meta.readable(Some(1)).unwrap().version, 1);
        assert!(!meta.is_live());
    }

    #[test]
    fn undelete_and_destroy_change_a_version_once_and_destroyed_stays_destroyed() {
        let mut meta = SecretMeta { current_version: 0, versions: vec![] };
        meta.push_version(info(1), 10);
        meta.versions[0].deleted = Some(UnixMillis(9));
        assert!(meta.apply(Change::Undelete(1)).unwrap().1);
        assert!(!meta.apply(Change::Undelete(1)).unwrap().1, "already live");
        assert!(meta.is_live());
        assert!(meta.apply(Change::Destroy(1)).unwrap().1);
        assert!(!meta.apply(Change::Destroy(1)).unwrap().1, "destroying twice changes nothing");
        assert!(matches!(meta.apply(Change::Undelete(1)), Err(StoreError::VersionDestroyed(1))));
        assert!(matches!(meta.readable(Some(1)), Err(StoreError::VersionDestroyed(1))));
        assert!(matches!(meta.readable(None), Err(StoreError::NotFound)));
        assert!(matches!(meta.apply(Change::Destroy(5)), Err(StoreError::VersionNotFound(5))));
        let (deleted, changed) = meta.apply(Change::Delete).unwrap();
        assert!(changed && deleted.deleted.is_some());
        assert!(!meta.apply(Change::Delete).unwrap().1, "deleting twice changes nothing");
        assert!(!meta.is_live());
    }
}
