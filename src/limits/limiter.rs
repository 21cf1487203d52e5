//! The rate limiter in front of every `Secrets` and `Admin` request: token buckets per
//! principal and per limited role, with the limits of the policy in force (so a reload
//! changes them at once), and refusals counted for the audit log.
//!
//! A refused request gets RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` detail and is
//! not recorded one by one: the limiter keeps a count per principal and class, and one
//! `rate_limit` record per principal and interval ([`SUMMARY_EVERY`]) gives it. So a flood
//! of requests makes a bounded number of records, like refused handshakes.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use super::{
    bucket::{Rate, TokenBucket},
    rate::{Applies, Class},
};
use crate::{
    audit::{AuditLog, Kind, Record},
    authz::{Authorizer, Effect},
};

/// How often refusals are written to the audit log as counts.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(10);
/// Principals whose refusals are counted apart in one interval; the rest share one count.
const MAX_COUNTED: usize = 1000;
/// Buckets kept before full ones (the same as none) are forgotten.
const PRUNE_ABOVE: usize = 4096;

/// A request over a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Throttled {
    /// What it was counted as.
    pub class: Class,
    /// The limit it is over.
    pub rate: Rate,
    /// The role whose shared limit it is over, if not the principal's own.
    pub role: Option<String>,
    /// How long until every bucket it needs has a token.
    pub retry_after: Duration,
}

/// Refusals of one principal and class since the last summary.
struct Count {
    refused: u64,
    since: String,
    last: Throttled,
}

#[derive(Default)]
struct State {
    principals: HashMap<String, [Option<TokenBucket>; 3]>,
    roles: HashMap<String, [Option<TokenBucket>; 3]>,
    counts: HashMap<(String, Class), Count>,
    /// Refusals of principals past [`MAX_COUNTED`] in this interval.
    others: u64,
}

/// See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct RateLimiter {
    authz: Authorizer,
    audit: AuditLog,
    state: Arc<Mutex<State>>,
}

impl RateLimiter {
    /// A limiter following the limits of `authz`'s policy, counting refusals into `audit`.
    pub fn new(authz: Authorizer, audit: AuditLog) -> Self {
        Self { authz, audit, state: Arc::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Counts and buckets only: a panic elsewhere leaves nothing inconsistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a token for a `class` request of `principal` from every bucket that applies, or
    /// none of them if one is empty.
    pub fn admit(&self, principal: &str, class: Class) -> Result<(), Throttled> {
        if !super::enforced() {
            return Ok(());
        }
        let policy = self.authz.handle().current();
        let limits = policy.rate_limits();
        if limits.is_empty() {
            return Ok(());
        }
        if limits.applying(principal, class).next().is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let mut state = self.state();
        let state = &mut *state;
        // Two passes over the buckets that apply: take a token from each only if every one
        // has one, so a refused request costs no bucket anything.
        let mut over: Option<Throttled> = None;
        for a in limits.applying(principal, class) {
            let (bucket, rate, role) = match a {
                Applies::Principal(rate) => (slot(&mut state.principals, principal), rate, None),
                Applies::Role(role, rate) => (slot(&mut state.roles, role), rate, Some(role)),
            };
            let bucket = bucket[class as usize].get_or_insert_with(|| TokenBucket::full(rate, now));
            if let Err(wait) = bucket.ready(rate, now) {
                if over.as_ref().is_none_or(|o| wait > o.retry_after) {
                    let role = role.map(str::to_owned);
                    over = Some(Throttled { class, rate, role, retry_after: wait });
                }
            }
        }
        if let Some(throttled) = over {
            count(state, principal, &throttled);
            return Err(throttled);
        }
        for a in limits.applying(principal, class) {
            let bucket = match a {
                Applies::Principal(_) => slot(&mut state.principals, principal),
                Applies::Role(role, _) => slot(&mut state.roles, role),
            };
            if let Some(b) = &mut bucket[class as usize] {
                b.take_ready();
            }
        }
        Ok(())
    }

    /// Writes the counts of refusals since the last summary (one record per principal and
    /// class), and forgets buckets that filled up again.
    pub fn summarize(&self) {
        let (counts, others) = {
            let mut state = self.state();
            if state.principals.len() + state.roles.len() > PRUNE_ABOVE {
                prune(&mut state, &self.authz);
            }
            (std::mem::take(&mut state.counts), std::mem::take(&mut state.others))
        };
        for ((principal, class), c) in counts {
            let by = c.last.role.as_ref().map_or_else(String::new, |r| format!(" (role {r})"));
            let reason = format!(
                "{n} {class} requests over the limit of {rate}/s, burst {burst}{by}, were \
                 refused on this replica since {since}",
                n = c.refused,
                class = class.as_str(),
                rate = c.last.rate.per_second,
                burst = c.last.rate.burst,
                since = c.since,
            );
            tracing::warn!(%principal, refused = c.refused, class = class.as_str(), "requests refused by rate limits");
            self.audit.note(record(Some(principal), c.refused, c.since, reason));
        }
        if others > 0 {
            let reason = format!(
                "{others} requests of principals past the first {MAX_COUNTED} refused by rate \
                 limits in this interval"
            );
            self.audit.note(record(None, others, crate::clock::now_rfc3339_millis(), reason));
        }
    }

    /// Runs [`RateLimiter::summarize`] every [`SUMMARY_EVERY`].
    pub fn spawn_summaries(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SUMMARY_EVERY);
            tick.tick().await;
            loop {
                tick.tick().await;
                this.summarize();
            }
        })
    }
}

