//! Writes: one compare-and-set transaction per try, built from the metadata this replica
//! last saw of the secret ([`Hints`]), whose else-branch returns the current metadata (and
//! the value at the version being written) when the compare fails. So an uncontended write
//! is one round trip, a contended or stale one never needs a separate read, and a version
//! conflict is only ever reported from etcd's answer, never from a hint.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard, PoisonError},
};

use etcd_client::{Compare, CompareOp, GetResponse, Txn, TxnOp, TxnOpResponse};
use tokio::time::Instant;

use super::{EtcdStore, corrupt, decode_first, encode_meta, members::Failure};
use crate::{
    path::SecretPath,
    store::{Change, SecretMeta, StoreError, VersionMeta},
};

/// Secrets whose last seen metadata is kept; past it the hints start over (a missing hint
/// costs one read).
const MAX_HINTS: usize = 10_000;

/// Where one try of a write left it.
pub(super) enum PutStep {
    /// This write committed (in this try or an earlier one).
    Written,
    /// The secret is at another version, not written by this write.
    Conflict(u64),
    /// An earlier try may have committed, but the evidence has been pruned.
    Unsure,
    /// Another writer changed the metadata (not the version) in between: try again.
    Again,
}

/// The metadata (and its `mod_revision`) this replica last read or wrote, per secret: a
/// guess, checked by every write's compare, never trusted to answer.
#[derive(Default)]
pub(super) struct Hints(Mutex<HashMap<String, (SecretMeta, i64)>>);

impl Hints {
    fn map(&self) -> MutexGuard<'_, HashMap<String, (SecretMeta, i64)>> {
        // Guesses only: whatever a panic left behind is checked by the next compare.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, path: &SecretPath) -> Option<(SecretMeta, i64)> {
        self.map().get(path.as_str()).cloned()
    }

    pub(super) fn remember(&self, path: &SecretPath, meta: SecretMeta, mod_revision: i64) {
        let mut map = self.map();
        if map.len() >= MAX_HINTS && !map.contains_key(path.as_str()) {
            map.clear();
        }
        map.insert(path.as_str().to_owned(), (meta, mod_revision));
    }

    pub(super) fn forget(&self, path: &SecretPath) {
        self.map().remove(path.as_str());
    }
}

/// Whether `meta` holds `info`'s version with `info`'s creation time, and `stored` (that
/// version's stored value) is `value`: how a retried write recognizes that an earlier,
/// unanswered try of it committed. `None` if that version is no longer kept.
fn holds(
    meta: &SecretMeta,
    info: &VersionMeta,
    stored: Option<&[u8]>,
    value: &[u8],
) -> Option<bool> {
    let kept = meta.versions.iter().find(|v| v.version == info.version)?;
    Some(kept.created == info.created && stored == Some(value))
}

