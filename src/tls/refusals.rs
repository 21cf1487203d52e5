//! Refused handshakes in the audit log: one by one up to a rate ([`REFUSALS_PER_SEC`],
//! bursts of [`REFUSAL_BURST`]); beyond it they are counted, and one summary record per
//! second gives the count. Anyone who can reach the port can cause a refusal, so without the
//! limit a flood of garbage connections would fill the disk, and a full disk stops the
//! gateway (the log fails closed).

use std::{
    net::SocketAddr,
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use crate::{
    audit::{AuditLog, Kind, Record},
    limits::{Rate, TokenBucket},
    metrics::Refusal,
};

/// Refused handshakes recorded one by one per second, on average.
pub const REFUSALS_PER_SEC: u32 = 50;
/// Refused handshakes recorded one by one in a burst.
pub const REFUSAL_BURST: u32 = 200;
/// How often a count of refusals over the limit is written.
pub(super) const SUMMARY_EVERY: Duration = Duration::from_secs(1);

const RATE: Rate = Rate { per_second: REFUSALS_PER_SEC as f64, burst: REFUSAL_BURST };

/// See the module docs.
pub(super) struct Refusals {
    audit: AuditLog,
    state: Mutex<Counted>,
}

struct Counted {
    bucket: TokenBucket,
    /// Refusals over the limit not yet in a summary record.
    over: u64,
    /// When the first of them happened, and its peer and reason (an example for auditors).
    first: Option<(String, SocketAddr, String)>,
}

impl Counted {
    fn new(now: Instant) -> Self {
        Self { bucket: TokenBucket::full(RATE, now), over: 0, first: None }
    }

    /// True if a refusal now may be recorded one by one; else it is counted.
    fn take(&mut self, now: Instant, peer: SocketAddr, reason: &str) -> bool {
        if self.bucket.try_take(RATE, now).is_ok() {
            return true;
        }
        self.over += 1;
        self.first
            .get_or_insert_with(|| (crate::clock::now_rfc3339_millis(), peer, reason.to_owned()));
        false
    }

    /// The count of refusals over the limit since the last summary, with the first of them.
    fn summary(&mut self) -> Option<(u64, (String, SocketAddr, String))> {
        let first = self.first.take()?;
        Some((std::mem::take(&mut self.over), first))
    }
}

impl Refusals {
    pub(super) fn new(audit: AuditLog) -> Self {
        Self { audit, state: Mutex::new(Counted::new(Instant::now())) }
    }

    fn counted(&self) -> MutexGuard<'_, Counted> {
        // Counts only: a panic elsewhere leaves nothing inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records (or counts) a handshake from `peer` refused for `reason`.
    pub(super) fn refused(&self, peer: SocketAddr, why: Refusal, reason: &str) {
        crate::metrics::handshake_refused(why);
        if !self.counted().take(Instant::now(), peer, reason) {
            return;
        }
        tracing::info!(peer = %peer, %reason, "TLS handshake refused");
        // Recorded without waiting: nothing was granted, so nothing waits on it.
        self.audit.note(refusal_record(peer, reason.chars().take(300).collect()));
    }

    /// Writes the count of refusals over the limit, if there were any since the last time.
    pub(super) fn summarize(&self) {
        let Some((count, (since, peer, reason))) = self.counted().summary() else { return };
        tracing::warn!(count, %since, first_peer = %peer, "TLS handshakes refused over the recording limit; counted, not recorded one by one");
        let reason: String = reason.chars().take(300).collect();
        let mut r = refusal_record(
            peer,
            format!(
                "{count} refused handshakes over the limit of {REFUSALS_PER_SEC} per second \
                 were counted, not recorded one by one; the first, from this peer: {reason}"
            ),
        );
        (r.since, r.refused) = (Some(since), Some(count));
        self.audit.note(r);
    }
}

/// The `handshake` record of a refusal from `peer`.
fn refusal_record(peer: SocketAddr, reason: String) -> Record {
    let mut r = Record::new(Kind::Handshake);
    r.peer = Some(peer.to_string());
    r.decision = Some(crate::authz::Effect::Deny);
    r.status = Some("UNAUTHENTICATED".into());
    r.reason = Some(reason);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_over_the_rate_are_counted_and_summarized_once() {
        let start = Instant::now();
        let peer: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let mut b = Counted::new(start);
        let recorded = (0..REFUSAL_BURST + 30).filter(|_| b.take(start, peer, "bad")).count();
        assert_eq!(recorded, REFUSAL_BURST as usize, "a burst is recorded one by one");
        let (count, (_, first_peer, reason)) = b.summary().expect("a summary of the rest");
        assert_eq!((count, first_peer, reason.as_str()), (30, peer, "bad"));
        assert!(b.summary().is_none(), "each refusal is in one summary only");

        // Tokens come back at the rate: after 100 ms, 5 more are recorded one by one.
        let later = start + Duration::from_millis(100);
        let recorded = (0..10).filter(|_| b.take(later, peer, "bad")).count();
        assert_eq!(recorded, (REFUSALS_PER_SEC / 10) as usize);
        assert_eq!(b.summary().map(|s| s.0), Some(5));
        // ... and never more than a burst, however long it was quiet.
        let much_later = start + Duration::from_secs(3600);
        let recorded = (0..REFUSAL_BURST + 1).filter(|_| b.take(much_later, peer, "x")).count();
        assert_eq!(recorded, REFUSAL_BURST as usize);
    }
}
