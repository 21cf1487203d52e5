//! `Secrets.Watch`: change events under a prefix, authorized one by one.
//!
//! A stream is a [`Watcher`]: a position in the store's change feed ([`Changes`], one ring
//! shared by every stream, so a stream holds no buffer of its own and memory stays bounded
//! however slowly its caller reads), the caller's identity and prefix, and counts. Each
//! time tonic asks for the next message, the watcher checks, in this order: that the
//! connection's certificate is still trusted (else UNAUTHENTICATED), that the policy in
//! force still lets the caller read something under the prefix (else PERMISSION_DENIED),
//! and that the gateway is not shutting down (else UNAVAILABLE); then it takes the next
//! batch of changes and, unless more than `watch.max_lag_events` would still be left
//! after it (the caller reads too slowly: RESOURCE_EXHAUSTED), sends those the caller may
//! read, each decided against the policy in force at that moment, skipping (and counting)
//! the rest.
//! Waiting, it wakes for new changes, for the heartbeat, and for shutdown.
//!
//! Audit: one record when the stream opens (durable before the first message: fail closed)
//! and one when it ends, with the counts of changes sent and skipped, never one per change,
//! so a watcher cannot make the log grow with every hidden write.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_stream::Stream;

use super::{ApiError, Call, timestamp};
use crate::{
    authz::{Action, Authorizer},
    config::WatchConfig,
    identity::Principal,
    path::PathPrefix,
    proto::v1,
    store::{ChangeEvent, ChangeKind, Changes, Since},
};

/// How long opening a stream waits for a store's change feed that is still starting.
const FEED_START: Duration = Duration::from_secs(10);
/// Changes looked at per message at most.
const BATCH: usize = 256;
/// A message stops taking events past this many bytes (at the end of a revision), well
/// under the smallest encoding limit a gateway can have (`limits.max_value_bytes` + 16 KiB).
const MESSAGE_BYTES: usize = 8 * 1024;

/// The stream a Watch answers with.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchResponse, tonic::Status>> + Send>>;

/// The gateway's watch streams: their limits, the count per principal, and the shutdown
/// signal that ends them all.
#[derive(Clone)]
pub struct Watchers {
    inner: Arc<Shared>,
}

struct Shared {
    heartbeat: Duration,
    max_per_principal: usize,
    max_lag: usize,
    open: Mutex<HashMap<String, usize>>,
    shutdown: watch::Sender<bool>,
}

/// A slot of a principal's watch streams, given back when the stream ends.
struct Slot {
    shared: Arc<Shared>,
    principal: String,
}

impl Watchers {
    /// Watch streams limited by `config`.
    pub fn new(config: &WatchConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                heartbeat: config.heartbeat_secs.secs(),
                max_per_principal: config.max_per_principal.get() as usize,
                max_lag: config.max_lag_events.get() as usize,
                open: Mutex::default(),
                shutdown: watch::channel(false).0,
            }),
        }
    }

    /// Ends every stream (UNAVAILABLE, with the revision to resume from): the gateway is
    /// shutting down, and they must not hold its grace period.
    pub fn shut_down(&self) {
        self.inner.shutdown.send_replace(true);
    }

    fn slot(&self, principal: &Principal) -> Result<Slot, ApiError> {
        let mut open = self.inner.lock();
        let n = open.entry(principal.to_string()).or_default();
        if *n >= self.inner.max_per_principal {
            return Err(ApiError::TooManyWatchers {
                principal: principal.to_string(),
                limit: self.inner.max_per_principal,
            });
        }
        *n += 1;
        crate::metrics::watchers_changed(1);
        Ok(Slot { shared: Arc::clone(&self.inner), principal: principal.to_string() })
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // Counts only: a panic elsewhere leaves nothing inconsistent.
        self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.shared.lock();
        if let Some(n) = open.get_mut(&self.principal) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.principal);
            }
        }
        crate::metrics::watchers_changed(-1);
    }
}