impl EtcdStore {
    /// One try of a write. `retried`: an earlier try may have committed, so a moved version
    /// may be this write's own. An error carries whether the request may have reached etcd
    /// as a write.
    pub(super) async fn put_once(
        &self,
        path: &SecretPath,
        expected: u64,
        value: &[u8],
        info: &VersionMeta,
        retried: bool,
        deadline: Instant,
    ) -> Result<PutStep, (Failure, bool)> {
        let empty = || SecretMeta { current_version: 0, versions: Vec::new() };
        // The freshest guess: the read cache's copy (kept by the watch, so it also knows other
        // replicas' writes) or this replica's last view, whichever is newer (the cache lags
        // this replica's own writes while its watch is stalled on a paused member). The
        // cache's copy is decoded only when it is the newer.
        let hint = self.hints.get(path);
        let meta_key = self.meta_key(path.as_str());
        let cached = self
            .cache
            .entry(meta_key.as_bytes())
            .filter(|(_, rev)| hint.as_ref().is_none_or(|(_, hinted)| rev >= hinted))
            .and_then(|(v, rev)| serde_json::from_slice::<SecretMeta>(&v).ok().map(|m| (m, rev)));
        let guess = cached.or(hint);
        let (meta, mod_revision) = match guess {
            Some((meta, rev)) if meta.current_version == expected => (meta, rev),
            // Without a hint, a first version expects that the secret never existed.
            None if expected == 0 => (empty(), 0),
            _ => {
                let (meta, rev, _) = self.meta(path, deadline).await.map_err(|f| (f, false))?;
                let meta = meta.unwrap_or_else(empty);
                self.hints.remember(path, meta.clone(), rev);
                if meta.current_version != expected {
                    return self.settle(path, &meta, info, value, retried, deadline).await;
                }
                (meta, rev)
            }
        };
        let data_key = self.data_key(path, info.version);
        let mut new = meta;
        let mut ops = Vec::new();
        for pruned in new.push_version(info.clone(), self.max_versions) {
            ops.push(TxnOp::delete(self.data_key(path, pruned.version), None));
        }
        ops.push(TxnOp::put(data_key.as_str(), value, None));
        ops.push(TxnOp::put(meta_key.as_str(), encode_meta(&new).map_err(|f| (f, false))?, None));
        let mut when =
            vec![Compare::mod_revision(meta_key.as_str(), CompareOp::Equal, mod_revision)];
        let mut or_else =
            vec![TxnOp::get(meta_key.as_str(), None), TxnOp::get(data_key.as_str(), None)];
        let fence = self.fence();
        if let Some(f) = &fence {
            when.push(f.compare());
            or_else.push(f.probe());
        }
        let txn = Txn::new().when(when).and_then(ops).or_else(or_else);
        let answer = match self.combiner.txn(meta_key, txn, value.len(), deadline).await {
            Ok(answer) => answer,
            Err(failed) => {
                self.hints.forget(path);
                return Err(failed);
            }
        };
        if answer.succeeded {
            self.hints.remember(path, new, answer.revision);
            return Ok(PutStep::Written);
        }
        // The compare failed: the else-branch has the current metadata and the value stored
        // at the version this write wanted.
        let mut gets = answer.responses.into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let (Some(meta_now), Some(data_now)) = (gets.next(), gets.next()) else {
            return Err((corrupt(format!("a write of {path} got no answer to its gets")), false));
        };
        if let Some(f) = &fence {
            f.check(gets.next().as_ref()).map_err(|e| (Failure::Done(e), false))?;
        }
        let (current, rev) = decode_first(path.as_str(), &meta_now).map_err(|f| (f, false))?;
        let current = current.unwrap_or_else(empty);
        self.hints.remember(path, current.clone(), rev);
        if current.current_version == expected {
            // Another writer changed the metadata (a delete mark), not the version.
            return Ok(PutStep::Again);
        }
        Ok(decide(&current, info, stored(&data_now), value, retried))
    }

    /// The secret is not at `expected`: a conflict, unless it holds this write's own
    /// earlier try (reading the value to tell).
    async fn settle(
        &self,
        path: &SecretPath,
        meta: &SecretMeta,
        info: &VersionMeta,
        value: &[u8],
        retried: bool,
        deadline: Instant,
    ) -> Result<PutStep, (Failure, bool)> {
        if !retried {
            return Ok(PutStep::Conflict(meta.current_version));
        }
        let key = self.data_key(path, info.version);
        let resp = self
            .members
            .attempt(deadline, |mut kv| async move { kv.get(key, None).await })
            .await
            .map_err(|f| (f, false))?;
        Ok(decide(meta, info, stored(&resp), value, retried))
    }

    /// One try of `change` (a delete, undelete or destroy): the metadata changed by
    /// compare-and-set, with the value it names (a destroy) deleted in the same transaction.
    /// Doing it again changes nothing, also how a retry sees its own earlier try; a compare
    /// that fails because the metadata moved in between is retried.
    pub(super) async fn change_once(
        &self,
        path: &SecretPath,
        change: Change,
        deadline: Instant,
    ) -> Result<VersionMeta, Failure> {
        let key = self.meta_key(path.as_str());
        let (meta, mod_revision, _) = self.meta(path, deadline).await?;
        let mut meta = meta.ok_or(Failure::Done(StoreError::NotFound))?;
        let (info, changed) = meta.apply(change).map_err(Failure::Done)?;
        if !changed {
            return Ok(info);
        }
        let mut ops = vec![TxnOp::put(key.as_str(), encode_meta(&meta)?, None)];
        if let Some(version) = change.removes() {
            ops.push(TxnOp::delete(self.data_key(path, version), None));
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(key.as_str(), CompareOp::Equal, mod_revision)])
            .and_then(ops);
        let resp =
            self.members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await?;
        if resp.succeeded() {
            self.hints.remember(path, meta, resp.header().map_or(0, |h| h.revision()));
            Ok(info)
        } else {
            Err(Failure::Refused(format!("metadata changed during {}", change.name())))
        }
    }
}

/// The stored value a get found, if any.
fn stored(resp: &GetResponse) -> Option<&[u8]> {
    resp.kvs().first().map(|kv| kv.value())
}

/// What a try that found the secret at another version than expected means.
fn decide(
    meta: &SecretMeta,
    info: &VersionMeta,
    stored: Option<&[u8]>,
    value: &[u8],
    retried: bool,
) -> PutStep {
    if !retried {
        return PutStep::Conflict(meta.current_version);
    }
    match holds(meta, info, stored, value) {
        Some(true) => PutStep::Written,
        Some(false) => PutStep::Conflict(meta.current_version),
        None => PutStep::Unsure,
    }
}
