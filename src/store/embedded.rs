//! The embedded backend: one redb file on local disk, for a single machine and development.
//!
//! redb gives ACID transactions with copy-on-write B-trees and an fsync on every commit, so
//! a crash leaves either the whole write or none of it. Two tables:
//! `meta`: path → JSON [`SecretMeta`]; `values`: (path, version) → stored bytes.
//! redb runs synchronously. Writes and range reads move to tokio's blocking pool (a write
//! waits for an fsync; a range is unbounded). A point read runs on the calling task: it takes
//! redb's header lock only for an instant (never across a commit's flush) and reads a few
//! pages from redb's cache or the OS page cache, which costs less than a trip through the
//! blocking pool (gets went from 35k to 62k per second in `cargo bench --bench audit`).
//!
//! **Changes.** Every write that changes a secret's metadata also appends a
//! [`ChangeEvent`] to a third table, `changes` (revision → JSON event), in the same
//! transaction, numbering the store's revisions 1, 2, 3, …; the newest `history` events are
//! kept. After the commit the event goes to the store's [`Changes`] feed, which starts from
//! that table when the file is opened, so a watcher can resume across a restart. Writers
//! hold one lock from `begin_write` to that hand-over, so the feed gets revisions in order.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use zeroize::Zeroizing;

use super::{
    Change, ChangeEvent, Changes, SecretMeta, Store, StoreError, StoredValue, StoredVersion,
    UnixMillis, VersionMeta, changes::derive,
};
use crate::path::{PathPrefix, SecretPath};

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const VALUES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("values");
const CHECKPOINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("audit_checkpoints");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

mod control;

/// A [`Store`] in one local redb file.
#[derive(Clone)]
pub struct EmbeddedStore {
    db: Arc<Database>,
    max_versions: u32,
    changes: Arc<Changes>,
    /// Held from `begin_write` until the change is handed to the feed (see the module docs).
    writing: Arc<Mutex<()>>,
    history: u64,
    /// The one replica's registry entry (see [`Store::register_replica`]).
    replica: Arc<Mutex<Option<Entry>>>,
    /// Counts control-state writes (see [`Store::control_changes`]).
    control: Arc<tokio::sync::watch::Sender<u64>>,
    /// The write fence (see [`Store::fence_writes`]): a control version that must not exist.
    fence: Arc<Mutex<Option<Fence>>>,
}

/// A write fence: the control kind and the version that must not exist.
type Fence = Arc<(String, u64)>;

/// A registry entry: replica id and record.
type Entry = (String, Vec<u8>);

/// What a write transaction did: its result, whether to commit, and the secret's metadata
/// before and after when it changed (for the change log).
struct Wrote<T> {
    value: T,
    commit: bool,
    change: Option<(SecretPath, Option<SecretMeta>, SecretMeta)>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").field("max_versions", &self.max_versions).finish()
    }
}

impl EmbeddedStore {
    /// Opens (or creates, mode 0600, parent directory 0700) the store file at `path`, keeping
    /// [`super::DEFAULT_HISTORY`] changes for watchers (the gateway configures it).
    #[cfg(feature = "testing")]
    pub fn open(path: &Path, max_versions: u32) -> Result<Self, StoreError> {
        Self::open_with_history(path, max_versions, super::DEFAULT_HISTORY)
    }

