//! The deadlines of one connection. [`HeadDeadline`]: a request head must arrive within a
//! limit, counted from the connection's start or from the moment the previous answer was ready
//! (so an idle kept-alive connection, or a head sent a byte at a time, is cut off). And
//! [`WriteDeadline`], a socket whose writes have a deadline: a client that pipelines requests
//! and never reads the answers would otherwise leave the connection waiting to write for as
//! long as it likes, holding its slot. A write that makes no progress for the given time fails,
//! and hyper closes the connection.
//!
//! Why not hyper's own header-read timeout: it arms a fresh timer for every request (an
//! allocation, and an insertion into and removal from tokio's timer wheel, under its lock),
//! which was a few percent of a hit's cost (figure 1). [`HeadDeadline`] costs a clock read and
//! two stores per request; its one timer per connection is moved only when it fires.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
        HeadDeadline { limit, start: Instant::now(), waiting_since: AtomicU64::new(0) }
    }

    /// When the connection's timer should first fire.
    pub fn first_check(&self) -> Instant {
        self.start + self.limit
    }

    /// A head arrived: the request is being answered, and no head is awaited.
    fn answering(&self) {
        self.waiting_since.store(ANSWERING, Ordering::Relaxed);
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
        Answering { inner: self.inner.call(request), deadline: Arc::clone(&self.deadline) }
    }
}

pin_project_lite::pin_project! {
    /// An answer being made; when it is ready, the next head is awaited.
    pub struct Answering<F> {
        #[pin]
        inner: F,
        deadline: Arc<HeadDeadline>,
    }
}

impl<F: Future> Future for Answering<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = ready!(this.inner.poll(cx));
        this.deadline.answered();
        Poll::Ready(answer)
    }
}

/// `inner`, with every write (and flush) allowed `limit` to make progress.
pub struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Armed while a write is pending; disarmed by any progress.
    timer: Option<Pin<Box<Sleep>>>,
    /// Counts the connections cut for stalling.
    cut: Counter,
}

impl<T> WriteDeadline<T> {
    /// Wraps `inner`; a stall counts into `cut`.
    pub fn new(inner: T, limit: Duration, cut: Counter) -> WriteDeadline<T> {
        WriteDeadline { inner, limit, timer: None, cut }
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
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
}
