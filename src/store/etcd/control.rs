//! The gateway tier's control state on etcd: each version of a control object (`policy`) as
//! its own key, `P control/<kind>/<version, 20 digits>`, so versions sort by number and a
//! new version is created by one transaction that succeeds only when it does not exist yet
//! and the version before it does (compare-and-set on the previous version). The records
//! are sealed by the caller (see `crate::control`); etcd holds them as opaque bytes.
//!
//! A record larger than [`PART_BYTES`] (a policy of many thousand rules) does not fit in
//! one etcd request (`--max-request-bytes`, 1.5 MiB by default): its parts are written first
//! under `P control/<kind>/parts/<random id>/<n>`, each in its own request, and the version
//! key then holds a manifest naming them, its length and its SHA-256, created by the same
//! compare-and-set. A reader reassembles and checks it; parts that do not add up leave the
//! manifest as the record, which then fails authentication like any other damaged record.
//! The parts of a write that lost its race are deleted.

use etcd_client::{
    Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
};

use sha2::{Digest, Sha256};

use super::EtcdStore;
use crate::store::StoreError;

/// Largest record stored in one key; larger ones go in parts of this size.
pub(super) const PART_BYTES: usize = 1 << 20;
/// The first bytes of a manifest.
const MANIFEST: &str = "secretgate-control-parts 1";

