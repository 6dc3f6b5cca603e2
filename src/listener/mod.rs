//! The hardened HTTP/1 listener that every port of ours uses (the agent's metadata endpoint,
//! kube2iam mode's, the metrics listeners, and `kiam webhook` over TLS, [`serve_tls`]), with limits that clients cannot talk
//! their way past: a deadline for each request head (a client that sends its headers
//! slowly, or sits idle on a kept-alive connection, is cut off), a cap on the size and number of
//! headers (431: 16 KiB, and hyper's 100 headers), a deadline on every write (a client that
//! pipelines requests and never reads the answers is cut off), both in
//! [`deadline`] (which also makes each pipelined request wait for the
//! connection's next turn, so that pipelining buys a pod no more than its neighbours get), a
//! maximum age per connection, a cap on open connections, and
//! a smaller cap per source address, so that one pod cannot take every slot of its node.
//! Connections over a source's cap are reset, but only once the accept queue is
//! empty, so that a flood from one pod does not make its neighbours' connections wait behind
//! the resets. The agent's connections run on [`Workers`] (one runtime per core, each accepting
//! from the listener; the caps are shared by all of them), the metrics listeners' on the caller's
//! runtime. It stops accepting at shutdown and gives open connections a short grace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::response::Response;
use futures::FutureExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub mod deadline;
mod limits;
pub mod workers;

pub use self::limits::{Limits, Tally};

use self::deadline::{HeadCheck, HeadDeadline, Heads, WriteDeadline};
use self::workers::Workers;
use crate::net::Sources;

/// The most refused connections held before they are reset (see [`serve_with`]).
const REFUSED_BATCH: usize = 256;

/// Serves `router` on `listener` until `shutdown`, handing each request the caller's address as
/// [`ConnectInfo`], and counting into `tally`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: &Limits,
    workers: &Workers,
    tally: Tally,
    shutdown: CancellationToken,
) {
    let make = move |peer: SocketAddr| with_peer(router.clone(), peer);
    serve_with(listener, make, limits, workers, tally, shutdown).await;
}

/// [`serve`] over TLS, on the caller's runtime: each connection's handshake must finish within
/// [`Limits::header_read_timeout`] (a late one is counted as a late head), under the same
/// connection caps, per-source cap and deadlines as plain HTTP.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    limits: &Limits,
    tally: Tally,
    shutdown: CancellationToken,
) {
    let make = move |peer: SocketAddr| with_peer(router.clone(), peer);
    let acceptor = Some(TlsAcceptor::from(tls));
    run(listener, make, acceptor, limits, &Workers::inline(), tally, shutdown).await;
}

/// `router` for one connection from `peer`, which each request gets as [`ConnectInfo`].
fn with_peer(router: Router, peer: SocketAddr) -> impl ConnectionService {
    hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
        router.clone().oneshot(request)
    })
}

/// The service hyper runs for one connection: what `make` returns for each.
pub trait ConnectionService:
    hyper::service::Service<
        hyper::Request<Incoming>,
        Response = Response,
        Error = Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<S> ConnectionService for S where
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// What every accept loop of one listener shares.
struct Shared<M> {
    make: M,
    /// The TLS handshake each connection makes first, if the listener serves HTTPS.
    tls: Option<TlsAcceptor>,
    builder: http1::Builder,
    permits: Arc<Semaphore>,
    sources: Arc<Sources>,
    limits: Limits,
    tally: Tally,
    shutdown: CancellationToken,
}

/// [`serve`] with the service for each connection made by `make` from the caller's address,
/// and the connections run by `workers` (each accepting from `listener`).
pub async fn serve_with<M, S>(
    listener: TcpListener,
    make: M,
    limits: &Limits,
    workers: &Workers,
    tally: Tally,
    shutdown: CancellationToken,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    run(listener, make, None, limits, workers, tally, shutdown).await;
}

/// [`serve_with`], with a TLS handshake first on each connection when `tls` is given.
async fn run<M, S>(
    listener: TcpListener,
    make: M,
    tls: Option<TlsAcceptor>,
    limits: &Limits,
    workers: &Workers,
    tally: Tally,
    shutdown: CancellationToken,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Heads have a deadline of ours (`HeadDeadline`), cheaper than hyper's per-request timer.
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) * 2);
    let shared = Arc::new(Shared {
        make,
        tls,
        builder,
        permits: Arc::new(Semaphore::new(limits.max_connections)),
        sources: Sources::new(limits.max_connections_per_source),
        limits: limits.clone(),
        tally,
        shutdown,
    });
    // Every connection task holds a sender; when all are dropped, `open` yields None.
    let (alive, mut open) = mpsc::channel::<()>(1);
    let places = workers.places();
    if places.is_empty() {
        accept(listener, Arc::clone(&shared), alive.clone()).await;
    } else {
        match listener.into_std() {
            Ok(listener) => {
                let mut loops = Vec::with_capacity(places.len());
                for place in places {
                    let Ok(listener) = listener.try_clone() else { continue };
                    let (shared, alive) = (Arc::clone(&shared), alive.clone());
                    loops.push(place.run(async move {
                        match TcpListener::from_std(listener) {
                            Ok(listener) => accept(listener, shared, alive).await,
                            Err(error) => tracing::warn!(%error, "a worker cannot accept"),
                        }
                    }));
                }
                for accepting in loops {
                    let _ = accepting.await;
                }
            }
            Err(error) => tracing::warn!(%error, "cannot hand the listener to the workers"),
        }
    }
    drop(alive);
    let _ = tokio::time::timeout(limits.drain, open.recv()).await;
}

