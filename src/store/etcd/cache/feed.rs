//! The change feed's loop: list the prefix, watch it from the right revision, apply what
//! the watch sends, and start again whenever the watch ends (cancelled, compacted, its
//! member lost or stalled).

use std::{collections::HashMap, sync::Arc, time::Duration};

use etcd_client::WatchOptions;

use super::{
    Cache, Entry,
    listing::{current_revision, list, newest_meta_at},
};
use crate::store::etcd::members::Members;

/// A watch silent this long is asked for progress...
const QUIET: Duration = Duration::from_secs(5);
/// ... and given up if it does not answer within this.
const PROGRESS_DEADLINE: Duration = Duration::from_secs(2);

/// The feed: list, watch (from up to `history` revisions before the list the first time,
/// from the revision after the last one applied afterwards), and again whenever the watch
/// ends.
pub(super) async fn feed_loop(
    cache: std::sync::Weak<Cache>,
    members: Arc<Members>,
    timeout: Duration,
) {
    let mut backoff = Duration::from_millis(100);
    // The revision the next watch starts from, once the first list has set it.
    let mut from: Option<i64> = None;
    // After a watch whose start etcd had compacted away: the change feed's head then, and
    // the compaction revision (see below).
    let mut gap: Option<(u64, i64)> = None;
    loop {
        let Some(c) = cache.upgrade() else { return };
        c.stop_serving();
        let prefix = c.prefix.clone();
        let (entries, revision, start) =
            match prepare(&c, &members, timeout, &mut from, &mut gap).await {
                Ok(prepared) => prepared,
                Err(why) => {
                    tracing::warn!(error = %why, "change feed: cannot read the store; retrying");
                    drop(c);
                    back_off(&mut backoff).await;
                    continue;
                }
            };
        let prev = !(start == revision + 1 && c.holds());
        let entries: HashMap<Vec<u8>, Entry> =
            entries.into_iter().filter(|(k, _)| c.wanted(k)).collect();
        let mut options =
            WatchOptions::new().with_prefix().with_start_revision(start.min(revision + 1));
        if prev {
            options = options.with_prev_key();
        }
        let (url, watch) = members.watch(&prefix, options).await;
        let mut stream = match watch {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(member = %url, error = %e, "read cache: cannot watch; retrying");
                members.cool(&url);
                drop(c);
                back_off(&mut backoff).await;
                continue;
            }
        };
        c.fill(entries, revision);
        if !prev && !c.holds() {
            // The fill itself went over the budget: the cache cannot give previous values.
            tracing::info!(member = %url, "read cache: over its budget; watching with previous values");
            continue;
        }
        c.changes.mark_ready();
        backoff = Duration::from_millis(100);
        drop(c);
        let (why, compacted) = follow(&cache, &mut stream, revision, prev).await;
        tracing::info!(member = %url, %why, "read cache: watch ended; listing again");
        let Some(c) = cache.upgrade() else { return };
        if compacted > 0 {
            // Decided once the next list shows whether anything happened in the lost history.
            gap = Some((c.changes.head(), compacted));
        }
        from = Some((i64::try_from(c.changes.head()).unwrap_or(i64::MAX) + 1).max(compacted));
        drop(c);
        members.cool(&url);
    }
}

