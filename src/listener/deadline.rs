//! The deadlines of one connection. [`HeadDeadline`]: a request head must arrive within a
//! limit, counted from the connection's start or from the moment the previous answer was ready
//! (so an idle kept-alive connection, or a head sent a byte at a time, is cut off). And
//! [`WriteDeadline`], a socket whose writes have a deadline: a client that pipelines requests
//! and never reads the answers would otherwise leave the connection waiting to write for as
//! long as it likes, holding its slot. A write that makes no progress for the given time fails,
//! and hyper closes the connection. The socket also tells [`HeadDeadline`] when a read finds
//! nothing, so that a pipelined request is told apart and waits for its turn ([`Answering`]).
//!
//! Why not hyper's own header-read timeout: it arms a fresh timer for every request (an
//! allocation, and an insertion into and removal from tokio's timer wheel, under its lock),
//! which was a few percent of a hit's cost (figure 1). [`HeadDeadline`] costs a clock read and
//! two stores per request; its one timer per connection is moved only when it fires.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// What [`HeadDeadline::waiting_since`] holds while a request is being answered.
const ANSWERING: u64 = u64::MAX;

/// Whether a connection waits for a request head, and since when. Shared by the connection's
/// service ([`Heads`], which marks each request's start and end) and its task, which asks
/// [`HeadDeadline::check`] whenever its timer fires.
#[derive(Debug)]
pub struct HeadDeadline {
    limit: Duration,
    start: Instant,
    /// Nanoseconds after `start` since which a head is awaited, or [`ANSWERING`].
    waiting_since: AtomicU64,
    /// Whether a read of the connection found nothing since the last head arrived; when not,
    /// the next head was pipelined behind it.
    read_idle: AtomicBool,
}

/// What a connection does when its head timer fires.
#[derive(Debug, PartialEq, Eq)]
pub enum HeadCheck {
    /// The head is late: cut the connection.
    Late,
    /// Check again then.
    At(Instant),
}

impl HeadDeadline {
    /// A connection that starts now, waiting for its first head.
    pub fn new(limit: Duration) -> HeadDeadline {
        HeadDeadline {
            limit,
            start: Instant::now(),
            waiting_since: AtomicU64::new(0),
            read_idle: AtomicBool::new(true),
        }
    }

    /// When the connection's timer should first fire.
    pub fn first_check(&self) -> Instant {
        self.start + self.limit
    }

    /// A head arrived: the request is being answered, and no head is awaited.
    fn answering(&self) {
        self.waiting_since.store(ANSWERING, Ordering::Relaxed);
    }

    /// A read of the connection found nothing to read.
    fn read_was_idle(&self) {
        self.read_idle.store(true, Ordering::Relaxed);
    }

    /// Whether the head that just arrived was read without a wait since the previous one,
    /// that is, pipelined behind it.
    fn pipelined(&self) -> bool {
        !self.read_idle.swap(false, Ordering::Relaxed)
    }

    /// The answer is ready: the next head is awaited from now.
    fn answered(&self) {
        let since = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(ANSWERING - 1);
        self.waiting_since.store(since, Ordering::Relaxed);
    }

    /// Whether the awaited head is late at `now`, or when to look again.
    pub fn check(&self, now: Instant) -> HeadCheck {
        match self.waiting_since.load(Ordering::Relaxed) {
            ANSWERING => HeadCheck::At(now + self.limit),
            since => {
                let due = self.start + Duration::from_nanos(since) + self.limit;
                if due <= now { HeadCheck::Late } else { HeadCheck::At(due) }
            }
        }
    }
}

/// A connection's service `inner`, marking on `deadline` when each request starts being
/// answered and when its answer is ready.
pub struct Heads<S> {
    inner: S,
    deadline: Arc<HeadDeadline>,
}

impl<S> Heads<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, deadline: Arc<HeadDeadline>) -> Heads<S> {
        Heads { inner, deadline }
    }
}

impl<S, R> hyper::service::Service<R> for Heads<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Answering<S::Future>;

    fn call(&self, request: R) -> Self::Future {
        self.deadline.answering();
        let pipelined = self.deadline.pipelined();
        Answering { inner: self.inner.call(request), deadline: Arc::clone(&self.deadline), pipelined }
    }
}

