//! Per-request accounting below tonic, for every service: the bytes of requests in flight
//! against one budget for the whole gateway, and the streams open on each connection (for
//! the idle-connection timeout, which counts an open stream as activity).
//!
//! Each request body is counted frame by frame as it arrives, before tonic buffers it into
//! a message: a frame that would take the gateway past `limits.max_request_memory_mib`
//! fails that request at once with RESOURCE_EXHAUSTED, so thousands of streams each holding
//! an unfinished large message cannot grow memory without bound. The bytes stay counted
//! until the request has been answered (its decoded message lives that long), and are
//! given back when the request ends for any reason: answered, cancelled, reset or timed
//! out (`limits.request_timeout_secs` bounds how long a slow sender can hold them).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Status, body::Body};

use crate::{registry::Standing, tls::ConnInfo};

/// The bytes of requests in flight, for the whole gateway.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    held: AtomicUsize,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, held: AtomicUsize::new(0) })
    }

    /// Bytes counted now.
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }
}

/// The bytes one request holds; given back when dropped.
struct Reservation {
    budget: Arc<MemoryBudget>,
    held: AtomicUsize,
}

impl Reservation {
    fn add(&self, n: usize) -> Result<(), Status> {
        let before = self.budget.held.fetch_add(n, Ordering::AcqRel);
        if before + n > self.budget.limit {
            self.budget.held.fetch_sub(n, Ordering::AcqRel);
            tracing::debug!(
                bytes = n,
                held = before,
                "request refused: request memory budget full"
            );
            return Err(Status::resource_exhausted(format!(
                "the gateway holds its limit of {} MiB of requests in flight \
                 (limits.max_request_memory_mib); retry later",
                self.budget.limit >> 20
            )));
        }
        self.held.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(*self.held.get_mut(), Ordering::AcqRel);
    }
}

/// Streams open on one connection, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    open: AtomicUsize,
    /// Milliseconds after `born` when the last stream ended (0: none yet).
    idle_since_ms: AtomicU64,
}

impl Activity {
    /// A new connection's activity: none yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self { born: Instant::now(), open: AtomicUsize::new(0), idle_since_ms: 0.into() })
    }

    /// How long the connection has had no open stream, or `None` while one is open.
    pub fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = self.born + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(now.saturating_duration_since(since))
    }

    fn opened(self: &Arc<Self>) -> StreamGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        StreamGuard(Arc::clone(self))
    }
}

/// One open stream; closing it (dropping the guard) may start the connection's idle time.
struct StreamGuard(Arc<Activity>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let ms = self.0.born.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::Release);
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The tower layer that counts every request (see the module docs), and refuses the API's
/// requests while this replica's registry lease has lapsed (see [`Standing`]).
#[derive(Clone)]
pub struct RequestLayer {
    budget: Arc<MemoryBudget>,
    standing: Arc<Standing>,
}

impl RequestLayer {
    /// Counts request bytes against `budget`; refuses while `standing` has lapsed.
    pub fn new(budget: Arc<MemoryBudget>, standing: Arc<Standing>) -> Self {
        Self { budget, standing }
    }
}

/// The API's services (health and reflection answer even while lapsed).
const API_PATHS: &str = "/secretgate.v1.";

impl<S> tower_layer::Layer<S> for RequestLayer {
    type Service = Counting<S>;

    fn layer(&self, inner: S) -> Counting<S> {
        Counting { inner, budget: Arc::clone(&self.budget), standing: Arc::clone(&self.standing) }
    }
}

/// The service [`RequestLayer`] makes.
#[derive(Clone)]
pub struct Counting<S> {
    inner: S,
    budget: Arc<MemoryBudget>,
    standing: Arc<Standing>,
}

impl<S, B> tower_service::Service<http::Request<Body>> for Counting<S>
where
    S: tower_service::Service<http::Request<Body>, Response = http::Response<B>>,
{
    type Response = http::Response<Guarded<B>>;
    type Error = S::Error;
    type Future = Answer<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if self.standing.lapsed() && req.uri().path().starts_with(API_PATHS) {
            // The request fails as its body is read, before any handler runs.
            let refused = Status::unavailable(
                "this gateway replica's registry lease lapsed (it was paused or cut off); it \
                 serves nothing until it has caught up with the store: retry, or use another \
                 replica",
            );
            let req = req.map(|_| Body::new(Refused(Some(refused))));
            return Answer { inner: self.inner.call(req), reservation: None, stream: None };
        }
        if !super::enforced() {
            return Answer { inner: self.inner.call(req), reservation: None, stream: None };
        }
        let stream = req.extensions().get::<ConnInfo>().map(|c| c.activity.opened());
        let reservation =
            Arc::new(Reservation { budget: Arc::clone(&self.budget), held: AtomicUsize::new(0) });
        let counted = Arc::clone(&reservation);
        let req = req.map(|inner| Body::new(Counted { inner, reservation: counted }));
        Answer { inner: self.inner.call(req), reservation: Some(reservation), stream }
    }
}

pin_project_lite::pin_project! {
    /// The response future: holds the request's bytes until the answer is ready, and hands
    /// the open stream to the response body.
    pub struct Answer<F> {
        #[pin]
        inner: F,
        reservation: Option<Arc<Reservation>>,
        stream: Option<StreamGuard>,
    }
}

impl<F, B, E> Future for Answer<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = Result<http::Response<Guarded<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        this.reservation.take();
        let stream = this.stream.take();
        Poll::Ready(result.map(|resp| resp.map(|inner| Guarded { inner, _stream: stream })))
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted as open until it is done.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        _stream: Option<StreamGuard>,
    }
}

impl<B: HttpBody> HttpBody for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body of a refused request: fails with its status when first read.
struct Refused(Option<Status>);

impl HttpBody for Refused {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

/// A request body counted against the budget as it arrives.
struct Counted {
    inner: Body,
    reservation: Arc<Reservation>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                self.reservation.add(data.len())?;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_past_the_budget_is_refused_and_every_byte_comes_back() {
        let budget = MemoryBudget::new(100);
        let r1 = Reservation { budget: Arc::clone(&budget), held: 0.into() };
        let r2 = Reservation { budget: Arc::clone(&budget), held: 0.into() };
        r1.add(60).unwrap();
        assert_eq!(r2.add(50).unwrap_err().code(), tonic::Code::ResourceExhausted);
        r2.add(40).unwrap();
        assert_eq!(budget.held(), 100);
        drop(r1);
        assert_eq!(budget.held(), 40);
        drop(r2);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_connection_is_idle_only_while_no_stream_is_open() {
        let a = Activity::new();
        let later = Instant::now() + Duration::from_secs(5);
        assert!(a.idle_for(later).unwrap() >= Duration::from_secs(5));
        let s = a.opened();
        assert_eq!(a.idle_for(later), None);
        drop(s);
        assert!(a.idle_for(Instant::now()).unwrap() < Duration::from_secs(1));
    }
}