/// A write fence (see [`crate::store::Store::fence_writes`]).
#[derive(Debug)]
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
        *self.fence.write().unwrap_or_else(|e| e.into_inner()) = Some(std::sync::Arc::new(fence));
    }

    /// The write fence in force, if any (shared: taken by every sealed write).
    pub(super) fn fence(&self) -> Option<std::sync::Arc<Fence>> {
        self.fence.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn control_key(&self, kind: &str, version: u64) -> String {
        format!("{}control/{kind}/{version:020}", self.prefix)
    }

    /// The range of `kind`'s version keys below `below` (all: up to `:`, just past the
    /// digits, so the parts under `parts/` are not in it).
    fn version_range(&self, kind: &str, below: Option<u64>) -> (String, String) {
        let dir = format!("{}control/{kind}/", self.prefix);
        let end = match below {
            Some(b) => self.control_key(kind, b),
            None => format!("{dir}:"),
        };
        (dir, end)
    }

    /// See [`crate::store::Store::put_control`].
    pub(super) async fn create_control(
        &self,
        kind: &str,
        version: u64,
        record: &[u8],
    ) -> Result<(), StoreError> {
        if record.len() <= PART_BYTES {
            return self.create_head(kind, version, record).await;
        }
        let id = {
            let mut raw = [0u8; 8];
            getrandom::fill(&mut raw).map_err(|e| StoreError::Backend(e.to_string()))?;
            hex::encode(raw)
        };
        let parts = format!("{}control/{kind}/parts/{id}/", self.prefix);
        for (n, chunk) in record.chunks(PART_BYTES).enumerate() {
            let key = format!("{parts}{n:04}");
            let written = self
                .retry("put_control", true, |deadline| {
                    let (key, chunk) = (key.clone(), chunk.to_vec());
                    async move {
                        let put = |mut kv: etcd_client::KvClient| async move {
                            kv.put(key, chunk, None).await
                        };
                        self.members.attempt(deadline, put).await.map(|_| ())
                    }
                })
                .await;
            if let Err(e) = written {
                self.delete_parts(&parts).await;
                return Err(e);
            }
        }
        let count = record.len().div_ceil(PART_BYTES);
        let digest = hex::encode(Sha256::digest(record));
        let manifest = format!("{MANIFEST} {id} {count} {} {digest}\n", record.len());
        let created = self.create_head(kind, version, manifest.as_bytes()).await;
        if created.is_err() {
            self.delete_parts(&parts).await;
        }
        if let Err(StoreError::Conflict { current, .. }) = created {
            // The same record stored before (another try of this write, with its own parts)?
            if current >= version {
                let there = self.read_control(kind, Some(version + 1), 1).await?;
                if there.first().is_some_and(|(v, bytes)| *v == version && bytes == record) {
                    return Ok(());
                }
            }
        }
        created
    }

    /// Deletes the parts under `parts` (best effort: orphans are harmless, only space).
    async fn delete_parts(&self, parts: &str) {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let key = parts.to_owned();
        let deleted = self
            .members
            .attempt(deadline, |mut kv| async move {
                kv.delete(key, Some(etcd_client::DeleteOptions::new().with_prefix())).await
            })
            .await;
        if let Err(f) = deleted {
            tracing::warn!(error = ?f, "cannot delete the parts of a control record that was not stored");
        }
    }

    /// Creates version key `version` of `kind` holding `value`: see
    /// [`crate::store::Store::put_control`].
    async fn create_head(&self, kind: &str, version: u64, value: &[u8]) -> Result<(), StoreError> {
        let key = self.control_key(kind, version);
        let previous = self.control_key(kind, version.saturating_sub(1));
        let (dir, end) = self.version_range(kind, None);
        let outcome = self
            .retry("put_control", true, |deadline| {
                let (key, previous, dir, end, value) =
                    (key.clone(), previous.clone(), dir.clone(), end.clone(), value.to_vec());
                async move {
                    let mut when =
                        vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)];
                    if version > 1 {
                        when.push(Compare::create_revision(previous, CompareOp::Greater, 0));
                    }
                    let newest = GetOptions::new()
                        .with_range(end)
                        .with_keys_only()
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1);
                    let txn = Txn::new()
                        .when(when)
                        .and_then([TxnOp::put(key.as_str(), value, None)])
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
        if mine.kvs().first().is_some_and(|kv| kv.value() == value) {
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
        let (dir, end) = self.version_range(kind, below);
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
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.kvs() {
            let value = match parse_manifest(kv.value()) {
                Some(m) => self.reassemble(kind, &m).await?.unwrap_or_else(|| kv.value().to_vec()),
                None => kv.value().to_vec(),
            };
            out.push((version_of(kv.key())?, value));
        }
        Ok(out)
    }

    /// The record a manifest names, or `None` when its parts do not add up.
    async fn reassemble(&self, kind: &str, m: &Manifest) -> Result<Option<Vec<u8>>, StoreError> {
        let parts = format!("{}control/{kind}/parts/{}/", self.prefix, m.id);
        let resp = self
            .retry("control_versions", false, |deadline| {
                let parts = parts.clone();
                async move {
                    let options = GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Key, SortOrder::Ascend);
                    self.members
                        .attempt(
                            deadline,
                            |mut kv| async move { kv.get(parts, Some(options)).await },
                        )
                        .await
                }
            })
            .await?;
        let mut record = Vec::with_capacity(m.len.min(64 << 20));
        for kv in resp.kvs() {
            record.extend_from_slice(kv.value());
        }
        let whole = resp.kvs().len() == m.count
            && record.len() == m.len
            && hex::encode(Sha256::digest(&record)) == m.digest;
        if !whole {
            tracing::warn!(kind, parts = %m.id, "a control record whose parts do not add up; refused");
        }
        Ok(whole.then_some(record))
    }
}

/// A manifest's fields.
struct Manifest {
    id: String,
    count: usize,
    len: usize,
    digest: String,
}

fn parse_manifest(value: &[u8]) -> Option<Manifest> {
    let text = std::str::from_utf8(value).ok()?.strip_suffix('\n')?;
    let rest = text.strip_prefix(MANIFEST)?.strip_prefix(' ')?;
    let [id, count, len, digest] = rest.split(' ').collect::<Vec<_>>()[..] else { return None };
    let safe = !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit());
    safe.then(|| {
        Some(Manifest {
            id: id.to_owned(),
            count: count.parse().ok()?,
            len: len.parse().ok()?,
            digest: digest.to_owned(),
        })
    })?
}

/// The version number a control key ends with.
fn version_of(key: &[u8]) -> Result<u64, StoreError> {
    let digits = key.rsplit(|b| *b == b'/').next().unwrap_or_default();
    std::str::from_utf8(digits).ok().and_then(|d| d.parse().ok()).ok_or_else(|| {
        StoreError::Corrupt(format!("control key {}", String::from_utf8_lossy(key).escape_debug()))
    })
}
