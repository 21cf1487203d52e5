//! The gateway tier's control state on etcd: each version of a control object (`policy`) as
//! its own key, `P control/<kind>/<version, 20 digits>`, so versions sort by number and a
//! new version is created by one transaction that succeeds only when it does not exist yet
//! and the version before it does (compare-and-set on the previous version). The records
//! are sealed by the caller (see `crate::control`); etcd holds them as opaque bytes.

use etcd_client::{
    Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

use super::EtcdStore;
use crate::store::StoreError;

/// A write fence (see [`crate::store::Store::fence_writes`]).
#[derive(Debug, Clone)]
pub(super) struct Fence {
    /// The control key that must not exist.
    pub(super) key: String,
    kind: String,
    version: u64,
}

impl Fence {
    /// The compare a fenced transaction adds.
    pub(super) fn compare(&self) -> Compare {
        Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0)
    }

    /// The get a fenced transaction's else-branch adds, to tell a fenced failure.
    pub(super) fn probe(&self) -> TxnOp {
        TxnOp::get(self.key.as_str(), Some(GetOptions::new().with_keys_only()))
    }

    /// `Fenced`, if the else-branch's probe found the key.
    pub(super) fn check(&self, probe: Option<&etcd_client::GetResponse>) -> Result<(), StoreError> {
        match probe.is_some_and(|g| !g.kvs().is_empty()) {
            true => Err(StoreError::Fenced { kind: self.kind.clone(), version: self.version }),
            false => Ok(()),
        }
    }
}

impl EtcdStore {
    /// Sets the write fence.
    pub(super) fn set_fence(&self, kind: &str, next: u64) {
        let fence =
            Fence { key: self.control_key(kind, next), kind: kind.to_owned(), version: next };
        *self.fence.write().unwrap_or_else(|e| e.into_inner()) = Some(fence);
    }

    /// The write fence in force, if any.
    pub(super) fn fence(&self) -> Option<Fence> {
        self.fence.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn control_key(&self, kind: &str, version: u64) -> String {
        format!("{}control/{kind}/{version:020}", self.prefix)
    }

    /// See [`crate::store::Store::put_control`].
    pub(super) async fn create_control(
        &self,
        kind: &str,
        version: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        let key = self.control_key(kind, version);
        let previous = self.control_key(kind, version.saturating_sub(1));
        let dir = format!("{}control/{kind}/", self.prefix);
        let outcome = self
            .retry("put_control", true, |deadline| {
                let (key, previous, dir, record) =
                    (key.clone(), previous.clone(), dir.clone(), record.to_vec());
                async move {
                    let mut when =
                        vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)];
                    if version > 1 {
                        when.push(Compare::create_revision(previous, CompareOp::Greater, 0));
                    }
                    let newest = GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1);
                    let txn = Txn::new()
                        .when(when)
                        .and_then([TxnOp::put(key.as_str(), record, None)])
                        .or_else([TxnOp::get(dir, Some(newest)), TxnOp::get(key, None)]);
                    self.members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await
                }
            })
            .await?;
        if outcome.succeeded() {
            return Ok(());
        }
        let mut answers = outcome.op_responses().into_iter();
        let (Some(TxnOpResponse::Get(newest)), Some(TxnOpResponse::Get(mine))) =
            (answers.next(), answers.next())
        else {
            return Err(StoreError::Corrupt(
                "put_control: an unexpected transaction answer".into(),
            ));
        };
        // A retried try whose first one committed finds its own record there.
        if mine.kvs().first().is_some_and(|kv| kv.value() == record) {
            return Ok(());
        }
        let current = match newest.kvs().first() {
            Some(kv) => version_of(kv.key())?,
            None => 0,
        };
        Err(StoreError::Conflict { expected: version.saturating_sub(1), current })
    }

    /// See [`crate::store::Store::control_versions`].
    pub(super) async fn read_control(
        &self,
        kind: &str,
        below: Option<u64>,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let dir = format!("{}control/{kind}/", self.prefix);
        let end = match below {
            Some(b) => self.control_key(kind, b),
            None => format!("{}control/{kind}0", self.prefix),
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let resp = self
            .retry("control_versions", false, |deadline| {
                let (dir, end) = (dir.clone(), end.clone());
                async move {
                    let options = GetOptions::new()
                        .with_range(end)
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(limit);
                    self.members
                        .attempt(deadline, |mut kv| async move { kv.get(dir, Some(options)).await })
                        .await
                }
            })
            .await?;
        resp.kvs().iter().map(|kv| Ok((version_of(kv.key())?, kv.value().to_vec()))).collect()
    }
}

/// The version number a control key ends with.
fn version_of(key: &[u8]) -> Result<u64, StoreError> {
    let digits = key.rsplit(|b| *b == b'/').next().unwrap_or_default();
    std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or_else(|| {
        StoreError::Corrupt(format!("control key {}", String::from_utf8_lossy(key).escape_debug()))
    })
}
