//! `kiam server`: watches pods and namespaces, decides by policy, and serves credentials to
//! agents over mutually authenticated gRPC.
//!
//! [`assemble`] builds and starts a server from a validated [`Config`] and its [`Deps`]; `main`
//! and the integration tests both use it, so the tests run the wiring that production runs.

pub mod config;
pub mod core;
pub mod debug;
pub mod grpc;
pub mod idle;
pub mod prefetch;
pub mod service;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::config::{Config, ConfigError, GrpcSettings, Inventory, Settings};
pub use self::core::{Ask, Core, Error};
use crate::aws::Sts;
use crate::cluster::events::{EventSink, KubeEvents, NoEvents};
use crate::cluster::file::FileSource;
use crate::cluster::kube::KubeSource;
use crate::cluster::{Cluster, Source, SourceError};
use crate::creds::{AssumeRole, CredentialCache};
use crate::metrics::Metrics;
use crate::tls::reload::{Reloading, Side};
use crate::tls::{self};

/// How often the certificate files are checked for rotation, by default.
pub const TLS_POLL: Duration = Duration::from_secs(2);

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("the server task failed: {0}")]
    Task(String),
}

/// The pod and namespace source [`Config::inventory`] names.
pub enum AnySource {
    Kube(KubeSource),
    File(FileSource),
}

impl Source for AnySource {
    async fn run(self, cluster: Arc<Cluster>, shutdown: CancellationToken) -> Result<(), SourceError> {
        match self {
            AnySource::Kube(source) => source.run(cluster, shutdown).await,
            AnySource::File(source) => source.run(cluster, shutdown).await,
        }
    }
}

/// Opens the source of pods and namespaces `config` names, and where Events about pods go:
/// the API server for a cluster, nowhere for a manifest file.
pub async fn open_inventory(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<(AnySource, Arc<dyn EventSink>), ServeError> {
    Ok(match &config.inventory {
        Inventory::Kube(path) => {
            let source = KubeSource::connect(path.clone()).await?.watching_for(config.watch_timeout);
            let events = KubeEvents::new(source.client(), config.pod_name.clone(), shutdown.clone());
            (AnySource::Kube(source), Arc::new(events))
        }
        Inventory::File(path) => {
            (AnySource::File(FileSource::open(path, Duration::from_secs(1))?), Arc::new(NoEvents))
        }
    })
}

/// What a server process takes from outside: `main` makes these from the environment, the
/// tests from their peers.
pub struct Deps<A, S> {
    /// STS: the SDK's default chain in production, moto in tests.
    pub sts: A,
    /// Pods and namespaces.
    pub source: S,
    /// Where Events about pods go.
    pub events: Arc<dyn EventSink>,
    /// The gRPC listener, bound to `--bind` (or wherever a test likes).
    pub listener: TcpListener,
    /// `--prometheus-listen-addr`, bound.
    pub metrics_listener: Option<TcpListener>,
    /// The process's one set of metrics.
    pub metrics: Arc<Metrics>,
}

/// A server, assembled, synced and serving.
pub struct Server<A> {
    /// Lookup, policy and credentials, for tests that look inside.
    pub core: Arc<Core<A>>,
    /// Where it serves.
    pub addr: SocketAddr,
    task: JoinHandle<Result<(), ServeError>>,
}

impl<A> Server<A> {
    /// Waits until the server stops.
    pub async fn wait(self) -> Result<(), ServeError> {
        self.task.await.map_err(|e| ServeError::Task(e.to_string()))?
    }
}

/// Assembles a server: loads its TLS material (and follows rotation), builds the cluster view,
/// the cache and the core, starts the source and the prefetcher, waits until both caches have
/// synced, and then serves. Returns `None` when `shutdown` fires before the caches sync.
pub async fn assemble<A: AssumeRole, S: Source>(
    config: &Config,
    deps: Deps<A, S>,
    shutdown: CancellationToken,
) -> Result<Option<Server<A>>, ServeError> {
    let Deps { sts, source, events, listener, metrics_listener, metrics } = deps;
    let addr =
        listener.local_addr().map_err(|source| ServeError::Bind { addr: config.bind.clone(), source })?;
    let tls = Reloading::load(&config.tls, Side::Server, metrics.tls_server.clone(), tls::server_config)?;
    tls.spawn_watch(config.tls_poll, shutdown.clone());
    let settings = &config.settings;
    let (announce, announcements) = mpsc::channel(settings.prefetch_buffer.max(1));
    let cluster = Arc::new(Cluster::new(Some(announce), Arc::clone(&metrics)));
    let cache = CredentialCache::new(sts, settings.lifetimes, settings.fetchers, Arc::clone(&metrics));
    let policy = settings.policy.clone();
    let core = Core::new(
        Arc::clone(&cluster),
        policy,
        cache,
        settings.session.clone(),
        events,
        Arc::clone(&metrics),
    );
    let core = Arc::new(core);
    let source_stop = shutdown.clone();
    crate::task::spawn_until(&shutdown, async move {
        if let Err(error) = source.run(cluster, source_stop).await {
            tracing::error!(%error, "pod/namespace source stopped");
        }
    });
    prefetch::spawn(Arc::clone(&core), announcements, settings.fetchers, shutdown.clone());
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(listener, Arc::clone(&metrics), shutdown.clone()));
    }
    tracing::info!(%addr, "waiting for the pod and namespace caches to sync");
    tokio::select! {
        () = core.cluster().wait_synced() => {}
        () = shutdown.cancelled() => return Ok(None),
    }
    tracing::info!(pods = core.cluster().pod_count(), "caches synced; serving");
    let debug = debug::DebugService::new(Arc::clone(&core), settings.node_binding);
    let service = service::KiamService::new(Arc::clone(&core), settings.node_binding);
    let grpc_settings = config.grpc.clone();
    let task =
        tokio::spawn(async move { grpc::run(listener, tls, service, debug, &grpc_settings, shutdown).await });
    Ok(Some(Server { core, addr, task }))
}

/// Runs the server process until `shutdown`.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let config = config.autodetect().await?;
    let metrics = Arc::new(Metrics::default());
    let sts = Sts::from_env(&config.sts).await;
    let (source, events) = open_inventory(&config, &shutdown).await?;
    let listener = crate::net::listen_on(&config.bind)
        .await
        .map_err(|source| ServeError::Bind { addr: config.bind.clone(), source })?;
    let metrics_listener = match &config.prometheus_listen_addr {
        Some(addr) => Some(
            crate::net::listen_on(addr)
                .await
                .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?,
        ),
        None => None,
    };
    let deps = Deps { sts, source, events, listener, metrics_listener, metrics };
    match assemble(&config, deps, shutdown).await? {
        Some(server) => server.wait().await,
        None => Ok(()),
    }
}
