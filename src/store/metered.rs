//! A [`Store`] that times every call and counts its failures for the metrics, in front of
//! any backend.

use std::{future::Future, sync::Arc, time::Instant};

use async_trait::async_trait;

use super::{
    Changes, SecretMeta, Store, StoreError, StoreStatus, StoredValue, StoredVersion, VersionMeta,
};
use crate::path::{PathPrefix, SecretPath};

/// See the module docs.
pub struct Metered(pub Arc<dyn Store>);

/// The `error` label of a failure; `None` for answers (not found, conflicts).
fn error_label(e: &StoreError) -> Option<&'static str> {
    match e {
        StoreError::NotFound
        | StoreError::VersionNotFound(_)
        | StoreError::VersionDeleted(_)
        | StoreError::VersionDestroyed(_)
        | StoreError::Conflict { .. } => None,
        StoreError::Unavailable(_) => Some("unavailable"),
        StoreError::NoQuorum(_) => Some("no_quorum"),
        StoreError::OutcomeUnknown(_) => Some("outcome_unknown"),
        StoreError::Corrupt(_) => Some("corrupt"),
        StoreError::Backend(_) => Some("backend"),
        StoreError::Fenced { .. } => Some("fenced"),
    }
}

async fn timed<T>(
    op: &'static str,
    call: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    let result = call.await;
    crate::metrics::store_call(op, started.elapsed(), result.as_ref().err().and_then(error_label));
    result
}

#[async_trait]
impl Store for Metered {
    async fn current_version(&self, path: &SecretPath) -> Result<u64, StoreError> {
        timed("current_version", self.0.current_version(path)).await
    }

    async fn put(
        &self,
        path: &SecretPath,
        expected: u64,
        value: &[u8],
    ) -> Result<VersionMeta, StoreError> {
        timed("put", self.0.put(path, expected, value)).await
    }

    async fn get(
        &self,
        path: &SecretPath,
        version: Option<u64>,
    ) -> Result<StoredValue, StoreError> {
        timed("get", self.0.get(path, version)).await
    }

    async fn delete(&self, path: &SecretPath) -> Result<VersionMeta, StoreError> {
        timed("delete", self.0.delete(path)).await
    }

    async fn undelete(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        timed("undelete", self.0.undelete(path, version)).await
    }

    async fn destroy(&self, path: &SecretPath, version: u64) -> Result<VersionMeta, StoreError> {
        timed("destroy", self.0.destroy(path, version)).await
    }

    async fn list(
        &self,
        prefix: &PathPrefix,
        after: Option<&SecretPath>,
        limit: usize,
    ) -> Result<Vec<SecretPath>, StoreError> {
        timed("list", self.0.list(prefix, after, limit)).await
    }

    async fn versions(&self, path: &SecretPath) -> Result<SecretMeta, StoreError> {
        timed("versions", self.0.versions(path)).await
    }

    async fn scan(
        &self,
        after: Option<(&SecretPath, u64)>,
        limit: usize,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        timed("scan", self.0.scan(after, limit)).await
    }

    async fn replace(
        &self,
        path: &SecretPath,
        version: u64,
        old: &[u8],
        new: &[u8],
    ) -> Result<bool, StoreError> {
        timed("replace", self.0.replace(path, version, old, new)).await
    }

    fn changes(&self) -> Arc<Changes> {
        self.0.changes()
    }

    async fn register_replica(
        &self,
        id: &str,
        record: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), StoreError> {
        timed("register_replica", self.0.register_replica(id, record, ttl)).await
    }

    async fn replicas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        timed("replicas", self.0.replicas()).await
    }

    async fn deregister_replica(&self) -> Result<(), StoreError> {
        timed("deregister_replica", self.0.deregister_replica()).await
    }

    async fn put_control(&self, kind: &str, version: u64, record: &[u8]) -> Result<(), StoreError> {
        timed("put_control", self.0.put_control(kind, version, record)).await
    }

    async fn control_versions(
        &self,
        kind: &str,
        below: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        timed("control_versions", self.0.control_versions(kind, below, limit)).await
    }

    fn fence_writes(&self, kind: &str, next: u64) {
        self.0.fence_writes(kind, next)
    }

    fn control_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.control_changes()
    }

    async fn put_audit_checkpoint(&self, log_id: &str, line: &[u8]) -> Result<(), StoreError> {
        timed("put_audit_checkpoint", self.0.put_audit_checkpoint(log_id, line)).await
    }

    async fn audit_checkpoint(&self, log_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        timed("audit_checkpoint", self.0.audit_checkpoint(log_id)).await
    }

    async fn audit_checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        timed("audit_checkpoints", self.0.audit_checkpoints()).await
    }

    fn status(&self) -> StoreStatus {
        self.0.status()
    }

    async fn ready(&self) -> Result<(), StoreError> {
        timed("ready", self.0.ready()).await
    }
}
