//! Limits on what callers may use: per-identity rate limits ([`RateLimiter`], configured
//! in the policy's `rate_limits.toml`), a budget for the bytes of requests in flight and
//! open-stream accounting for idle connections ([`RequestLayer`]).

mod bucket;
mod limiter;
mod rate;
mod requests;

pub use bucket::{Rate, TokenBucket};
pub use limiter::{RateLimiter, Throttled};
pub use rate::{Class, FILE as RATE_LIMITS_FILE, RateLimits};
pub use requests::{Activity, MemoryBudget, RequestLayer};

#[cfg(feature = "testing")]
static BYPASSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the per-request limits are enforced. Always, except in benchmarks of the
/// `testing` build, which switch them off and on at run time to measure what they cost
/// ([`bypass`]).
#[inline]
fn enforced() -> bool {
    #[cfg(feature = "testing")]
    {
        !BYPASSED.load(std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "testing"))]
    {
        true
    }
}

/// Benchmarks only: switches the per-request limits (rate limits, the request memory
/// budget, open-stream accounting) off (`true`) or back on, for every gateway in the process.
#[cfg(feature = "testing")]
pub fn bypass(off: bool) {
    BYPASSED.store(off, std::sync::atomic::Ordering::Relaxed);
}
