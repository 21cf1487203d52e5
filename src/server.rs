//! Assembling and running a gateway from a checked [`ValidConfig`] (only `Config::load` and
//! `Config::check` make one, so a gateway never starts on an unchecked configuration).
//!
//! [`Gateway::start`] binds the listener, opens the store and serves in the background;
//! the returned handle reports the bound address (port 0 works, for tests) and shuts the
//! gateway down gracefully, releasing the store.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::Server;
use tonic_health::ServingStatus;

mod load;

use self::load::{load_keyring, load_policy, load_trust};
use crate::{
    api::{AdminService, ControlService, SecretsService, Vault, Watchers},
    audit::{AuditError, AuditLog, SigningKey, signing::SigningError},
    authz::{Policy, PolicyError},
    config::{StoreConfig, ValidConfig},
    control::{ControlError, Kek, KekError},
    crypto::{Keyring, KeyringError, KeyringHandle},
    limits::{MemoryBudget, RateLimiter, RequestLayer},
    metrics::{MetricsServer, scrape::Sources},
    proto::{
        FILE_DESCRIPTOR_SET,
        v1::{
            admin_server::AdminServer, control_server::ControlServer, secrets_server::SecretsServer,
        },
    },
    store::{EmbeddedStore, EtcdStore, Metered, Store, StoreError},
    tls::{self, ClientTrust, HandshakeLimits, ServerCert, TlsError, TlsIncoming},
};

