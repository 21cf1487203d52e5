//! The etcd backend: the replicated store for production (a 3- or 5-member Raft cluster).
//!
//! **Key layout.** Every key starts with the configured prefix `P` (default `/secretgate/`);
//! nothing is ever written outside it:
//!
//! - `P` `meta` *path* → JSON [`SecretMeta`], e.g. `/secretgate/meta/app/db`;
//! - `P` `data` *path* `@` *version* (20 digits, zero-padded) → the stored bytes, e.g.
//!   `/secretgate/data/app/db@00000000000000000003`.
//!
//! - `P` `audit/` *log id* → the latest signed checkpoint line of that audit log.
//! - `P` `replicas/` *replica id* → that gateway replica's record (JSON), under a lease.
//!
//! `@` cannot occur in a [`SecretPath`], so the mapping is unambiguous, and meta keys sort
//! exactly like paths, so `list` is a key range read in pages of at most [`LIST_PAGE`] keys.
//!
//! **Guarantees.** Every write is one etcd transaction: it compares the meta key's
//! `mod_revision` with the one read (0 for "never existed") and then puts the meta and the
//! value and deletes pruned versions together, so concurrent writers and crashes never leave
//! half a write, and a lost compare is a [`StoreError::Conflict`] with the current version
//! read back. A read is one linearizable etcd transaction that gets the metadata and the
//! value together (one round trip, one snapshot). Requests carry etcd's `hasleader` flag, so a member without a leader
//! refuses at once instead of hanging.
//!
//! **Time bounds.** One operation, retries included, takes at most `store.timeout_ms`. Each
//! try gets a share of it, so a request stuck on a paused member is retried on another.
//! Retrying a write is safe: the retry compares the same revision, so at most one of the
//! tries can apply, and a retry that loses the compare checks whether the secret now holds
//! *this* write (same version, creation time and value). If the deadline passes after a
//! write was sent and nothing settles it, the error is [`StoreError::OutcomeUnknown`], never
//! a plain failure: the write may still commit.

mod cache;
mod combine;
mod control;
mod leader;
mod members;
mod registry;
mod scan;
mod write;

