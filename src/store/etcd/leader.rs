//! Which etcd member leads: every member is asked for its status every [`LEADER_CHECK`], and
//! at once after a try on the leader failed, so that tries go to the leader (`members.rs`
//! says why). A member that does not answer within a try's share is left out; the answers
//! of the highest raft term name the leader. Until one is known, tries go round robin.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use futures_util::future::join_all;

use super::members::{LEADER_CHECK, Member, Members, NO_LEADER};

/// The least time between two checks, however often a try on the leader fails.
const MIN_GAP: Duration = Duration::from_millis(100);

/// Follows which member leads, for as long as `members` is used elsewhere.
pub(super) fn track(members: &Arc<Members>) {
    let weak = Arc::downgrade(members);
    let recheck = Arc::clone(&members.recheck);
    tokio::spawn(async move {
        loop {
            let Some(members) = weak.upgrade() else { return };
            let found = find(&members).await;
            let before = members.leader.swap(found.unwrap_or(NO_LEADER), Ordering::Relaxed);
            if found != Some(before) {
                let url = found.map(|i| members.all()[i].url.as_str());
                tracing::debug!(leader = ?url, "etcd: the member that leads");
            }
            drop(members);
            tokio::time::sleep(MIN_GAP).await;
            let _ = tokio::time::timeout(LEADER_CHECK - MIN_GAP, recheck.notified()).await;
        }
    });
}

/// The index of the member that leads, if the members that answer agree on one of them.
async fn find(members: &Members) -> Option<usize> {
    let answers = join_all(members.all().iter().map(|m| status(members, m))).await;
    let (_, leader, _) = answers.iter().flatten().max_by_key(|(_, _, term)| *term)?;
    answers.iter().position(|a| a.is_some_and(|(id, _, _)| id == *leader))
}

/// Member `m`'s own id, the leader it knows and its raft term, if it answers in time.
async fn status(members: &Members, m: &Member) -> Option<(u64, u64, u64)> {
    let ask = async { members.connection(m).await?.maintenance.clone().status().await };
    let status = tokio::time::timeout(members.share(), ask).await.ok()?.ok()?;
    Some((status.header()?.member_id(), status.leader(), status.raft_term()))
}
