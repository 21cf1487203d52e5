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

use std::{
    fs::{File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
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
    record::{Body, GENESIS_PREV, checkpoint_message, line_hash, now_rfc3339, write_line},
    verify::signed,
};
use crate::config::AuditConfig;

/// How often a failed log is retried while no request comes.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// How often the writer looks whether the writes it waits for have ended, during the group
/// commit window (it sleeps in between rather than waking for every record).
const GROUP_STEP: Duration = Duration::from_micros(100);
/// Most records written in one batch.
const MAX_BATCH: usize = 4096;
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
}

/// What the writer has done since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditStats {
    /// Records made durable.
    pub records: u64,
    /// fsyncs that made them durable (records / syncs is the group commit factor).
    pub syncs: u64,
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
        self.inner.as_deref().map_or(AuditStats { records: 0, syncs: 0 }, |i| AuditStats {
            records: i.shared.records.load(Ordering::Relaxed),
            syncs: i.shared.syncs.load(Ordering::Relaxed),
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

/// The end of the chain.
#[derive(Debug, Clone)]
struct Head {
    next_seq: u64,
    prev: String,
}

/// An outage in progress.
struct Outage {
    reason: String,
    since: String,
    refused: u64,
}

/// Everything the writer thread owns.
struct State {
    path: PathBuf,
    file: File,
    /// Identity of the open file, to notice removal or replacement.
    ino: (u64, u64),
    /// Durable length of the open file.
    len: u64,
    first_seq: u64,
    head: Head,
    log_id: String,
    key: SigningKey,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    max_file_bytes: u64,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    last_checkpoint_line: Option<String>,
    outage: Option<Outage>,
    checkpoints: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    health: watch::Sender<Option<String>>,
    group_commit: Duration,
    /// How long a write and sync take (a moving average).
    sync_time: Duration,
    shared: Arc<Shared>,
    /// The runtime task that answers waiters (see `open`).
    dispatch: Option<tokio::sync::mpsc::UnboundedSender<Done>>,
}

impl State {
    fn open(
        config: &AuditConfig,
        key: SigningKey,
        checkpoints: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        stored: &[(String, Vec<u8>)],
        health: watch::Sender<Option<String>>,
        shared: Arc<Shared>,
    ) -> Result<Self, AuditError> {
        let path = config.path.clone();
        let fail = |reason: String| AuditError::Open { path: path.display().to_string(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(|e| fail(format!("cannot create directory: {e}")))?;
        }
        let found = find_tail(&path).map_err(|e| fail(e.to_string()))?;
        let genesis_note =
            check_start(found.as_ref(), stored, &key, config.new_log).map_err(fail)?;
        let file = open_append(&path).map_err(|e| fail(e.to_string()))?;
        let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
        let mut state = Self {
            path: path.clone(),
            ino: (meta.dev(), meta.ino()),
            len: meta.len(),
            file,
            first_seq: 0,
            head: Head { next_seq: 0, prev: GENESIS_PREV.into() },
            log_id: String::new(),
            key,
            checkpoint_every: config.checkpoint_every,
            checkpoint_interval: config.checkpoint_interval(),
            max_file_bytes: config.max_file_bytes,
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            last_checkpoint_line: None,
            outage: None,
            checkpoints,
            health,
            group_commit: config.group_commit(),
            sync_time: Duration::ZERO,
            shared,
            dispatch: None,
        };
        // Answer waiters from a task of the runtime: one wakeup crosses threads per batch,
        // and the waiters are woken on a worker's own queue (promptly) rather than one by
        // one through the runtime's shared queue.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Done>();
            runtime.spawn(async move {
                while let Some(done) = rx.recv().await {
                    done.send();
                }
            });
            state.dispatch = Some(tx);
        }
        let first = match found {
            Some(Tail { head, log_id, first_seq, in_active: true, .. }) => {
                tracing::info!(log = %path.display(), next_seq = head.next_seq, %log_id, "audit log continues");
                (state.head, state.log_id, state.first_seq) = (head, log_id, first_seq);
                None
            }
            Some(Tail { head, log_id, .. }) => {
                tracing::warn!(log = %path.display(), "active audit log file missing; continuing the chain of the newest rotated file");
                (state.head, state.log_id) = (head, log_id);
                let mut r = Record::new(Kind::Continue);
                r.reason = Some("the active log file was missing at start".into());
                Some(r)
            }
            None => {
                state.log_id = random_id().map_err(|e| fail(e.to_string()))?;
                let mut r = Record::new(Kind::Genesis);
                r.pubkey = Some(state.key.verifying_key().to_string());
                r.reason = genesis_note;
                Some(r)
            }
        };
        if let Some(mut r) = first {
            r.log_id = Some(state.log_id.clone());
            state.first_seq = state.head.next_seq;
            state.write(&[&r.body()], false).map_err(|e| fail(format!("cannot write: {e}")))?;
        }
        Ok(state)
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            let wait = if self.outage.is_some() {
                PROBE_EVERY
            } else if self.since_checkpoint > 0 {
                self.checkpoint_interval.saturating_sub(self.last_checkpoint.elapsed())
            } else {
                Duration::from_secs(3600)
            };
            let first = match rx.recv_timeout(wait) {
                Ok(msg) => msg,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // A probe while failed, or a timed checkpoint.
                    let _ = self.commit(&[], true);
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.finish();
                    return;
                }
            };
            let mut batch = Batch::default();
            batch.take(first, &self.shared);
            let started = Instant::now();
            loop {
                while batch.open()
                    && let Ok(msg) = rx.try_recv()
                {
                    batch.take(msg, &self.shared);
                }
                let window = self.window(&batch);
                match (started + window).checked_duration_since(Instant::now()) {
                    Some(left) if batch.open() => std::thread::sleep(left.min(GROUP_STEP)),
                    _ => break,
                }
            }
            let Batch { records, waiters, close, .. } = batch;
            let result = self.commit(&records, false);
            let done = Done { waiters, result };
            match &self.dispatch {
                // Without the runtime (shutting down) the writer answers itself.
                Some(d) => {
                    if let Err(unsent) = d.send(done) {
                        unsent.0.send();
                    }
                }
                None => done.send(),
            }
            if let Some(done) = close {
                let _ = done.send(self.finish());
                return;
            }
        }
    }

    /// How long a batch may stay open: `group_commit` while writes are in progress; about
    /// one sync while other requests in progress have not sent their records yet; else 0.
    fn window(&self, batch: &Batch) -> Duration {
        if self.shared.writing.load(Ordering::Relaxed) > 0 {
            return self.group_commit;
        }
        let waited_for = batch.waiting + self.shared.pending.load(Ordering::Relaxed);
        if self.shared.in_flight.load(Ordering::Relaxed) > waited_for {
            return self.group_commit.min(self.sync_time);
        }
        Duration::ZERO
    }

    /// Writes `records` durably, with an outage record first if the log was failing and a
    /// checkpoint after them when one is due (`timed`: also when only time says so). Returns
    /// the sequence number of the first of `records`.
    fn commit(&mut self, records: &[Body], timed: bool) -> Result<u64, String> {
        if records.is_empty() && self.outage.is_none() && !(timed && self.checkpoint_due(0, true)) {
            return Ok(self.head.next_seq);
        }
        let result = self.check_file().and_then(|()| {
            let outage = self.outage.as_ref().map(|o| {
                let mut r = Record::new(Kind::Outage);
                (r.reason, r.since, r.refused) =
                    (Some(o.reason.clone()), Some(o.since.clone()), Some(o.refused));
                r.body()
            });
            let batch: Vec<&Body> = outage.iter().chain(records).collect();
            let due = self.checkpoint_due(batch.len() as u64, timed);
            let first = self.write(&batch, due)?;
            Ok(first + u64::from(outage.is_some()))
        });
        match result {
            Ok(first) => {
                if let Some(o) = self.outage.take() {
                    tracing::warn!(since = %o.since, refused = o.refused, "audit log writable again; service resumes");
                }
                if self.health.borrow().is_some() {
                    self.health.send_replace(None);
                }
                if self.len >= self.max_file_bytes {
                    if let Err(e) = self.rotate("rotation") {
                        tracing::error!(error = %e, "audit log rotation failed; retried on the next write");
                    }
                }
                Ok(first)
            }
            Err(e) => {
                let reason = e.to_string();
                match &mut self.outage {
                    Some(o) => o.refused += records.len() as u64,
                    None => {
                        tracing::error!(log = %self.path.display(), error = %reason, "audit log write failed; refusing requests until it is writable");
                        self.outage = Some(Outage {
                            reason: reason.clone(),
                            since: now_rfc3339(),
                            refused: records.len() as u64,
                        });
                    }
                }
                self.health.send_replace(Some(reason.clone()));
                Err(reason)
            }
        }
    }

    fn checkpoint_due(&self, adding: u64, timed: bool) -> bool {
        self.since_checkpoint + adding >= self.checkpoint_every
            || (timed
                && self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.checkpoint_interval)
    }

    /// Chains `records` (and a checkpoint if `checkpoint`), writes them in one write and
    /// syncs; returns the sequence number of the first. All lines of one write carry the
    /// same timestamp. On failure the file is cut back and the head is unchanged.
    fn write(&mut self, records: &[&Body], checkpoint: bool) -> io::Result<u64> {
        let mut head = self.head.clone();
        let first = head.next_seq;
        let ts = now_rfc3339();
        let size: usize = records.iter().map(|b| b.len() + 128).sum();
        let mut buf = Vec::with_capacity(size + if checkpoint { 512 } else { 0 });
        let chain = |body: &Body, buf: &mut Vec<u8>, head: &mut Head| {
            let start = buf.len();
            write_line(buf, head.next_seq, &ts, body, &head.prev);
            head.prev = line_hash(&buf[start..]);
            head.next_seq += 1;
            buf.push(b'\n');
            start..buf.len() - 1
        };
        for body in records {
            chain(body, &mut buf, &mut head);
        }
        let mut cp_line = None;
        if checkpoint {
            let mut cp = Record::new(Kind::Checkpoint);
            cp.log_id = Some(self.log_id.clone());
            let msg = checkpoint_message(&self.log_id, head.next_seq, &ts, &head.prev);
            cp.sig = Some(self.key.sign(&msg));
            let line = chain(&cp.body(), &mut buf, &mut head);
            cp_line = Some(String::from_utf8_lossy(&buf[line]).into_owned());
        }
        let syncing = Instant::now();
        let result = self.file.write_all(&buf).and_then(|()| self.file.sync_data());
        self.sync_time = (self.sync_time * 7 + syncing.elapsed()) / 8;
        if let Err(e) = result {
            // Cut back anything partly written, so the file ends with a whole durable line.
            let _ = self.file.set_len(self.len);
            let _ = self.file.seek(SeekFrom::Start(self.len));
            return Err(e);
        }
        self.len += buf.len() as u64;
        let written = records.len() as u64 + u64::from(cp_line.is_some());
        self.shared.records.fetch_add(written, Ordering::Relaxed);
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        self.since_checkpoint += records.len() as u64;
        self.head = head;
        if let Some(line) = cp_line {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
            let _ = self.checkpoints.send((self.log_id.clone(), line.clone()));
            self.last_checkpoint_line = Some(line);
        }
        Ok(first)
    }

    /// Notices a removed or replaced active file and starts a new one in its place.
    fn check_file(&mut self) -> io::Result<()> {
        let same = std::fs::metadata(&self.path).map(|m| (m.dev(), m.ino()) == self.ino);
        match same {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => {
                tracing::error!(log = %self.path.display(), "the audit log file was removed or replaced; starting a new file that continues the chain");
                self.start_file("the log file was removed or replaced")
            }
        }
    }

    /// Ends the active file with a checkpoint, renames it, and starts a new one.
    fn rotate(&mut self, reason: &str) -> io::Result<()> {
        if self.since_checkpoint > 0 || self.last_checkpoint_line.is_none() {
            self.write(&[], true)?;
        }
        let rotated = rotated_name(&self.path, self.first_seq);
        std::fs::rename(&self.path, &rotated)?;
        sync_dir(&self.path);
        tracing::info!(rotated = %rotated.display(), "audit log rotated");
        self.start_file(reason)
    }

    fn start_file(&mut self, reason: &str) -> io::Result<()> {
        let file = open_append(&self.path)?;
        let meta = file.metadata()?;
        (self.file, self.ino, self.len) = (file, (meta.dev(), meta.ino()), meta.len());
        sync_dir(&self.path);
        self.first_seq = self.head.next_seq;
        let mut r = Record::new(Kind::Continue);
        r.log_id = Some(self.log_id.clone());
        r.reason = Some(reason.into());
        self.write(&[&r.body()], false).map(drop)
    }

    /// The final checkpoint at shutdown.
    fn finish(&mut self) -> Option<String> {
        if self.since_checkpoint > 0 || self.last_checkpoint_line.is_none() {
            if let Err(e) = self.check_file().and_then(|()| self.write(&[], true)) {
                tracing::error!(error = %e, "cannot write the final audit checkpoint");
            }
        }
        self.last_checkpoint_line.clone()
    }
}

