//! Key rotation over the stored records: which keys they use, and online rewrap.
//!
//! Rewrap walks every stored version of every secret (live, deleted and older versions
//! alike — each is a ciphertext under some key) and re-seals the ones not under the
//! primary key, one record at a time, with a compare-and-set on the record's exact bytes.
//! A concurrent write creates a *new* version and never touches old ones, so rewrap cannot
//! overwrite it; a record that changed or was pruned under our feet is skipped, never
//! clobbered. Every record stays readable throughout: it is either the old envelope (whose
//! key is still active) or the new one. Rewrap is idempotent, so an interrupted run is
//! resumed by running it again: records already under the primary key cost one header
//! read each.

use std::{collections::BTreeMap, ops::ControlFlow};

use crate::{
    crypto::{KeyringHandle, envelope},
    path::SecretPath,
    store::{Store, StoreError, StoredVersion},
};

/// Records fetched per store round trip.
const PAGE: usize = 256;

/// How many stored records each key seals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Records per key id (including ids not in the keyring).
    pub records: BTreeMap<String, u64>,
    /// Records whose header does not parse.
    pub unreadable: u64,
    /// All records.
    pub total: u64,
}

/// Counters of a rewrap run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RewrapCounts {
    /// Records looked at.
    pub scanned: u64,
    /// Records re-sealed under the primary key.
    pub rewrapped: u64,
    /// Records already under the primary key.
    pub current: u64,
    /// Records that changed or disappeared while being rewrapped (left as they are).
    pub skipped: u64,
    /// Records that could not be opened (unknown key, altered bytes); see the log.
    pub failed: u64,
}

/// Counts the records each key seals.
pub async fn key_usage(store: &dyn Store) -> Result<KeyUsage, StoreError> {
    let mut usage = KeyUsage::default();
    for_each_page(store, |page| {
        for r in page {
            usage.total += 1;
            match envelope::parse_header(&r.value) {
                Ok(h) => *usage.records.entry(h.key_id.to_owned()).or_default() += 1,
                Err(_) => usage.unreadable += 1,
            }
        }
        ControlFlow::Continue(())
    })
    .await?;
    Ok(usage)
}

/// Re-seals every record not under the primary key. `on_progress` is called after each
/// record; returning `Break` stops the run early (it can be resumed by running again).
pub async fn rewrap(
    store: &dyn Store,
    keys: &KeyringHandle,
    mut on_progress: impl FnMut(&RewrapCounts) -> ControlFlow<()>,
) -> Result<RewrapCounts, StoreError> {
    let mut p = RewrapCounts::default();
    let mut after: Option<(SecretPath, u64)> = None;
    loop {
        let page = store.scan(after.as_ref().map(|(path, v)| (path, *v)), PAGE).await?;
        let Some(last) = page.last() else { return Ok(p) };
        after = Some((last.path.clone(), last.version));
        for record in &page {
            p.scanned += 1;
            rewrap_one(store, keys, record, &mut p).await?;
            if on_progress(&p).is_break() {
                return Ok(p);
            }
        }
    }
}

async fn rewrap_one(
    store: &dyn Store,
    keys: &KeyringHandle,
    record: &StoredVersion,
    p: &mut RewrapCounts,
) -> Result<(), StoreError> {
    // The keyring may be reloaded during a long run; each record uses the one in force.
    let ring = keys.current();
    let primary = ring.primary();
    let (path, version) = (&record.path, record.version);
    match envelope::parse_header(&record.value) {
        Ok(h) if h.key_id == primary.id.as_str() => {
            p.current += 1;
            return Ok(());
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(%path, version, error = %e, "rewrap: record is not a valid envelope");
            p.failed += 1;
            return Ok(());
        }
    }
    let sealed = envelope::open(&ring, path, version, &record.value)
        .and_then(|plain| envelope::seal(primary, path, version, &plain));
    match sealed {
        Ok(new) => {
            match store.replace(path, version, &record.value, &new).await {
                Ok(true) => p.rewrapped += 1,
                // Changed concurrently, or the primary changed under the run (the write
                // fence): left for the next run.
                Ok(false) | Err(StoreError::Fenced { .. }) => p.skipped += 1,
                Err(e) => return Err(e),
            }
        }
        Err(e) => {
            tracing::warn!(%path, version, error = %e, "rewrap: record cannot be opened");
            p.failed += 1;
        }
    }
    Ok(())
}

async fn for_each_page(
    store: &dyn Store,
    mut f: impl FnMut(&[StoredVersion]) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    let mut after: Option<(SecretPath, u64)> = None;
    loop {
        let page = store.scan(after.as_ref().map(|(path, v)| (path, *v)), PAGE).await?;
        let Some(last) = page.last() else { return Ok(()) };
        after = Some((last.path.clone(), last.version));
        if f(&page).is_break() {
            return Ok(());
        }
    }
}
