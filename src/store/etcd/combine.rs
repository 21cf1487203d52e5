//! Write combining: the compare-and-set transactions of concurrent puts go to etcd as the
//! nested transactions of one request.
//!
//! etcd 3.4 spends most of a write's CPU on the request, not on its keys: measured here, a
//! compare-and-set transaction costs its three members about 1.8× a plain put (435 against
//! 240 µs), while a second key in it adds about 30 µs. So at 64 concurrent writers, etcd's
//! own CAS transactions reach only 0.61× of its plain puts. Sent as nested transactions of
//! one request, each put keeps its own compare, its own then- and else-branch and its own
//! answer (one put's failed compare does not fail another), and etcd applies them all at
//! one revision: measured with the same 64 writers (two keys per put, no watcher), about
//! 150–200 µs of etcd CPU per put and 1.2–1.45× the throughput of plain puts.
//!
//! A put goes out at once when fewer than [`IN_FLIGHT`] requests are on their way, alone (a
//! plain transaction, as without combining); the puts that come while they are, go together
//! in the next one. So a lone writer waits for nothing, and under load the number of etcd
//! requests follows the round trip, not the number of writers. Two puts of one secret never
//! share a request (etcd refuses a request that writes a key twice); the later one waits for
//! the next.

use std::{
    collections::{HashSet, VecDeque},
    sync::Arc,
};

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use tokio::{
    sync::{Mutex, mpsc, oneshot},
    time::Instant,
};

use super::members::{Failure, Members};

/// Combined requests on their way at once.
const IN_FLIGHT: usize = 2;
/// Most puts in one request (etcd's `--max-txn-ops` is 128 by default).
const MAX_PUTS: usize = 32;
/// Most value bytes in one request (etcd's `--max-request-bytes` is 1.5 MiB by default); a
/// larger put goes alone.
const MAX_BYTES: usize = 512 * 1024;

/// What etcd answered one put's transaction.
pub(super) struct Answer {
    /// Whether its compare held (the then-branch ran).
    pub(super) succeeded: bool,
    /// The answers of the branch that ran, in order.
    pub(super) responses: Vec<TxnOpResponse>,
    /// The revision of the request (every put of it committed at this revision).
    pub(super) revision: i64,
}

/// One try of a put, waiting to go: its transaction and who hears the answer. An error
/// carries whether the request may have reached etcd as a write.
struct Job {
    /// The key only this put writes (the secret's metadata), to keep two puts of one secret
    /// out of one request.
    key: String,
    txn: Txn,
    bytes: usize,
    deadline: Instant,
    reply: oneshot::Sender<Result<Answer, (Failure, bool)>>,
}

/// The handle puts send their transactions through; see the module docs.
pub(super) struct Combiner {
    tx: mpsc::UnboundedSender<Job>,
}

impl Combiner {
    /// Starts [`IN_FLIGHT`] senders; they end when the combiner is dropped.
    pub(super) fn start(members: Arc<Members>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Arc::new(Mutex::new(Queue { rx, held: VecDeque::new() }));
        for _ in 0..IN_FLIGHT {
            tokio::spawn(send_loop(Arc::clone(&members), Arc::clone(&queue)));
        }
        Self { tx }
    }

    /// Sends `txn`, the transaction of one put whose only written key of its own is `key`
    /// (with `bytes` of value), and waits for etcd's answer to it.
    pub(super) async fn txn(
        &self,
        key: String,
        txn: Txn,
        bytes: usize,
        deadline: Instant,
    ) -> Result<Answer, (Failure, bool)> {
        let (reply, answer) = oneshot::channel();
        let stopped = || (Failure::NotSent("the store is closing".into()), false);
        self.tx.send(Job { key, txn, bytes, deadline, reply }).map_err(|_| stopped())?;
        answer.await.unwrap_or_else(|_| Err(stopped()))
    }
}

/// Puts waiting to go: the channel, and those held back from a request that already had a
/// put of their secret (oldest first).
struct Queue {
    rx: mpsc::UnboundedReceiver<Job>,
    held: VecDeque<Job>,
}