/// Accepts connections on `listener` until shutdown and serves each on the runtime this runs on
/// (a worker's, when there are workers).
async fn accept<M, S>(listener: TcpListener, shared: Arc<Shared<M>>, alive: mpsc::Sender<()>)
where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: ConnectionService,
{
    let mut accept_backoff = Duration::from_millis(5);
    let cancelled = shared.shutdown.cancelled();
    tokio::pin!(cancelled);
    // Connections refused by the per-source cap, reset only once the accept queue is empty: the
    // other sources' connections queued behind a flood are served first (figure 9).
    let mut refused = Vec::new();
    loop {
        let permit = match Arc::clone(&shared.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                reset(&mut refused);
                tokio::select! {
                    _ = &mut cancelled => break,
                    permit = Arc::clone(&shared.permits).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                }
            }
        };
        // What is queued is taken without waiting; only then are the refused reset, and the
        // loop waits. (tokio's cooperative budget still makes it yield now and then.)
        let accepted = match listener.accept().now_or_never() {
            Some(accepted) => accepted,
            None => {
                reset(&mut refused);
                tokio::select! {
                    _ = &mut cancelled => break,
                    accepted = listener.accept() => accepted,
                }
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors, say: back off rather than spin.
                tracing::warn!(%error, "accept failed");
                reset(&mut refused);
                tokio::time::sleep(accept_backoff).await;
                accept_backoff = (accept_backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        accept_backoff = Duration::from_millis(5);
        let Some(share) = shared.sources.claim(peer.ip()) else {
            shared.tally.source_cap.inc();
            tracing::debug!(%peer, "connection refused: its source holds its share of connections");
            // Reset, not closed: a flood's refused connections leave no TIME_WAIT state behind.
            let _ = stream.set_zero_linger();
            if refused.len() >= REFUSED_BATCH {
                reset(&mut refused);
            }
            refused.push(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (shared, alive) = (Arc::clone(&shared), alive.clone());
        tokio::spawn(async move {
            let (_permit, _share, _alive) = (permit, share, alive);
            let Some(acceptor) = &shared.tls else {
                connection(stream, peer, &shared).await;
                return;
            };
            match tokio::time::timeout(shared.limits.header_read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => connection(stream, peer, &shared).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                Err(_) => {
                    shared.tally.head_timeout.inc();
                    tracing::debug!(%peer, "TLS handshake too slow");
                }
            }
        });
    }
}

/// Serves one connection until it ends, is cut, grows too old, or shutdown.
async fn connection<M, S, T>(stream: T, peer: SocketAddr, shared: &Shared<M>)
where
    M: Fn(SocketAddr) -> S,
    S: ConnectionService,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (limits, tally) = (&shared.limits, &shared.tally);
    let head = Arc::new(HeadDeadline::new(limits.header_read_timeout));
    let service = Heads::new((shared.make)(peer), Arc::clone(&head));
    tally.open.inc();
    let io = WriteDeadline::new(stream, limits.write_timeout, tally.write_timeout.clone(), Arc::clone(&head));
    let connection = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let head_timer = tokio::time::sleep_until(head.first_check());
    let age = tokio::time::sleep(limits.max_connection_age);
    let cancelled = shared.shutdown.cancelled();
    tokio::pin!(head_timer, age, cancelled);
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break Some(result),
            () = &mut head_timer => match head.check(Instant::now()) {
                // Closed without an answer, as hyper does with its own header timeout.
                HeadCheck::Late => {
                    tally.head_timeout.inc();
                    break Some(Ok(()));
                }
                HeadCheck::At(next) => head_timer.as_mut().reset(next),
            },
            () = &mut age => {
                tally.max_age.inc();
                break None;
            }
            () = &mut cancelled => break None,
        }
    };
    // Closed for its age or at shutdown: after the request in flight, if it finishes within the
    // drain.
    let result = match result {
        Some(result) => result,
        None => {
            connection.as_mut().graceful_shutdown();
            tokio::time::timeout(limits.drain, connection.as_mut()).await.unwrap_or(Ok(()))
        }
    };
    tally.open.dec();
    if let Err(error) = result {
        tracing::debug!(%peer, %error, "connection closed with an error");
    }
}

/// Resets the refused connections on a task of their own, so that the accept loop goes on
/// accepting meanwhile.
fn reset(refused: &mut Vec<tokio::net::TcpStream>) {
    if !refused.is_empty() {
        let batch = std::mem::take(refused);
        tokio::spawn(async move { drop(batch) });
    }
}

#[cfg(test)]
mod tests;
