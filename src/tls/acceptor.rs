//! The accept loop: TCP accept → bounded TLS handshake → identity → hand to tonic.
//!
//! Each handshake runs in its own task with a deadline (and a shorter one for its first
//! byte). Handshakes in progress have their own budget and a per-source cap
//! ([`super::pending`]): the oldest pending one makes room for a new connection, never the
//! other way round, so silent or dripping connections cannot lock real clients out.
//! `limits.max_connections` bounds the connections whose handshake completed.
//!
//! Connections from the load balancers of `proxy_protocol_from` start with a PROXY v2
//! header ([`super::proxy`]); the client address in it stands for the connection from then
//! on (per-source cap, logs, audit). Refused handshakes go to the audit log through
//! [`super::refusals`].

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
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use super::{
    ConnInfo, ConnTrust, TlsConnection, TrustHandle,
    pending::Pending,
    proxy::{self, Proxied},
    refusals::{Refusals, SUMMARY_EVERY},
};
use crate::{
    audit::AuditLog, config::IpNet, identity::PeerIdentity, limits::Activity, metrics::Refusal,
};

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
        idle_timeout: Option<Duration>,
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
            Accepted { slots, tx, refusals: Arc::clone(&refusals), pending, idle_timeout },
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
#[derive(Debug, Clone)]
pub struct HandshakeLimits {
    /// The whole handshake's deadline.
    pub timeout: Duration,
    /// The deadline for the client's first byte.
    pub first_byte: Duration,
    /// Handshakes in progress at most.
    pub budget: usize,
    /// Handshakes in progress per source address at most; 0 for no cap.
    pub per_source: usize,
    /// The load balancers whose connections start with a PROXY v2 header.
    pub proxy_from: Arc<[IpNet]>,
}

/// Where the accept loop's connections go.
struct Accepted {
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<TlsConnection>,
    refusals: Arc<Refusals>,
    pending: Arc<Pending>,
    idle_timeout: Option<Duration>,
}

/// Why a handshake dropped unfinished was refused.
const DROPPED: &str = "handshake dropped unfinished to make room for a newer connection \
                       (limits.max_handshakes, limits.max_handshakes_per_source)";

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
        let limits = limits.clone();
        // A balancer's connections are capped per client once its header names the client.
        let balancer = limits.proxy_from.iter().any(|n| n.contains(peer_addr.ip()));
        let dropped = to.pending.admit(peer_addr, !balancer, |id| {
            tokio::spawn(async move {
                let to = task_to;
                let mut tcp = tcp;
                let mut peer_addr = peer_addr;
                if balancer {
                    match tokio::time::timeout(limits.first_byte, proxy::read_header(&mut tcp))
                        .await
                    {
                        Ok(Ok(Proxied::Client(client))) => {
                            peer_addr = client;
                            for peer in to.pending.moved(id, client) {
                                to.refusals.refused(peer, Refusal::Dropped, DROPPED);
                            }
                        }
                        Ok(Ok(Proxied::Local)) => {}
                        Ok(Err(reason)) => {
                            to.pending.done(id);
                            return to.refusals.refused(peer_addr, Refusal::Proxy, &reason);
                        }
                        Err(_) => {
                            to.pending.done(id);
                            let why = format!("no PROXY protocol header within {:?}", limits.first_byte);
                            return to.refusals.refused(peer_addr, Refusal::Timeout, &why);
                        }
                    }
                }
                let acceptor = TlsAcceptor::from(current.config());
                let result = handshake(acceptor, tcp, peer_addr, &limits).await;
                to.pending.done(id);
                match result {
                    Ok((stream, identity, chain)) => {
                        let Ok(slot) = Arc::clone(&to.slots).try_acquire_owned() else {
                            let why = "too many open connections (limits.max_connections)";
                            to.refusals.refused(peer_addr, Refusal::ConnectionLimit, why);
                            return;
                        };
                        tracing::debug!(peer = %peer_addr, principal = %identity.principal, "client connected");
                        let trust =
                            Arc::new(ConnTrust::new(handle, current, chain, identity.expires));
                        let identity = Arc::new(identity);
                        let activity = Activity::new();
                        let info = ConnInfo { peer_addr, identity, trust, activity };
                        let conn = TlsConnection::new(stream, info, slot, to.idle_timeout);
                        // A closed channel means the server is shutting down: drop it.
                        let _ = to.tx.send(conn).await;
                    }
                    Err((why, reason)) => to.refusals.refused(peer_addr, why, &reason),
                }
            })
            .abort_handle()
        });
        for peer in dropped {
            to.refusals.refused(peer, Refusal::Dropped, DROPPED);
        }
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    limits: &HandshakeLimits,
) -> Result<(TlsStream<TcpStream>, PeerIdentity, Vec<CertificateDer<'static>>), (Refusal, String)> {
    let tls = |e: String| (Refusal::Tls, e);
    let _ = tcp.set_nodelay(true);
    let started = Instant::now();
    // A client that says nothing is dropped early: its ClientHello is its first packet.
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.first_byte, tcp.peek(&mut first)).await {
        Err(_) => {
            return Err((
                Refusal::Timeout,
                format!("no ClientHello within {:?}", limits.first_byte),
            ));
        }
        Ok(Ok(0)) => return Err((Refusal::Closed, "closed before its ClientHello".into())),
        Ok(Err(e)) => return Err((Refusal::Closed, e.to_string())),
        Ok(Ok(_)) => {}
    }
    let left = limits.timeout.saturating_sub(started.elapsed());
    let stream = tokio::time::timeout(left, acceptor.accept(tcp))
        .await
        .map_err(|_| {
            (Refusal::Timeout, format!("handshake not completed within {:?}", limits.timeout))
        })?
        .map_err(|e| tls(e.to_string()))?;
    let chain = stream.get_ref().1.peer_certificates().unwrap_or_default().to_vec();
    let leaf = chain.first().ok_or_else(|| tls(format!("{peer}: no client certificate")))?;
    // The verifier already accepted this identity; deriving it again here cannot fail
    // unless the verifier was bypassed, and then refusing is right.
    let identity = PeerIdentity::from_der(leaf).map_err(|e| tls(e.to_string()))?;
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