/// Lists the prefix and decides where the watch starts: the first time, up to `history`
/// revisions back if etcd still has them; after a break, right after the last change
/// applied (`from`), or after the compaction when the watch found its start compacted
/// (`gap`). Returns the list, its revision and the watch's start; an error when etcd could
/// not be read (the feed backs off and tries again).
async fn prepare(
    c: &Cache,
    members: &Members,
    timeout: Duration,
    from: &mut Option<i64>,
    gap: &mut Option<(u64, i64)>,
) -> Result<(HashMap<Vec<u8>, Entry>, i64, i64), String> {
    let prefix = c.prefix.as_str();
    // After a break the watch goes on from where the feed stopped: list as of the
    // revision before that at once (see below). At start, with the cache holding, it
    // goes back `history` revisions from the current one (learnt from a one-key read),
    // so the list is made there at once too; else (or if that read fails) it is made at
    // the current revision.
    let mut now = None;
    let at = match *from {
        Some(s) => (s > 1 && gap.is_none() && c.holds()).then(|| s - 1),
        None if c.holds() => match current_revision(members, prefix, timeout).await {
            Ok(rev) => {
                now = Some(rev);
                Some((rev + 1 - c.history).max(1) - 1).filter(|&r| r > 0)
            }
            Err(f) => {
                tracing::debug!(error = ?f, "read cache: cannot read the current revision; listing it");
                None
            }
        },
        None => None,
    };
    let listed = match list(members, prefix, timeout, at).await {
        Err(f) if at.is_some() => {
            tracing::debug!(error = ?f, "read cache: cannot list where the feed stopped; listing the current revision");
            list(members, prefix, timeout, None).await
        }
        listed => listed,
    };
    let (mut entries, mut revision) = listed.map_err(|f| format!("listing the prefix: {f:?}"))?;
    if let Some((head, compacted)) = *gap {
        // The history after the head is gone, up to the compaction. If no metadata as of
        // the compaction revision (still readable) was written after the head, nothing
        // under the prefix changed in the lost part (the gateway never deletes metadata,
        // and a key changed in it shows that revision or a later one): the change feed
        // goes on from the compaction with no gap. Otherwise watchers behind it resync.
        let newest = newest_meta_at(members, prefix, compacted, timeout)
            .await
            .map_err(|e| format!("reading the metadata as of the compaction: {e}"))?;
        *gap = None;
        if newest.is_none_or(|n| n > head) {
            tracing::warn!(
                compacted,
                "change feed: changes were compacted away before it read them; watchers behind must resync"
            );
            c.changes.reset(u64::try_from(compacted - 1).unwrap_or(0));
        }
        *from = Some(compacted);
    }
    let start = match *from {
        Some(start) => start,
        None => {
            // Read back history only if etcd still has it (the list was made just
            // before its start, or a read at its start answers): else from the list on.
            let now = now.unwrap_or(revision);
            let wanted = (now + 1 - c.history).max(1);
            let readable = wanted > now
                || revision == wanted - 1
                || newest_meta_at(members, prefix, wanted, timeout)
                    .await
                    // Unreachable says nothing about etcd's history: ask again.
                    .map_err(|e| format!("reading the store's history: {e}"))?
                    .is_some();
            let start = if readable { wanted } else { revision + 1 };
            if readable {
                c.changes.reset(u64::try_from(start - 1).unwrap_or(0));
            } else {
                // No history: but nothing changed after the newest metadata write the
                // list shows, so a client that saw that one can still resume.
                let meta = format!("{prefix}meta");
                let newest = entries
                    .iter()
                    .filter(|(k, _)| k.starts_with(meta.as_bytes()))
                    .map(|(_, (_, rev))| *rev)
                    .max()
                    .unwrap_or(0);
                c.changes.reset(u64::try_from(newest.min(revision)).unwrap_or(0));
                c.changes.push(Vec::new(), u64::try_from(revision).unwrap_or(0));
            }
            *from = Some(start);
            start
        }
    };
    // Each change's metadata before it comes from the cache when the list was made at
    // the revision before the watch starts (it usually was; else it is listed again
    // there): then every event of the watch is after the list, and the cache holds what
    // it changed.
    // Else etcd sends it with each event (`prev_kv`), which costs etcd about a third
    // of a write's CPU: only with the cache off or over its budget, or when the list
    // cannot be made there (compacted).
    if start <= 1 && c.holds() {
        // From etcd's first revision: before it, nothing.
        (entries, revision) = (HashMap::new(), 0);
    } else if start <= revision && c.holds() {
        match list(members, prefix, timeout, Some(start - 1)).await {
            Ok(l) => (entries, revision) = l,
            Err(f) => {
                tracing::debug!(error = ?f, "read cache: cannot list at the watch's start; the watch sends previous values")
            }
        }
    }
    Ok((entries, revision, start))
}

/// Waits `backoff` before the feed tries again, and doubles it (up to 5 s).
async fn back_off(backoff: &mut Duration) {
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

/// Applies the watch's responses until it ends; why it ended, and the compaction revision
/// when it ended because its start was compacted away (else 0).
async fn follow(
    cache: &std::sync::Weak<Cache>,
    stream: &mut etcd_client::WatchStream,
    listed: i64,
    prev: bool,
) -> (String, i64) {
    loop {
        let message = match tokio::time::timeout(QUIET, stream.message()).await {
            Ok(m) => m,
            Err(_) => {
                // Quiet, or stuck on a paused member: a live member answers a progress request.
                if let Err(e) = stream.request_progress().await {
                    return (format!("progress request failed: {e}"), 0);
                }
                match tokio::time::timeout(PROGRESS_DEADLINE, stream.message()).await {
                    Ok(m) => m,
                    Err(_) => return ("no answer to a progress request".into(), 0),
                }
            }
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => return ("the stream ended".into(), 0),
            Err(e) => return (e.to_string(), 0),
        };
        if resp.canceled() || resp.compact_revision() > 0 {
            let why = format!(
                "cancelled ({}; compacted at {})",
                resp.cancel_reason(),
                resp.compact_revision()
            );
            return (why, resp.compact_revision());
        }
        let Some(c) = cache.upgrade() else { return ("the store is gone".into(), 0) };
        // A progress notification (no events, not the creation answer) says every event up
        // to its revision was sent.
        let progress = if resp.events().is_empty() && !resp.created() {
            resp.header().map_or(0, |h| h.revision())
        } else {
            0
        };
        if !c.apply(resp.events(), progress, listed, prev) {
            return ("the cache went over its budget; watching with previous values".into(), 0);
        }
    }
}
