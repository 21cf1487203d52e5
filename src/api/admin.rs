//! The `secretgate.v1.Admin` service: key status and online rewrap.

use std::{ops::ControlFlow, sync::Arc, time::Instant};

use tokio::sync::{Mutex, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::{ApiError, Call, RewrapCounts, Vault};
use crate::{
    audit::AuditLog,
    authz::{Authorizer, Permit, WholeStore, act},
    limits::{Class, RateLimiter},
    proto::v1::{self, admin_server::Admin},
    registry::{ReplicaRecord, disagreements},
};

/// Progress messages are sent at most this often (in records), plus the final one.
const PROGRESS_EVERY: u64 = 64;

/// The `Admin` service. Every call needs the `admin` action on `/`.
#[derive(Clone)]
pub struct AdminService {
    vault: Vault,
    reloads: Arc<crate::server::Reloads>,
    authz: Authorizer,
    audit: AuditLog,
    limiter: RateLimiter,
    rewrap: Arc<Mutex<()>>,
    /// This replica's id in the registry.
    replica_id: String,
}

impl AdminService {
    /// An admin service over `vault` and the reloadable values `reloads`, deciding with
    /// `authz`, recording to `audit`, admitting requests past `limiter`.
    pub(crate) fn new(
        vault: Vault,
        reloads: Arc<crate::server::Reloads>,
        authz: Authorizer,
        audit: AuditLog,
        limiter: RateLimiter,
        replica_id: String,
    ) -> Self {
        let rewrap = Arc::new(Mutex::new(()));
        Self { vault, reloads, authz, audit, limiter, rewrap, replica_id }
    }

    /// The context of one Admin RPC (on `/`), once admitted past the rate limits.
    fn call<T>(&self, method: &'static str, request: &Request<T>) -> Result<Call, Status> {
        Call::admit(&self.limiter, Class::Admin, method, request, "/", &self.audit)
    }

    fn permit(&self, call: &mut Call) -> Result<Permit<act::Admin>, ApiError> {
        call.authorize::<act::Admin>(&self.authz, WholeStore)
    }

    async fn key_status(
        &self,
        permit: &Permit<act::Admin>,
    ) -> Result<v1::KeyStatusResponse, ApiError> {
        let status = self.vault.key_status(permit).await?;
        let (ring, usage) = (&status.ring, &status.usage);
        let mut keys: Vec<v1::KeyInfo> = ring
            .keys()
            .iter()
            .map(|k| v1::KeyInfo {
                id: k.id.to_string(),
                state: k.state.as_str().into(),
                records: usage.records.get(k.id.as_str()).copied().unwrap_or(0),
                created: k.created.clone(),
            })
            .collect();
        for (id, n) in &usage.records {
            if !ring.keys().iter().any(|k| k.id.as_str() == id) {
                keys.push(v1::KeyInfo {
                    id: id.clone(),
                    state: "unknown".into(),
                    records: *n,
                    created: String::new(),
                });
            }
        }
        Ok(v1::KeyStatusResponse {
            keyring_version: ring.version().to_owned(),
            keys,
            unreadable_records: usage.unreadable,
            total_records: usage.total,
            reload_error: status.reload_error.unwrap_or_default(),
        })
    }
}

impl AdminService {
    async fn audit_status(
        &self,
        permit: &Permit<act::Admin>,
    ) -> Result<v1::AuditStatusResponse, ApiError> {
        let Some(log_id) = self.audit.log_id() else {
            return Ok(v1::AuditStatusResponse { enabled: false, ..Default::default() });
        };
        let checkpoint = self.vault.audit_checkpoint(permit, log_id).await?.unwrap_or_default();
        let stats = self.audit.stats();
        Ok(v1::AuditStatusResponse {
            records_written: stats.records,
            syncs: stats.syncs,
            sync_micros: stats.sync_micros,
            enabled: true,
            log_id: log_id.to_owned(),
            failure: self.audit.failure().unwrap_or_default(),
            checkpoint: String::from_utf8_lossy(&checkpoint).into_owned(),
        })
    }
}

impl AdminService {
    async fn tier_status(
        &self,
        permit: &Permit<act::Admin>,
    ) -> Result<v1::TierStatusResponse, ApiError> {
        let mut records = Vec::new();
        for (id, bytes) in self.vault.replicas(permit).await? {
            match serde_json::from_slice::<ReplicaRecord>(&bytes) {
                Ok(r) => records.push(r),
                Err(e) => {
                    tracing::warn!(replica = %id.escape_debug(), error = %e, "a replica record that does not decode; left out")
                }
            }
        }
        let disagree = disagreements(&records).into_iter().map(str::to_owned).collect();
        let replicas = records
            .into_iter()
            .map(|r| v1::Replica {
                answering: r.id == self.replica_id,
                id: r.id,
                address: r.address,
                started: r.started,
                keyring: r.keyring,
                policy: r.policy,
                client_trust: r.client_trust,
                audit_log_id: r.audit_log_id,
                audit_ok: r.audit_ok,
                version: r.version,
            })
            .collect();
        Ok(v1::TierStatusResponse { replicas, disagree })
    }

    fn store_status(&self, permit: &Permit<act::Admin>) -> v1::StoreStatusResponse {
        let s = self.vault.store_status(permit);
        v1::StoreStatusResponse {
            backend: s.backend.to_owned(),
            cache: s.cache.to_owned(),
            cache_entries: s.entries,
            cache_bytes: s.bytes,
            cache_max_bytes: s.max_bytes,
            cache_hits: s.hits,
            etcd_leader: s.leader.unwrap_or_default(),
        }
    }
}

fn progress_message(to_rewrap: u64, p: &RewrapCounts, done: bool) -> v1::RewrapProgress {
    v1::RewrapProgress {
        to_rewrap,
        scanned: p.scanned,
        rewrapped: p.rewrapped,
        current: p.current,
        skipped: p.skipped,
        failed: p.failed,
        done,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn key_status(
        &self,
        request: Request<v1::KeyStatusRequest>,
    ) -> Result<Response<v1::KeyStatusResponse>, Status> {
        let mut call = self.call("secretgate.v1.Admin/KeyStatus", &request)?;
        let span = call.span();
        async move {
            let result = match self.permit(&mut call) {
                Ok(permit) => AdminService::key_status(self, &permit).await,
                Err(e) => Err(e),
            };
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn audit_status(
        &self,
        request: Request<v1::AuditStatusRequest>,
    ) -> Result<Response<v1::AuditStatusResponse>, Status> {
        let mut call = self.call("secretgate.v1.Admin/AuditStatus", &request)?;
        let span = call.span();
        let result = match self.permit(&mut call) {
            Ok(permit) => self.audit_status(&permit).instrument(span).await,
            Err(e) => Err(e),
        };
        // Answered even while the log fails: reporting why is the point of this RPC.
        call.finish_unwaited(result)
    }

    async fn store_status(
        &self,
        request: Request<v1::StoreStatusRequest>,
    ) -> Result<Response<v1::StoreStatusResponse>, Status> {
        let mut call = self.call("secretgate.v1.Admin/StoreStatus", &request)?;
        let span = call.span();
        async move {
            let result = self.permit(&mut call).map(|permit| self.store_status(&permit));
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn tier_status(
        &self,
        request: Request<v1::TierStatusRequest>,
    ) -> Result<Response<v1::TierStatusResponse>, Status> {
        let mut call = self.call("secretgate.v1.Admin/TierStatus", &request)?;
        let span = call.span();
        async move {
            let result = match self.permit(&mut call) {
                Ok(permit) => self.tier_status(&permit).await,
                Err(e) => Err(e),
            };
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    async fn reload_status(
        &self,
        request: Request<v1::ReloadStatusRequest>,
    ) -> Result<Response<v1::ReloadStatusResponse>, Status> {
        let mut call = self.call("secretgate.v1.Admin/ReloadStatus", &request)?;
        let span = call.span();
        async move {
            let result = self.permit(&mut call).map(|_permit| {
                let values = self.reloads.status().into_iter();
                let values = values.map(|(what, version, refused)| v1::ReloadedValue {
                    what: what.to_owned(),
                    version,
                    refused: refused.unwrap_or_default(),
                });
                v1::ReloadStatusResponse { values: values.collect() }
            });
            call.finish(result).await
        }
        .instrument(span)
        .await
    }

    type RewrapStream = ReceiverStream<Result<v1::RewrapProgress, Status>>;

    async fn rewrap(
        &self,
        request: Request<v1::RewrapRequest>,
    ) -> Result<Response<Self::RewrapStream>, Status> {
        let mut call = self.call("secretgate.v1.Admin/Rewrap", &request)?;
        let permit = match self.permit(&mut call) {
            Ok(p) => p,
            Err(e) => return call.finish(Err(e)).await,
        };
        let Ok(guard) = Arc::clone(&self.rewrap).try_lock_owned() else {
            return call.finish(Err(ApiError::RewrapRunning)).await;
        };
        // Rewrap rewrites the store: its intent is recorded before it starts.
        let intent = match call.intent().await {
            Ok(intent) => intent,
            Err(e) => return call.finish(Err(e)).await,
        };
        let status = match self.vault.key_status(&permit).await {
            Ok(status) => status,
            Err(e) => return call.finish(Err(e)).await,
        };
        let primary = status.ring.primary().id.to_string();
        let usage = &status.usage;
        let to_rewrap = usage.total - usage.records.get(&primary).copied().unwrap_or(0);
        let vault = self.vault.clone();
        let (tx, rx) = mpsc::channel(16);
        // The caller gets the stream now; the outcome (how the rewrap ended, with its counts)
        // is recorded when it ends, and is durable before the stream's last message.
        let response = call.stream_started(ReceiverStream::new(rx));
        call.key_id(&primary);
        tokio::spawn(async move {
            let _running = guard;
            let started = Instant::now();
            let progress_tx = tx.clone();
            let result = vault
                .rewrap(&permit, intent, |p| {
                    // A closed stream means the caller cancelled: stop, resumable later.
                    if progress_tx.is_closed() {
                        return ControlFlow::Break(());
                    }
                    if p.scanned % PROGRESS_EVERY == 0 {
                        // Lossy on purpose: a slow reader only misses intermediate counts.
                        let _ = progress_tx.try_send(Ok(progress_message(to_rewrap, p, false)));
                    }
                    ControlFlow::Continue(())
                })
                .await;
            let outcome = match result {
                Ok(p) => {
                    let done = !tx.is_closed();
                    tracing::info!(
                        scanned = p.scanned,
                        rewrapped = p.rewrapped,
                        current = p.current,
                        skipped = p.skipped,
                        failed = p.failed,
                        done,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "rewrap finished"
                    );
                    call.summary(rewrap_summary(&p, done));
                    if done {
                        Ok(progress_message(to_rewrap, &p, done))
                    } else {
                        Err(ApiError::RewrapCancelled)
                    }
                }
                Err(e) => Err(e),
            };
            let last = call.finish(outcome).await.map(Response::into_inner);
            let _ = tx.send(last).await;
        });
        Ok(response)
    }
}

/// What a rewrap did, for its outcome record.
fn rewrap_summary(p: &RewrapCounts, done: bool) -> String {
    format!(
        "rewrap {}: scanned {}, rewrapped {}, already under the primary key {}, \
         changed meanwhile and skipped {}, failed to open {}",
        if done { "finished" } else { "cancelled by the caller" },
        p.scanned,
        p.rewrapped,
        p.current,
        p.skipped,
        p.failed
    )
}
