//! Prometheus metrics (OpenMetrics text on `GET /metrics`, its own listener: `[metrics]`).
//!
//! Two kinds, one exposition:
//! - **Events** (requests, decisions, audit writes, store calls, refused handshakes,
//!   throttled requests, refused reloads) are counted where they happen, in one
//!   process-wide set of families ([`Metrics`]): a gateway is one process.
//! - **State** (the audit log's fail-closed state, the cache, etcd members, the keyring and
//!   policy in force, certificate and CRL times, open connections) is read from the running
//!   gateway at each scrape ([`scrape`]), so it is never stale and a value that no longer
//!   exists (an old policy version) is not reported.
//!
//! The endpoint has no client authentication, so no label carries a principal, a secret
//! path or anything a client chose: labels are method names, status codes, actions and
//! other closed sets (also what keeps their number bounded). Client certificate expiry is
//! an aggregate (a histogram of remaining lifetimes at handshake, the soonest expiry among
//! open connections), never per client.
//!
//! Recording can be switched off at run time ([`set_recording`], for the benchmark that
//! measures what metrics cost).

pub mod scrape;
mod serve;

use std::{
    collections::BTreeMap,
    sync::{
        LazyLock, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

pub use serve::{MetricsServer, serve};

/// The process's event metrics; see the module docs.
pub struct Metrics {
    registry: Registry,
    requests: Family<Rpc, Counter>,
    latency: Family<Method, Histogram, fn() -> Histogram>,
    decisions: Family<Decided, Counter>,
    audit_records: Counter,
    audit_sync: Histogram,
    audit_failures: Counter,
    store_latency: Family<Op, Histogram, fn() -> Histogram>,
    store_errors: Family<OpError, Counter>,
    etcd_request_puts: Histogram,
    handshakes_refused: Family<Reason, Counter>,
    rate_limited: Family<ClassLabel, Counter>,
    reload_failures: Family<What, Counter>,
    client_cert_lifetime: Histogram,
    watch_events: Family<Handled, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Handled {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rpc {
    method: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Method {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Decided {
    action: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Op {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpError {
    op: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct What {
    what: &'static str,
}

/// Why a connection was refused before it could send a request (the `reason` label of
/// `secretgate_handshakes_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Silent or slow: no ClientHello, no PROXY header or no finished handshake in time.
    Timeout,
    /// Dropped unfinished to make room (the handshake budget or the per-source cap).
    Dropped,
    /// The TLS handshake failed (no, wrong, expired or revoked certificate; bad protocol).
    Tls,
    /// Closed by the client before its ClientHello.
    Closed,
    /// A malformed or refused PROXY protocol header.
    Proxy,
    /// `limits.max_connections` open already.
    ConnectionLimit,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Dropped => "dropped",
            Self::Tls => "tls",
            Self::Closed => "closed",
            Self::Proxy => "proxy",
            Self::ConnectionLimit => "connection_limit",
        }
    }
}

/// Seconds, from 100 µs doubling to about 3.3 s: request, store and fsync latency.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
static RECORDING: AtomicBool = AtomicBool::new(true);

/// Certificates of open connections by expiry (Unix seconds → count), for the soonest.
static OPEN: LazyLock<Mutex<BTreeMap<i64, usize>>> = LazyLock::new(Default::default);

/// Turns recording of event metrics on or off (on by default). Off, the families stay and
/// stop counting; state read at scrape is unaffected. For measuring what metrics cost.
pub fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

fn recording() -> Option<&'static Metrics> {
    RECORDING.load(Ordering::Relaxed).then(|| &*METRICS)
}

impl Metrics {
    fn new() -> Self {
        let m = Self {
            registry: Registry::default(),
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_buckets),
            decisions: Family::default(),
            audit_records: Counter::default(),
            audit_sync: latency_buckets(),
            audit_failures: Counter::default(),
            store_latency: Family::new_with_constructor(latency_buckets),
            store_errors: Family::default(),
            etcd_request_puts: Histogram::new(exponential_buckets(1.0, 2.0, 6)),
            handshakes_refused: Family::default(),
            rate_limited: Family::default(),
            reload_failures: Family::default(),
            watch_events: Family::default(),
            // 1 hour to 2 years.
            client_cert_lifetime: Histogram::new(
                [3600.0, 6.0 * 3600.0, 86400.0, 7.0 * 86400.0, 30.0 * 86400.0, 90.0 * 86400.0]
                    .into_iter()
                    .chain([365.0 * 86400.0, 730.0 * 86400.0]),
            ),
        };
        let mut r = Registry::with_prefix("secretgate");
        r.register("requests", "RPCs answered, by method and gRPC status code", m.requests.clone());
        r.register_with_unit(
            "request_duration",
            "Time from admission to answer, by method",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions, by action and result (allow, deny, filtered)",
            m.decisions.clone(),
        );
        r.register(
            "audit_records",
            "Audit records made durable (checkpoints included)",
            m.audit_records.clone(),
        );
        r.register_with_unit(
            "audit_fsync_duration",
            "Time to write and fsync one batch of audit records",
            Unit::Seconds,
            m.audit_sync.clone(),
        );
        r.register(
            "audit_write_failures",
            "Audit batches that could not be written (requests are refused meanwhile)",
            m.audit_failures.clone(),
        );
        r.register_with_unit(
            "store_request_duration",
            "Time of store calls, by operation",
            Unit::Seconds,
            m.store_latency.clone(),
        );
        r.register(
            "store_errors",
            "Store calls that failed, by operation and error (not found and conflicts are answers, not errors)",
            m.store_errors.clone(),
        );
        r.register(
            "etcd_write_request_puts",
            "Puts sent in one etcd request (concurrent puts go together, see docs/etcd.md)",
            m.etcd_request_puts.clone(),
        );
        r.register(
            "handshakes_refused",
            "Connections refused before their first request, by reason",
            m.handshakes_refused.clone(),
        );
        r.register(
            "rate_limited",
            "Requests refused by a rate limit (rate_limits.toml), by class",
            m.rate_limited.clone(),
        );
        r.register(
            "reload_failures",
            "Reloads refused (the last good version stays in force), by what",
            m.reload_failures.clone(),
        );
        r.register_with_unit(
            "client_cert_remaining_lifetime",
            "Remaining lifetime of client certificates at handshake",
            Unit::Seconds,
            m.client_cert_lifetime.clone(),
        );
        r.register(
            "watch_events",
            "Changes handled by Watch streams: sent, or skipped because the caller may not read them",
            m.watch_events.clone(),
        );
        Self { registry: r, ..m }
    }
}

/// An RPC answered with `code` after `elapsed`.
pub fn rpc(method: &'static str, code: tonic::Code, elapsed: Duration) {
    if let Some(m) = recording() {
        m.requests.get_or_create(&Rpc { method, code: code_label(code) }).inc();
        m.latency.get_or_create(&Method { method }).observe(elapsed.as_secs_f64());
    }
}

/// An authorization decision on `action`: `allow`, `deny` or `filtered` (List).
pub fn decision(action: &'static str, result: &'static str) {
    if let Some(m) = recording() {
        m.decisions.get_or_create(&Decided { action, result }).inc();
    }
}

/// `records` audit records written and synced in `took`.
pub fn audit_written(records: u64, took: Duration) {
    if let Some(m) = recording() {
        m.audit_records.inc_by(records);
        m.audit_sync.observe(took.as_secs_f64());
    }
}

/// An etcd request carried `puts` puts (more than one: combined).
pub fn etcd_write_request(puts: usize) {
    if let Some(m) = recording() {
        m.etcd_request_puts.observe(puts as f64);
    }
}

/// An audit batch failed to be written.
pub fn audit_failed() {
    if let Some(m) = recording() {
        m.audit_failures.inc();
    }
}

/// A store call `op` that took `elapsed` and failed with `error` (a label), if it did.
pub fn store_call(op: &'static str, elapsed: Duration, error: Option<&'static str>) {
    if let Some(m) = recording() {
        m.store_latency.get_or_create(&Op { op }).observe(elapsed.as_secs_f64());
        if let Some(error) = error {
            m.store_errors.get_or_create(&OpError { op, error }).inc();
        }
    }
}

/// A connection refused before its first request.
pub fn handshake_refused(why: Refusal) {
    if let Some(m) = recording() {
        m.handshakes_refused.get_or_create(&Reason { reason: why.label() }).inc();
    }
}

/// A request of `class` refused by a rate limit.
pub fn rate_limited(class: &'static str) {
    if let Some(m) = recording() {
        m.rate_limited.get_or_create(&ClassLabel { class }).inc();
    }
}

/// A reload of `what` (keyring, policy, server certificate, client trust) refused.
pub fn reload_failed(what: &'static str) {
    if let Some(m) = recording() {
        m.reload_failures.get_or_create(&What { what }).inc();
    }
}

/// Watch streams open now (state, kept whether recording or not).
static WATCH_STREAMS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// A Watch stream opened (`1`) or ended (`-1`).
pub fn watchers_changed(delta: i64) {
    WATCH_STREAMS.fetch_add(delta, Ordering::Relaxed);
}

/// Watch streams open now.
fn watch_streams() -> i64 {
    WATCH_STREAMS.load(Ordering::Relaxed)
}

/// A Watch stream sent `sent` changes and skipped `skipped` its caller may not read.
pub fn watch_events(sent: u64, skipped: u64) {
    if let Some(m) = recording() {
        for (result, n) in [("sent", sent), ("skipped", skipped)] {
            if n > 0 {
                m.watch_events.get_or_create(&Handled { result }).inc_by(n);
            }
        }
    }
}

/// An open client connection, counted while it lives; made at the end of a handshake.
#[derive(Debug)]
pub struct OpenConnection {
    expires: i64,
}

impl OpenConnection {
    /// Counts a connection whose client certificate expires at `expires`.
    pub fn new(expires: SystemTime) -> Self {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
        };
        let expires = secs(expires);
        if let Some(m) = recording() {
            let left = expires.saturating_sub(secs(SystemTime::now())).max(0);
            m.client_cert_lifetime.observe(left as f64);
        }
        *open().entry(expires).or_default() += 1;
        Self { expires }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = open();
        if let Some(n) = open.get_mut(&self.expires) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.expires);
            }
        }
    }
}

fn open() -> std::sync::MutexGuard<'static, BTreeMap<i64, usize>> {
    // Counts only: a panic elsewhere leaves nothing inconsistent.
    OPEN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Open client connections, and the soonest expiry (Unix seconds) of their certificates.
fn connections() -> (i64, Option<i64>) {
    let open = open();
    (open.values().sum::<usize>() as i64, open.keys().next().copied())
}

/// The gRPC status code's name as the label (`OK`, `PERMISSION_DENIED`, …).
fn code_label(code: tonic::Code) -> &'static str {
    crate::api::code_name(code)
}

#[cfg(test)]
mod tests;