/// One open stream; see the module docs.
pub(super) struct Watcher {
    /// `Some` from [`Watcher::start`] until the stream has ended (its outcome recorded).
    call: Option<Call>,
    changes: Arc<Changes>,
    head: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    authz: Authorizer,
    principal: Principal,
    prefix: PathPrefix,
    /// Every change up to here has been sent or skipped.
    cursor: u64,
    /// The head when the last message went out or the stream began waiting: changes after
    /// it arrived while the caller was not being served (see [`Watcher::next`]).
    asked_at: u64,
    sent: u64,
    skipped: u64,
    heartbeat: Duration,
    max_lag: usize,
    next_heartbeat: Instant,
    _slot: Slot,
}

impl Watcher {
    /// Checks a Watch request and opens its stream: the prefix, a `read` grant under it,
    /// the caller's stream limit, and that `from_revision` can still be resumed from.
    pub(super) async fn open(
        call: &mut Call,
        watchers: &Watchers,
        authz: &Authorizer,
        changes: Arc<Changes>,
        req: &v1::WatchRequest,
    ) -> Result<Self, ApiError> {
        let prefix = PathPrefix::parse(&req.prefix)?;
        let id = call.identity()?;
        call.filtered(Action::Read);
        let principal = id.principal.clone();
        if !authz.may_read_under(&principal, &prefix) {
            return Err(ApiError::NothingToWatch {
                principal: principal.to_string(),
                prefix: prefix.as_str().to_owned(),
            });
        }
        // etcd's feed is ready once it knows where its history starts (not compacted away).
        let deadline = tokio::time::Instant::now() + FEED_START;
        if !changes.ready(deadline).await {
            return Err(ApiError::Unavailable);
        }
        let cursor = match req.from_revision {
            0 => changes.head(),
            from => match changes.since(from, 0) {
                Since::Gone(start) => return Err(ApiError::ResyncRequired { from, start }),
                Since::Events(..) => from,
            },
        };
        let slot = watchers.slot(&principal)?;
        let shared = &watchers.inner;
        Ok(Self {
            call: None,
            head: changes.subscribe(),
            asked_at: changes.head(),
            changes,
            shutdown: shared.shutdown.subscribe(),
            authz: authz.clone(),
            principal,
            prefix,
            cursor,
            sent: 0,
            skipped: 0,
            heartbeat: shared.heartbeat,
            max_lag: shared.max_lag,
            next_heartbeat: Instant::now() + shared.heartbeat,
            _slot: slot,
        })
    }

    /// Starts the stream once its opening is recorded: it owns the request's context from
    /// here on, and records its outcome when it ends.
    pub(super) fn start(mut self, call: Call) -> Self {
        self.call = Some(call);
        self
    }

    /// The stream tonic sends: one message per call of [`Watcher::next`] until it ends.
    pub(super) fn into_stream(self) -> WatchStream {
        Box::pin(futures_util::stream::unfold(self, |mut w| async move {
            w.next().await.map(|item| (item, w))
        }))
    }

    /// The next message, the ending error, or `None` once ended.
    async fn next(&mut self) -> Option<Result<v1::WatchResponse, tonic::Status>> {
        self.call.as_ref()?;
        loop {
            // Slow: more changes arrived while the caller was not being served (since the
            // last message went out, or since this call began waiting, when the transport
            // stopped polling it) than it may fall behind by. Distance alone is not
            // slowness: a stream resumed from far back catches up a batch per message.
            if self.changes.behind(self.asked_at) > self.max_lag {
                let (limit, resume) = (self.max_lag, self.cursor);
                return Some(Err(self.end(ApiError::WatcherTooSlow { limit, resume })));
            }
            if let Some(end) = self.check() {
                return Some(Err(self.end(end)));
            }
            self.head.borrow_and_update();
            match self.changes.since(self.cursor, BATCH) {
                Since::Gone(start) => {
                    let from = self.cursor;
                    return Some(Err(self.end(ApiError::ResyncRequired { from, start })));
                }
                Since::Events(events, upto) => {
                    let found = !events.is_empty();
                    let (visible, upto) = self.visible(&events, upto);
                    self.cursor = upto;
                    if !visible.is_empty() {
                        self.next_heartbeat = Instant::now() + self.heartbeat;
                        self.asked_at = self.changes.head();
                        return Some(Ok(v1::WatchResponse { events: visible, revision: upto }));
                    }
                    if found {
                        continue;
                    }
                }
            }
            // Nothing to send: wait for new changes, shutdown or the heartbeat (at least
            // every heartbeat, the checks above run again).
            self.asked_at = self.changes.head();
            tokio::select! {
                _ = self.head.changed() => {}
                _ = self.shutdown.changed() => {}
                () = tokio::time::sleep_until(self.next_heartbeat) => {
                    self.next_heartbeat = Instant::now() + self.heartbeat;
                    return Some(Ok(v1::WatchResponse { events: Vec::new(), revision: self.cursor }));
                }
            }
        }
    }

