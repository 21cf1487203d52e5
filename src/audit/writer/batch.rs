//! The writer thread's loop: take a batch, wait out the group commit window, write it with
//! one sync, answer its waiters; checkpoints, outages and the final checkpoint at shutdown.

use super::*;

/// The end of the chain.
#[derive(Debug, Clone)]
pub(super) struct Head {
    pub(super) next_seq: u64,
    pub(super) prev: String,
}

/// An outage in progress.
pub(super) struct Outage {
    pub(super) reason: String,
    pub(super) since: String,
    pub(super) refused: u64,
}

/// Everything the writer thread owns.
pub(super) struct State {
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Identity of the open file, to notice removal or replacement.
    pub(super) ino: (u64, u64),
    /// Durable length of the open file.
    pub(super) len: u64,
    pub(super) first_seq: u64,
    pub(super) head: Head,
    pub(super) log_id: String,
    pub(super) key: SigningKey,
    pub(super) checkpoint_every: u64,
    pub(super) checkpoint_interval: Duration,
    pub(super) max_file_bytes: u64,
    pub(super) since_checkpoint: u64,
    pub(super) last_checkpoint: Instant,
    pub(super) last_checkpoint_line: Option<String>,
    pub(super) outage: Option<Outage>,
    pub(super) checkpoints: tokio::sync::mpsc::UnboundedSender<(String, String)>,
    pub(super) health: watch::Sender<Option<String>>,
    pub(super) group_commit: Duration,
    /// How long a write and sync take (a moving average).
    pub(super) sync_time: Duration,
    pub(super) shared: Arc<Shared>,
    /// The runtime task that answers waiters (see `open`).
    pub(super) dispatch: Option<tokio::sync::mpsc::UnboundedSender<Done>>,
    /// Set for the final checkpoint of a clean stop, which says so.
    pub(super) stopping: bool,
}

impl State {
    pub(super) fn run(mut self, rx: mpsc::Receiver<Msg>) {
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
                crate::metrics::audit_failed();
                let reason = e.to_string();
                match &mut self.outage {
                    Some(o) => o.refused += records.len() as u64,
                    None => {
                        tracing::error!(log = %self.path.display(), error = %reason, "audit log write failed; refusing requests until it is writable");
                        self.outage = Some(Outage {
                            reason: reason.clone(),
                            since: crate::clock::now_rfc3339_millis(),
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

    /// The final checkpoint at shutdown.
    fn finish(&mut self) -> Option<String> {
        // Always a final checkpoint, marked as such: at the next start, a log whose stored
        // checkpoint is a final one must end with it (nothing may be added while stopped).
        self.stopping = true;
        if let Err(e) = self.check_file().and_then(|()| self.write(&[], true)) {
            tracing::error!(error = %e, "cannot write the final audit checkpoint");
        }
        self.last_checkpoint_line.clone()
    }
}