/// Where a rotated file goes.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(format!(".{first_seq:020}"));
    p.into()
}

/// The last whole line of the log found on disk.
struct Tail {
    head: Head,
    log_id: String,
    first_seq: u64,
    /// Found in the active file (else in the newest rotated one).
    in_active: bool,
    /// The public key named by the file's first line, when that is the genesis record.
    genesis_pubkey: Option<String>,
}

/// Checks the log found on disk (`found`) against the checkpoints the store keeps
/// (`stored`, of every log: replicas sharing a store each have their own) before anything
/// is written; returns what a new log's genesis record notes (`Some` when a new log begins,
/// with `new_log`, although the store keeps checkpoints signed by `key`).
fn check_start(
    found: Option<&Tail>,
    stored: &[(String, Vec<u8>)],
    key: &SigningKey,
    new_log: bool,
) -> Result<Option<String>, String> {
    let public = key.verifying_key();
    let Some(tail) = found else {
        // No log here. Checkpoints that this key signed are of a log that was here (or of a
        // replica sharing the key); other replicas' logs are none of this gateway's business.
        let mine: Vec<String> = stored
            .iter()
            .filter_map(|(id, line)| Record::parse(line).ok().map(|r| (id, r)))
            .filter(|(_, r)| r.kind() == Kind::Checkpoint && signed(&public, r))
            .map(|(id, r)| format!("{id} (seq {})", r.seq))
            .collect();
        if mine.is_empty() {
            return Ok(None);
        }
        let logs = mine.join(", ");
        if !new_log {
            return Err(format!(
                "no audit log here, but the store keeps checkpoints that audit.signing_key \
                 signed, of audit log {logs}: the log was deleted or moved, or audit.path \
                 changed. Put the log files back; or, to begin a new log on purpose (or for a \
                 new replica that shares this key), start once with audit.new_log = true \
                 (SECRETGATE_AUDIT_NEW_LOG=true): its genesis record then names the logs left \
                 behind"
            ));
        }
        tracing::warn!(previous = %logs, "audit.new_log: beginning a new audit log; the store keeps checkpoints of others");
        return Ok(Some(format!(
            "begun with audit.new_log; the store keeps checkpoints of {logs}"
        )));
    };
    if let Some(named) = &tail.genesis_pubkey {
        if *named != public.to_string() {
            return Err(format!(
                "audit.signing_key is not this log's key: its genesis record names public key \
                 {named}, the configured key's is {public}. Configure the log's own key; to \
                 change keys, move the log aside (it stays verifiable with its key) and begin a \
                 new one with audit.new_log = true"
            ));
        }
    }
    if let Some((_, line)) = stored.iter().find(|(id, _)| *id == tail.log_id) {
        let cp = Record::parse(line).map_err(|e| {
            format!(
                "the checkpoint the store keeps for this log ({}) cannot be read ({e}); the \
                 store was damaged or tampered with. Restore the store from a backup",
                tail.log_id
            )
        })?;
        let last = tail.head.next_seq.saturating_sub(1);
        if cp.seq >= tail.head.next_seq {
            return Err(format!(
                "the log ends at seq {last} but the store holds a checkpoint at seq {}: it was \
                 cut short or replaced. Keep it as evidence, move it aside (with its rotated \
                 files) and begin a new log with audit.new_log = true",
                cp.seq
            ));
        }
        if cp.kind() != Kind::Checkpoint || !signed(&public, &cp) {
            return Err(format!(
                "the checkpoint the store keeps for this log (seq {}) is not signed by \
                 audit.signing_key ({public}): the key is not this log's, or the store was \
                 tampered with",
                cp.seq
            ));
        }
    }
    Ok(None)
}