/// Largest request of the services that carry no value (Admin, health, reflection).
const SMALL_REQUEST_BYTES: usize = 16 * 1024;
/// How long a graceful shutdown waits for open requests before closing connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The TLS files are missing or unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The policy cannot be loaded.
    #[error("cannot load the policy: {0}")]
    Policy(#[from] PolicyError),
    /// The keyring cannot be loaded.
    #[error(transparent)]
    Keyring(#[from] KeyringError),
    /// The KEK cannot be loaded.
    #[error(transparent)]
    Kek(#[from] KekError),
    /// The policy kept in the store cannot be used.
    #[error("the stored policy: {0}")]
    Control(#[from] ControlError),
    /// The store cannot be opened.
    #[error("cannot open the store: {0}")]
    Store(#[from] StoreError),
    /// The audit signing key cannot be loaded.
    #[error("cannot load the audit signing key: {0}")]
    AuditKey(#[from] SigningError),
    /// The audit log cannot be opened, or was cut short.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A file-backed value a running gateway reloads when its files change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// `crypto.keyring`.
    Keyring,
    /// The files of `authz.policies`.
    Policy,
    /// `tls.cert` and `tls.key`.
    ServerCert,
    /// `tls.client_ca` and `tls.client_crl`.
    ClientTrust,
}

/// The reloadable values in force, for [`Gateway::reload_error`] and `Admin/ReloadStatus`.
pub(crate) struct Reloads {
    pub(crate) keys: KeyringHandle,
    pub(crate) policy: crate::authz::PolicyHandle,
    pub(crate) server_cert: tls::ServerCertHandle,
    pub(crate) trust: tls::TrustHandle,
    /// Notified when a value from the store is put in force (the registry then writes this
    /// replica's record at once, so a push sees the tier follow without waiting a renewal).
    pub(crate) applied: Arc<tokio::sync::Notify>,
    /// Whether this replica's registry lease is current (else it serves nothing).
    pub(crate) standing: Arc<crate::registry::Standing>,
}

/// A running gateway.
pub struct Gateway {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    watchers: Vec<JoinHandle<()>>,
    audit: AuditLog,
    checkpoint_task: Option<JoinHandle<()>>,
    reloads: Arc<Reloads>,
    limiter: RateLimiter,
    metrics: Option<MetricsServer>,
    watch_streams: Watchers,
    /// Keeps this replica's record in the registry.
    registry: Option<JoinHandle<()>>,
    store: Arc<dyn Store>,
}

impl Reloads {
    /// Each value: what it is, the version in force, and why its newest files were refused.
    pub(crate) fn status(&self) -> Vec<(&'static str, String, Option<String>)> {
        let keys = self.keys.current();
        vec![
            (
                "keyring",
                format!("{} (primary {})", keys.version(), keys.primary().id),
                self.keys.last_error(),
            ),
            ("policy", self.policy.current().version().to_owned(), self.policy.last_error()),
            (
                "server certificate",
                self.server_cert.current().describe(),
                self.server_cert.last_error(),
            ),
            ("client trust", self.trust.current().describe(), self.trust.last_error()),
        ]
    }
}

impl Gateway {
    /// Starts serving according to `config`.
    pub async fn start(config: &ValidConfig) -> Result<Self, StartError> {
        let (server_cert, load_server_cert) = tls::server_cert(&config.tls)?;
        tracing::info!(cert = %config.tls.cert.display(), version = %server_cert.current().describe(), "server certificate loaded");
        let store: Arc<dyn Store> = Arc::new(Metered(open_store(config).await?));
        let applied = Arc::new(tokio::sync::Notify::new());
        let kek = match config.crypto.kek.as_os_str().is_empty() {
            true => None,
            false => {
                let mut kek = Kek::load(&config.crypto.kek)?;
                tracing::info!(kek = %config.crypto.kek.display(), id = kek.id(), "KEK loaded");
                let previous = &config.crypto.previous_kek;
                if !previous.as_os_str().is_empty() {
                    let old = Kek::load(previous)?;
                    tracing::warn!(previous_kek = %previous.display(), id = old.id(), "KEK rotation in progress: control state sealed under the previous KEK is still accepted; run secretgate kek-reseal, then remove crypto.previous_kek");
                    kek = kek.with_previous(old);
                }
                Some(Arc::new(kek))
            }
        };
        // Only with control state in the store (else nothing is marked, and the file is not
        // read).
        let state_file = match kek {
            Some(_) => config.replica.state_file.as_path(),
            None => std::path::Path::new(""),
        };
        let marks =
            Arc::new(crate::control::HighWater::load(state_file, &config.store.identity())?);
        let follow =
            load::Follow { store: &store, kek: kek.as_ref(), applied: &applied, marks: &marks };
        let (trust, load_trust, stored_trust) = load_trust(config, &server_cert, &follow).await?;
        tracing::info!(client_ca = %config.tls.client_ca.display(), source = ?config.tls.client_trust_source, version = %trust.current().describe(), "client trust loaded");
        let (keys, stored_keyring) = load_keyring(config, &follow).await?;
        let (authz, stored_policy) = load_policy(config, &follow).await?;
        tracing::info!(
            policies = %config.authz.policies.display(),
            source = ?config.authz.source,
            version = authz.handle().current().version(),
            rules = authz.handle().current().rule_count(),
            "policy loaded"
        );
        let (audit, checkpoint_task) = open_audit(config, &store).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        let handshakes = HandshakeLimits {
            timeout: config.tls.handshake_timeout(),
            first_byte: config
                .tls
                .client_hello_timeout_secs
                .secs()
                .min(config.tls.handshake_timeout()),
            budget: config.limits.max_handshakes.get() as usize,
            per_source: config.limits.max_handshakes_per_source.get() as usize,
            proxy_from: config.proxy_protocol_from.clone().into(),
        };
        let incoming = TlsIncoming::new(
            listener,
            Arc::clone(&trust),
            handshakes,
            config.limits.max_connections.get() as usize,
            config.limits.idle_connection_timeout(),
            audit.clone(),
        );

        let max_message = config.limits.max_request_bytes() as usize;
        let store_for_health = Arc::clone(&store);
        let store_for_registry = Arc::clone(&store);
        let vault = Vault::new(store, keys.clone()).following(stored_keyring.clone());
        let limiter = RateLimiter::new(authz.clone(), audit.clone());
        let watch_streams = Watchers::new(&config.watch);
        let secrets = SecretsServer::new(SecretsService::new(
            vault.clone(),
            authz.clone(),
            audit.clone(),
            limiter.clone(),
            config.limits.max_value_bytes.get(),
            watch_streams.clone(),
        ))
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
        // The other services take only small requests: a large one is refused before it is
        // decoded (and, for Admin, before its caller is authorized).
        let reloads = Arc::new(Reloads {
            keys: keys.clone(),
            policy: Arc::clone(authz.handle()),
            server_cert: Arc::clone(&server_cert),
            trust: Arc::clone(&trust),
            applied,
            standing: crate::registry::Standing::new(
                config.replica.lease_secs.secs(),
                stored_policy.is_some() || stored_keyring.is_some() || stored_trust.is_some(),
            ),
        });
        let replica_id = match config.replica.id.as_str() {
            "" => crate::registry::default_id(addr.port()),
            id => id.to_owned(),
        };
        let admin = AdminServer::new(AdminService::new(
            vault.clone(),
            Arc::clone(&reloads),
            authz.clone(),
            audit.clone(),
            limiter.clone(),
            replica_id.clone(),
        ))
        .max_decoding_message_size(SMALL_REQUEST_BYTES);
        let control = ControlServer::new(ControlService::new(
            (stored_policy.clone(), stored_keyring.clone(), stored_trust.clone()),
            vault.clone(),
            authz.clone(),
            audit.clone(),
            limiter.clone(),
        ))
        .max_decoding_message_size(crate::api::MAX_CONTROL_REQUEST_BYTES);
        let (health_reporter, health) = tonic_health::server::health_reporter();
        let health = health.max_decoding_message_size(SMALL_REQUEST_BYTES);
        health_reporter.set_serving::<SecretsServer<SecretsService>>().await;
        health_reporter.set_serving::<AdminServer<AdminService>>().await;
        // Live at once; ready once the first check of the store has passed.
        health_reporter.set_service_status(crate::health::LIVENESS, ServingStatus::Serving).await;
        health_reporter
            .set_service_status(crate::health::READINESS, ServingStatus::NotServing)
            .await;
        let mut watchers = vec![tokio::spawn(crate::health::report(
            audit.watch(),
            Arc::clone(&store_for_health),
            health_reporter.clone(),
        ))];
        // Reflection v1 and v1alpha, as grpc-go serves them: older tools (grpcurl before
        // 1.9, grpcui, Python's grpcio-reflection) speak only v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let descriptors = |e| TlsError::Rustls(format!("reflection descriptors: {e}"));
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(descriptors)?
            .max_decoding_message_size(SMALL_REQUEST_BYTES);
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(descriptors)?
            .max_decoding_message_size(SMALL_REQUEST_BYTES);

        let keyring_watcher = match &stored_keyring {
            Some(stored) => stored.follow(),
            None => keys.watch(config.crypto.reload_interval(), Keyring::load, |r: &Keyring| {
                format!("{} (primary {})", r.version(), r.primary().id)
            }),
        };
        let policy_watcher = match &stored_policy {
            Some(stored) => stored.follow(),
            None => {
                authz.handle().watch(config.authz.reload_interval(), Policy::load, |p: &Policy| {
                    format!("{} ({} rules)", p.version(), p.rule_count())
                })
            }
        };
        let (tx, rx) = oneshot::channel::<()>();
        let request_memory = MemoryBudget::new(config.limits.max_request_memory() as usize);
        let mut builder = Server::builder();
        if let Some(age) = config.limits.max_connection_age() {
            // Past the age, GOAWAY: requests in flight finish, new ones go to a new connection.
            // (No `max_connection_age_grace`: with it, tonic 0.14 skips the GOAWAY and only
            // cuts the connection after age + grace.)
            builder = builder.max_connection_age(age);
        }
        let router = builder
            .timeout(config.limits.request_timeout())
            .max_concurrent_streams(
                u32::try_from(config.limits.max_streams_per_connection.get()).ok(),
            )
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(RequestLayer::new(request_memory, Arc::clone(&reloads.standing)))
            .add_service(secrets)
            .add_service(admin)
            .add_service(control)
            .add_service(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        let task = tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await
        });
        tracing::info!(%addr, store = %config.store.describe(), "secretgate serving");
        watchers.extend([keyring_watcher, policy_watcher, limiter.spawn_summaries()]);
        watchers.push(server_cert.watch(
            config.tls.reload_interval(),
            load_server_cert,
            ServerCert::describe,
        ));
        watchers.push(match (load_trust, &stored_trust) {
            (Some(load), _) => {
                trust.watch(config.tls.reload_interval(), load, ClientTrust::describe)
            }
            (None, Some(stored)) => stored.follow(),
            (None, None) => unreachable!("client trust comes from files or the store"),
        });
        watchers.push(tls::warn_when_crls_are_due(Arc::clone(&trust)));
        let mut catch_up: Vec<Arc<dyn crate::control::stored::CatchUp>> = Vec::new();
        if let Some(k) = &stored_keyring {
            catch_up.push(Arc::clone(k) as _);
        }
        if let Some(p) = &stored_policy {
            catch_up.push(Arc::clone(p) as _);
        }
        if let Some(t) = &stored_trust {
            catch_up.push(Arc::clone(t) as _);
        }
        let registry = crate::registry::spawn(
            Arc::clone(&store_for_health),
            Arc::clone(&reloads),
            audit.clone(),
            (replica_id, addr.to_string()),
            config.replica.lease_secs.secs(),
            catch_up,
        );
        let metrics = match config.metrics.addr() {
            None => None,
            Some(at) => {
                let sources = Sources {
                    audit: audit.clone(),
                    store: store_for_health,
                    reloads: Arc::clone(&reloads),
                };
                let tls = match config.metrics.tls {
                    true => Some(tls::metrics_server_config(Arc::clone(&server_cert))?),
                    false => None,
                };
                let bind = |source| StartError::Bind { addr: at, source };
                let listener = TcpListener::bind(at).await.map_err(bind)?;
                Some(crate::metrics::serve(listener, sources, tls).map_err(bind)?)
            }
        };
        Ok(Self {
            metrics,
            addr,
            shutdown: Some(tx),
            task,
            watchers,
            audit,
            checkpoint_task,
            reloads,
            limiter,
            watch_streams,
            registry: Some(registry),
            store: store_for_registry,
        })
    }

    /// Why the newest files of `what` were refused (the last good version stays in force),
    /// or `None` when the newest files are the version in force.
    pub fn reload_error(&self, what: Reloaded) -> Option<String> {
        let r = &self.reloads;
        match what {
            Reloaded::Keyring => r.keys.last_error(),
            Reloaded::Policy => r.policy.last_error(),
            Reloaded::ServerCert => r.server_cert.last_error(),
            Reloaded::ClientTrust => r.trust.last_error(),
        }
    }

    /// The address the gateway listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address of the metrics endpoint, when it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsServer::local_addr)
    }

    /// Stops accepting, lets open requests finish (up to a grace period), writes the final
    /// audit checkpoint (kept in the store too) and releases the store.
    pub async fn shutdown(mut self) {
        drop(self.metrics.take());
        for w in self.watchers.drain(..) {
            w.abort();
        }
        // Out of the registry at once (not when its lease would expire).
        if let Some(task) = self.registry.take() {
            task.abort();
            if let Err(e) = self.store.deregister_replica().await {
                tracing::warn!(error = %e, "cannot remove this replica from the registry; it drops out when its lease expires");
            }
        }
        // Watch streams end now with a revision to resume from, instead of holding the grace
        // period open.
        self.watch_streams.shut_down();
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
        // Requests refused since the last summary are counted in the log before it closes.
        self.limiter.summarize();
        if self.audit.close().await.is_none() && self.audit.log_id().is_some() {
            tracing::error!("the audit log could not be closed with a final checkpoint");
        }
        if let Some(task) = self.checkpoint_task.take() {
            // Ends once the writer is gone, after storing the final checkpoint.
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                tracing::error!("the final audit checkpoint could not be stored in time");
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

/// Opens the configured backend (`store.backend`).
pub async fn open_store(config: &ValidConfig) -> Result<Arc<dyn Store>, StartError> {
    // At most 1000 (the field's range).
    let keep = config.limits.max_versions.get() as u32;
    let history = config.watch.history_events.get();
    Ok(match &config.store {
        StoreConfig::Etcd(etcd) => Arc::new(EtcdStore::connect_with_history(etcd, keep, history)?),
        StoreConfig::Embedded { path } => {
            Arc::new(EmbeddedStore::open_with_history(path, keep, history)?)
        }
    })
}

/// Opens the audit log (unless disabled), checked against the checkpoints the store keeps
/// (see [`AuditLog::open`]), and starts the task that keeps the latest checkpoint in the store.
async fn open_audit(
    config: &ValidConfig,
    store: &Arc<dyn Store>,
) -> Result<(AuditLog, Option<JoinHandle<()>>), StartError> {
    if !config.audit.enabled {
        tracing::warn!("audit.enabled = false: NOTHING IS AUDITED; for benchmarks only");
        return Ok((AuditLog::disabled(), None));
    }
    let key = SigningKey::load(&config.audit.signing_key)?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let stored = store.audit_checkpoints().await?;
    let audit = AuditLog::open(&config.audit, key, tx, &stored)?;
    // A checkpoint written while opening (a new log begun while the store keeps others') is
    // stored before the gateway serves: the store then knows this log from its first line.
    if let Ok((log_id, line)) = rx.try_recv() {
        store.put_audit_checkpoint(&log_id, line.as_bytes()).await?;
    }
    let log_id = audit.log_id().unwrap_or_default().to_owned();
    tracing::info!(log = %config.audit.path.display(), %log_id, "audit log open");
    let store = Arc::clone(store);
    let task = tokio::spawn(async move {
        while let Some(mut latest) = rx.recv().await {
            // Only the newest checkpoint matters; skip any queued behind it.
            while let Ok(newer) = rx.try_recv() {
                latest = newer;
            }
            if let Err(e) = store.put_audit_checkpoint(&latest.0, latest.1.as_bytes()).await {
                tracing::warn!(error = %e, "cannot store the audit checkpoint; retried with the next one");
            }
        }
    });
    Ok((audit, Some(task)))
}
