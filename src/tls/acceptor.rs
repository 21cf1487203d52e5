//! The accept loop: TCP accept → bounded TLS handshake → identity → hand to tonic.
//!
//! Each handshake runs in its own task with a deadline, so a slow or silent client holds
//! one connection slot for at most the handshake timeout and never delays other clients.
//! `limits.max_connections` slots bound open connections including handshakes in progress;
//! when all are taken the loop stops accepting and the kernel backlog queues new clients.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use rustls::ServerConfig;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tonic::transport::server::Connected;

use crate::{
    audit::{AuditLog, Kind, Record},
    identity::PeerIdentity,
};

/// Facts about a connection, available to every request on it as a request extension.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The TCP peer.
    pub peer_addr: SocketAddr,
    /// The verified identity of the client certificate.
    pub identity: Arc<PeerIdentity>,
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
}

impl TlsIncoming {
    /// Starts accepting on `listener`.
    pub fn new(
        listener: TcpListener,
        config: Arc<ServerConfig>,
        handshake_timeout: Duration,
        max_connections: usize,
        audit: AuditLog,
    ) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(max_connections));
        let acceptor = TlsAcceptor::from(config);
        let task =
            tokio::spawn(accept_loop(listener, acceptor, handshake_timeout, slots, tx, audit));
        Self { rx, task }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<TlsConnection>,
    audit: AuditLog,
) {
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        let (tcp, peer_addr) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let tx = tx.clone();
        let audit = audit.clone();
        tokio::spawn(async move {
            match handshake(acceptor, tcp, peer_addr, handshake_timeout).await {
                Ok((stream, identity)) => {
                    tracing::debug!(peer = %peer_addr, principal = %identity.principal, "client connected");
                    let info = ConnInfo { peer_addr, identity: Arc::new(identity) };
                    // A closed channel means the server is shutting down: drop the connection.
                    let _ = tx.send(TlsConnection { stream, info, _slot: slot }).await;
                }
                Err(reason) => {
                    tracing::info!(peer = %peer_addr, %reason, "TLS handshake refused");
                    // Recorded without waiting: nothing was granted, so nothing waits on it.
                    let mut r = Record::new(Kind::Handshake);
                    r.peer = Some(peer_addr.to_string());
                    r.decision = Some("deny".into());
                    r.status = Some("UNAUTHENTICATED".into());
                    r.reason = Some(reason.chars().take(300).collect());
                    audit.note(r);
                }
            }
        });
    }
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, PeerIdentity), String> {
    let _ = tcp.set_nodelay(true);
    let stream = tokio::time::timeout(timeout, acceptor.accept(tcp))
        .await
        .map_err(|_| format!("handshake not completed within {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| format!("{peer}: no client certificate"))?;
    // The verifier already accepted this identity; deriving it again here cannot fail
    // unless the verifier was bypassed, and then refusing is right.
    let identity = PeerIdentity::from_der(leaf).map_err(|e| e.to_string())?;
    Ok((stream, identity))
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.task.abort();
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
