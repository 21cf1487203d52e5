//! The accept loop: TCP accept → bounded TLS handshake → identity → hand to tonic.
//!
//! Each handshake runs in its own task with a deadline (and a shorter one for its first
//! byte). Handshakes in progress have their own budget and a per-source cap
//! ([`super::pending`]): the oldest pending one makes room for a new connection, never the
//! other way round, so silent or dripping connections cannot lock real clients out.
//! `limits.max_connections` bounds the connections whose handshake completed.
//!
//! Refused handshakes are recorded in the audit log one by one up to a rate
//! ([`REFUSALS_PER_SEC`], bursts of [`REFUSAL_BURST`]); beyond it they are counted, and one
//! summary record per second gives the count. Anyone who can reach the port can cause a
//! refusal, so without the limit a flood of garbage connections would fill the disk, and a
//! full disk stops the gateway (the log fails closed).

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use rustls::pki_types::CertificateDer;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use super::{ConnTrust, TrustHandle, Untrusted, pending::Pending};
use crate::{
    audit::{AuditLog, Kind, Record},
    identity::PeerIdentity,
};

/// Refused handshakes recorded one by one per second, on average.
pub const REFUSALS_PER_SEC: u32 = 50;
/// Refused handshakes recorded one by one in a burst.
pub const REFUSAL_BURST: u32 = 200;
/// How often a count of refusals over the limit is written.
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// Facts about a connection, available to every request on it as a request extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer_addr: SocketAddr,
    /// The verified identity of the client certificate.
    pub identity: Arc<PeerIdentity>,
    /// The certificate chain, checked against the client trust in force.
    pub trust: Arc<ConnTrust>,
}

impl ConnInfo {
    /// Whether the connection's certificate is still accepted by the client trust in force
    /// (see [`ConnTrust::check`]).
    pub fn check(&self) -> Result<(), Untrusted> {
        self.trust.check()
    }
}

/// One authenticated client connection.
pub struct TlsConnection {
    stream: TlsStream<TcpStream>,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

/// The stream of authenticated connections tonic serves. Dropping it stops accepting.
pub struct TlsIncoming {
    rx: mpsc::Receiver<TlsConnection>,
    task: JoinHandle<()>,
    summaries: JoinHandle<()>,
    refusals: Arc<Refusals>,
}

impl TlsIncoming {
    /// Starts accepting on `listener`; each handshake uses the client trust in force when
    /// it starts (see [`ConnInfo::trust`]).
    pub fn new(
        listener: TcpListener,
        trust: TrustHandle,
        limits: HandshakeLimits,
        max_connections: usize,
        audit: AuditLog,
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(max_connections));
        let refusals = Arc::new(Refusals::new(audit));
        let pending = Arc::new(Pending::new(limits.budget, limits.per_source));
        let task = tokio::spawn(accept_loop(
            listener,
            trust,
            limits,
            Accepted { slots, tx, refusals: Arc::clone(&refusals), pending },
        ));
        let summaries = {
            let refusals = Arc::clone(&refusals);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SUMMARY_EVERY);
                loop {
                    tick.tick().await;
                    refusals.summarize();
                }
            })
        };
        Self { rx, task, summaries, refusals }
    }
}

/// How handshakes are bounded (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct HandshakeLimits {
    /// The whole handshake's deadline.
    pub timeout: Duration,
    /// The deadline for the client's first byte.
    pub first_byte: Duration,
    /// Handshakes in progress at most.
    pub budget: usize,
    /// Handshakes in progress per source address at most; 0 for no cap.
    pub per_source: usize,
}

/// Where the accept loop's connections go.
struct Accepted {
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<TlsConnection>,
    refusals: Arc<Refusals>,
    pending: Arc<Pending>,
}

/// Records refused handshakes, one by one up to the rate (a token bucket), then as counts.
struct Refusals {
    audit: AuditLog,
    state: std::sync::Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Refusals over the limit not yet in a summary record.
    over: u64,
    /// When the first of them happened, and its peer and reason (an example for auditors).
    first: Option<(String, SocketAddr, String)>,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Self { tokens: f64::from(REFUSAL_BURST), refilled: now, over: 0, first: None }
    }

    /// True if a refusal now may be recorded one by one; else it is counted.
    fn take(&mut self, now: Instant, peer: SocketAddr, reason: &str) -> bool {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + earned * f64::from(REFUSALS_PER_SEC)).min(f64::from(REFUSAL_BURST));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return true;
        }
        self.over += 1;
        self.first
            .get_or_insert_with(|| (crate::clock::now_rfc3339_millis(), peer, reason.to_owned()));
        false
    }

    /// The count of refusals over the limit since the last summary, with the first of them.
    fn summary(&mut self) -> Option<(u64, (String, SocketAddr, String))> {
        let first = self.first.take()?;
        Some((std::mem::take(&mut self.over), first))
    }
}

impl Refusals {
    fn new(audit: AuditLog) -> Self {
        Self { audit, state: std::sync::Mutex::new(Bucket::new(Instant::now())) }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // The bucket holds counts only: a panic elsewhere leaves nothing inconsistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn refused(&self, peer: SocketAddr, reason: &str) {
        if !self.bucket().take(Instant::now(), peer, reason) {
            return;
        }
        tracing::info!(peer = %peer, %reason, "TLS handshake refused");
        // Recorded without waiting: nothing was granted, so nothing waits on it.
        self.audit.note(refusal_record(peer, reason.chars().take(300).collect()));
    }

