//! Connection workers: one thread per core, each running a single-threaded tokio runtime that
//! waits on its own epoll and polls only its own connections, as nginx's worker processes do.
//!
//! Why not the process's multi-thread runtime: there, one thread at a time waits on epoll, and
//! the tasks it wakes are handed to the other threads (a futex wake-up and a cache miss per
//! hand-off). A hit is a few microseconds of work, so under load those hand-offs cost the agent
//! a sixth of its throughput against nginx (figure 1 in BENCHMARKS.md). The accept loop stays
//! on the main runtime and hands each accepted socket to the worker holding the fewest
//! connections; the socket then belongs to that worker's epoll. Everything else (the node view's
//! stream, the gRPC client, metrics, iptables) stays on the main runtime.
//!
//! A worker thread ends when the last [`Workers`] handle is gone (the listeners' accept loops
//! have returned, after their drain), dropping whatever connection it still holds.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A connection's work, as handed to a worker.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Where connections run: per-core workers, or (for [`Workers::inline`]) the caller's runtime.
#[derive(Clone, Debug, Default)]
pub struct Workers {
    workers: Arc<[Worker]>,
}

#[derive(Debug)]
struct Worker {
    jobs: mpsc::UnboundedSender<Job>,
    /// Connections this worker holds now.
    load: Arc<AtomicUsize>,
}

/// Gives back a worker's share when its connection ends.
struct Held(Arc<AtomicUsize>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Workers {
    /// Connections run on the caller's runtime, as plain tasks (listeners that see one client
    /// or two, such as `/metrics`, and tests on a paused clock).
    pub fn inline() -> Workers {
        Workers::default()
    }

    /// One worker thread per core this process may use.
    pub fn per_core() -> io::Result<Workers> {
        Workers::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// `count` worker threads (none: [`Workers::inline`]).
    pub fn new(count: usize) -> io::Result<Workers> {
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let (jobs, mut queue) = mpsc::unbounded_channel::<Job>();
            std::thread::Builder::new().name(format!("kiam-conn-{index}")).spawn(move || {
                runtime.block_on(async move {
                    while let Some(job) = queue.recv().await {
                        tokio::spawn(job);
                    }
                });
            })?;
            workers.push(Worker { jobs, load: Arc::new(AtomicUsize::new(0)) });
        }
        Ok(Workers { workers: workers.into() })
    }

    /// Runs `serve` on `stream`, on the worker holding the fewest connections. The socket is
    /// moved to that worker's epoll; `serve` runs in the worker's runtime.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(worker) = self.workers.iter().min_by_key(|w| w.load.load(Ordering::Relaxed)) else {
            tokio::spawn(serve(stream));
            return;
        };
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "cannot hand a connection to a worker");
                return;
            }
        };
        worker.load.fetch_add(1, Ordering::Relaxed);
        let held = Held(Arc::clone(&worker.load));
        let job: Job = Box::pin(async move {
            let _held = held;
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::debug!(%error, "a worker cannot take a connection"),
            }
        });
        // A worker's loop ends only once every handle is gone, so this send does not fail
        // while `self` lives; if it did, the caller's runtime serves the connection.
        if let Err(mpsc::error::SendError(job)) = worker.jobs.send(job) {
            tokio::spawn(job);
        }
    }

    /// How many worker threads there are (0 when inline).
    pub fn count(&self) -> usize {
        self.workers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Serves one echo connection through `workers`; the thread that served it.
    async fn served_by(workers: &Workers) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.expect("connect");
            stream.write_all(b"ping").await.expect("write");
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.expect("read");
            answer
        });
        let (stream, _) = listener.accept().await.expect("accept");
        workers.spawn(stream, |mut stream| async move {
            let mut ping = [0u8; 4];
            stream.read_exact(&mut ping).await.expect("read");
            let name = std::thread::current().name().unwrap_or("unnamed").to_owned();
            stream.write_all(name.as_bytes()).await.expect("write");
        });
        tokio::time::timeout(std::time::Duration::from_secs(10), client)
            .await
            .expect("the connection is served")
            .expect("client")
    }

    #[tokio::test]
    async fn connections_run_on_the_workers_threads_and_their_sockets_still_work() {
        let workers = Workers::new(2).expect("workers");
        assert_eq!(workers.count(), 2);
        let name = served_by(&workers).await;
        assert!(name.starts_with("kiam-conn-"), "served on {name}");
    }

    #[tokio::test]
    async fn inline_workers_serve_on_the_callers_runtime() {
        let name = served_by(&Workers::inline()).await;
        assert!(!name.starts_with("kiam-conn-"), "served on {name}");
    }

    #[tokio::test]
    async fn a_new_connection_goes_to_the_least_loaded_worker() {
        let workers = Workers::new(2).expect("workers");
        workers.workers[0].load.store(5, Ordering::Relaxed);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let _client = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let (done, finished) = tokio::sync::oneshot::channel();
        workers.spawn(stream, |_stream| async move {
            let _ = done.send(std::thread::current().name().map(str::to_owned));
        });
        let name = tokio::time::timeout(std::time::Duration::from_secs(10), finished).await;
        assert_eq!(name.expect("served").expect("sent").as_deref(), Some("kiam-conn-1"));
        workers.workers[0].load.store(0, Ordering::Relaxed);
        // Its share is given back when the connection ends.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while workers.workers[1].load.load(Ordering::Relaxed) != 0 {
            assert!(std::time::Instant::now() < until, "the share is given back");
            tokio::task::yield_now().await;
        }
    }
}
