//! The gRPC health service's states (`grpc.health.v1.Health`).
//!
//! - `""`, `secretgate.v1.Secrets`, `secretgate.v1.Admin`: SERVING, and NOT_SERVING while the
//!   audit log cannot be written (requests are refused meanwhile).
//! - [`LIVENESS`]: SERVING while the process answers at all. A liveness probe that fails
//!   means restart it.
//! - [`READINESS`]: NOT_SERVING until the first check has passed, then SERVING while the
//!   gateway can serve: the audit log is writable and the
//!   store answers (on etcd, a linearizable read: a quorum is reachable), checked every
//!   [`CHECK_EVERY`]. A readiness probe that fails means send no traffic here for now.
//!
//! Degraded but serving states (a refused reload keeping the last good version, the read
//! cache over its budget) keep every service SERVING, so probes do not restart a whole tier
//! over one bad file.

use std::{sync::Arc, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{audit::writer::AuditHealth, store::Store};

/// The health service name of the liveness probe.
pub const LIVENESS: &str = "secretgate.liveness";
/// The health service name of the readiness probe.
pub const READINESS: &str = "secretgate.readiness";
/// How often readiness checks the store.
pub const CHECK_EVERY: Duration = Duration::from_secs(2);

/// Keeps the health states (see the module docs) until aborted.
pub async fn report(audit: Option<AuditHealth>, store: Arc<dyn Store>, reporter: HealthReporter) {
    let mut audit = audit;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_audit, mut last_store) = (None::<Option<String>>, None::<Option<String>>);
    loop {
        let audit_failure = audit.as_mut().and_then(|h| h.borrow_and_update().clone());
        if last_audit.as_ref() != Some(&audit_failure) {
            let status = match &audit_failure {
                None => ServingStatus::Serving,
                Some(reason) => {
                    tracing::error!(%reason, "audit log failing: health NOT_SERVING, requests refused");
                    ServingStatus::NotServing
                }
            };
            for service in ["", "secretgate.v1.Secrets", "secretgate.v1.Admin"] {
                reporter.set_service_status(service, status).await;
            }
        }
        let store_failure = store.ready().await.err().map(|e| e.to_string());
        if last_store.as_ref() != Some(&store_failure) {
            match &store_failure {
                Some(e) => tracing::warn!(error = %e, "store not ready: readiness NOT_SERVING"),
                None if last_store.is_some() => tracing::info!("store ready again"),
                None => {}
            }
        }
        let ready = audit_failure.is_none() && store_failure.is_none();
        let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(READINESS, status).await;
        (last_audit, last_store) = (Some(audit_failure), Some(store_failure));
        match audit.as_mut() {
            Some(h) => {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = h.changed() => if changed.is_err() { audit = None },
                }
            }
            None => {
                tick.tick().await;
            }
        }
    }
}