fn slot<'s>(
    map: &'s mut HashMap<String, [Option<TokenBucket>; 3]>,
    name: &str,
) -> &'s mut [Option<TokenBucket>; 3] {
    if !map.contains_key(name) {
        map.insert(name.to_owned(), [None, None, None]);
    }
    map.get_mut(name).expect("inserted above")
}

fn count(state: &mut State, principal: &str, throttled: &Throttled) {
    let key = (principal.to_owned(), throttled.class);
    if let Some(c) = state.counts.get_mut(&key) {
        c.refused += 1;
        c.last = throttled.clone();
    } else if state.counts.len() < MAX_COUNTED {
        let since = crate::clock::now_rfc3339_millis();
        state.counts.insert(key, Count { refused: 1, since, last: throttled.clone() });
    } else {
        state.others += 1;
    }
}

/// Forgets the buckets that are full under the limits in force (or no longer limited).
fn prune(state: &mut State, authz: &Authorizer) {
    let policy = authz.handle().current();
    let limits = policy.rate_limits();
    let now = Instant::now();
    let classes = [Class::Read, Class::Write, Class::Admin];
    state.principals.retain(|name, buckets| {
        let rates: Vec<Option<Rate>> = classes
            .iter()
            .map(|c| {
                limits.applying(name, *c).find_map(|a| match a {
                    Applies::Principal(r) => Some(r),
                    Applies::Role(..) => None,
                })
            })
            .collect();
        keep(buckets, &rates, now)
    });
    state.roles.retain(|name, buckets| {
        let rates: Vec<Option<Rate>> = classes.iter().map(|c| limits.role_rate(name, *c)).collect();
        keep(buckets, &rates, now)
    });
}

/// Drops the full buckets of one name; true if any is left.
fn keep(buckets: &mut [Option<TokenBucket>; 3], rates: &[Option<Rate>], now: Instant) -> bool {
    for (b, rate) in buckets.iter_mut().zip(rates) {
        let full = match (b.as_mut(), rate) {
            (Some(bucket), Some(rate)) => bucket.is_full(*rate, now),
            _ => true,
        };
        if full {
            *b = None;
        }
    }
    buckets.iter().any(Option::is_some)
}

fn record(principal: Option<String>, refused: u64, since: String, reason: String) -> Record {
    let mut r = Record::new(Kind::RateLimit);
    r.principal = principal;
    r.decision = Some(Effect::Deny);
    r.status = Some("RESOURCE_EXHAUSTED".into());
    (r.since, r.refused, r.reason) = (Some(since), Some(refused), Some(reason));
    r
}