/// Finds where the chain ends: the active file, else the newest rotated file. Cuts a torn
/// last line off the active file.
fn find_tail(path: &Path) -> io::Result<Option<Tail>> {
    if let Some(tail) = file_tail(path, true)? {
        return Ok(Some(Tail { in_active: true, ..tail }));
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Ok(None) };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{}.", name.to_string_lossy());
    let mut rotated: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_prefix(&prefix))
                    .is_some_and(|s| s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    rotated.sort();
    match rotated.last() {
        Some(newest) => file_tail(newest, false),
        None => Ok(None),
    }
}

/// The head after the last whole line of `path` and the log id from its first line; `None`
/// for a missing or empty file. `repair`: cut a torn last line off.
fn file_tail(path: &Path, repair: bool) -> io::Result<Option<Tail>> {
    let invalid = |what: String| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
    };
    let mut file = match OpenOptions::new().read(true).write(repair).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity((len - start) as usize);
    file.read_to_end(&mut tail)?;
    let whole = tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    if whole < tail.len() {
        if !repair {
            return Err(invalid("ends with a torn line".into()));
        }
        let keep = start + whole as u64;
        tracing::warn!(log = %path.display(), cut = len - keep, "audit log ends with a torn line (a crash mid-write, never acknowledged); cutting it off");
        file.set_len(keep)?;
        file.sync_data()?;
        if keep == 0 {
            return Ok(None);
        }
    }
    let body = &tail[..whole];
    let body = body.strip_suffix(b"\n").unwrap_or(body);
    let last = body.rsplit(|&b| b == b'\n').next().unwrap_or_default();
    let record =
        Record::parse(last).map_err(|e| invalid(format!("last line is not a record: {e}")))?;
    file.seek(SeekFrom::Start(0))?;
    let mut first = Vec::new();
    std::io::BufRead::read_until(
        &mut io::BufReader::new(&mut file).take(TAIL_BYTES),
        b'\n',
        &mut first,
    )?;
    let first = Record::parse(first.strip_suffix(b"\n").unwrap_or(&first))
        .map_err(|e| invalid(format!("first line is not a record: {e}")))?;
    let log_id =
        first.log_id.clone().ok_or_else(|| invalid("first line names no log id".into()))?;
    let genesis_pubkey = if first.kind() == Kind::Genesis { first.pubkey.clone() } else { None };
    Ok(Some(Tail {
        head: Head { next_seq: record.seq + 1, prev: line_hash(last) },
        log_id,
        first_seq: first.seq,
        in_active: false,
        genesis_pubkey,
    }))
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().append(true).create(true).mode(0o600).open(path)
}

fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Makes a rename or create in `path`'s directory durable (best effort).
fn sync_dir(path: &Path) {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

fn random_id() -> io::Result<String> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(hex::encode(id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::VerifyingKey;

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig {
            path: dir.join("audit/audit.log"),
            checkpoint_every: 10,
            ..AuditConfig::default()
        }
    }

    fn open(
        config: &AuditConfig,
    ) -> (AuditLog, VerifyingKey, tokio::sync::mpsc::UnboundedReceiver<(String, String)>) {
        // The log's own key, kept beside its directory, so that a reopened log is signed by
        // it again.
        let path = config.path.parent().unwrap().with_extension("key");
        let key = match SigningKey::load(&path) {
            Ok(key) => key,
            Err(_) => {
                let key = SigningKey::generate().unwrap();
                key.save(&path).unwrap();
                key
            }
        };
        let public = key.verifying_key();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (AuditLog::open(config, key, tx, &[]).unwrap(), public, rx)
    }

    fn request(n: usize) -> Record {
        let mut r = Record::new(Kind::Request);
        r.path = Some(format!("/r/{n}"));
        r
    }

    /// Every line's `prev` is the hash of the line before; seqs count up by one.
    fn assert_chained(lines: &[&str], first_prev: &str) -> Vec<Record> {
        let mut prev = first_prev.to_owned();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let r = Record::parse(line.as_bytes()).unwrap();
            assert_eq!(r.prev, prev, "line {i}");
            if let Some(before) = out.last() {
                let before: &Record = before;
                assert_eq!(r.seq, before.seq + 1, "line {i}");
            }
            prev = line_hash(line.as_bytes());
            out.push(r);
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_chained_durable_and_checkpointed() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let (log, public, mut checkpoints) = open(&config);
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let log = log.clone();
                tokio::spawn(async move { log.append(request(n)).await.unwrap() })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap());
        }
        // Durable when append returns: the file already holds every record.
        let text = std::fs::read_to_string(&config.path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let records = assert_chained(&lines, GENESIS_PREV);
        assert_eq!(records[0].kind(), Kind::Genesis);
        assert_eq!(records[0].pubkey.as_deref(), Some(public.to_string().as_str()));
        for seq in &seqs {
            assert_eq!(records[*seq as usize].kind(), Kind::Request);
        }
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(seqs.len(), 200);
        let cps: Vec<&Record> = records.iter().filter(|r| r.kind() == Kind::Checkpoint).collect();
        // One checkpoint ends each batch in which 10 more records arrived (a batch is
        // written and synced as a whole).
        assert!(!cps.is_empty());
        let log_id = log.log_id().unwrap().to_owned();
        for cp in &cps {
            let msg = checkpoint_message(&log_id, cp.seq, &cp.ts, &cp.prev);
            assert!(public.verify(&msg, cp.sig.as_deref().unwrap()), "checkpoint {}", cp.seq);
        }
        let (id, sent) = checkpoints.recv().await.unwrap();
        assert_eq!(id, log_id);
        assert!(lines.contains(&sent.as_str()), "the stored checkpoint is a line of the log");
        let last = log.close().await.unwrap();
        assert_eq!(
            std::fs::read_to_string(&config.path).unwrap().lines().last(),
            Some(last.as_str())
        );
    }

    #[tokio::test]
    async fn reopening_cuts_a_torn_line_and_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let (log, _, _rx) = open(&config);
        for n in 0..3 {
            log.append(request(n)).await.unwrap();
        }
        log.close().await.unwrap();
        let before = std::fs::read_to_string(&config.path).unwrap();
        // A crash mid-write leaves part of a line that was never acknowledged.
        std::fs::write(&config.path, format!("{before}{{\"seq\":99,\"ts\":\"2026")).unwrap();
        let (log, _, _rx) = open(&config);
        assert_eq!(log.next_seq_at_open(), before.lines().count() as u64);
        let seq = log.append(request(9)).await.unwrap();
        assert_eq!(seq, before.lines().count() as u64);
        log.close().await.unwrap();
        let text = std::fs::read_to_string(&config.path).unwrap();
        assert!(text.starts_with(&before) && text.ends_with('\n'));
        assert_chained(&text.lines().collect::<Vec<_>>(), GENESIS_PREV);
    }

    #[tokio::test]
    async fn rotation_and_a_removed_file_continue_the_chain_in_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig { max_file_bytes: 4000, ..config(dir.path()) };
        let (log, _, _rx) = open(&config);
        for n in 0..60 {
            log.append(request(n)).await.unwrap();
        }
        let saved = std::fs::read_to_string(&config.path).unwrap();
        std::fs::remove_file(&config.path).unwrap();
        log.append(request(60)).await.unwrap();
        log.close().await.unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(config.path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p != &config.path)
            .collect();
        files.sort();
        assert!(files.len() >= 2, "rotated at 4000 bytes: {files:?}");
        let mut all = String::new();
        for f in &files {
            let text = std::fs::read_to_string(f).unwrap();
            let first = Record::parse(text.lines().next().unwrap().as_bytes()).unwrap();
            assert!(f.to_string_lossy().ends_with(&format!(".{:020}", first.seq)), "{f:?}");
            let last = Record::parse(text.lines().last().unwrap().as_bytes()).unwrap();
            assert_eq!(last.kind(), Kind::Checkpoint, "a rotated file ends with a checkpoint");
            all.push_str(&text);
        }
        let new = std::fs::read_to_string(&config.path).unwrap();
        let first = Record::parse(new.lines().next().unwrap().as_bytes()).unwrap();
        assert_eq!(first.kind(), Kind::Continue);
        assert!(first.reason.as_deref().unwrap().contains("removed"), "{first:?}");
        all.push_str(&saved);
        all.push_str(&new);
        let records = assert_chained(&all.lines().collect::<Vec<_>>(), GENESIS_PREV);
        assert_eq!(records.iter().filter(|r| r.kind() == Kind::Request).count(), 61);
    }

    fn windowed(dir: &Path) -> AuditConfig {
        AuditConfig { group_commit_us: 100_000, ..config(dir) }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lone_request_is_not_held_for_the_group_commit_window() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _rx) = open(&windowed(dir.path()));
        let before = log.stats();
        let started = Instant::now();
        for n in 0..5 {
            let _request = log.begin();
            log.append(request(n)).await.unwrap();
        }
        // Five windows would take 500 ms; each record went out on its own at once.
        assert!(started.elapsed() < Duration::from_millis(250), "{:?}", started.elapsed());
        let after = log.stats();
        assert_eq!(after.syncs - before.syncs, 5);
        assert_eq!(after.records - before.records, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_in_progress_holds_the_batch_until_its_outcome_comes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _rx) = open(&windowed(dir.path()));
        let before = log.stats();
        let writing = log.writing();
        let started = Instant::now();
        let held = {
            let log = log.clone();
            tokio::spawn(async move { (log.append(request(0)).await.unwrap(), started.elapsed()) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let outcome = log.append_outcome(request(1), writing).await.unwrap();
        let (seq, waited) = held.await.unwrap();
        // One sync covered both: the first record waited for the write's outcome, and no
        // longer (the window is 100 ms).
        assert_eq!(outcome, seq + 1);
        assert_eq!(log.stats().syncs - before.syncs, 1);
        assert!(waited >= Duration::from_millis(15), "{waited:?}");
        assert!(waited < Duration::from_millis(90), "{waited:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_never_ends_holds_records_for_one_window_only() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _, _rx) = open(&windowed(dir.path()));
        let _writing = log.writing();
        for n in 0..2 {
            let started = Instant::now();
            log.append(request(n)).await.unwrap();
            let waited = started.elapsed();
            assert!(waited >= Duration::from_millis(90), "{waited:?}");
            assert!(waited < Duration::from_millis(1000), "{waited:?}");
        }
    }

    #[tokio::test]
    async fn a_disabled_log_accepts_everything_and_names_no_log() {
        let log = AuditLog::disabled();
        assert_eq!(log.append(request(0)).await.unwrap(), 0);
        assert!(log.log_id().is_none() && log.failure().is_none() && log.close().await.is_none());
    }

    /// A checkpoint line of log `log_id` at `seq`, signed by `key`.
    fn checkpoint_line(key: &SigningKey, log_id: &str, seq: u64) -> Vec<u8> {
        let mut r = Record::new(Kind::Checkpoint);
        (r.seq, r.ts, r.prev) = (seq, now_rfc3339(), line_hash(b"x"));
        r.log_id = Some(log_id.into());
        r.sig = Some(key.sign(&checkpoint_message(log_id, seq, &r.ts, &r.prev)));
        r.to_line().into_bytes()
    }

    fn tail(log_id: &str, next_seq: u64, genesis: Option<&SigningKey>) -> Tail {
        Tail {
            head: Head { next_seq, prev: line_hash(b"y") },
            log_id: log_id.into(),
            first_seq: 0,
            in_active: true,
            genesis_pubkey: genesis.map(|k| k.verifying_key().to_string()),
        }
    }

    #[test]
    fn a_log_is_checked_against_the_stored_checkpoints_before_it_is_continued() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let stored = vec![("log-1".to_owned(), checkpoint_line(&key, "log-1", 40))];
        // Its own key, a checkpoint behind the end: continues.
        assert_eq!(
            check_start(Some(&tail("log-1", 50, Some(&key))), &stored, &key, false),
            Ok(None)
        );
        assert_eq!(check_start(Some(&tail("log-1", 41, None)), &stored, &key, false), Ok(None));
        // No checkpoint stored for it, or none at all: continues.
        assert_eq!(check_start(Some(&tail("log-2", 3, None)), &stored, &key, false), Ok(None));
        assert_eq!(check_start(Some(&tail("log-1", 3, None)), &[], &key, false), Ok(None));
        assert_eq!(check_start(None, &[], &key, false), Ok(None));

        let refused = |found: Option<&Tail>, stored: &[(String, Vec<u8>)], key, new_log| {
            check_start(found, stored, key, new_log).expect_err("refused")
        };
        // Ends at or before the stored checkpoint.
        let e = refused(Some(&tail("log-1", 40, None)), &stored, &key, false);
        assert!(e.contains("ends at seq 39 ") && e.contains("checkpoint at seq 40"), "{e}");
        // The genesis names another key (whatever the store holds).
        let e = refused(Some(&tail("log-1", 50, Some(&key))), &[], &other, false);
        assert!(e.contains("not this log's key"), "{e}");
        // No genesis in the active file (rotated): the stored checkpoint's signature tells.
        let e = refused(Some(&tail("log-1", 50, None)), &stored, &other, false);
        assert!(e.contains("not signed by audit.signing_key"), "{e}");
        // A stored line that is not a checkpoint is no proof either.
        let mut req = Record::new(Kind::Request);
        (req.seq, req.log_id) = (40, Some("log-1".into()));
        let fake = vec![("log-1".to_owned(), req.to_line().into_bytes())];
        let e = refused(Some(&tail("log-1", 50, None)), &fake, &key, false);
        assert!(e.contains("not signed"), "{e}");
        // An unreadable stored checkpoint of this log is refused, not taken as seq 0.
        let broken = vec![("log-1".to_owned(), b"{\"seq\":".to_vec())];
        let e = refused(Some(&tail("log-1", 50, None)), &broken, &key, false);
        assert!(e.contains("cannot be read") && e.contains("log-1"), "{e}");
        // No log, but the store keeps a checkpoint this key signed: refused unless a new log
        // is asked for.
        let e = refused(None, &stored, &key, false);
        assert!(e.contains("no audit log here") && e.contains("log-1 (seq 40)"), "{e}");
        let note = check_start(None, &stored, &key, true).unwrap().unwrap();
        assert!(note.contains("log-1 (seq 40)"), "{note}");
        // Other replicas' logs (other keys), and lines that prove nothing, do not stop a new
        // replica's first start.
        let others = [stored.clone(), broken, fake].concat();
        assert_eq!(check_start(None, &others, &other, false), Ok(None));
    }
}
