//! The consistent read cache: the sealed records of the prefix (metadata and sealed values,
//! never plaintext) in memory, filled by one range read and kept by one etcd watch from the
//! revision after it (the replica's one watch feed), re-listed when the watch is cancelled,
//! compacted away, ends, or stalls on a member (a paused member keeps its stream open but
//! silent, so a quiet watch is asked for progress and given up when it does not answer).
//!
//! **Reads are never served from memory on the feed's word alone.** Each read first passes a
//! linearizability barrier: one linearizable, keys-only etcd read that returns the current
//! `mod_revision` of the secret's metadata key. The read is answered from memory only if it
//! matches the cached entry (a `mod_revision` names one write of one key, so equal revisions
//! mean equal bytes); otherwise it waits briefly for the feed to apply that revision, and
//! then reads etcd directly. The metadata's revision vouches for the values too: every
//! write that changes a value key (a put, a prune, a destroy, a rewrap) changes the
//! metadata in the same transaction (a rewrap touches it with `ignore_value`), and the feed
//! applies a transaction's events at once, so a cache whose metadata is current holds the
//! values that metadata names as they are in etcd. So a read that starts after a write was
//! acknowledged (by this replica, another one, or etcd directly) always sees it. Comparing
//! per-key revisions, not "the watch reached etcd's revision", matters: etcd's revision is
//! cluster-wide, and a write outside the prefix moves it without any event here.
//!
//! The feed runs with `store.cache = false` too, holding nothing: it is the replica's one
//! watch, which the Watch API and the tier's control state are to share. It also feeds the
//! store's [`Changes`]: each metadata event becomes a [`ChangeEvent`], told from the metadata
//! before it, which the cache holds: every watch starts right after the revision its list
//! was made at (listed again there when needed), so each event is after the list. etcd's
//! previous values (`prev_kv`, about a third of a write's CPU in etcd) are asked for only
//! when the cache cannot answer (off, over its budget, or that list compacted away). So
//! that a watcher can resume across a gateway restart, the feed's first watch starts up to
//! `history` revisions back, and after a break it watches again from the revision after
//! the last one it applied, so the change feed has no gap. When etcd
//! compacted that history away, the metadata as of the compaction revision (still readable)
//! tells whether any changed in it: if none did, the feed goes on; else it restarts after
//! the compaction and watchers behind it are told to resync.
//!
//! One barrier is in flight at a time; every read that arrives meanwhile joins the next one
//! (a plain range read for one key, else one transaction of up to [`MAX_BARRIER_KEYS`] keys,
//! etcd's default `--max-txn-ops`). Past
//! `store.cache_max_mib` the cache empties itself and reads go to etcd until a restart.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard, atomic::AtomicU64},
    time::Duration,
};

use etcd_client::{EventType, GetOptions, Txn, TxnOp, TxnOpResponse};
use tokio::{
    sync::{mpsc, oneshot, watch},
    time::Instant,
};

use super::members::{Failure, Members};
use crate::{
    path::SecretPath,
    store::{ChangeEvent, Changes, changes::derive},
};

mod feed;
mod listing;

/// Keys one barrier transaction checks at most.
pub(super) const MAX_BARRIER_KEYS: usize = 128;
/// How long a read whose barrier found the cache behind waits for the feed.
const CATCH_UP: Duration = Duration::from_millis(100);
/// Bytes counted per entry besides its key and value.
const ENTRY_OVERHEAD: usize = 64;
/// Keys per page of the initial range read.
const LIST_PAGE: i64 = 1000;

/// One cached key: its value and the revision that wrote it.
type Entry = (Vec<u8>, i64);
/// Every cached key.
pub(super) type Entries = HashMap<Vec<u8>, Entry>;

#[derive(Default)]
struct State {
    entries: Entries,
    bytes: usize,
    /// Filled and following a watch.
    serving: bool,
    /// Emptied for good: past the budget.
    over_budget: bool,
}

/// Reads answered from memory, for tests and (later) metrics.
pub(super) static HITS: AtomicU64 = AtomicU64::new(0);