    /// Like [`EmbeddedStore::open`], keeping the newest `history` changes.
    pub fn open_with_history(
        path: &Path,
        max_versions: u32,
        history: u64,
    ) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::fs::create_private_dir(dir)
                .map_err(|e| StoreError::Backend(format!("creating {}: {e}", dir.display())))?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Backend(format!("opening {}: {e}", path.display())))?;
        crate::fs::restrict(path, 0o600)
            .map_err(|e| StoreError::Backend(format!("chmod {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.open_table(VALUES).map_err(backend)?;
        txn.open_table(CHANGES).map_err(backend)?;
        txn.commit().map_err(backend)?;
        let history = history.max(1);
        let changes = Arc::new(load_changes(&db, history)?);
        let (writing, replica) = (Arc::default(), Arc::default());
        let control = Arc::new(tokio::sync::watch::channel(0).0);
        let db = Arc::new(db);
        let fence = Arc::default();
        Ok(Self { db, max_versions, changes, writing, history, replica, control, fence })
    }

    /// Runs `f` in one write transaction; when it changed a secret's metadata, records the
    /// change in the same transaction and hands it to the feed after the commit.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<Wrote<T>, StoreError> + Send + 'static,
    {
        let (changes, writing, history) =
            (Arc::clone(&self.changes), Arc::clone(&self.writing), self.history);
        self.blocking(move |db| {
            // A panic while held leaves nothing half-done: redb aborts an uncommitted write.
            let _order = writing.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(backend)?;
            let wrote = f(&txn)?;
            if !wrote.commit {
                return Ok(wrote.value);
            }
            let event = match &wrote.change {
                Some((path, before, after)) => log_change(&txn, history, path, before, after)?,
                None => None,
            };
            txn.commit().map_err(backend)?;
            if let Some(e) = event {
                let revision = e.revision;
                changes.push(vec![e], revision);
            }
            Ok(wrote.value)
        })
        .await
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    /// A point read, run on the calling task (see the module docs).
    fn reading<T>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        f(&self.db)
    }
}

impl EmbeddedStore {
    /// Applies `change` to the secret's metadata in one write transaction, removing the value
    /// it names (a destroy) in the same transaction. redb frees the pages that held it; their
    /// bytes stay in the file until redb reuses them (SECURITY.md).
    async fn change(&self, path: &SecretPath, change: Change) -> Result<VersionMeta, StoreError> {
        let path = path.clone();
        self.write(move |txn| {
            let key = path.as_str();
            let mut meta_table = txn.open_table(META).map_err(backend)?;
            let mut meta = read_meta(&meta_table, key)?.ok_or(StoreError::NotFound)?;
            let before = meta.clone();
            let (info, changed) = meta.apply(change)?;
            if !changed {
                return Ok(Wrote { value: info, commit: false, change: None });
            }
            if let Some(version) = change.removes() {
                let mut values = txn.open_table(VALUES).map_err(backend)?;
                values.remove((key, version)).map_err(backend)?;
            }
            write_meta(&mut meta_table, key, &meta)?;
            Ok(Wrote { value: info, commit: true, change: Some((path, Some(before), meta)) })
        })
        .await
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn current_version(&self, path: &SecretPath) -> Result<u64, StoreError> {
        let key = path.as_str();
        self.reading(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            Ok(read_meta(&meta, key)?.map_or(0, |m| m.current_version))
        })
    }

    async fn put(
        &self,
        path: &SecretPath,
        expected: u64,
        value: &[u8],
    ) -> Result<VersionMeta, StoreError> {
        let path = path.clone();
        let value = Zeroizing::new(value.to_vec());
        let keep = self.max_versions;
        let fence = self.fence();
        self.write(move |txn| {
            control::check_fence(txn, fence.as_deref())?;
            let key = path.as_str();
            let mut meta_table = txn.open_table(META).map_err(backend)?;
            let mut values = txn.open_table(VALUES).map_err(backend)?;
            let before = read_meta(&meta_table, key)?;
            let mut meta =
                before.clone().unwrap_or(SecretMeta { current_version: 0, versions: Vec::new() });
            if meta.current_version != expected {
                return Err(StoreError::Conflict { expected, current: meta.current_version });
            }
            let info = VersionMeta::new(expected + 1, UnixMillis::now());
            for pruned in meta.push_version(info.clone(), keep) {
                values.remove((key, pruned.version)).map_err(backend)?;
            }
            values.insert((key, info.version), value.as_slice()).map_err(backend)?;
            write_meta(&mut meta_table, key, &meta)?;
            Ok(Wrote { value: info, commit: true, change: Some((path, before, meta)) })
        })
        .await
    }

    async fn get(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<StoredValue, StoreError> {
        let key = path.as_str();
        self.reading(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta_table = txn.open_table(META).map_err(backend)?;
            let meta = read_meta(&meta_table, key)?.ok_or(StoreError::NotFound)?;
            let info = meta.readable(version)?;
            let values = txn.open_table(VALUES).map_err(backend)?;
            let guard = values.get((key, info.version)).map_err(backend)?.ok_or_else(|| {
                StoreError::Corrupt(format!("value of {key} version {} missing", info.version))
            })?;
            let bytes = guard.value();
            let mut value = Zeroizing::new(Vec::with_capacity(bytes.len()));
            value.extend_from_slice(bytes);
            Ok(StoredValue {
                version: info.version,
                created: info.created,
                current_version: meta.current_version,
                value,
            })
        })
    }

    async fn delete(&self, path: &SecretPath) -> Result<VersionMeta, StoreError> {
        self.change(path, Change::Delete).await
    }

    async fn undelete(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        self.change(path, Change::Undelete(version)).await
    }

    async fn destroy(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        self.change(path, Change::Destroy(version)).await
    }

    async fn list(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
    ) -> Result<Vec<SecretPath>, StoreError> {
        let prefix = prefix.clone();
        let after = after.map(|a| a.as_str().to_owned());
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta_table = txn.open_table(META).map_err(backend)?;
            let mut out = Vec::new();
            // Keys sort bytewise, and `p` < `p/…` < `p0`: the prefix itself, then its subtree.
            let (exact, lower, upper) = match &prefix {
                PathPrefix::Root => (None, "/".to_owned(), "0".to_owned()),
                PathPrefix::Path(p) => {
                    (Some(p.as_str().to_owned()), format!("{p}/"), format!("{p}0"))
                }
            };
            let candidates = exact.into_iter().filter(|e| after.as_ref().is_none_or(|a| e > a));
            for key in candidates {
                if read_meta(&meta_table, &key)?.is_some_and(|m| m.is_live()) {
                    out.push(key);
                }
            }
            let start = match &after {
                Some(a) if *a >= lower => a.clone(),
                _ => lower.clone(),
            };
            let range = meta_table.range(start.as_str()..upper.as_str()).map_err(backend)?;
            for item in range {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(backend)?;
                let key = k.value();
                if after.as_deref() == Some(key) {
                    continue;
                }
                if decode_meta(key, v.value())?.is_live() {
                    out.push(key.to_owned());
                }
            }
            out.truncate(limit);
            out.into_iter()
                .map(|k| {
                    SecretPath::parse(&k)
                        .map_err(|e| StoreError::Corrupt(format!("stored path {k:?}: {e}")))
                })
                .collect()
        })
        .await
    }

    async fn versions(&self, path: &SecretPath) -> Result<SecretMeta, StoreError> {
        let key = path.as_str();
        self.reading(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let meta = txn.open_table(META).map_err(backend)?;
            read_meta(&meta, key)?.ok_or(StoreError::NotFound)
        })
    }

    async fn scan(
        &self,
        after: Option<(&SecretPath, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        let after = after.map(|(p, v)| (p.as_str().to_owned(), v));
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let values = txn.open_table(VALUES).map_err(backend)?;
            let range = match &after {
                Some((p, v)) => values.range((p.as_str(), *v)..).map_err(backend)?,
                None => values.range::<(&str, u64)>(..).map_err(backend)?,
            };
            let mut out = Vec::new();
            for item in range {
                if out.len() >= limit {
                    break;
                }
                let (k, v) = item.map_err(backend)?;
                let (path, version) = k.value();
                if after.as_ref().is_some_and(|(p, av)| p == path && *av == version) {
                    continue;
                }
                let path = SecretPath::parse(path)
                    .map_err(|e| StoreError::Corrupt(format!("stored path {path:?}: {e}")))?;
                let bytes = v.value();
                let mut value = Zeroizing::new(Vec::with_capacity(bytes.len()));
                value.extend_from_slice(bytes);
                out.push(StoredVersion { path, version, value });
            }
            Ok(out)
        })
        .await
    }

    async fn replace(
        &self,
        path: &SecretPath,
        version: u64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let key = path.as_str().to_owned();
        let old = Zeroizing::new(old.to_vec());
        let new = Zeroizing::new(new.to_vec());
        let fence = self.fence();
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            control::check_fence(&txn, fence.as_deref())?;
            {
                let mut values = txn.open_table(VALUES).map_err(backend)?;
                let same = values
                    .get((key.as_str(), version))
                    .map_err(backend)?
                    .is_some_and(|v| v.value() == old.as_slice());
                if !same {
                    return Ok(false);
                }
                values.insert((key.as_str(), version), new.as_slice()).map_err(backend)?;
            }
            txn.commit().map_err(backend)?;
            Ok(true)
        })
        .await
    }

    fn changes(&self) -> Arc<Changes> {
        Arc::clone(&self.changes)
    }

    async fn register_replica(
        &self,
        id: &str,
        record: &[u8],
        _ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        *self.replica.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((id.to_owned(), record.to_vec()));
        Ok(())
    }

    async fn replicas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.replica.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect())
    }

    async fn deregister_replica(&self) -> Result<(), StoreError> {
        self.replica.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(())
    }

    async fn put_control(&self, kind: &str, version: u64, record: &[u8]) -> Result<(), StoreError> {
        self.create_control(kind, version, record).await
    }

    async fn control_versions(
        &self,
        kind: &str,
        below: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.read_control(kind, below, limit).await
    }

    fn control_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.control.subscribe()
    }

    fn fence_writes(&self, kind: &str, next: u64) {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new((kind.to_owned(), next)));
    }

    async fn put_audit_checkpoint(&self, log_id: &str, line: &[u8]) -> Result<(), StoreError> {
        let (id, line) = (log_id.to_owned(), line.to_vec());
        self.blocking(move |db| {
            let txn = db.begin_write().map_err(backend)?;
            {
                let mut table = txn.open_table(CHECKPOINTS).map_err(backend)?;
                table.insert(id.as_str(), line.as_slice()).map_err(backend)?;
            }
            txn.commit().map_err(backend)
        })
        .await
    }

    async fn audit_checkpoint(&self, log_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.reading(|db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = match txn.open_table(CHECKPOINTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(backend(e)),
            };
            Ok(table.get(log_id).map_err(backend)?.map(|v| v.value().to_vec()))
        })
    }

    async fn audit_checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = match txn.open_table(CHECKPOINTS) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(backend(e)),
            };
            let mut out = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (id, line) = entry.map_err(backend)?;
                out.push((id.value().to_owned(), line.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }
}

