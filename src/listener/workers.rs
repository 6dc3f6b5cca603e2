//! Connection workers: one thread per core, each running a single-threaded tokio runtime that
//! waits on its own epoll and polls only its own connections, as nginx's worker processes do.
//!
//! Why not the process's multi-thread runtime: there, one thread at a time waits on epoll, and
//! the tasks it wakes are handed to the other threads (a futex wake-up and a cache miss per
//! hand-off). A hit is a few microseconds of work, so those hand-offs show (figure 1 in
//! BENCHMARKS.md). Every worker accepts from the same listening socket (each through its own
//! epoll) and serves what it accepts, so a new connection goes to whichever worker gets to it
//! first: an idle one, when a busy one is still working through its queue (figure 9). Nothing
//! moves a connection afterwards, as in nginx: handing connections to the least loaded worker was
//! tried (9bca69f) and cost more than it gave, in both figure 1 and figure 9 (BENCHMARKS.md).
//! Everything else (the node view's stream, the gRPC client, metrics, iptables) stays on the main
//! runtime.
//!
//! The worker threads end when the last [`Workers`] handle is gone (the listeners' accept loops
//! have returned, after their drain), dropping whatever connection they still hold.

use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// The most connection workers an agent starts. Two serve well over 100 000 hits a second on
/// loopback (figure 1), far more than one node's pods ask; each costs a thread and a runtime,
/// and the chart sets no CPU limit by default, so a 96-core node would otherwise get 96.
pub const MOST_WORKERS: usize = 4;

/// How many workers for `cores` usable cores.
fn worker_count(cores: usize) -> usize {
    cores.clamp(1, MOST_WORKERS)
}

/// Where connections run: per-core workers, or (for [`Workers::inline`]) the caller's runtime.
#[derive(Clone, Debug, Default)]
pub struct Workers(Option<Arc<Pool>>);

#[derive(Debug)]
struct Pool {
    /// Each worker's runtime.
    workers: Vec<Handle>,
    /// Cancelled when the last handle is gone: the worker threads then stop.
    stop: CancellationToken,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One worker's place in the pool: where its accept loop runs (and so what it accepts). The
/// caller keeps the [`Workers`] handle while anything runs there.
#[derive(Clone, Debug)]
pub struct Place(Handle);

impl Workers {
    /// Connections run on the caller's runtime, as plain tasks (listeners that see one client
    /// or two, such as `/metrics`, and tests).
    pub fn inline() -> Workers {
        Workers(None)
    }

    /// One worker thread per core this process may use (its CPU quota counts), at most
    /// [`MOST_WORKERS`].
    pub fn per_core() -> io::Result<Workers> {
        Workers::new(worker_count(std::thread::available_parallelism().map_or(1, |n| n.get())))
    }

    /// `count` worker threads (none: [`Workers::inline`]).
    pub fn new(count: usize) -> io::Result<Workers> {
        if count == 0 {
            return Ok(Workers::inline());
        }
        // Built before the first thread starts: if a later one fails, dropping the pool stops
        // the threads already started.
        let mut pool = Pool { workers: Vec::with_capacity(count), stop: CancellationToken::new() };
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let handle = runtime.handle().clone();
            let stop = pool.stop.clone();
            std::thread::Builder::new()
                .name(format!("kiam-conn-{index}"))
                .spawn(move || runtime.block_on(stop.cancelled()))?;
            pool.workers.push(handle);
        }
        Ok(Workers(Some(Arc::new(pool))))
    }

    /// Each worker's place (none when inline).
    pub fn places(&self) -> Vec<Place> {
        self.0.as_ref().map_or_else(Vec::new, |pool| pool.workers.iter().cloned().map(Place).collect())
    }
}

impl Place {
    /// Runs `future` on this worker's runtime.
    pub fn run<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.spawn(future)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    /// A connection accepted on the first worker; the name of the thread that served it, as its
    /// client read it.
    async fn accepted_at_first(workers: &Workers) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("non-blocking");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(b"ping").await.expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        });
        let accepting = workers.places()[0].run(async move {
            let listener = TcpListener::from_std(listener).expect("register");
            let (mut stream, _) = listener.accept().await.expect("accept");
            // As the agent's accept loop does: the connection's task runs where it was accepted.
            tokio::spawn(async move {
                let mut ping = [0u8; 4];
                stream.read_exact(&mut ping).await.expect("read");
                let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
                stream.write_all(name.as_bytes()).await.expect("write");
            });
        });
        tokio::time::timeout(LIMIT, accepting).await.expect("accepted").expect("the accept task");
        tokio::time::timeout(LIMIT, client).await.expect("the connection is served").expect("client")
    }

    #[test]
    fn one_worker_per_core_up_to_the_cap() {
        assert_eq!(worker_count(1), 1);
        assert_eq!(worker_count(2), 2);
        assert_eq!(worker_count(96), MOST_WORKERS);
    }

    #[tokio::test]
    async fn a_connection_is_served_on_the_worker_that_accepted_it() {
        let workers = Workers::new(2).expect("workers");
        assert_eq!(workers.places().len(), 2);
        let name = workers.places()[1].run(async { std::thread::current().name().map(str::to_owned) });
        assert_eq!(name.await.expect("ran").as_deref(), Some("kiam-conn-1"));
        assert_eq!(accepted_at_first(&workers).await, "kiam-conn-0");
    }

    #[tokio::test]
    async fn the_workers_stop_with_their_last_handle() {
        let workers = Workers::new(1).expect("workers");
        let (held, released) = tokio::sync::oneshot::channel::<()>();
        let _task = workers.places()[0].run(async move {
            let _held = held;
            std::future::pending::<()>().await;
        });
        drop(workers);
        // The worker's runtime is dropped with its tasks, which drops what they held.
        let released = tokio::time::timeout(LIMIT, released).await.expect("the worker stops");
        assert!(released.is_err(), "the task ended without sending");
    }

    #[test]
    fn inline_workers_have_no_places() {
        // `serve_with` then accepts and serves on the caller's runtime (the HTTP tests' inline
        // listeners).
        assert!(Workers::inline().places().is_empty());
    }
}
