//! Assembling and running a gateway from a validated [`Config`].
//!
//! [`Gateway::start`] binds the listener, opens the store and serves in the background;
//! the returned handle reports the bound address (port 0 works, for tests) and shuts the
//! gateway down gracefully, releasing the store.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Server;

use crate::{
    api::SecretsService,
    config::Config,
    proto::{FILE_DESCRIPTOR_SET, v1::secrets_server::SecretsServer},
    store::{EmbeddedStore, EtcdStore, Store, StoreError},
    tls::{self, TlsError, TlsIncoming},
};

/// Bytes a request may carry beyond the value itself (path, framing).
const REQUEST_OVERHEAD_BYTES: usize = 16 * 1024;
/// How long a graceful shutdown waits for open requests before closing connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS files are missing or unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The store cannot be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Gateway {
    /// Starts serving according to `config`.
    pub async fn start(config: &Config) -> Result<Self, StartError> {
        let tls = tls::server_config(&config.tls)?;
        let store = open_store(config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let incoming = TlsIncoming::new(
            listener,
            tls,
            config.tls.handshake_timeout(),
            config.limits.max_connections as usize,
        );

        let max_message = config.limits.max_value_bytes as usize + REQUEST_OVERHEAD_BYTES;
        let secrets = SecretsServer::new(SecretsService::new(store, config.limits.max_value_bytes))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<SecretsServer<SecretsService>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| TlsError::Rustls(format!("reflection descriptors: {e}")))?;

        let (tx, rx) = oneshot::channel::<()>();
        let router = Server::builder()
            .timeout(config.limits.request_timeout())
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(secrets)
            .add_service(health)
            .add_service(reflection);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!(%addr, store = %config.store.describe(), "secretgate serving");
        Ok(Self { addr, shutdown: Some(tx), task })
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets open requests finish (up to a grace period) and releases the
    /// store.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
            Err(_) => {
                tracing::warn!("open requests did not finish within the grace period; closing");
                self.task.abort();
                let _ = (&mut self.task).await;
            }
        }
    }

    /// Serves until the process receives SIGINT or SIGTERM, then shuts down.
    pub async fn run_until_signal(self) -> std::io::Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r?,
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        self.shutdown().await;
        Ok(())
    }
}

/// Opens the configured backend (`store.backend`, checked by `Config::validate`).
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, StartError> {
    let keep = config.limits.max_versions;
    Ok(match config.store.backend.as_str() {
        "etcd" => Arc::new(EtcdStore::connect(&config.store, keep)?),
        _ => Arc::new(EmbeddedStore::open(&config.store.path, keep)?),
    })
}
