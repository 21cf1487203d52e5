//! Connections to the etcd members, and how one request is tried and judged.
//!
//! Each member gets its own connection, and the gateway picks the member for each try
//! itself: the leader, while it is known and has not recently failed a try, else round
//! robin over the members not recently failed. The leader answers a linearizable read
//! without asking another member for the read index, and takes a write without forwarding
//! it (measured on the 3-member test cluster: a get 0.1 ms sooner, a compare-and-set write
//! about a tenth less etcd CPU); which member leads is asked every [`LEADER_CHECK`] and
//! after a try on it failed (`leader.rs`). tonic's balanced channel is not used on purpose:
//! it keeps offering a dead member, whose connection error makes it look ready and idle, so
//! a killed member would fail a third of all requests. Here a
//! member that fails a try (refused, no answer, no leader) sits out for a cool-down, and
//! the retry goes to another one.

use std::{
    future::Future,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, KvClient, LeaseClient, MaintenanceClient,
    TlsOptions,
};
use tokio::{sync::OnceCell, time::Instant};
use tonic::Code;
use zeroize::Zeroizing;

use crate::{
    config::EtcdConfig,
    store::{StoreError, StoreStatus},
};

/// Largest etcd response accepted (a value is at most 16 MiB, see `limits.max_value_bytes`).
const MAX_RESPONSE_BYTES: usize = 32 << 20;
/// [`Members::leader`] when no member is known to lead.
pub(super) const NO_LEADER: usize = usize::MAX;
/// How often the gateway asks which member leads (and after a try on the leader failed).
pub(super) const LEADER_CHECK: Duration = Duration::from_secs(2);
/// Pause before the second try; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// The cluster's members and the rules for trying a request on them.
pub(super) struct Members {
    members: Vec<Member>,
    options: ConnectOptions,
    next: AtomicUsize,
    /// The member that leads, as last learned ([`NO_LEADER`]: not known).
    pub(super) leader: AtomicUsize,
    /// Wakes the leader check early (a try on the leader failed).
    pub(super) recheck: Arc<tokio::sync::Notify>,
    /// How long one try may take: a third of the operation's time, so a try stuck on a
    /// paused member leaves time for two more elsewhere.
    share: Duration,
}

pub(super) struct Member {
    pub(super) url: String,
    /// Connected on first use: without a user this never waits, with one it authenticates.
    conn: OnceCell<Conn>,
    /// The same for leases (the replica registry), on a connection of its own.
    lease: OnceCell<LeaseClient>,
    /// Not picked before this instant unless every member is cooling down.
    cool_until: Mutex<Option<Instant>>,
    /// Whether its last try answered (for metrics); true until one fails.
    answered: AtomicBool,
}

/// One member's connection: its KV requests and its status requests (which member leads).
pub(super) struct Conn {
    kv: KvClient,
    pub(super) maintenance: MaintenanceClient,
}

/// Why one try failed, and what that means for retrying.
#[derive(Debug)]
pub(super) enum Failure {
    /// The member has no leader: nothing was applied; the cluster has no quorum right now.
    NoLeader(String),
    /// The request never reached a member (refused connection, failed handshake); retry.
    NotSent(String),
    /// A member refused the request before applying anything (overloaded, compacted); retry.
    Refused(String),
    /// The request may have reached etcd; a write may or may not apply. Retry.
    Unknown(String),
    /// A final answer: not retried.
    Done(StoreError),
}

/// What the failed tries of one operation have shown so far.
#[derive(Default)]
pub(super) struct Trouble {
    no_leader: bool,
    /// Some member answered (with a refusal), so members are reachable and have a leader.
    answered: bool,
    /// A write may have reached etcd without an answer: it may have applied.
    pub(super) maybe_applied: bool,
    tries: u32,
    last: String,
}

