//! The audit log writer: one thread that owns the file, with group commit.
//!
//! Requests hand their [`Record`] to the writer and wait (bounded) for it to be durable. The
//! writer takes every record that is waiting, chains and writes them in one `write`, and
//! covers all of them with one `fdatasync`: throughput is not capped at one fsync per
//! request. Only then does each waiter hear that its record is durable.
//!
//! **Failing closed.** A failed write or sync is rolled back (the file is cut back to its
//! last durable length, so no half line stays behind), every waiter of the batch gets an
//! error, and the log is marked failed with the reason (health goes NOT_SERVING). A waiter
//! that hears nothing within the timeout (a hung disk) gives up with an error too: no
//! request hangs. While failed, the writer probes every [`PROBE_EVERY`]; the first write
//! that succeeds is an `outage` record (since when, why, how many records were refused),
//! and service resumes by itself.
//!
//! **Group commit window.** Records that arrive while a sync runs go into the next batch. In
//! addition, while writes are in progress (intent durable, outcome not yet handed to the
//! writer: [`Writing`]), the writer waits up to `group_commit_us` for their outcome records
//! before it syncs. The store is committing those writes right then, each with its own sync;
//! without the window the log would add one more sync per store commit and take the disk from
//! the store, so writes would pay twice. With it, one log sync covers the outcomes of many
//! store commits (and every other record that came meanwhile). When no write is in progress
//! but other requests are ([`InFlight`]) and have not sent their records yet, a batch stays
//! open for about one sync's time (a moving average, at most the window), so that under
//! read load one fsync covers about twice as many records. A request alone is never held.
//!
//! **Checkpoints.** A signed checkpoint ends the batch in which `checkpoint_every` records
//! have accumulated since the last one, or the first write (or idle tick) after
//! `checkpoint_interval_secs` with new records, and the last batch before shutdown.
//!
//! **Files.** The active file is rotated at `max_file_bytes`: a checkpoint ends it, it is
//! renamed to `<path>.<first seq, 20 digits>`, and the new file opens with a `continue`
//! record chained to the old file's last line. A removed or replaced active file is noticed
//! before each batch and handled the same way (with that reason), so records never go into
//! a file nobody can see. On start, a torn last line (a crash mid-write: never
//! acknowledged) is cut off and the chain continues from the last whole line.
//!
//! **Layout.** This file is the handle ([`AuditLog`], what requests call); `batch` is the
//! writer thread's loop (group commit, checkpoints, outages); `file` the file I/O and
//! rotation; `resume` the start-up check of the log on disk against the stored checkpoints.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{oneshot, watch};

use super::{
    Kind, Record, SigningKey,
    record::{Body, GENESIS_PREV, checkpoint_message, line_hash, write_line},
    verify::signed,
};
use crate::{
    config::AuditConfig,
    fs::{create_private_dir, open_append, sync_dir},
};

/// How often a failed log is retried while no request comes.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How often the writer looks whether the writes it waits for have ended, during the group
/// commit window (it sleeps in between rather than waking for every record).
const GROUP_STEP: Duration = Duration::from_micros(100);
/// Most records written in one batch.
const MAX_BATCH: usize = 4096;
/// The `reason` of the final checkpoint a clean stop writes.
pub const FINAL_CHECKPOINT: &str = "final checkpoint: the gateway stopped cleanly";
/// Bytes read from the end of a file to find its last line on start.
const TAIL_BYTES: u64 = 256 * 1024;

/// Why a record could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The log cannot be written now (the reason is for the operator's log, not clients).
    #[error("audit log unavailable: {0}")]
    Unavailable(String),
    /// The log could not be opened at start.
    #[error("audit log {path}: {reason}")]
    Open {
        /// The log file.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// The state the writer publishes: `None` when healthy, else why the log is failing.
pub type AuditHealth = watch::Receiver<Option<String>>;

/// A handle to the audit log; cheap to clone. A disabled log accepts and drops records.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
    health: watch::Sender<Option<String>>,
    timeout: Duration,
    log_id: String,
    next_seq_at_open: u64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Counters shared by the handles and the writer thread.
#[derive(Default)]
struct Shared {
    /// Writes in progress (see [`Writing`]).
    writing: AtomicUsize,
    /// Requests in progress (see [`InFlight`]).
    in_flight: AtomicUsize,
    /// Records sent with a waiter and not yet taken by the writer.
    pending: AtomicUsize,
    /// Records made durable since start (checkpoints and outage records included).
    records: AtomicU64,
    /// Syncs since start.
    syncs: AtomicU64,
    /// Microseconds spent writing and syncing since start.
    sync_micros: AtomicU64,
}

/// What the writer has done since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// Records made durable.
    pub records: u64,
    /// fsyncs that made them durable (records / syncs is the group commit factor).
    pub syncs: u64,
    /// Microseconds spent writing and syncing (sync_micros / syncs: the mean per batch).
    pub sync_micros: u64,
}