pin_project_lite::pin_project! {
    /// An answer being made; when it is ready, the next head is awaited. A pipelined request
    /// waits for the connection task's next turn first: hyper would otherwise answer up to 16
    /// pipelined requests in one turn while other pods' connections wait in the run queue
    /// (figure 9). A client that waits for each answer, as SDKs do, never waits here.
    pub struct Answering<F> {
        #[pin]
        inner: F,
        deadline: Arc<HeadDeadline>,
        pipelined: bool,
    }
}

impl<F: Future> Future for Answering<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if std::mem::take(this.pipelined) {
            // Woken while running, tokio puts the task at the back of the run queue.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let answer = ready!(this.inner.poll(cx));
        this.deadline.answered();
        Poll::Ready(answer)
    }
}

/// `inner`, with every write (and flush) allowed `limit` to make progress.
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Told when a read finds nothing (see [`Answering`]).
    head: Arc<HeadDeadline>,
    /// Armed while a write is pending; disarmed by any progress.
    timer: Option<Pin<Box<Sleep>>>,
    /// Counts the connections cut for stalling.
    cut: Counter,
}

impl<T> WriteDeadline<T> {
    /// Wraps `inner`, the socket of the connection with `head`; a stall counts into `cut`.
    pub fn new(inner: T, limit: Duration, cut: Counter, head: Arc<HeadDeadline>) -> WriteDeadline<T> {
        WriteDeadline { inner, limit, head, timer: None, cut }
    }

    /// Turns a pending write into an error once the deadline has passed, and disarms the timer
    /// on progress.
    fn check<R>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.timer = None;
            return poll;
        }
        let limit = self.limit;
        let timer =
            self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now() + limit)));
        ready!(timer.as_mut().poll(cx));
        self.timer = None;
        self.cut.inc();
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if poll.is_pending() {
            self.head.read_was_idle();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn the_first_head_is_due_one_limit_after_the_start() {
        let head = HeadDeadline::new(LIMIT);
        let start = Instant::now();
        assert_eq!(head.first_check(), start + LIMIT);
        assert_eq!(head.check(start + LIMIT / 2), HeadCheck::At(start + LIMIT));
        assert_eq!(head.check(start + LIMIT), HeadCheck::Late);
    }

    #[tokio::test(start_paused = true)]
    async fn no_head_is_due_while_answering_and_the_next_one_counts_from_the_answer() {
        let head = HeadDeadline::new(LIMIT);
        let start = Instant::now();
        head.answering();
        // However long the answer takes, the connection is not cut meanwhile.
        assert_eq!(head.check(start + LIMIT * 3), HeadCheck::At(start + LIMIT * 4));
        tokio::time::advance(LIMIT * 3).await;
        head.answered();
        let answered = Instant::now();
        assert_eq!(head.check(answered + LIMIT / 2), HeadCheck::At(answered + LIMIT));
        assert_eq!(head.check(answered + LIMIT), HeadCheck::Late);
    }

    /// A service that answers at once.
    struct Echo;

    impl hyper::service::Service<u32> for Echo {
        type Response = u32;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<u32, Self::Error>>;

        fn call(&self, request: u32) -> Self::Future {
            std::future::ready(Ok(request))
        }
    }

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Wakes(AtomicU64);

    impl std::task::Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn a_pipelined_request_waits_one_turn_and_a_request_after_an_idle_read_does_not() {
        use hyper::service::Service;
        let head = Arc::new(HeadDeadline::new(LIMIT));
        let heads = Heads::new(Echo, Arc::clone(&head));
        let wakes = Arc::new(Wakes::default());
        let waker = std::task::Waker::from(Arc::clone(&wakes));
        let mut cx = Context::from_waker(&waker);

        // The first request of a connection is not pipelined.
        let mut first = std::pin::pin!(heads.call(1));
        assert!(matches!(first.as_mut().poll(&mut cx), Poll::Ready(Ok(1))));

        // The next head came in without a read finding nothing in between: one turn first.
        let mut second = std::pin::pin!(heads.call(2));
        assert!(second.as_mut().poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "it asks to be polled again at once");
        assert!(matches!(second.as_mut().poll(&mut cx), Poll::Ready(Ok(2))));

        // A read of the socket that finds nothing: the next request is answered at once.
        let (_client, server) = tokio::io::duplex(64);
        let mut socket = WriteDeadline::new(server, LIMIT, Counter::default(), Arc::clone(&head));
        let mut buf = [0u8; 16];
        let mut buf = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut socket).poll_read(&mut cx, &mut buf).is_pending());
        let mut third = std::pin::pin!(heads.call(3));
        assert!(matches!(third.as_mut().poll(&mut cx), Poll::Ready(Ok(3))));
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
    }
}
