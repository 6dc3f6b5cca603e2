//! The server's listener: mutual TLS terminated here (handshakes off the accept loop, each with
//! the material current at accept time, so certificates rotate without a restart), the idle
//! limit, and tonic serving kiam's `KiamService` plus kiam-rs's `Debug` service until shutdown.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use super::config::GrpcSettings;
use super::idle::IdleStream;
use super::node_service::NodeViewService;
use super::token_service::PodTokenService;
use super::{ServeError, debug, service};
use crate::creds::AssumeRole;
use crate::pb::kiam_service_server::KiamServiceServer;
use crate::pb::node::node_view_server::NodeViewServer;
use crate::pb::token::pod_tokens_server::PodTokensServer;
use crate::tls::reload::Reloading;

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once, and per source address. Anything on the network can reach
/// the server's port (every pod, if nothing filters it), and a connection costs a descriptor
/// before it proves anything: without these caps, half-open handshakes could use up the
/// server's descriptors and stop credentials for the whole cluster. Agents make a handful of
/// connections each, and only after a handshake do they hold them.
const MAX_HANDSHAKES: usize = 1024;
const MAX_HANDSHAKES_PER_SOURCE: usize = 16;

/// The gRPC services one server offers.
pub struct Services<A> {
    /// kiam's `KiamService`.
    pub kiam: service::KiamService<A>,
    /// `kiamrs.debug`.
    pub debug: debug::DebugService<A>,
    /// `kiamrs.node`, unless disabled.
    pub view: Option<NodeViewService<A>>,
    /// `kiamrs.token`.
    pub tokens: PodTokenService<A>,
}

/// Serves `services` over mutual TLS on `listener` until `shutdown`.
pub async fn run<A: AssumeRole>(
    listener: TcpListener,
    tls: Arc<Reloading<Arc<rustls::ServerConfig>>>,
    services: Services<A>,
    grpc: &GrpcSettings,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let Services { kiam: service, debug, view, tokens } = services;
    let idle = Some(grpc.max_connection_idle).filter(|d| !d.is_zero());
    let closed = service.metrics().server.idle_connections_closed.clone();
    let incoming = accept_tls(listener, tls, idle, closed, shutdown.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(grpc.keepalive_time).filter(|d| !d.is_zero()))
        .http2_keepalive_timeout(Some(grpc.keepalive_timeout).filter(|d| !d.is_zero()))
        .max_connection_age(grpc.max_connection_age)
        .max_connection_age_grace(grpc.max_connection_age_grace)
        .add_service(KiamServiceServer::new(service))
        .add_service(debug::server(debug))
        .add_optional_service(view.map(NodeViewServer::new))
        .add_service(PodTokensServer::new(tokens))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepts connections and completes TLS handshakes off the accept loop, so one slow client
/// cannot hold up the others, with at most [`MAX_HANDSHAKES`] in progress
/// ([`MAX_HANDSHAKES_PER_SOURCE`] per address; more are closed at once). Failed handshakes (no
/// client certificate, wrong CA) are logged and dropped.
fn accept_tls(
    listener: TcpListener,
    tls: Arc<Reloading<Arc<rustls::ServerConfig>>>,
    idle: Option<Duration>,
    idle_closed: Counter,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<IdleStream<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, mut rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let sources = crate::net::Sources::new(MAX_HANDSHAKES_PER_SOURCE);
    crate::task::spawn_until(&shutdown.clone(), async move {
        loop {
            let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(share) = sources.claim(peer.ip()) else {
                tracing::debug!(%peer, "connection refused: its source has too many handshakes in progress");
                continue;
            };
            // Each handshake uses the material current at accept time.
            let (acceptor, tx) = (TlsAcceptor::from(Arc::clone(&*tls.current())), tx.clone());
            let (idle_closed, stop) = (idle_closed.clone(), shutdown.clone());
            crate::task::spawn_until(&shutdown, async move {
                let _ = tcp.set_nodelay(true);
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop((permit, share));
                match handshake {
                    Ok(Ok(stream)) => {
                        let on_close = move || {
                            idle_closed.inc();
                        };
                        let stream = IdleStream::new(stream, idle, on_close, &stop);
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
