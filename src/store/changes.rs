//! The store's change feed: what `Secrets.Watch` streams. Each backend turns its own commits
//! into [`ChangeEvent`]s (etcd: the replica's one watch feed, see `etcd/cache.rs`; the
//! embedded store: its write transactions, with a bounded change log in the file) and hands
//! them to one [`Changes`] per store, in revision order.
//!
//! [`Changes`] keeps the newest events in a bounded ring shared by every watcher: a watcher
//! holds only its position (a revision), never a buffer of its own, so memory stays bounded
//! however many watchers there are and however slow they read. The ring is *complete after*
//! a revision, its `start`: every change with a higher revision up to its `head` is in it.
//! A watcher whose position falls below `start` (it resumed from too far back, it read too
//! slowly, or the feed lost history to a compaction) must list again and resume from the
//! current revision: [`Since::Gone`].
//!
//! Events carry no values: the path, the version, what happened to it, the store revision,
//! and when (from the metadata). A change is derived from a secret's metadata before and
//! after one write ([`derive`]), so both backends report the same kinds.

use std::{
    collections::VecDeque,
    sync::{Arc, RwLock},
};

use tokio::sync::watch;

use super::{SecretMeta, UnixMillis};
use crate::path::SecretPath;

/// What happened to a version of a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A new version was written.
    Written,
    /// The version was soft-deleted.
    Deleted,
    /// The soft-deleted version was restored.
    Undeleted,
    /// The version's value was destroyed for good.
    Destroyed,
}

impl ChangeKind {
    /// `written`, `deleted`, `undeleted` or `destroyed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Written => "written",
            Self::Deleted => "deleted",
            Self::Undeleted => "undeleted",
            Self::Destroyed => "destroyed",
        }
    }
}

/// One change to one secret, as `Secrets.Watch` reports it. Never a value.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChangeEvent {
    /// The secret.
    pub path: SecretPath,
    /// The version it happened to.
    pub version: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The store revision of the write (etcd's revision; the embedded store's own counter).
    pub revision: u64,
    /// When, as the metadata records it.
    pub time: UnixMillis,
}

/// The answer of [`Changes::since`].
#[derive(Debug)]
pub enum Since {
    /// The events after the position asked for, oldest first (possibly none), and the
    /// revision up to which they are complete: the watcher's next position.
    Events(Vec<Arc<ChangeEvent>>, u64),
    /// The position is before what the feed still holds: the events after it are gone.
    /// The oldest position that can still be resumed from.
    Gone(u64),
}

/// The ring of recent changes; see the module docs.
pub struct Changes {
    ring: RwLock<Ring>,
    /// The head: every change up to it is in the ring. Watchers wait on it.
    head: watch::Sender<u64>,
}

struct Ring {
    events: VecDeque<Arc<ChangeEvent>>,
    /// Complete after this revision.
    start: u64,
    capacity: usize,
    /// Whether the backend's feed has shown it follows from `start` (etcd: the start was not
    /// compacted when its watch was made). Until then the feed answers nothing and no one
    /// can resume.
    ready: bool,
}

impl std::fmt::Debug for Changes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.read();
        f.debug_struct("Changes")
            .field("start", &ring.start)
            .field("events", &ring.events.len())
            .field("head", &self.head())
            .finish()
    }
}

impl Changes {
    /// An empty feed complete after revision `start`, keeping at most `capacity` events.
    pub fn new(start: u64, capacity: usize) -> Self {
        let ring = Ring { events: VecDeque::new(), start, capacity: capacity.max(1), ready: true };
        Self { ring: RwLock::new(ring), head: watch::channel(start).0 }
    }

    /// A feed whose backend has not yet proved where it starts: ready once it has
    /// ([`Changes::mark_ready`]).
    pub(crate) fn starting(capacity: usize) -> Self {
        let feed = Self::new(0, capacity);
        feed.write().ready = false;
        feed
    }

