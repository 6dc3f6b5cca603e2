//! `kiam server`: watches pods and namespaces, decides by policy, and serves credentials to
//! agents over mutually authenticated gRPC.
//!
//! [`main`] wires the process (STS client, cluster source, TLS) from a validated [`Config`];
//! [`run`] serves an already-bound listener until shutdown, so tests can bind `127.0.0.1:0`.

pub mod core;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

pub use self::core::{Core, Error};
use crate::aws::{Sts, StsConfig};
use crate::cluster::file::FileSource;
use crate::cluster::kube::KubeSource;
use crate::cluster::{Cluster, Source};
use crate::creds::{AssumeRole, CredentialCache, Lifetimes};
use crate::pb::kiam_service_server::KiamServiceServer;
use crate::policy::Policy;
use crate::tls::{self, TlsFiles};

/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server learns about pods and namespaces.
#[derive(Clone, Debug)]
pub enum Inventory {
    /// The Kubernetes API: a kubeconfig file, or in-cluster configuration when `None`.
    Kube(Option<PathBuf>),
    /// A manifest file, re-read when it changes (`--manifest`, for local development).
    File(PathBuf),
}

/// The validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub tls: TlsFiles,
    pub inventory: Inventory,
    pub policy: Policy,
    pub lifetimes: Lifetimes,
    pub session: String,
    pub sts: StsConfig,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Source(#[from] crate::cluster::SourceError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs the server process until `shutdown`.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let tls = tls::server_config(&config.tls)?;
    let sts = Sts::from_env(&config.sts).await;
    let cluster = Arc::new(Cluster::default());
    match &config.inventory {
        Inventory::Kube(path) => spawn_source(KubeSource::connect(path.clone()).await?, &cluster, &shutdown),
        Inventory::File(path) => {
            spawn_source(FileSource::open(path, Duration::from_secs(1))?, &cluster, &shutdown)
        }
    }
    let listener = TcpListener::bind(&config.bind)
        .await
        .map_err(|source| ServeError::Bind { addr: config.bind.clone(), source })?;
    tracing::info!(bind = %config.bind, "waiting for the pod and namespace caches to sync");
    tokio::select! {
        () = cluster.wait_synced() => {}
        () = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(pods = cluster.pod_count(), "caches synced; serving");
    let cache = CredentialCache::new(sts, config.lifetimes, 8);
    let core = Arc::new(Core::new(cluster, config.policy, cache, config.session));
    run(listener, tls, core, shutdown).await
}

/// Runs `source` in the background until `shutdown`.
pub fn spawn_source(source: impl Source, cluster: &Arc<Cluster>, shutdown: &CancellationToken) {
    let (cluster, shutdown) = (Arc::clone(cluster), shutdown.clone());
    tokio::spawn(async move {
        if let Err(error) = source.run(cluster, shutdown).await {
            tracing::error!(%error, "pod/namespace source stopped");
        }
    });
}

/// Serves `core` over mutual TLS on `listener` until `shutdown`.
pub async fn run<A: AssumeRole>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    core: Arc<Core<A>>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let incoming = accept_tls(listener, TlsAcceptor::from(tls), shutdown.clone());
    let service = KiamServiceServer::new(service::KiamService::new(core));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepts connections and completes TLS handshakes off the accept loop, so one slow client
/// cannot hold up the others. Failed handshakes (no client certificate, wrong CA) are logged
/// and dropped.
fn accept_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
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
