//! Handshakes in progress: their own budget and a per-source cap, so that connections that
//! never finish their handshake (silent, or dripping a byte at a time) cannot keep real
//! clients out.
//!
//! Every accepted TCP connection is admitted at once. When its source already has
//! `per_source` handshakes pending, the oldest of them is dropped to make room; when the
//! whole budget is pending, the oldest handshake anywhere is dropped. A new connection is
//! never refused while older ones wait, so a flood only ever delays itself: a real client's
//! handshake is the newest, and it needs milliseconds.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    sync::Mutex,
};

use tokio::task::AbortHandle;

/// The handshakes in progress.
pub(super) struct Pending {
    inner: Mutex<Inner>,
    /// Handshakes pending at most.
    budget: usize,
    /// Handshakes pending per source address at most; 0 for no cap (every client behind one
    /// load balancer address).
    per_source: usize,
}

#[derive(Default)]
struct Inner {
    next: u64,
    /// Pending handshakes by age (ids grow).
    order: BTreeMap<u64, (SocketAddr, AbortHandle)>,
    by_source: HashMap<IpAddr, VecDeque<u64>>,
}

impl Pending {
    pub(super) fn new(budget: usize, per_source: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), budget: budget.max(1), per_source }
    }

    /// Starts the handshake of `peer` (`start` spawns it, given its id), after dropping the
    /// oldest pending ones that stand in its way; returns the peers of those dropped. A
    /// connection that is not `capped` (from a load balancer, whose PROXY header has not
    /// named the client yet) counts against the budget only, until [`Pending::moved`].
    pub(super) fn admit(
        &self,
        peer: SocketAddr,
        capped: bool,
        start: impl FnOnce(u64) -> AbortHandle,
    ) -> Vec<SocketAddr> {
        let mut inner = self.lock();
        let mut dropped = Vec::new();
        if capped {
            dropped.extend(self.make_room_for(&mut inner, peer));
        }
        if inner.order.len() >= self.budget {
            if let Some(id) = inner.order.keys().next().copied() {
                dropped.extend(inner.remove(id, true));
            }
        }
        let id = inner.next;
        inner.next += 1;
        // Spawned under the lock, so the handshake's own `done` comes after it is listed.
        let handle = start(id);
        inner.order.insert(id, (peer, handle));
        if capped {
            inner.by_source.entry(peer.ip()).or_default().push_back(id);
        }
        dropped
    }

    /// The PROXY header of handshake `id` named its client: it is capped as one of that
    /// client's from now on (dropping the client's oldest if it is at the cap; returned).
    pub(super) fn moved(&self, id: u64, client: SocketAddr) -> Vec<SocketAddr> {
        let mut inner = self.lock();
        let Some(entry) = inner.order.get_mut(&id) else { return Vec::new() };
        entry.0 = client;
        let dropped: Vec<SocketAddr> = self.make_room_for(&mut inner, client).into_iter().collect();
        inner.by_source.entry(client.ip()).or_default().push_back(id);
        dropped
    }

    /// Drops the oldest pending handshake of `peer`'s source if it is at the cap.
    fn make_room_for(&self, inner: &mut Inner, peer: SocketAddr) -> Option<SocketAddr> {
        if self.per_source == 0 {
            return None;
        }
        let oldest = inner.by_source.get(&peer.ip()).filter(|q| q.len() >= self.per_source);
        let id = *oldest.and_then(|q| q.front())?;
        inner.remove(id, true)
    }

    /// The handshake `id` ended (done, failed or dropped).
    pub(super) fn done(&self, id: u64) {
        // Not aborted: it is the handshake's own task telling us, and it goes on.
        self.lock().remove(id, false);
    }

    /// How many handshakes are pending.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().order.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain bookkeeping: a panic elsewhere leaves nothing half-updated that matters.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Inner {
    /// Forgets handshake `id` (and with `abort`, stops its task); its peer, if it was
    /// pending.
    fn remove(&mut self, id: u64, abort: bool) -> Option<SocketAddr> {
        let (peer, handle) = self.order.remove(&id)?;
        if abort {
            handle.abort();
        }
        if let Some(q) = self.by_source.get_mut(&peer.ip()) {
            q.retain(|&i| i != id);
            if q.is_empty() {
                self.by_source.remove(&peer.ip());
            }
        }
        Some(peer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silent() -> AbortHandle {
        tokio::spawn(std::future::pending::<()>()).abort_handle()
    }

    fn peer(ip: &str, port: u16) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), port)
    }

    #[tokio::test]
    async fn the_oldest_pending_handshake_makes_room_never_the_new_one() {
        let p = Pending::new(4, 2);
        let first = silent();
        assert!(p.admit(peer("10.0.0.1", 1), true, |_| first.clone()).is_empty());
        assert!(p.admit(peer("10.0.0.1", 2), true, |_| silent()).is_empty());
        // The source's cap: its oldest goes (and is aborted).
        assert_eq!(p.admit(peer("10.0.0.1", 3), true, |_| silent()), [peer("10.0.0.1", 1)]);
        tokio::task::yield_now().await;
        assert!(first.is_finished(), "the dropped handshake was aborted");
        assert_eq!(p.len(), 2);
        // The whole budget: the oldest anywhere goes.
        assert!(p.admit(peer("10.0.0.2", 1), true, |_| silent()).is_empty());
        assert!(p.admit(peer("10.0.0.3", 1), true, |_| silent()).is_empty());
        assert_eq!(p.admit(peer("10.0.0.4", 1), true, |_| silent()), [peer("10.0.0.1", 2)]);
        assert_eq!(p.len(), 4);
        // A finished handshake frees its place.
        let ids: Vec<u64> = p.lock().order.keys().copied().collect();
        p.done(ids[0]);
        assert_eq!(p.len(), 3);
        assert!(p.admit(peer("10.0.0.5", 1), true, |_| silent()).is_empty());
    }

    #[tokio::test]
    async fn without_a_per_source_cap_only_the_budget_applies() {
        let p = Pending::new(3, 0);
        for port in 0..3 {
            assert!(p.admit(peer("10.0.0.9", port), true, |_| silent()).is_empty());
        }
        assert_eq!(p.admit(peer("10.0.0.9", 3), true, |_| silent()), [peer("10.0.0.9", 0)]);
    }

    #[tokio::test]
    async fn a_balancers_connection_is_capped_as_its_client_once_named() {
        let p = Pending::new(10, 1);
        let lb = peer("10.9.9.9", 1);
        // Not capped under the balancer's address: many may wait for their headers.
        for port in 1..4 {
            assert!(p.admit(peer("10.9.9.9", port), false, |_| silent()).is_empty());
        }
        assert!(p.admit(peer("192.0.2.1", 1), true, |_| silent()).is_empty());
        let ids: Vec<u64> = p.lock().order.keys().copied().collect();
        // Named as 192.0.2.1, which is at its cap of 1: that client's older one goes.
        assert_eq!(p.moved(ids[0], peer("192.0.2.1", 7)), [peer("192.0.2.1", 1)]);
        assert!(p.moved(ids[1], peer("192.0.2.2", 7)).is_empty());
        assert_eq!(p.len(), 3);
        p.done(ids[0]);
        assert_eq!(p.len(), 2);
        assert!(!p.lock().by_source.contains_key(&lb.ip()));
    }
}