/// A write in progress, from its durable intent ([`AuditLog::writing`]) until the writer
/// takes its outcome record ([`AuditLog::append_outcome`]) or the request is dropped.
pub struct Writing(Option<Arc<Shared>>);

impl Drop for Writing {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.writing.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Proof that the intent record of a write is durable: made only by
/// [`AuditLog::append_intent`], not `Clone`, and consumed by the write it allows
/// (`Vault::write`, `delete`, `rewrap`), so no write reaches the store unrecorded.
#[derive(Debug)]
#[must_use = "an intent is recorded for a write that must follow"]
pub struct Intent {
    seq: u64,
}

impl Intent {
    /// The sequence number of the intent record (0 when the log is disabled).
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

/// A request in progress, from [`AuditLog::begin`] until dropped.
pub struct InFlight(Option<Arc<Shared>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(shared) = &self.0 {
            shared.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

type Waiter = oneshot::Sender<Result<u64, String>>;

enum Msg {
    /// A record, who waits for it, and the write it ends.
    Append(Body, Option<Waiter>, Option<Writing>),
    Close(oneshot::Sender<Option<String>>),
}

impl AuditLog {
    /// Opens (or continues) the log of `config`, signing checkpoints with `key`. Checkpoint
    /// lines are sent to `checkpoints` as they are written, for the store.
    ///
    /// `stored` is every log's latest checkpoint kept in the store (see
    /// [`crate::store::Store::audit_checkpoints`]). Before writing anything the log is checked
    /// against it: a log that ends before its stored checkpoint, a stored checkpoint (or a
    /// genesis) that `key` did not sign, or a missing log where the store remembers one are
    /// refused, so that a deleted, cut or replaced log is not silently continued.
    pub fn open(
        config: &AuditConfig,
        key: SigningKey,
        checkpoints: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        stored: &[(String, Vec<u8>)],
    ) -> Result<Self, AuditError> {
        let (health, _) = watch::channel(None);
        let shared = Arc::new(Shared::default());
        let state =
            State::open(config, key, checkpoints, stored, health.clone(), Arc::clone(&shared))?;
        let log_id = state.log_id.clone();
        let next_seq_at_open = state.head.next_seq;
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || state.run(rx))
            .map_err(|e| AuditError::Open {
                path: config.path.display().to_string(),
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        let inner = Inner {
            tx,
            shared,
            health,
            timeout: config.timeout(),
            log_id,
            next_seq_at_open,
            thread: Mutex::new(Some(thread)),
        };
        Ok(Self { inner: Some(Arc::new(inner)) })
    }

    /// A log that records nothing (`audit.enabled = false`).
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// The log's id, `None` when disabled.
    pub fn log_id(&self) -> Option<&str> {
        self.inner.as_deref().map(|i| i.log_id.as_str())
    }

    /// The sequence number the next record would have had when the log was opened: the
    /// length of the chain found on disk (0 when disabled).
    pub fn next_seq_at_open(&self) -> u64 {
        self.inner.as_deref().map_or(0, |i| i.next_seq_at_open)
    }

    /// Marks a request in progress until the guard is dropped: while some request in
    /// progress has not sent its record yet, the writer holds a batch open for about one
    /// sync's time (a request alone is never held).
    pub fn begin(&self) -> InFlight {
        InFlight(self.inner.as_deref().map(|i| {
            i.shared.in_flight.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&i.shared)
        }))
    }

    /// Marks a write in progress, once its intent is durable: until its outcome record is
    /// handed over with [`AuditLog::append_outcome`] (or the guard is dropped), the writer
    /// holds batches open for up to the group commit window.
    pub fn writing(&self) -> Writing {
        Writing(self.inner.as_deref().map(|i| {
            i.shared.writing.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&i.shared)
        }))
    }

    /// What the writer has done since start (zeros when disabled).
    pub fn stats(&self) -> AuditStats {
        let zero = AuditStats { records: 0, syncs: 0, sync_micros: 0 };
        self.inner.as_deref().map_or(zero, |i| AuditStats {
            records: i.shared.records.load(Ordering::Relaxed),
            syncs: i.shared.syncs.load(Ordering::Relaxed),
            sync_micros: i.shared.sync_micros.load(Ordering::Relaxed),
        })
    }

    /// Why the log is failing now, if it is; `None` when healthy or disabled.
    pub fn failure(&self) -> Option<String> {
        self.inner.as_deref().and_then(|i| i.health.borrow().clone())
    }

    /// Changes of [`AuditLog::failure`]; `None` when disabled.
    pub fn watch(&self) -> Option<AuditHealth> {
        self.inner.as_deref().map(|i| i.health.subscribe())
    }

    /// Appends `record` and waits until it is durable; returns its sequence number (0 when
    /// disabled). Fails within the configured timeout if the log cannot be written.
    pub async fn append(&self, record: Record) -> Result<u64, AuditError> {
        self.append_ending(record, None).await
    }

    /// Appends the intent record of a write (its phase is set to intent) and waits until it
    /// is durable: the [`Intent`] the write needs.
    pub async fn append_intent(&self, mut record: Record) -> Result<Intent, AuditError> {
        record.phase = Some(super::Phase::Intent);
        self.append(record).await.map(|seq| Intent { seq })
    }

    /// Like [`AuditLog::append`], for the outcome record of the write `writing`.
    pub async fn append_outcome(
        &self,
        record: Record,
        writing: Writing,
    ) -> Result<u64, AuditError> {
        self.append_ending(record, Some(writing)).await
    }

    async fn append_ending(
        &self,
        record: Record,
        writing: Option<Writing>,
    ) -> Result<u64, AuditError> {
        let Some(inner) = self.inner.as_deref() else { return Ok(0) };
        let (tx, rx) = oneshot::channel();
        inner.shared.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = inner.send(Msg::Append(record.body(), Some(tx), writing)) {
            inner.shared.pending.fetch_sub(1, Ordering::Relaxed);
            return Err(e);
        }
        match tokio::time::timeout(inner.timeout, rx).await {
            Ok(Ok(Ok(seq))) => Ok(seq),
            Ok(Ok(Err(reason))) => Err(AuditError::Unavailable(reason)),
            Ok(Err(_)) => Err(AuditError::Unavailable("the audit writer stopped".into())),
            Err(_) => {
                let reason = format!("a record was not durable within {:?}", inner.timeout);
                inner.health.send_replace(Some(reason.clone()));
                Err(AuditError::Unavailable(reason))
            }
        }
    }

    /// Appends `record` without waiting (refused handshakes, and outcomes of requests
    /// already refused because the log failed).
    pub fn note(&self, record: Record) {
        if let Some(inner) = self.inner.as_deref() {
            let _ = inner.send(Msg::Append(record.body(), None, None));
        }
    }

    /// Writes a final checkpoint, stops the writer and returns the checkpoint line (also
    /// sent to the checkpoint channel). Waits at most the timeout for a hung disk.
    pub async fn close(&self) -> Option<String> {
        let inner = self.inner.as_deref()?;
        let (tx, rx) = oneshot::channel();
        inner.send(Msg::Close(tx)).ok()?;
        let last = tokio::time::timeout(inner.timeout, rx).await.ok().and_then(Result::ok)?;
        let thread = inner.thread.lock().ok()?.take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        last
    }
}

impl Inner {
    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        // After Close the writer thread has ended and dropped the receiver.
        self.tx.send(msg).map_err(|_| AuditError::Unavailable("the audit writer stopped".into()))
    }
}

/// A batch's outcome, for its waiters.
struct Done {
    waiters: Vec<Option<Waiter>>,
    result: Result<u64, String>,
}

impl Done {
    /// Tells each waiter its record's sequence number, or why the batch failed.
    fn send(self) {
        for (seq, w) in self.waiters.into_iter().enumerate() {
            if let Some(w) = w {
                let _ = w.send(
                    self.result.as_ref().map(|first| first + seq as u64).map_err(Clone::clone),
                );
            }
        }
    }
}

/// Records taken for one batch, with their waiters.
#[derive(Default)]
struct Batch {
    records: Vec<Body>,
    waiters: Vec<Option<Waiter>>,
    /// Records someone waits for.
    waiting: usize,
    close: Option<oneshot::Sender<Option<String>>>,
}

impl Batch {
    fn take(&mut self, msg: Msg, shared: &Shared) {
        match msg {
            // Dropping `writing` ends the write: its outcome is in hand.
            Msg::Append(r, w, _writing) => {
                if w.is_some() {
                    self.waiting += 1;
                    shared.pending.fetch_sub(1, Ordering::Relaxed);
                }
                self.records.push(r);
                self.waiters.push(w);
            }
            Msg::Close(done) => self.close = Some(done),
        }
    }

    /// True while the batch can take more.
    fn open(&self) -> bool {
        self.close.is_none() && self.records.len() < MAX_BATCH
    }
}

mod batch;
mod file;
mod resume;
#[cfg(test)]
mod tests;

use batch::{Head, State};
use file::random_id;
pub use file::rotated_name;
