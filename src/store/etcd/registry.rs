//! The gateway tier's replica registry on etcd: each replica's record under
//! `P replicas/<id>`, bound to a lease of its own with the configured time to live. The
//! replica renews the lease each time it writes its record (a third of the time to live), so
//! a replica that dies, or is paused or cut off, drops out of the registry when its lease
//! expires; a clean stop revokes the lease at once.

use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use tokio::time::Instant;

use super::{EtcdStore, corrupt, members::Failure};
use crate::store::StoreError;

impl EtcdStore {
    /// Every key under `P dir`, as (the rest of the key, value).
    pub(super) async fn under(
        &self,
        op: &str,
        dir: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let base = format!("{}{dir}", self.prefix);
        self.retry(op, false, |deadline| {
            let base = base.clone();
            async move {
                let mut resp = self
                    .members
                    .attempt(deadline, |mut kv| {
                        let base = base.clone();
                        async move { kv.get(base, Some(GetOptions::new().with_prefix())).await }
                    })
                    .await?;
                let mut out = Vec::with_capacity(resp.kvs().len());
                for kv in resp.take_kvs() {
                    let (key, value) = kv.into_key_value();
                    let key = String::from_utf8(key)
                        .map_err(|e| corrupt(format!("a key under {base}: {e}")))?;
                    let id = key.strip_prefix(base.as_str()).unwrap_or(&key).to_owned();
                    out.push((id, value));
                }
                Ok(out)
            }
        })
        .await
    }

    /// Writes this replica's record, renewing its lease (or taking a new one when it
    /// lapsed: the replica was paused or cut off longer than `ttl`). The lease steps are tried
    /// on the members in turn until one answers or the store timeout passes, so one slow or
    /// dead member does not make the replica miss a renewal.
    pub(super) async fn register(
        &self,
        id: &str,
        record: &[u8],
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut lease = self.lease.lock().await;
        let deadline = Instant::now() + self.timeout;
        let renewed = match *lease {
            Some(l) => self.renew(l, deadline).await,
            None => false,
        };
        if !renewed {
            let secs = i64::try_from(ttl.as_secs().max(2)).unwrap_or(i64::MAX);
            let granted = self
                .on_any_member(deadline, || async move {
                    self.members
                        .lease_attempt(deadline, |mut c| async move { c.grant(secs, None).await })
                        .await
                })
                .await?;
            *lease = Some(granted.id());
        }
        let (key, value) = (format!("{}replicas/{id}", self.prefix), record.to_vec());
        let options = PutOptions::new().with_lease(lease.unwrap_or_default());
        // One try: a failed one is the next renewal's to repeat. Not the store's retry loop,
        // whose failed tries cool members down: from a background task that steers the
        // requests in flight away from healthy members while one is down.
        self.members
            .attempt(deadline, |mut kv| async move { kv.put(key, value, Some(options)).await })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Renews lease `id` on the first member that answers; false when none renews it before
    /// `deadline` (every member tried says it expired, or none answers).
    async fn renew(&self, id: i64, deadline: Instant) -> bool {
        let tries = self.members.len();
        for _ in 0..tries {
            // etcd-client's `keep_alive` sends one renewal and reads its answer itself (an
            // error when the lease is gone), so its success is the renewal: waiting on the
            // stream for another answer would wait for one that never comes (and did: every
            // renewal timed out and took a new lease, leaving the old one to expire).
            let answer = self
                .members
                .lease_attempt(deadline, |mut c| async move { c.keep_alive(id).await.map(|_| ()) })
                .await;
            if answer.is_ok() {
                return true;
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        false
    }

    /// Runs `once` (one try on the next member) until it succeeds or `deadline` passes.
    async fn on_any_member<T, F, Fut>(
        &self,
        deadline: Instant,
        mut once: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        loop {
            match once().await {
                Ok(v) => return Ok(v),
                Err(f) if Instant::now() >= deadline => return Err(unavailable(f)),
                Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
            }
        }
    }

    /// Revokes this replica's lease, which removes its record.
    pub(super) async fn deregister(&self) -> Result<(), StoreError> {
        let Some(id) = self.lease.lock().await.take() else { return Ok(()) };
        let deadline = Instant::now() + self.timeout;
        self.members
            .lease_attempt(deadline, |mut c| async move { c.revoke(id).await })
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

fn unavailable(f: Failure) -> StoreError {
    StoreError::Unavailable(format!("replica registry: {f:?}"))
}
