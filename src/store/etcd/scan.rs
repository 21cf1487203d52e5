//! Scans and replaces of stored values, for rewrap.

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::{EtcdStore, LIST_PAGE, corrupt, members::Failure};
use crate::{path::SecretPath, store::StoredVersion};

impl EtcdStore {
    /// One try of a scan: one range read over the data keys (a single revision).
    pub(super) async fn scan_once(
        &self,
        after: Option<(&SecretPath, u64)>,
        limit: usize,
        deadline: Instant,
    ) -> Result<Vec<StoredVersion>, Failure> {
        let base = format!("{}data", self.prefix);
        let start = match after {
            Some((path, version)) => format!("{}\0", self.data_key(path, version)),
            None => format!("{base}/"),
        };
        let end = format!("{base}0");
        let page = i64::try_from(limit.min(LIST_PAGE)).unwrap_or(1);
        let options = GetOptions::new().with_range(end.as_str()).with_limit(page);
        let from = start.as_str();
        let mut resp = self
            .members
            .attempt(deadline, |mut kv| async move { kv.get(from, Some(options)).await })
            .await?;
        let mut out = Vec::with_capacity(resp.kvs().len());
        for kv in resp.take_kvs() {
            let (key, value) = kv.into_key_value();
            let value = Zeroizing::new(value);
            let key = String::from_utf8(key).map_err(|e| corrupt(format!("data key: {e}")))?;
            let rest = key.strip_prefix(base.as_str()).unwrap_or(&key);
            let parsed = rest.rsplit_once('@').and_then(|(path, version)| {
                Some((SecretPath::parse(path).ok()?, version.parse::<u64>().ok()?))
            });
            let Some((path, version)) = parsed else {
                return Err(corrupt(format!("stored data key {key:?}")));
            };
            out.push(StoredVersion { path, version, value });
        }
        Ok(out)
    }

    /// One try of a replace: a transaction comparing the stored value (and touching the
    /// metadata, whose revision the read cache trusts for its values). A try that finds `new`
    /// already stored counts as done: an earlier, unanswered try applied it (the bytes of a
    /// fresh envelope never repeat, so nobody else wrote them).
    pub(super) async fn replace_once(
        &self,
        (key, meta_key): &(String, String),
        old: &[u8],
        new: &[u8],
        deadline: Instant,
    ) -> Result<bool, Failure> {
        let (key, meta_key) = (key.as_str(), meta_key.as_str());
        let mut when = vec![
            Compare::value(key, CompareOp::Equal, old),
            Compare::create_revision(meta_key, CompareOp::Greater, 0),
        ];
        let mut or_else = vec![TxnOp::get(key, None)];
        let fence = self.fence();
        if let Some(f) = &fence {
            when.push(f.compare());
            or_else.push(f.probe());
        }
        // The metadata is touched (same bytes, a new revision): the read cache's barrier
        // checks the metadata's revision only, which must move with every value it names.
        let touch = TxnOp::put(meta_key, [], Some(PutOptions::new().with_ignore_value()));
        let txn =
            Txn::new().when(when).and_then([TxnOp::put(key, new, None), touch]).or_else(or_else);
        let resp =
            self.members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await?;
        if resp.succeeded() {
            return Ok(true);
        }
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            etcd_client::TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let current =
            gets.next().and_then(|g| g.kvs().first().map(|kv| Zeroizing::new(kv.value().to_vec())));
        if let Some(f) = &fence {
            f.check(gets.next().as_ref()).map_err(Failure::Done)?;
        }
        Ok(current.is_some_and(|v| v.as_slice() == new))
    }
}
