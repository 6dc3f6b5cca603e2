//! The agent's HTTP/1 listener, with limits that pods cannot talk their way past: a deadline for
//! each request head (a client that sends its headers slowly, or sits idle on a kept-alive
//! connection, is cut off), a cap on the size and number of headers (431), and a cap on open
//! connections. It stops accepting at shutdown and gives open connections a short grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Limits on what one client may hold or send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for a request head to arrive, counted from the first byte of a request or
    /// from the end of the previous response on a kept-alive connection.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers), in bytes. SDKs send well under 1 KiB.
    pub max_header_bytes: usize,
    /// The most headers in one request.
    pub max_headers: usize,
    /// The most connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long open connections get to finish at shutdown.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_headers: 64,
            max_connections: 4096,
            drain: Duration::from_secs(5),
        }
    }
}

/// Serves `router` on `listener` until `shutdown`, handing each request the caller's address as
/// [`ConnectInfo`].
pub async fn serve(listener: TcpListener, router: Router, limits: &Limits, shutdown: CancellationToken) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a sender; when all are dropped, `open` yields None.
    let (alive, mut open) = mpsc::channel::<()>(1);
    let mut accept_backoff = Duration::from_millis(5);
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(accept_backoff).await;
                    accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        accept_backoff = Duration::from_millis(5);
        let _ = stream.set_nodelay(true);
        let (builder, router, shutdown, alive) =
            (Arc::clone(&builder), router.clone(), shutdown.clone(), alive.clone());
        let drain = limits.drain;
        tokio::spawn(async move {
            let _permit = permit;
            let _alive = alive;
            let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
                router.clone().oneshot(request)
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    tokio::time::timeout(drain, connection.as_mut()).await.unwrap_or(Ok(()))
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection closed with an error");
            }
        });
    }
    drop(alive);
    let _ = tokio::time::timeout(limits.drain, open.recv()).await;
}