/// One read's question to the barrier: the current `mod_revision` of this key (0: absent).
struct Ask {
    key: Vec<u8>,
    reply: oneshot::Sender<Result<i64, Failure>>,
}

/// See the module docs.
pub(super) struct Cache {
    state: RwLock<State>,
    /// The highest revision the feed has applied.
    applied: watch::Sender<i64>,
    barrier: mpsc::UnboundedSender<Ask>,
    max_bytes: usize,
    prefix: String,
    /// `store.cache`: without it the feed runs (the replica's one watch) but holds nothing.
    caching: bool,
    /// Reads this cache answered.
    hits: AtomicU64,
    /// The store's change feed, fed from the same watch.
    changes: Arc<Changes>,
    /// Revisions of history the first watch starts before the list.
    history: i64,
    /// The newest revision that changed a key under `P control/`, or at which the feed
    /// (re)started (see [`crate::store::Store::control_changes`]).
    control: watch::Sender<u64>,
    /// `P control/`, the keys whose events go to `control`.
    control_prefix: String,
}

impl Cache {
    /// Starts the feed and the barrier over `members` for keys under `prefix`.
    pub(super) fn start(
        members: Arc<Members>,
        prefix: String,
        caching: bool,
        max_bytes: usize,
        timeout: Duration,
        history: u64,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let capacity = usize::try_from(history).unwrap_or(usize::MAX);
        let control_prefix = format!("{prefix}control/");
        let cache = Arc::new(Self {
            state: RwLock::default(),
            applied: watch::channel(0).0,
            barrier: tx,
            max_bytes,
            prefix,
            caching,
            hits: AtomicU64::new(0),
            changes: Arc::new(Changes::starting(capacity)),
            history: i64::try_from(history).unwrap_or(i64::MAX),
            control: watch::channel(0).0,
            control_prefix,
        });
        tokio::spawn(barrier_loop(Arc::clone(&members), timeout, rx));
        tokio::spawn(feed::feed_loop(Arc::downgrade(&cache), members, timeout));
        cache
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // A panic mid-update leaves entries that the barrier still checks one by one.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The store's change feed.
    pub(super) fn changes(&self) -> Arc<Changes> {
        Arc::clone(&self.changes)
    }

    /// See [`crate::store::Store::control_changes`].
    pub(super) fn control_changes(&self) -> watch::Receiver<u64> {
        self.control.subscribe()
    }

    /// Counts a read answered from memory.
    pub(super) fn hit(&self) {
        self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The cache's state, for `Admin/StoreStatus`.
    pub(super) fn status(&self) -> crate::store::StoreStatus {
        let state = self.read();
        let cache = match (self.caching, state.over_budget, state.serving) {
            (false, ..) => "off",
            (true, true, _) => "over budget",
            (true, false, true) => "serving",
            (true, false, false) => "filling",
        };
        crate::store::StoreStatus {
            backend: "etcd",
            cache,
            entries: state.entries.len() as u64,
            bytes: state.bytes as u64,
            max_bytes: self.max_bytes as u64,
            hits: self.hits.load(std::sync::atomic::Ordering::Relaxed),
            members: Vec::new(),
            leader: None,
        }
    }

    /// Whether reads may be tried from memory.
    pub(super) fn serving(&self) -> bool {
        self.read().serving
    }

    /// The cached value of `key` and its revision (0: not cached).
    pub(super) fn entry(&self, key: &[u8]) -> Option<Entry> {
        self.read().entries.get(key).cloned()
    }

    /// `read` of the cached value of `key` (`None`: absent) and of every cached entry, if
    /// `key`'s cached revision is `revision` (0 and absent alike): all under one lock.
    pub(super) fn read_at<T>(
        &self,
        key: &[u8],
        revision: i64,
        read: impl FnOnce(Option<&[u8]>, &Entries) -> T,
    ) -> Option<T> {
        let state = self.read();
        let entry = state.entries.get(key);
        let current = entry.map_or(0, |(_, rev)| *rev) == revision;
        (state.serving && current).then(|| read(entry.map(|(v, _)| v.as_slice()), &state.entries))
    }

    /// The current `mod_revision` of `key`, from the next barrier.
    pub(super) async fn barrier(&self, key: Vec<u8>) -> Result<i64, Failure> {
        let (reply, answer) = oneshot::channel();
        if self.barrier.send(Ask { key, reply }).is_err() {
            return Err(Failure::Unknown("the read barrier stopped".into()));
        }
        answer.await.unwrap_or_else(|_| Err(Failure::Unknown("the read barrier stopped".into())))
    }

    /// Waits (at most [`CATCH_UP`]) until the feed has applied `revision`.
    pub(super) async fn caught_up(&self, revision: i64) -> bool {
        let mut applied = self.applied.subscribe();
        let wait = applied.wait_for(|a| *a >= revision);
        matches!(tokio::time::timeout(CATCH_UP, wait).await, Ok(Ok(_)))
    }

    fn wanted(&self, key: &[u8]) -> bool {
        let rest = key.strip_prefix(self.prefix.as_bytes()).unwrap_or_default();
        rest.starts_with(b"meta/") || rest.starts_with(b"data/")
    }

    /// Replaces everything with a fresh list at `revision`.
    fn fill(&self, entries: HashMap<Vec<u8>, Entry>, revision: i64) {
        let mut state = self.write();
        if state.over_budget || !self.caching {
            drop(state);
            self.control.send_replace(u64::try_from(revision).unwrap_or(0));
            self.applied.send_modify(|a| *a = (*a).max(revision));
            return;
        }
        // A (re)started feed may have missed control changes while it was down.
        self.control.send_replace(u64::try_from(revision).unwrap_or(0));
        let bytes = entries.iter().map(|(k, (v, _))| k.len() + v.len() + ENTRY_OVERHEAD).sum();
        (state.entries, state.bytes) = (entries, bytes);
        self.check_budget(&mut state);
        state.serving = !state.over_budget;
        drop(state);
        self.applied.send_modify(|a| *a = (*a).max(revision));
    }

    /// Applies one watch response's events: to the cache those after `listed` (the list
    /// already holds the rest), and every metadata change to the change feed.
    ///
    /// `prev`: the watch sends each event's previous value, the metadata before the change.
    /// Without it, that is the entry the cache holds, which the feed only relies on when the
    /// list was made just before the watch's start (see `feed::feed_loop`). False when the cache
    /// emptied itself past its budget while relying on it: then the watch must start again.
    fn apply(&self, events: &[etcd_client::Event], progress: i64, listed: i64, prev: bool) -> bool {
        let mut top = progress;
        let mut changes = Vec::new();
        let mut control_changed = 0;
        let mut state = self.write();
        for e in events {
            let Some(kv) = e.kv() else { continue };
            top = top.max(kv.mod_revision());
            if kv.key().starts_with(self.control_prefix.as_bytes()) {
                control_changed = kv.mod_revision().max(control_changed);
            }
            let before = if prev {
                e.prev_kv().map(|p| p.value())
            } else {
                state.entries.get(kv.key()).map(|(v, _)| v.as_slice())
            };
            if let Some(change) = self.change(e, before) {
                changes.push(change);
            }
            if kv.mod_revision() <= listed
                || state.over_budget
                || !self.caching
                || !self.wanted(kv.key())
            {
                continue;
            }
            let old = match e.event_type() {
                EventType::Put => state
                    .entries
                    .insert(kv.key().to_vec(), (kv.value().to_vec(), kv.mod_revision())),
                EventType::Delete => state.entries.remove(kv.key()),
            };
            let added = match e.event_type() {
                EventType::Put => kv.key().len() + kv.value().len() + ENTRY_OVERHEAD,
                EventType::Delete => 0,
            };
            let removed = old.map_or(0, |(v, _)| kv.key().len() + v.len() + ENTRY_OVERHEAD);
            state.bytes = (state.bytes + added).saturating_sub(removed);
        }
        self.check_budget(&mut state);
        let relied = prev || !state.over_budget;
        drop(state);
        self.applied.send_modify(|a| *a = (*a).max(top));
        // Progress notifications do not move the change feed: before 3.4.31 etcd answers a
        // progress request at once with its current revision, even while the watch is still
        // sending older events, so a watcher told "complete up to R" could miss them.
        self.changes.push(changes, 0);
        if control_changed > 0 {
            self.control.send_replace(u64::try_from(control_changed).unwrap_or(0));
        }
        relied
    }

    /// Whether the cache holds every key of the prefix (it is on and within its budget).
    fn holds(&self) -> bool {
        self.caching && !self.read().over_budget
    }

    /// The change a metadata event made, from the metadata `before` it (`None`: the secret
    /// did not exist); `None` for other keys, deletions of metadata, which the gateway never
    /// makes, and metadata that does not decode (logged).
    fn change(&self, e: &etcd_client::Event, before: Option<&[u8]>) -> Option<ChangeEvent> {
        let kv = e.kv().filter(|_| e.event_type() == EventType::Put)?;
        let rest = kv.key().strip_prefix(self.prefix.as_bytes())?.strip_prefix(b"meta")?;
        let decoded = std::str::from_utf8(rest).ok().and_then(|p| SecretPath::parse(p).ok());
        let Some(path) = decoded else {
            tracing::warn!(key = %String::from_utf8_lossy(kv.key()).escape_debug(), "change feed: a metadata key that names no secret path; skipped");
            return None;
        };
        let meta = |bytes: &[u8]| super::decode_meta(path.as_str(), bytes).ok();
        let Some(after) = meta(kv.value()) else {
            tracing::warn!(%path, "change feed: metadata that does not decode; skipped");
            return None;
        };
        let before = before.and_then(meta);
        derive(&path, before.as_ref(), &after, u64::try_from(kv.mod_revision()).ok()?)
    }

    fn check_budget(&self, state: &mut State) {
        if state.bytes > self.max_bytes && !state.over_budget {
            tracing::warn!(
                bytes = state.bytes,
                limit = self.max_bytes,
                "the read cache is over store.cache_max_mib: emptied; reads go to etcd directly \
                 until a restart"
            );
            *state = State { over_budget: true, ..State::default() };
        }
    }

    fn stop_serving(&self) {
        self.write().serving = false;
    }
}

/// Answers the reads' questions, one transaction at a time, each covering every question
/// that arrived while the previous one was in flight.
async fn barrier_loop(
    members: Arc<Members>,
    timeout: Duration,
    mut rx: mpsc::UnboundedReceiver<Ask>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BARRIER_KEYS {
            match rx.try_recv() {
                Ok(ask) => batch.push(ask),
                Err(_) => break,
            }
        }
        let keys_only = || Some(GetOptions::new().with_keys_only());
        let deadline = Instant::now() + timeout;
        let revision =
            |g: &etcd_client::GetResponse| g.kvs().first().map_or(0, |kv| kv.mod_revision());
        let answer = if let [one] = batch.as_slice() {
            // One key: a plain range read, cheaper for etcd than a transaction.
            let key = one.key.clone();
            let get = |mut kv: etcd_client::KvClient| async move { kv.get(key, keys_only()).await };
            members.attempt(deadline, get).await.map(|g| vec![revision(&g)])
        } else {
            let ops: Vec<TxnOp> =
                batch.iter().map(|a| TxnOp::get(a.key.clone(), keys_only())).collect();
            let txn = Txn::new().and_then(ops);
            let resp = members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await;
            resp.map(|resp| {
                let answers = resp.op_responses().into_iter();
                answers
                    .map(|r| if let TxnOpResponse::Get(g) = r { revision(&g) } else { -1 })
                    .collect()
            })
        };
        match answer {
            Ok(revisions) => {
                for (ask, revision) in batch.into_iter().zip(revisions) {
                    let _ = ask.reply.send(Ok(revision));
                }
            }
            Err(f) => {
                let why = format!("{f:?}");
                for ask in batch {
                    let _ = ask.reply.send(Err(Failure::Unknown(why.clone())));
                }
            }
        }
    }
}