impl Members {
    /// Prepares TLS, credentials and one (lazy) connection per endpoint.
    pub(super) fn new(config: &EtcdConfig) -> Result<Self, StoreError> {
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read_pem(&config.ca)?));
        if !config.cert.as_os_str().is_empty() {
            let key = Zeroizing::new(read_pem(&config.key)?);
            tls = tls.identity(Identity::from_pem(read_pem(&config.cert)?, key.as_slice()));
        }
        let share = (config.timeout() / 3).max(Duration::from_millis(100));
        let tick = (config.timeout() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut options = ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(tick)
            .with_keep_alive(tick, tick)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true)
            .with_auto_token_refresh(true);
        if let Some(password) = config.password.expose() {
            options = options.with_user(config.username.as_str(), password);
        }
        let members = config
            .endpoints
            .iter()
            .map(|url| Member {
                url: url.clone(),
                conn: OnceCell::new(),
                lease: OnceCell::new(),
                cool_until: Mutex::new(None),
                answered: AtomicBool::new(true),
            })
            .collect();
        Ok(Self {
            members,
            options,
            next: AtomicUsize::new(0),
            leader: AtomicUsize::new(NO_LEADER),
            recheck: Arc::default(),
            share,
        })
    }

    /// One try of `request` on one member, bounded by [`Members::share`] and by `deadline`.
    /// A member that fails the try cools down, so the next try goes elsewhere.
    pub(super) async fn attempt<T, F, Fut>(
        &self,
        deadline: Instant,
        request: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let member = self.pick();
        let until = deadline.min(Instant::now() + self.share);
        let result = tokio::time::timeout_at(until, async {
            let conn = self.connection(member).await;
            request(conn.map_err(classify)?.kv.clone()).await.map_err(classify)
        })
        .await
        .unwrap_or_else(|_| Err(Failure::Unknown(format!("no answer within {:?}", self.share))));
        member.answered.store(result.is_ok(), Ordering::Relaxed);
        result.map_err(|f| {
            self.cool(&member.url);
            f.at(&member.url)
        })
    }

    /// One try of a lease request, like [`Members::attempt`] (no cool-down: the registry
    /// tries again on its own schedule).
    pub(super) async fn lease_attempt<T, F, Fut>(
        &self,
        deadline: Instant,
        request: F,
    ) -> Result<T, Failure>
    where
        F: FnOnce(LeaseClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let member = self.pick();
        let until = deadline.min(Instant::now() + self.share);
        let connect = || async {
            let client = Client::connect([member.url.as_str()], Some(self.options.clone())).await?;
            Ok::<_, etcd_client::Error>(client.lease_client())
        };
        tokio::time::timeout_at(until, async {
            let lease = member.lease.get_or_try_init(connect).await;
            request(lease.map_err(classify)?.clone()).await.map_err(classify)
        })
        .await
        .unwrap_or_else(|_| Err(Failure::Unknown(format!("no answer within {:?}", self.share))))
        .map_err(|f| f.at(&member.url))
    }

    /// The members, in configuration order.
    pub(super) fn all(&self) -> &[Member] {
        &self.members
    }

    /// How long one try may take.
    pub(super) fn share(&self) -> Duration {
        self.share
    }

    /// Member `m`'s connection for requests and status, opened on first use.
    pub(super) async fn connection<'m>(
        &self,
        m: &'m Member,
    ) -> Result<&'m Conn, etcd_client::Error> {
        let connect = || async {
            // `options` is never formatted: its Debug output includes the password.
            let client = Client::connect([m.url.as_str()], Some(self.options.clone())).await?;
            let kv = client.kv_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
            Ok(Conn { kv, maintenance: client.maintenance_client() })
        };
        m.conn.get_or_try_init(connect).await
    }

    /// A watch of `key` with `options` on the next member in turn that is not cooling down,
    /// on a connection of its own; with that member's URL. A member whose watch fails or
    /// stalls can be cooled down with [`Members::cool`], so the next watch goes elsewhere.
    pub(super) async fn watch(
        &self,
        key: &str,
        options: etcd_client::WatchOptions,
    ) -> (String, Result<etcd_client::WatchStream, etcd_client::Error>) {
        let member = self.pick();
        let watch = async {
            let client = Client::connect([member.url.as_str()], Some(self.options.clone())).await?;
            let mut watch = client.watch_client().max_decoding_message_size(MAX_RESPONSE_BYTES);
            watch.watch(key, Some(options)).await
        };
        let result = tokio::time::timeout(self.share, watch).await.unwrap_or_else(|_| {
            Err(etcd_client::Error::WatchError(format!("no answer within {:?}", self.share)))
        });
        (member.url.clone(), result)
    }

    /// `cache`'s status with each member's URL and whether its last try answered, and the
    /// URL of the member known to lead.
    pub(super) fn status(&self, cache: StoreStatus) -> StoreStatus {
        let health = |m: &Member| (m.url.clone(), m.answered.load(Ordering::Relaxed));
        let leader = self.members.get(self.leader.load(Ordering::Relaxed));
        StoreStatus {
            members: self.members.iter().map(health).collect(),
            leader: leader.map(|m| m.url.clone()),
            ..cache
        }
    }

    /// Lets member `url` sit out the next picks (a try or its watch failed or stalled); if
    /// it was the leader, which member leads is asked again at once.
    pub(super) fn cool(&self, url: &str) {
        if let Some(i) = self.members.iter().position(|m| m.url == url) {
            let m = &self.members[i];
            *m.cool_until.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Instant::now() + 3 * self.share);
            m.answered.store(false, Ordering::Relaxed);
            if self.leader.load(Ordering::Relaxed) == i {
                self.recheck.notify_one();
            }
        }
    }

    /// The next member in turn that is not cooling down; if all are, the next in turn.
    /// How many members there are.
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    fn pick(&self) -> &Member {
        let now = Instant::now();
        let ready = |m: &Member| {
            m.cool_until.lock().unwrap_or_else(|e| e.into_inner()).is_none_or(|t| t <= now)
        };
        if let Some(leader) = self.members.get(self.leader.load(Ordering::Relaxed)) {
            if ready(leader) {
                return leader;
            }
        }
        let n = self.members.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let ready = (0..n).map(|k| &self.members[(first + k) % n]).find(|m| ready(m));
        // Config validation guarantees at least one endpoint, so `first % n` is in range.
        ready.unwrap_or(&self.members[first % n])
    }
}