impl Queue {
    /// The next request's puts: waits for one, then takes every other waiting one that fits.
    /// `None` when the combiner is gone.
    async fn next(&mut self) -> Option<Vec<Job>> {
        let mut batch = Vec::new();
        let (mut keys, mut bytes) = (HashSet::new(), 0);
        let mut fits = |job: &Job, batch: &Vec<Job>| {
            let room = batch.is_empty() || bytes + job.bytes <= MAX_BYTES;
            if batch.len() < MAX_PUTS && room && !keys.contains(&job.key) {
                keys.insert(job.key.clone());
                bytes += job.bytes;
                true
            } else {
                false
            }
        };
        let mut skipped = VecDeque::new();
        while let Some(job) = self.held.pop_front() {
            if fits(&job, &batch) { batch.push(job) } else { skipped.push_back(job) }
        }
        self.held = skipped;
        if batch.is_empty() {
            let job = self.rx.recv().await?;
            fits(&job, &batch);
            batch.push(job);
        }
        while batch.len() < MAX_PUTS
            && let Ok(job) = self.rx.try_recv()
        {
            if fits(&job, &batch) { batch.push(job) } else { self.held.push_back(job) }
        }
        Some(batch)
    }
}

async fn send_loop(members: Arc<Members>, queue: Arc<Mutex<Queue>>) {
    loop {
        let Some(batch) = queue.lock().await.next().await else { return };
        let now = Instant::now();
        // A put whose time ran out while it waited was never sent.
        let (mut batch, late): (Vec<Job>, Vec<Job>) =
            batch.into_iter().partition(|j| j.deadline > now);
        for job in late {
            let why = "the write's time ran out before it was sent";
            let _ = job.reply.send(Err((Failure::NotSent(why.into()), false)));
        }
        if !batch.is_empty() {
            crate::metrics::etcd_write_request(batch.len());
        }
        if batch.len() > 1 {
            send_together(&members, batch).await;
        } else if let Some(job) = batch.pop() {
            job.send_alone(&members).await;
        }
    }
}

impl Job {
    /// Sends this put in a request of its own (a plain transaction) and answers it.
    async fn send_alone(self, members: &Members) {
        let Self { txn, deadline, reply, .. } = self;
        let resp = members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await;
        let _ = reply.send(resp.map(|r| answer(r, None)).map_err(|f| (f, true)));
    }
}

/// Sends `batch` as the nested transactions of one request and answers each put.
async fn send_together(members: &Members, batch: Vec<Job>) {
    let deadline = batch.iter().map(|j| j.deadline).min().unwrap_or_else(Instant::now);
    let ops: Vec<TxnOp> = batch.iter().map(|j| TxnOp::txn(j.txn.clone())).collect();
    let txn = Txn::new().and_then(ops);
    let sent = members.attempt(deadline, |mut kv| async move { kv.txn(txn).await }).await;
    match sent {
        Ok(resp) => {
            let revision = resp.header().map_or(0, |h| h.revision());
            let mut nested = resp.op_responses().into_iter();
            for job in batch {
                let got = match nested.next() {
                    Some(TxnOpResponse::Txn(t)) => Ok(answer(t, Some(revision))),
                    _ => Err((
                        super::corrupt("a combined write got no answer for a put".into()),
                        false,
                    )),
                };
                let _ = job.reply.send(got);
            }
        }
        // A refusal of the whole request for what one put holds (too large, say) must not
        // fail the others: each goes again alone and hears its own answer.
        Err(Failure::Done(_)) => {
            for job in batch {
                job.send_alone(members).await;
            }
        }
        Err(f) => {
            let why = format!("{f:?}");
            for job in batch {
                let copy = match &f {
                    Failure::NoLeader(_) => Failure::NoLeader(why.clone()),
                    Failure::NotSent(_) => Failure::NotSent(why.clone()),
                    Failure::Refused(_) => Failure::Refused(why.clone()),
                    Failure::Unknown(_) | Failure::Done(_) => Failure::Unknown(why.clone()),
                };
                let _ = job.reply.send(Err((copy, true)));
            }
        }
    }
}

/// One put's answer from its transaction's response; `revision` that of the request it went
/// in (a nested transaction's response has no header of its own).
fn answer(resp: TxnResponse, revision: Option<i64>) -> Answer {
    let revision = revision.unwrap_or_else(|| resp.header().map_or(0, |h| h.revision()));
    Answer { succeeded: resp.succeeded(), responses: resp.op_responses(), revision }
}