use std::{fmt, future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use etcd_client::{GetOptions, GetResponse, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;
use zeroize::Zeroizing;

use self::{
    cache::Cache,
    members::{Failure, Members, Trouble},
    write::{Hints, PutStep},
};
use super::{
    Change, SecretMeta, Store, StoreError, StoredValue, StoredVersion, UnixMillis, VersionMeta,
};
use crate::{
    config::EtcdConfig,
    path::{PathPrefix, SecretPath},
};

/// Most meta keys fetched by one range request of `list`.
pub const LIST_PAGE: usize = 256;

/// A [`Store`] in an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
    prefix: String,
    timeout: Duration,
    max_versions: u32,
    hints: Arc<Hints>,
    /// Sends concurrent puts' transactions together (see `combine`).
    combiner: Arc<combine::Combiner>,
    /// The replica's watch feed and read cache (holding nothing with `store.cache = false`).
    cache: Arc<Cache>,
    /// The lease of this replica's record in the registry, once it has one.
    lease: Arc<tokio::sync::Mutex<Option<i64>>>,
    /// The write fence: the control key (and its kind and version) that must not exist for
    /// a sealed write to commit (see [`Store::fence_writes`]).
    fence: Arc<std::sync::RwLock<Option<Arc<control::Fence>>>>,
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("max_versions", &self.max_versions)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// Prepares connections to the cluster named by `config` (TLS with its CA and client
    /// certificate, and its user if one is set). Connections open on first use, so an
    /// unreachable cluster shows up as `Unavailable` on the first operation, not here.
    #[cfg(feature = "testing")]
    pub fn connect(config: &EtcdConfig, max_versions: u32) -> Result<Self, StoreError> {
        Self::connect_with_history(config, max_versions, super::DEFAULT_HISTORY)
    }

    /// Like [`EtcdStore::connect`], the change feed keeping the newest `history` changes
    /// and, at start, reading up to `history` revisions of etcd's history.
    pub fn connect_with_history(
        config: &EtcdConfig,
        max_versions: u32,
        history: u64,
    ) -> Result<Self, StoreError> {
        let members = Arc::new(Members::new(config)?);
        leader::track(&members);
        let (prefix, timeout) = (config.prefix.clone(), config.timeout());
        let max = (config.cache_max_mib.get() << 20) as usize;
        let cache =
            Cache::start(Arc::clone(&members), prefix.clone(), config.cache, max, timeout, history);
        let (hints, lease, fence) = (Arc::default(), Arc::default(), Arc::default());
        let combiner = Arc::new(combine::Combiner::start(Arc::clone(&members)));
        Ok(Self { members, prefix, timeout, max_versions, hints, combiner, cache, lease, fence })
    }

    fn meta_key(&self, path: &str) -> String {
        format!("{}meta{path}", self.prefix)
    }

    fn data_key(&self, path: &SecretPath, version: u64) -> String {
        format!("{}data{path}@{version:020}", self.prefix)
    }

    /// Runs `once` until it succeeds, fails for good, or the operation's time is up.
    /// `write`: a try that may have reached etcd may have applied.
    async fn retry<T, F, Fut>(&self, op: &str, write: bool, once: F) -> Result<T, StoreError>
    where
        F: FnMut(Instant) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        members::retry(op, self.timeout, write, once).await
    }

    /// The secret's metadata and its `mod_revision` (0 if it never existed), read at the
    /// revision returned with it.
    async fn meta(
        &self,
        path: &SecretPath,
        deadline: Instant,
    ) -> Result<(Option<SecretMeta>, i64, i64), Failure> {
        let key = self.meta_key(path.as_str());
        let resp =
            self.members.attempt(deadline, |mut kv| async move { kv.get(key, None).await }).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let (meta, mod_revision) = decode_first(path.as_str(), &resp)?;
        Ok((meta, mod_revision, revision))
    }

    /// Reads answered from the read cache so far, by every etcd store of the process.
    #[cfg(feature = "testing")]
    pub fn cache_hits() -> u64 {
        cache::HITS.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A read answered from memory after the barrier (see [`cache`]), or `None` when the
    /// cache cannot answer it for sure: then the caller reads etcd directly.
    async fn cached_get(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Option<Result<StoredValue, StoreError>> {
        let cache = &self.cache;
        if !cache.serving() {
            return None;
        }
        let meta_key = self.meta_key(path.as_str()).into_bytes();
        let revision = cache.barrier(meta_key.clone()).await.ok()?;
        // The metadata's revision vouches for the values it names (see [`cache`]). `None`:
        // a value the metadata names is not cached (it was put into etcd without one).
        let read = |meta: Option<&[u8]>, entries: &cache::Entries| {
            let Some(meta) = meta else { return Some(Err(StoreError::NotFound)) };
            let meta = decode_meta(path.as_str(), meta).ok()?;
            let info = match meta.readable(version) {
                Ok(info) => info,
                Err(e) => return Some(Err(e)),
            };
            let (value, _) = entries.get(self.data_key(path, info.version).as_bytes())?;
            Some(Ok(StoredValue {
                version: info.version,
                created: info.created,
                current_version: meta.current_version,
                value: Zeroizing::new(value.clone()),
            }))
        };
        let answer = match cache.read_at(&meta_key, revision, read) {
            Some(answer) => answer,
            None if cache.caught_up(revision).await => cache.read_at(&meta_key, revision, read)?,
            None => return None,
        }?;
        cache.hit();
        Some(answer)
    }

    /// One try of a read: one etcd transaction (one round trip, one linearizable snapshot)
    /// that gets the metadata and the value, either the version asked for or the newest
    /// value key of the path, which is the current version's (a write puts both in one
    /// transaction, a delete only marks the metadata). Should the newest key not be the
    /// version the metadata names, the value is read at the transaction's revision.
    async fn get_once(
        &self,
        path: &SecretPath,
        version: Option<u64>,
        deadline: Instant,
    ) -> Result<StoredValue, Failure> {
        let data = match version {
            Some(v) => TxnOp::get(self.data_key(path, v), None),
            None => {
                let newest = GetOptions::new()
                    .with_prefix()
                    .with_sort(SortTarget::Key, SortOrder::Descend)
                    .with_limit(1);
                TxnOp::get(format!("{}data{path}@", self.prefix), Some(newest))
            }
        };
        let txn = Txn::new().and_then([TxnOp::get(self.meta_key(path.as_str()), None), data]);
        let resp =
            self.members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let mut gets = resp.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(meta), Some(mut data)) = (gets.next(), gets.next()) else {
            return Err(corrupt(format!("a read of {path} got no answer to its gets")));
        };
        let (meta, mod_revision) = decode_first(path.as_str(), &meta)?;
        let Some(meta) = meta else {
            self.hints.forget(path);
            return Err(Failure::Done(StoreError::NotFound));
        };
        self.hints.remember(path, meta.clone(), mod_revision);
        let info = meta.readable(version).map_err(Failure::Done)?;
        let key = self.data_key(path, info.version);
        let value = match data.take_kvs().pop() {
            Some(kv) if kv.key() == key.as_bytes() => kv.into_key_value().1,
            _ => self.value_at(path, info.version, revision, deadline).await?,
        };
        Ok(StoredValue {
            version: info.version,
            created: info.created,
            current_version: meta.current_version,
            value: Zeroizing::new(value),
        })
    }

    /// The value of `path`'s `version` as of `revision`.
    async fn value_at(
        &self,
        path: &SecretPath,
        version: u64,
        revision: i64,
        deadline: Instant,
    ) -> Result<Vec<u8>, Failure> {
        let options = GetOptions::new().with_revision(revision);
        let key = self.data_key(path, version);
        let mut resp = self
            .members
            .attempt(deadline, |mut kv| async move { kv.get(key, Some(options)).await })
            .await?;
        let Some(kv) = resp.take_kvs().pop() else {
            return Err(corrupt(format!("value of {path} version {version} missing")));
        };
        Ok(kv.into_key_value().1)
    }

    /// One try of a list, all pages read at the revision of the first.
    async fn list_once(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
        deadline: Instant,
    ) -> Result<Vec<SecretPath>, Failure> {
        let mut out = Vec::new();
        let mut revision = 0;
        // Paths sort bytewise and `p` < `p/…` < `p0`: the prefix itself, then its subtree.
        let (lower, upper) = match prefix {
            PathPrefix::Root => ("/".to_owned(), "0".to_owned()),
            PathPrefix::Path(p) => {
                if after.is_none_or(|a| a < p) {
                    let key = self.meta_key(p.as_str());
                    let resp = self
                        .members
                        .attempt(deadline, |mut kv| async move { kv.get(key, None).await })
                        .await?;
                    revision = resp.header().map_or(0, |h| h.revision());
                    if decode_first(p.as_str(), &resp)?.0.is_some_and(|m| m.is_live()) {
                        out.push(p.clone());
                    }
                }
                (format!("{p}/"), format!("{p}0"))
            }
        };
        let mut start = match after {
            Some(a) if a.as_str() >= lower.as_str() => self.meta_key(&format!("{a}\0")),
            _ => self.meta_key(&lower),
        };
        let end = self.meta_key(&upper);
        let base = self.meta_key("");
        while out.len() < limit && start < end {
            let page = (limit - out.len()).clamp(16, LIST_PAGE);
            let mut options = GetOptions::new().with_range(end.as_str()).with_limit(page as i64);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let from = start.as_str();
            let resp = self
                .members
                .attempt(deadline, |mut kv| async move { kv.get(from, Some(options)).await })
                .await?;
            if revision == 0 {
                revision = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let key = kv.key_str().map_err(|e| corrupt(format!("meta key: {e}")))?;
                let path = key.strip_prefix(base.as_str()).unwrap_or(key);
                if decode_meta(path, kv.value())?.is_live() && out.len() < limit {
                    let path = SecretPath::parse(path)
                        .map_err(|e| corrupt(format!("stored path {path:?}: {e}")))?;
                    out.push(path);
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    let mut next = last.key().to_vec();
                    next.push(0);
                    start = String::from_utf8(next).map_err(|e| corrupt(e.to_string()))?;
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for EtcdStore {
    /// The version this replica last saw (a guess, which the write's compare-and-set
    /// checks: a stale one ends in a `Conflict` naming the current version), or one read.
    async fn current_version(&self, path: &SecretPath) -> Result<u64, StoreError> {
        if let Some((meta, _)) = self.hints.get(path) {
            return Ok(meta.current_version);
        }
        self.retry("current_version", false, |deadline| async move {
            let (meta, rev, _) = self.meta(path, deadline).await?;
            let current = meta.as_ref().map_or(0, |m| m.current_version);
            if let Some(meta) = meta {
                self.hints.remember(path, meta, rev);
            }
            Ok(current)
        })
        .await
    }

    async fn put(
        &self,
        path: &SecretPath,
        expected: u64,
        value: &[u8],
    ) -> Result<VersionMeta, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let info = VersionMeta::new(expected + 1, UnixMillis::now());
        let mut trouble = Trouble::default();
        loop {
            match self.put_once(path, expected, value, &info, trouble.maybe_applied, deadline).await
            {
                Ok(PutStep::Written) => return Ok(info),
                Ok(PutStep::Conflict(current)) => {
                    return Err(StoreError::Conflict { expected, current });
                }
                Ok(PutStep::Unsure) => {
                    let why = "an earlier try may have written a version since pruned";
                    trouble.note(Failure::Unknown(why.into()), true)?;
                    return Err(trouble.give_up("put", self.timeout));
                }
                Ok(PutStep::Again) if Instant::now() < deadline => {}
                Ok(PutStep::Again) => return Err(trouble.give_up("put", self.timeout)),
                Err((failure, sent)) => {
                    trouble.note(failure, sent)?;
                    trouble
                        .pause(deadline)
                        .await
                        .map_err(|()| trouble.give_up("put", self.timeout))?;
                }
            }
        }
    }

    async fn get(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<StoredValue, StoreError> {
        if let Some(answer) = self.cached_get(path, version).await {
            return answer;
        }
        self.retry("get", false, |deadline| self.get_once(path, version, deadline)).await
    }

    async fn delete(&self, path: &SecretPath) -> Result<VersionMeta, StoreError> {
        // A retried delete is idempotent: it finds the version already deleted and returns it.
        self.retry("delete", true, |deadline| self.change_once(path, Change::Delete, deadline))
            .await
    }

    async fn undelete(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        let change = Change::Undelete(version);
        self.retry("undelete", true, |deadline| self.change_once(path, change, deadline)).await
    }

    async fn destroy(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        let change = Change::Destroy(version);
        self.retry("destroy", true, |deadline| self.change_once(path, change, deadline)).await
    }

    async fn list(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
    ) -> Result<Vec<SecretPath>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.retry("list", false, |deadline| self.list_once(prefix, after, limit, deadline)).await
    }

    async fn versions(&self, path: &SecretPath) -> Result<SecretMeta, StoreError> {
        self.retry("versions", false, |deadline| async move {
            self.meta(path, deadline).await?.0.ok_or(Failure::Done(StoreError::NotFound))
        })
        .await
    }

    async fn scan(
        &self,
        after: Option<(&SecretPath, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.retry("scan", false, |deadline| self.scan_once(after, limit, deadline)).await
    }

    async fn replace(
        &self,
        path: &SecretPath,
        version: u64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        let keys = (self.data_key(path, version), self.meta_key(path.as_str()));
        self.retry("replace", true, |deadline| self.replace_once(&keys, old, new, deadline)).await
    }

    async fn put_audit_checkpoint(&self, log_id: &str, line: &[u8]) -> Result<(), StoreError> {
        let key = format!("{}audit/{log_id}", self.prefix);
        self.retry("put_audit_checkpoint", true, |deadline| {
            let (key, line) = (key.clone(), line.to_vec());
            async move {
                let put = |mut kv: etcd_client::KvClient| {
                    let (key, line) = (key.clone(), line.clone());
                    async move { kv.put(key, line, None).await }
                };
                self.members.attempt(deadline, put).await.map(|_| ())
            }
        })
        .await
    }

    async fn audit_checkpoint(&self, log_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let key = format!("{}audit/{log_id}", self.prefix);
        self.retry("audit_checkpoint", false, |deadline| {
            let key = key.clone();
            async move {
                let resp = self
                    .members
                    .attempt(deadline, |mut kv| {
                        let key = key.clone();
                        async move { kv.get(key, None).await }
                    })
                    .await?;
                Ok(resp.kvs().first().map(|kv| kv.value().to_vec()))
            }
        })
        .await
    }

    fn changes(&self) -> Arc<super::Changes> {
        self.cache.changes()
    }

    fn status(&self) -> super::StoreStatus {
        self.members.status(self.cache.status())
    }

    async fn ready(&self) -> Result<(), StoreError> {
        self.retry("ready", false, |deadline| async move {
            let key = self.prefix.as_str();
            let options = GetOptions::new().with_count_only();
            self.members
                .attempt(deadline, |mut kv| async move { kv.get(key, Some(options)).await })
                .await?;
            Ok(())
        })
        .await
    }

    async fn audit_checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.under("audit_checkpoints", "audit/").await
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
        self.cache.control_changes()
    }

    fn fence_writes(&self, kind: &str, next: u64) {
        self.set_fence(kind, next);
    }

    async fn register_replica(
        &self,
        id: &str,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.register(id, record, ttl).await
    }

    async fn replicas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.under("replicas", "replicas/").await
    }

    async fn deregister_replica(&self) -> Result<(), StoreError> {
        self.deregister().await
    }
}

fn decode_first(path: &str, resp: &GetResponse) -> Result<(Option<SecretMeta>, i64), Failure> {
    match resp.kvs().first() {
        None => Ok((None, 0)),
        Some(kv) => Ok((Some(decode_meta(path, kv.value())?), kv.mod_revision())),
    }
}

fn decode_meta(path: &str, bytes: &[u8]) -> Result<SecretMeta, Failure> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(format!("metadata of {path}: {e}")))
}

fn encode_meta(meta: &SecretMeta) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(meta).map_err(|e| Failure::Done(StoreError::Backend(e.to_string())))
}

fn corrupt(what: String) -> Failure {
    Failure::Done(StoreError::Corrupt(what))
}