impl Failure {
    fn at(self, url: &str) -> Self {
        match self {
            Self::NoLeader(m) => Self::NoLeader(format!("{url}: {m}")),
            Self::NotSent(m) => Self::NotSent(format!("{url}: {m}")),
            Self::Refused(m) => Self::Refused(format!("{url}: {m}")),
            Self::Unknown(m) => Self::Unknown(format!("{url}: {m}")),
            done => done,
        }
    }
}

/// Runs `once` until it succeeds, fails for good, or `timeout` is up. `write`: a try that
/// may have reached etcd may have applied.
pub(super) async fn retry<T, F, Fut>(
    op: &str,
    timeout: Duration,
    write: bool,
    mut once: F,
) -> Result<T, StoreError>
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let deadline = Instant::now() + timeout;
    let mut trouble = Trouble::default();
    loop {
        match once(deadline).await {
            Ok(v) => return Ok(v),
            Err(f) => trouble.note(f, write)?,
        }
        trouble.pause(deadline).await.map_err(|()| trouble.give_up(op, timeout))?;
    }
}

impl Trouble {
    /// Records a failed try (`sent`: it was a write that may have reached etcd); a final
    /// failure is returned as the operation's error.
    pub(super) fn note(&mut self, failure: Failure, sent: bool) -> Result<(), StoreError> {
        self.tries += 1;
        self.last = match failure {
            Failure::Done(e) => return Err(e),
            Failure::NoLeader(m) => {
                self.no_leader = true;
                m
            }
            Failure::NotSent(m) => m,
            Failure::Refused(m) => {
                self.answered = true;
                m
            }
            Failure::Unknown(m) => {
                self.maybe_applied |= sent;
                m
            }
        };
        tracing::debug!(tries = self.tries, error = %self.last, "etcd request failed; retrying");
        Ok(())
    }

    /// Waits before the next try (none before the second: it goes to another member);
    /// `Err` if the deadline leaves no time for one.
    pub(super) async fn pause(&self, deadline: Instant) -> Result<(), ()> {
        let backoff = match self.tries {
            0 | 1 => Duration::ZERO,
            n => FIRST_BACKOFF.saturating_mul(1 << (n - 2).min(4)).min(MAX_BACKOFF),
        };
        if Instant::now() + backoff >= deadline {
            return Err(());
        }
        tokio::time::sleep(backoff).await;
        Ok(())
    }