    /// Waits (until `deadline`) for the feed to be ready; whether it is.
    pub async fn ready(&self, deadline: tokio::time::Instant) -> bool {
        let mut head = self.subscribe();
        loop {
            if self.read().ready {
                return true;
            }
            if tokio::time::timeout_at(deadline, head.changed()).await.is_err() {
                return false;
            }
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        // Every update leaves the ring consistent before anything that can panic.
        self.ring.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Ring> {
        self.ring.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The revision up to which every change is in the ring.
    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    /// The revision after which the ring is complete.
    pub fn start(&self) -> u64 {
        self.read().start
    }

    /// Notified whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Appends `events` (in revision order) and moves the head to `progress` or the newest
    /// event's revision, whichever is higher. Events not after the newest one held (or the
    /// start) are dropped: a feed that re-reads history after a break repeats some.
    pub(crate) fn push(&self, events: Vec<ChangeEvent>, progress: u64) {
        let head = self.head();
        let mut top = progress;
        {
            let mut ring = self.write();
            for e in events {
                let newest = ring.events.back().map_or(0, |e| e.revision);
                let repeat = e.revision < newest
                    || (e.revision == newest
                        && ring
                            .events
                            .iter()
                            .rev()
                            .take_while(|x| x.revision == newest)
                            .any(|x| x.path == e.path));
                if e.revision <= ring.start || repeat {
                    continue;
                }
                top = top.max(e.revision);
                if ring.events.len() == ring.capacity
                    && let Some(old) = ring.events.pop_front()
                {
                    ring.start = old.revision;
                }
                ring.events.push_back(Arc::new(e));
            }
        }
        if top > head {
            self.head.send_replace(top);
        }
    }

    /// The backend's feed now follows from `start` (see [`Changes::starting`]).
    pub(crate) fn mark_ready(&self) {
        let was = std::mem::replace(&mut self.write().ready, true);
        if !was {
            // Wakes whoever waits in [`Changes::ready`].
            self.head.send_modify(|_| {});
        }
    }

    /// History was lost (a compaction, or a store that lost its change log): the ring is
    /// emptied and complete after `start` only. Watchers behind it get [`Since::Gone`].
    pub(crate) fn reset(&self, start: u64) {
        {
            let mut ring = self.write();
            ring.events.clear();
            ring.start = ring.start.max(start);
        }
        self.head.send_modify(|h| *h = (*h).max(start));
    }

    /// The events after revision `after`, at most `limit` revisions' worth (events of one
    /// revision are never split), or [`Since::Gone`].
    pub fn since(&self, after: u64, limit: usize) -> Since {
        let head = self.head();
        let ring = self.read();
        if !ring.ready {
            return Since::Events(Vec::new(), after);
        }
        if after < ring.start {
            return Since::Gone(ring.start);
        }
        let first = ring.events.partition_point(|e| e.revision <= after);
        let mut out: Vec<Arc<ChangeEvent>> =
            ring.events.iter().skip(first).take(limit.max(1)).cloned().collect();
        let Some(last) = out.last().map(|e| e.revision) else {
            return Since::Events(out, head.max(after));
        };
        let taken = first + out.len();
        if taken == ring.events.len() {
            return Since::Events(out, head.max(last));
        }
        // Finish the last revision, so a resume from it misses nothing.
        out.extend(ring.events.iter().skip(taken).take_while(|e| e.revision == last).cloned());
        Since::Events(out, last)
    }

    /// How many events in the ring are after `after`: how far behind a watcher there is.
    pub fn behind(&self, after: u64) -> usize {
        let ring = self.read();
        if !ring.ready {
            return 0;
        }
        ring.events.len() - ring.events.partition_point(|e| e.revision <= after)
    }
}

/// The change one write made to a secret, from its metadata before (`None`: it did not
/// exist) and after; `None` when nothing a watcher sees changed (the same metadata again).
pub fn derive(
    path: &SecretPath,
    before: Option<&SecretMeta>,
    after: &SecretMeta,
    revision: u64,
) -> Option<ChangeEvent> {
    let event = |version, kind, time| {
        Some(ChangeEvent { path: path.clone(), version, kind, revision, time })
    };
    let written = before.map_or(0, |b| b.current_version);
    if after.current_version > written {
        let created = after.versions.first().map_or(UnixMillis(0), |v| v.created);
        return event(after.current_version, ChangeKind::Written, created);
    }
    for now in &after.versions {
        let was = before.and_then(|b| b.versions.iter().find(|v| v.version == now.version));
        let (was_deleted, was_destroyed) = was.map_or((None, None), |w| (w.deleted, w.destroyed));
        if let (None, Some(t)) = (was_destroyed, now.destroyed) {
            return event(now.version, ChangeKind::Destroyed, t);
        }
        match (was_deleted, now.deleted) {
            (None, Some(t)) => return event(now.version, ChangeKind::Deleted, t),
            (Some(_), None) => return event(now.version, ChangeKind::Undeleted, UnixMillis::now()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VersionMeta;

    fn ev(revision: u64) -> ChangeEvent {
        ChangeEvent {
            path: SecretPath::parse("/a").unwrap(),
            version: revision,
            kind: ChangeKind::Written,
            revision,
            time: UnixMillis(revision),
        }
    }

    fn revisions(s: Since) -> (Vec<u64>, u64) {
        match s {
            Since::Events(e, upto) => (e.iter().map(|e| e.revision).collect(), upto),
            Since::Gone(start) => panic!("gone, start {start}"),
        }
    }

    #[test]
    fn since_returns_what_follows_and_the_next_position() {
        let c = Changes::new(10, 100);
        c.push(vec![ev(11), ev(13), ev(14)], 20);
        assert_eq!(revisions(c.since(10, 100)), (vec![11, 13, 14], 20));
        assert_eq!(revisions(c.since(12, 100)), (vec![13, 14], 20));
        assert_eq!(revisions(c.since(20, 100)), (vec![], 20));
        assert_eq!(revisions(c.since(10, 2)), (vec![11, 13], 13), "a page ends at its last");
        assert_eq!(c.behind(11), 2);
        assert!(matches!(c.since(9, 10), Since::Gone(10)));
    }

    #[test]
    fn a_revision_is_never_split_across_pages() {
        let c = Changes::new(0, 100);
        let mut two = ev(5);
        two.path = SecretPath::parse("/b").unwrap();
        c.push(vec![ev(4), ev(5), two, ev(6)], 0);
        assert_eq!(revisions(c.since(0, 2)), (vec![4, 5, 5], 5));
    }

    #[test]
    fn the_ring_forgets_its_oldest_and_says_so() {
        let c = Changes::new(0, 3);
        c.push((1..=5).map(ev).collect(), 0);
        assert_eq!(c.start(), 2);
        assert!(matches!(c.since(1, 10), Since::Gone(2)));
        assert_eq!(revisions(c.since(2, 10)), (vec![3, 4, 5], 5));
        c.push(vec![ev(5), ev(3)], 0);
        assert_eq!(revisions(c.since(2, 10)), (vec![3, 4, 5], 5), "repeats are dropped");
        c.reset(9);
        assert!(matches!(c.since(5, 10), Since::Gone(9)));
        assert_eq!(revisions(c.since(9, 10)), (vec![], 9));
    }

    #[test]
    fn derive_names_each_kind() {
        let p = SecretPath::parse("/a").unwrap();
        let mut m = SecretMeta { current_version: 0, versions: vec![] };
        m.push_version(VersionMeta::new(1, UnixMillis(7)), 10);
        let written = derive(&p, None, &m, 3).unwrap();
        assert_eq!(
            (written.kind, written.version, written.time),
            (ChangeKind::Written, 1, m.versions[0].created)
        );
        let before = m.clone();
        m.versions[0].deleted = Some(UnixMillis(8));
        assert_eq!(derive(&p, Some(&before), &m, 4).unwrap().kind, ChangeKind::Deleted);
        let deleted = m.clone();
        m.versions[0].deleted = None;
        assert_eq!(derive(&p, Some(&deleted), &m, 5).unwrap().kind, ChangeKind::Undeleted);
        let live = m.clone();
        m.versions[0].destroyed = Some(UnixMillis(9));
        let d = derive(&p, Some(&live), &m, 6).unwrap();
        assert_eq!((d.kind, d.time), (ChangeKind::Destroyed, UnixMillis(9)));
        assert!(derive(&p, Some(&m), &m, 7).is_none());
    }
}