/// Appends the change from `before` to `after` to the change log (as the next revision) and
/// drops what falls out of the newest `history`; the event, unless nothing a watcher sees
/// changed.
fn log_change(
    txn: &redb::WriteTransaction,
    history: u64,
    path: &SecretPath,
    before: &Option<SecretMeta>,
    after: &SecretMeta,
) -> Result<Option<ChangeEvent>, StoreError> {
    let mut log = txn.open_table(CHANGES).map_err(backend)?;
    let last = log.last().map_err(backend)?.map_or(0, |(k, _)| k.value());
    let Some(event) = derive(path, before.as_ref(), after, last + 1) else { return Ok(None) };
    let bytes = serde_json::to_vec(&event).map_err(|e| StoreError::Backend(e.to_string()))?;
    log.insert(event.revision, bytes.as_slice()).map_err(backend)?;
    let keep_from = event.revision.saturating_sub(history - 1);
    loop {
        let oldest = log.first().map_err(backend)?.map(|(k, _)| k.value());
        match oldest {
            Some(k) if k < keep_from => log.remove(k).map_err(backend)?,
            _ => break,
        };
    }
    Ok(Some(event))
}

/// The feed as the change log leaves it: complete after the revision before its oldest
/// kept event.
fn load_changes(db: &Database, history: u64) -> Result<Changes, StoreError> {
    let txn = db.begin_read().map_err(backend)?;
    let log = txn.open_table(CHANGES).map_err(backend)?;
    let mut events = Vec::new();
    for entry in log.iter().map_err(backend)? {
        let (k, v) = entry.map_err(backend)?;
        let event: ChangeEvent = serde_json::from_slice(v.value())
            .map_err(|e| StoreError::Corrupt(format!("change {}: {e}", k.value())))?;
        events.push(event);
    }
    let start = events.first().map_or(0, |e| e.revision - 1);
    let changes = Changes::new(start, usize::try_from(history).unwrap_or(usize::MAX));
    let head = events.last().map_or(start, |e| e.revision);
    changes.push(events, head);
    Ok(changes)
}

fn read_meta(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<SecretMeta>, StoreError> {
    match table.get(key).map_err(backend)? {
        Some(v) => decode_meta(key, v.value()).map(Some),
        None => Ok(None),
    }
}

fn decode_meta(key: &str, bytes: &[u8]) -> Result<SecretMeta, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| StoreError::Corrupt(format!("metadata of {key}: {e}")))
}

fn write_meta(
    table: &mut redb::Table<'_, &'static str, &'static [u8]>,
    key: &str,
    meta: &SecretMeta,
) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec(meta).map_err(|e| StoreError::Backend(e.to_string()))?;
    table.insert(key, bytes.as_slice()).map_err(backend)?;
    Ok(())
}

fn backend(e: impl Into<redb::Error>) -> StoreError {
    let e: redb::Error = e.into();
    match e {
        redb::Error::Io(io) => StoreError::Unavailable(format!("embedded store I/O: {io}")),
        other => StoreError::Backend(other.to_string()),
    }
}