    /// The operation's error once its time is up. Without a leader, or without any member
    /// answering in time, the gateway cannot reach a quorum: that is what it reports.
    pub(super) fn give_up(&self, op: &str, timeout: Duration) -> StoreError {
        let (tries, last) = (self.tries, &self.last);
        if self.maybe_applied {
            StoreError::OutcomeUnknown(format!(
                "etcd {op}: no confirmation within {timeout:?} after {tries} tries; the write \
                 may still be applied (last error: {last})"
            ))
        } else if self.no_leader {
            StoreError::NoQuorum(format!(
                "etcd {op}: the cluster has no leader, so the store has no quorum ({last})"
            ))
        } else if !self.answered {
            StoreError::NoQuorum(format!(
                "etcd {op}: no member answered within {timeout:?} after {tries} tries, so no \
                 quorum is reachable (last error: {last})"
            ))
        } else {
            StoreError::Unavailable(format!(
                "etcd {op}: refused for {timeout:?} after {tries} tries (last error: {last})"
            ))
        }
    }
}

/// Sorts an etcd client error by what it means for a retry.
fn classify(e: etcd_client::Error) -> Failure {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => classify_status(&s),
        E::TransportError(t) => Failure::NotSent(format!("transport: {t}")),
        E::IoError(io) => Failure::Unknown(format!("I/O: {io}")),
        other => Failure::Done(StoreError::Backend(format!("etcd client: {other}"))),
    }
}

fn classify_status(s: &tonic::Status) -> Failure {
    let msg = s.message();
    let text = format!("{:?}: {msg}", s.code());
    if msg.contains("no leader") {
        return Failure::NoLeader(text);
    }
    match s.code() {
        Code::Unauthenticated | Code::PermissionDenied => Failure::Done(StoreError::Backend(
            format!("etcd refused the gateway's credentials: {text}"),
        )),
        Code::InvalidArgument | Code::FailedPrecondition | Code::Unimplemented => {
            Failure::Done(StoreError::Backend(text))
        }
        Code::ResourceExhausted if msg.contains("space") => Failure::Done(StoreError::Unavailable(
            format!("etcd is out of space (NOSPACE alarm): {text}"),
        )),
        // "too many requests" and "revision compacted" are refusals before anything applied.
        Code::ResourceExhausted | Code::OutOfRange => Failure::Refused(text),
        Code::Unavailable if is_connect_error(msg) => Failure::NotSent(text),
        _ => Failure::Unknown(text),
    }
}

/// Whether tonic failed to open a connection (so the request was never sent).
fn is_connect_error(msg: &str) -> bool {
    ["error trying to connect", "tcp connect error", "Connection refused", "connection refused"]
        .iter()
        .any(|m| msg.contains(m))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, StoreError> {
    std::fs::read(path).map_err(|e| StoreError::Backend(format!("reading {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, msg: &str) -> Failure {
        classify(etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg)))
    }

    #[test]
    fn refusals_before_sending_are_told_apart_from_unknown_outcomes() {
        assert!(matches!(status(Code::Unavailable, "etcdserver: no leader"), Failure::NoLeader(_)));
        assert!(matches!(status(Code::Unavailable, "tcp connect error"), Failure::NotSent(_)));
        assert!(matches!(
            status(Code::Unavailable, "etcdserver: request timed out"),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            status(Code::Unavailable, "etcdserver: leader changed"),
            Failure::Unknown(_)
        ));
        assert!(matches!(
            status(Code::InvalidArgument, "etcdserver: request is too large"),
            Failure::Done(StoreError::Backend(_))
        ));
        assert!(matches!(
            status(Code::ResourceExhausted, "etcdserver: mvcc: database space exceeded"),
            Failure::Done(StoreError::Unavailable(_))
        ));
    }

    #[test]
    fn an_unanswered_write_is_an_unknown_outcome_not_a_failure() {
        let mut t = Trouble::default();
        t.note(Failure::NoLeader("no leader".into()), true).unwrap();
        assert!(matches!(t.give_up("put", Duration::from_secs(1)), StoreError::NoQuorum(_)));
        t.note(Failure::Unknown("no answer".into()), false).unwrap();
        assert!(matches!(t.give_up("get", Duration::from_secs(1)), StoreError::NoQuorum(_)));
        let mut busy = Trouble::default();
        busy.note(Failure::Refused("too many requests".into()), false).unwrap();
        assert!(matches!(busy.give_up("get", Duration::from_secs(1)), StoreError::Unavailable(_)));
        t.note(Failure::Unknown("no answer".into()), true).unwrap();
        assert!(matches!(t.give_up("put", Duration::from_secs(1)), StoreError::OutcomeUnknown(_)));
    }
}
