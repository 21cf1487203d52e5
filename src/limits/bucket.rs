//! A token bucket: `rate` tokens a second, at most `burst` saved up.

use std::time::{Duration, Instant};

/// How fast a bucket fills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// Most tokens held (a burst taken at once).
    pub burst: u32,
}

/// Tokens left, as of the last refill. A full bucket is the same as no bucket, so callers
/// may drop full ones to bound their memory (see [`TokenBucket::is_full`]).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(rate: Rate, now: Instant) -> Self {
        Self { tokens: f64::from(rate.burst), refilled: now }
    }

    /// Adds what `rate` earned since the last refill (a rate lowered by a reload also caps
    /// what is saved up).
    fn refill(&mut self, rate: Rate, now: Instant) {
        let earned = now.saturating_duration_since(self.refilled).as_secs_f64() * rate.per_second;
        self.tokens = (self.tokens + earned).min(f64::from(rate.burst));
        self.refilled = now;
    }

    /// `Ok` if a token is there now, else how long until one is (nothing is taken).
    pub fn ready(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate.per_second))
        }
    }

    /// Takes a token that [`TokenBucket::ready`] said is there.
    pub fn take_ready(&mut self) {
        self.tokens -= 1.0;
    }

    /// Takes a token if one is there now.
    pub fn try_take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.ready(rate, now)?;
        self.take_ready();
        Ok(())
    }

    /// Whether the bucket has filled up again (so forgetting it changes nothing).
    pub fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= f64::from(rate.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_the_wait_until_the_next_token() {
        let rate = Rate { per_second: 10.0, burst: 3 };
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        assert_eq!((0..5).filter(|_| b.try_take(rate, t0).is_ok()).count(), 3);
        let wait = b.try_take(rate, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!((0..5).filter(|_| b.try_take(rate, t1).is_ok()).count(), 2);
        assert!(!b.is_full(rate, t1));
        assert!(b.is_full(rate, t1 + Duration::from_secs(1)));
        // A lower burst after a reload caps what was saved.
        let lower = Rate { per_second: 10.0, burst: 1 };
        let t2 = t1 + Duration::from_secs(10);
        assert_eq!((0..5).filter(|_| b.try_take(lower, t2).is_ok()).count(), 1);
    }
}