    /// Writes the count of refusals over the limit, if there were any since the last time.
    fn summarize(&self) {
        let Some((count, (since, peer, reason))) = self.bucket().summary() else { return };
        tracing::warn!(count, %since, first_peer = %peer, "TLS handshakes refused over the recording limit; counted, not recorded one by one");
        let reason: String = reason.chars().take(300).collect();
        let mut r = refusal_record(
            peer,
            format!(
                "{count} refused handshakes over the limit of {REFUSALS_PER_SEC} per second \
                 were counted, not recorded one by one; the first, from this peer: {reason}"
            ),
        );
        (r.since, r.refused) = (Some(since), Some(count));
        self.audit.note(r);
    }
}

/// The `handshake` record of a refusal from `peer`.
fn refusal_record(peer: SocketAddr, reason: String) -> Record {
    let mut r = Record::new(Kind::Handshake);
    r.peer = Some(peer.to_string());
    r.decision = Some(crate::authz::Effect::Deny);
    r.status = Some("UNAUTHENTICATED".into());
    r.reason = Some(reason);
    r
}

async fn accept_loop(
    listener: TcpListener,
    trust: TrustHandle,
    limits: HandshakeLimits,
    to: Accepted,
) {
    let to = Arc::new(to);
    loop {
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (handle, current) = (Arc::clone(&trust), trust.current());
        let task_to = Arc::clone(&to);
        let dropped = to.pending.admit(peer_addr, |id| {
            tokio::spawn(async move {
                let to = task_to;
                let acceptor = TlsAcceptor::from(current.config());
                let result = handshake(acceptor, tcp, peer_addr, limits).await;
                to.pending.done(id);
                match result {
                    Ok((stream, identity, chain)) => {
                        let Ok(slot) = Arc::clone(&to.slots).try_acquire_owned() else {
                            let why = "too many open connections (limits.max_connections)";
                            to.refusals.refused(peer_addr, why);
                            return;
                        };
                        tracing::debug!(peer = %peer_addr, principal = %identity.principal, "client connected");
                        let trust =
                            Arc::new(ConnTrust::new(handle, current, chain, identity.expires));
                        let info = ConnInfo { peer_addr, identity: Arc::new(identity), trust };
                        // A closed channel means the server is shutting down: drop it.
                        let _ = to.tx.send(TlsConnection { stream, info, _slot: slot }).await;
                    }
                    Err(reason) => to.refusals.refused(peer_addr, &reason),
                }
            })
            .abort_handle()
        });
        for peer in dropped {
            to.refusals.refused(
                peer,
                "handshake dropped unfinished to make room for a newer connection \
                 (limits.max_handshakes, limits.max_handshakes_per_source)",
            );
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    limits: HandshakeLimits,
) -> Result<(TlsStream<TcpStream>, PeerIdentity, Vec<CertificateDer<'static>>), String> {
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    // A client that says nothing is dropped early: its ClientHello is its first packet.
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.first_byte, tcp.peek(&mut first)).await {
        Err(_) => return Err(format!("no ClientHello within {:?}", limits.first_byte)),
        Ok(Ok(0)) => return Err("closed before its ClientHello".into()),
        Ok(Err(e)) => return Err(e.to_string()),
        Ok(Ok(_)) => {}
    }
    let left = limits.timeout.saturating_sub(started.elapsed());
    let stream = tokio::time::timeout(left, acceptor.accept(tcp))
        .await
        .map_err(|_| format!("handshake not completed within {:?}", limits.timeout))?
        .map_err(|e| e.to_string())?;
    let chain = stream.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
    let leaf = chain.first().ok_or_else(|| format!("{peer}: no client certificate"))?;
    // The verifier already accepted this identity; deriving it again here cannot fail
    // unless the verifier was bypassed, and then refusing is right.
    let identity = PeerIdentity::from_der(leaf).map_err(|e| e.to_string())?;
    Ok((stream, identity, chain))
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
        self.summaries.abort();
        // Refusals counted since the last summary are not lost at shutdown.
        self.refusals.summarize();
    }
}

impl tokio_stream::Stream for TlsIncoming {
    type Item = Result<TlsConnection, io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx).map(|c| c.map(Ok))
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_over_the_rate_are_counted_and_summarized_once() {
        let start = Instant::now();
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut b = Bucket::new(start);
        let recorded = (0..REFUSAL_BURST + 30).filter(|_| b.take(start, peer, "bad")).count();
        assert_eq!(recorded, REFUSAL_BURST as usize, "a burst is recorded one by one");
        let (count, (_, first_peer, reason)) = b.summary().expect("a summary of the rest");
        assert_eq!((count, first_peer, reason.as_str()), (30, peer, "bad"));
        assert!(b.summary().is_none(), "each refusal is in one summary only");

        // Tokens come back at the rate: after 100 ms, 5 more are recorded one by one.
        let later = start + Duration::from_millis(100);
        let recorded = (0..10).filter(|_| b.take(later, peer, "bad")).count();
        assert_eq!(recorded, (REFUSALS_PER_SEC / 10) as usize);
        assert_eq!(b.summary().map(|s| s.0), Some(5));
        // ... and never more than a burst, however long it was quiet.
        let much_later = start + Duration::from_secs(3600);
        let recorded = (0..REFUSAL_BURST + 1).filter(|_| b.take(much_later, peer, "x")).count();
        assert_eq!(recorded, REFUSAL_BURST as usize);
    }
}
