//! One authenticated connection as tonic serves it: its facts ([`ConnInfo`], a request
//! extension), its connection slot, and the idle-connection timeout.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    sync::OwnedSemaphorePermit,
    time::Sleep,
};
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use super::{ConnTrust, Untrusted};
use crate::{identity::PeerIdentity, limits::Activity};

/// Facts about a connection, available to every request on it as a request extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address: the TCP peer, or the source a trusted load balancer gave in
    /// its PROXY protocol header.
    pub peer_addr: SocketAddr,
    /// The verified identity of the client certificate.
    pub identity: Arc<PeerIdentity>,
    /// The certificate chain, checked against the client trust in force.
    pub trust: Arc<ConnTrust>,
    /// The streams open on the connection (see [`Activity`]).
    pub activity: Arc<Activity>,
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
    /// Counted in the metrics while open.
    _open: crate::metrics::OpenConnection,
    idle: Option<IdleClose>,
}

impl TlsConnection {
    /// A connection holding one of the `limits.max_connections` slots, closed once it has
    /// had no open stream for `idle_timeout` (`None`: never).
    pub(super) fn new(
        stream: TlsStream<TcpStream>,
        info: ConnInfo,
        slot: OwnedSemaphorePermit,
        idle_timeout: Option<Duration>,
    ) -> Self {
        let idle = idle_timeout.map(|timeout| IdleClose {
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            activity: Arc::clone(&info.activity),
        });
        let open = crate::metrics::OpenConnection::new(info.identity.expires);
        Self { stream, info, _slot: slot, _open: open, idle }
    }
}

/// The idle-connection timeout: the connection reads as closed (EOF) once it has had no
/// open stream for `timeout`, so the server drops it and frees its slot. A long-lived
/// stream (Rewrap, and Watch) is activity: its connection is never idle while it runs.
struct IdleClose {
    timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    activity: Arc<Activity>,
}

impl IdleClose {
    /// Whether the connection has been idle for the whole timeout; otherwise the timer is
    /// set to the earliest moment it could be, and wakes the reader then.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let wait = match self.activity.idle_for(now) {
                Some(idle) if idle >= self.timeout => return true,
                Some(idle) => self.timeout - idle,
                None => self.timeout,
            };
            self.sleep.as_mut().reset((now + wait).into());
        }
        false
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
        if self.idle.as_mut().is_some_and(|idle| idle.expired(cx)) {
            tracing::debug!(peer = %self.info.peer_addr, "closing an idle connection");
            return Poll::Ready(Ok(()));
        }
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