    /// Why the stream must end now, if it must.
    fn check(&self) -> Option<ApiError> {
        let resume = self.cursor;
        let call = self.call.as_ref()?;
        if let Err(e) = call.identity() {
            return Some(match e {
                ApiError::CertificateNotAccepted(why) => ApiError::WatchUntrusted { why, resume },
                other => other,
            });
        }
        if !self.authz.may_read_under(&self.principal, &self.prefix) {
            return Some(ApiError::NothingToWatch {
                principal: self.principal.to_string(),
                prefix: self.prefix.as_str().to_owned(),
            });
        }
        if *self.shutdown.borrow() {
            return Some(ApiError::ShuttingDown { resume });
        }
        None
    }

    /// The events under the prefix that the caller may read now, counting the others, up
    /// to about [`MESSAGE_BYTES`] (whole revisions); and the revision they go up to (`upto`
    /// when they are all taken).
    fn visible(&mut self, events: &[Arc<ChangeEvent>], upto: u64) -> (Vec<v1::WatchEvent>, u64) {
        let mut out = Vec::new();
        let (mut bytes, mut skipped, mut upto) = (0, 0, upto);
        for (i, e) in events.iter().enumerate() {
            if bytes >= MESSAGE_BYTES && i > 0 && events[i - 1].revision != e.revision {
                upto = events[i - 1].revision;
                break;
            }
            if !e.path.starts_with(&self.prefix) {
                continue;
            }
            if self.authz.allows_any(&self.principal, &e.path, &[Action::Read]) {
                let m = event_message(e);
                bytes += prost::Message::encoded_len(&m) + 4;
                out.push(m);
            } else {
                skipped += 1;
            }
        }
        self.sent += out.len() as u64;
        self.skipped += skipped;
        crate::metrics::watch_events(out.len() as u64, skipped);
        (out, upto)
    }

    /// Records the stream's outcome (with its counts) and gives the status to end it with.
    fn end(&mut self, why: ApiError) -> tonic::Status {
        match self.close(Err(why)) {
            Some(status) => status,
            None => tonic::Status::internal("stream already ended"),
        }
    }

    fn close(&mut self, result: Result<(), ApiError>) -> Option<tonic::Status> {
        let mut call = self.call.take()?;
        call.summary(format!(
            "watch ended after revision {}: {} changes sent, {} skipped (not readable)",
            self.cursor, self.sent, self.skipped
        ));
        // The caller has no answer to wait for: the record goes in as the log takes it.
        call.finish_unwaited(result).err()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The caller went away (or the connection did) while the stream was open.
        let _ = self.close(Err(ApiError::StreamClosed));
    }
}

fn event_message(e: &ChangeEvent) -> v1::WatchEvent {
    let kind = match e.kind {
        ChangeKind::Written => v1::ChangeKind::Written,
        ChangeKind::Deleted => v1::ChangeKind::Deleted,
        ChangeKind::Undeleted => v1::ChangeKind::Undeleted,
        ChangeKind::Destroyed => v1::ChangeKind::Destroyed,
    };
    v1::WatchEvent {
        path: e.path.as_str().to_owned(),
        version: e.version,
        kind: kind.into(),
        revision: e.revision,
        time: Some(timestamp(e.time)),
    }
}
