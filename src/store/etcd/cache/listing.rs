//! Reading the prefix for the feed: the whole of it at one revision (the cache's fill), and
//! the newest metadata write as of an older revision (whether etcd still has history there,
//! and whether anything changed in history it compacted).

use std::{collections::HashMap, time::Duration};

use etcd_client::{GetOptions, KvClient};
use tokio::time::Instant;

use super::{Entry, LIST_PAGE};
use crate::store::{
    StoreError,
    etcd::members::{Failure, Members, retry},
};

/// Lists the prefix at one revision (`at`, else the current one), page by page.
pub(super) async fn list(
    members: &Members,
    prefix: &str,
    timeout: Duration,
    at: Option<i64>,
) -> Result<(HashMap<Vec<u8>, Entry>, i64), Failure> {
    let end = {
        let mut e = prefix.as_bytes().to_vec();
        // The prefix ends with '/', so the range end is the prefix with its last byte + 1.
        if let Some(last) = e.last_mut() {
            *last += 1;
        }
        e
    };
    let mut entries = HashMap::new();
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = at.unwrap_or(0);
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let from = start.clone();
        let deadline = Instant::now() + timeout;
        let mut resp = members
            .attempt(deadline, |mut kv| async move { kv.get(from, Some(options)).await })
            .await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        let more = resp.more();
        let mut last = None;
        for kv in resp.take_kvs() {
            let rev = kv.mod_revision();
            let (key, value) = kv.into_key_value();
            last = Some(key.clone());
            entries.insert(key, (value, rev));
        }
        match (more, last) {
            (true, Some(mut key)) => {
                key.push(0);
                start = key;
            }
            _ => return Ok((entries, revision)),
        }
    }
}

/// etcd's current revision, from a read of one key (the prefix itself): what the feed's
/// first list needs to know to be made at the watch's start at once.
pub(super) async fn current_revision(
    members: &Members,
    prefix: &str,
    timeout: Duration,
) -> Result<i64, Failure> {
    let options = GetOptions::new().with_keys_only().with_limit(1);
    let key = prefix.to_owned();
    let resp = members
        .attempt(Instant::now() + timeout, |mut kv| async move { kv.get(key, Some(options)).await })
        .await?;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// The newest `mod_revision` of the metadata under `prefix` as of `revision` (0: none), or
/// `None` when etcd compacted that revision away (the history from there is gone). Tried
/// on the members in turn until `timeout` (the store's retries): a member that does not
/// answer says nothing about the history, so its failure is never taken for a compaction.
pub(super) async fn newest_meta_at(
    members: &Members,
    prefix: &str,
    revision: i64,
    timeout: Duration,
) -> Result<Option<u64>, StoreError> {
    let options = GetOptions::new()
        .with_prefix()
        .with_revision(revision)
        .with_keys_only()
        .with_sort(etcd_client::SortTarget::Mod, etcd_client::SortOrder::Descend)
        .with_limit(1);
    let key = format!("{prefix}meta");
    retry("history read", timeout, false, |deadline| {
        let (key, options) = (key.clone(), options.clone());
        async move {
            let get = |mut kv: KvClient| async move { kv.get(key, Some(options)).await };
            match members.attempt(deadline, get).await {
                Ok(resp) => {
                    let newest = resp.kvs().first().map_or(0, |kv| kv.mod_revision());
                    Ok(Some(u64::try_from(newest).unwrap_or(0)))
                }
                Err(Failure::Refused(m)) if m.contains("compacted") => Ok(None),
                Err(f) => Err(f),
            }
        }
    })
    .await
}
