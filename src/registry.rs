//! The gateway tier's replica registry: every replica keeps a record of itself in the store
//! (id, address, start time, the versions of the keyring, policy and client trust it
//! enforces, its audit log id, and whether its audit log is writable), renewed every third of
//! `replica.lease_secs`; on etcd under a lease, so a replica that dies or is cut off drops out
//! within that time. `Admin/TierStatus` (`secretgate status`) lists the live replicas and
//! whether they agree.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::{audit::AuditLog, server::Reloads, store::Store};

/// Whether this replica is in good standing in the tier: its record renewed within its
/// lease. A replica whose lease lapsed (it was paused or cut off longer than
/// `replica.lease_secs`) may have missed a keyring or policy change that the rest of the
/// tier went ahead with (a promote waits only for live replicas), so it serves nothing until
/// it has caught up with the store and registered again.
#[derive(Debug)]
pub struct Standing {
    /// When the last renewal that succeeded began, in milliseconds after `base` (0: not
    /// registered yet; the versions loaded at start are current). Read by every request,
    /// so an atomic rather than a lock.
    renewed_ms: AtomicU64,
    base: Instant,
    lease: Duration,
    /// Only a replica that follows control state in the store can miss a change while cut
    /// off; one whose control state comes from its own files never lapses.
    follows_store: bool,
}

impl Standing {
    /// A replica registering under leases of `lease`, following control state in the store
    /// or not.
    pub fn new(lease: Duration, follows_store: bool) -> Arc<Self> {
        // One millisecond before now, so that a renewal at once stores a value above 0.
        let base =
            Instant::now().checked_sub(Duration::from_millis(1)).unwrap_or_else(Instant::now);
        Arc::new(Self { renewed_ms: AtomicU64::new(0), base, lease, follows_store })
    }

    /// Whether the lease lapsed: no renewal began within the last lease.
    pub fn lapsed(&self) -> bool {
        if !self.follows_store {
            return false;
        }
        match self.renewed_ms.load(Ordering::Acquire) {
            0 => false,
            ms => self.base.elapsed() >= Duration::from_millis(ms) + self.lease,
        }
    }

    fn renewed(&self, at: Instant) {
        let ms =
            u64::try_from(at.saturating_duration_since(self.base).as_millis()).unwrap_or(u64::MAX);
        self.renewed_ms.fetch_max(ms.max(1), Ordering::AcqRel);
    }
}

/// One replica's record, as kept in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    /// `replica.id`, or `<hostname>:<port>`.
    pub id: String,
    /// The address it listens on.
    pub address: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// The keyring in force (its version and primary key).
    pub keyring: String,
    /// The ids of the keys it holds (primary and active): a key may be promoted once every
    /// live replica holds it.
    #[serde(default)]
    pub keyring_keys: Vec<String>,
    /// The id of its primary key: a key may be retired once no live replica seals with it.
    #[serde(default)]
    pub keyring_primary: String,
    /// The policy version in force.
    pub policy: String,
    /// The client trust in force (CA bundle and CRLs).
    pub client_trust: String,
    /// Its audit log's id (empty with the log off).
    pub audit_log_id: String,
    /// Whether its audit log is writable (else it refuses every request).
    pub audit_ok: bool,
    /// The gateway's version.
    pub version: String,
}

/// What the tier's records say together: for each of keyring, policy and client trust,
/// whether every live replica enforces the same version.
pub fn disagreements(records: &[ReplicaRecord]) -> Vec<&'static str> {
    let differ = |f: fn(&ReplicaRecord) -> &str| records.windows(2).any(|w| f(&w[0]) != f(&w[1]));
    let mut out = Vec::new();
    if differ(|r| &r.keyring) {
        out.push("keyring");
    }
    if differ(|r| &r.policy) {
        out.push("policy");
    }
    if differ(|r| &r.client_trust) {
        out.push("client trust");
    }
    out
}

/// This replica's record now.
fn record(
    id: &str,
    address: &str,
    started: &str,
    reloads: &Reloads,
    audit: &AuditLog,
) -> ReplicaRecord {
    let versions = reloads.status();
    let find = |what: &str| {
        versions.iter().find(|(w, ..)| *w == what).map(|(_, v, _)| v.clone()).unwrap_or_default()
    };
    let ring = reloads.keys.current();
    let held = ring.keys().iter().filter(|k| k.state != crate::crypto::KeyState::Retired);
    ReplicaRecord {
        keyring_keys: held.map(|k| k.id.to_string()).collect(),
        keyring_primary: ring.primary().id.to_string(),
        id: id.to_owned(),
        address: address.to_owned(),
        started: started.to_owned(),
        keyring: find("keyring"),
        policy: find("policy"),
        client_trust: find("client trust"),
        audit_log_id: audit.log_id().unwrap_or_default().to_owned(),
        audit_ok: audit.failure().is_none(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    }
}

/// Keeps this replica's record in the store until aborted. After a lapse (see
/// [`Standing`]) it first brings every control object kept in the store (`catch_up`) up to
/// date, and registers again only once they are.
pub(crate) fn spawn(
    store: Arc<dyn Store>,
    reloads: Arc<Reloads>,
    audit: AuditLog,
    (id, address): (String, String),
    lease: Duration,
    catch_up: Vec<Arc<dyn crate::control::stored::CatchUp>>,
) -> JoinHandle<()> {
    let started = crate::clock::now_rfc3339_secs();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(lease / 3);
        loop {
            // At each renewal, and at once when a value from the store is put in force.
            tokio::select! {
                _ = tick.tick() => {}
                () = reloads.applied.notified() => {}
            }
            if reloads.standing.lapsed() {
                tracing::warn!(
                    "this replica's registry lease lapsed (it was paused or cut off): it refuses requests until it has caught up with the store"
                );
                let mut caught_up = true;
                for follower in &catch_up {
                    if let Err(e) = follower.catch_up().await {
                        tracing::warn!(error = %e, "cannot catch up with the store; retrying");
                        caught_up = false;
                    }
                }
                if !caught_up {
                    continue;
                }
            }
            let r = record(&id, &address, &started, &reloads, &audit);
            let bytes = match serde_json::to_vec(&r) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "replica registry: cannot encode this replica's record");
                    continue;
                }
            };
            let began = Instant::now();
            match store.register_replica(&id, &bytes, lease).await {
                Ok(()) => reloads.standing.renewed(began),
                Err(e) => {
                    tracing::warn!(error = %e, "replica registry: cannot renew this replica's record; retrying")
                }
            }
        }
    })
}

/// The default replica id: `<hostname>:<port>`.
pub fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{port}")
}
