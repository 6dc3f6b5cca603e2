//! `kiam server`: watches pods and namespaces, decides by policy, and serves credentials to
//! agents over mutually authenticated gRPC.
//!
//! [`assemble`] builds and starts a server from a validated [`Config`] and its [`Deps`]; `main`
//! and the integration tests both use it, so the tests run the wiring that production runs.

pub mod access;
pub mod config;
pub mod debug;
pub mod grpc;
pub mod identity;
pub mod idle;
pub mod jwks;
pub mod node_service;
pub mod peers;
pub mod pod_token;
pub mod readiness;
pub mod service;
pub mod token_service;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use self::config::{Config, ConfigError, GrpcSettings, Inventory, Peers, Settings};
pub use self::identity::DEFAULT_POD_TOKEN_AUDIENCE;
use crate::aws::Sts;
use crate::cluster::events::{EventSink, KubeEvents, NoEvents};
use crate::cluster::file::FileSource;
use crate::cluster::kube::KubeSource;
use crate::cluster::{Cluster, Source, SourceError};
use crate::core::Core;
use crate::creds::AssumeRole;
use crate::metrics::Metrics;
use crate::tls::reload::{Reloading, Side};
use crate::tls::{self};
use identity::{Identities, TokenVerifier};
use node_service::NodeViewService;
use view::Hub;

/// How long a node-view fence waits for an agent's acknowledgement before dropping its stream.
const FENCE_TIMEOUT: Duration = Duration::from_millis(500);
/// The most node-view streams one node may hold at once.
const STREAMS_PER_NODE: usize = 4;

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

/// What the server reads the cluster through: the pod and namespace source, where Events go, and
/// (with an API server) the checker of agents' tokens.
pub struct Inventoried {
    pub source: AnySource,
    pub events: Arc<dyn EventSink>,
    pub tokens: Option<TokenVerifier>,
    /// The API client, for node taints.
    pub nodes: Option<kube::Client>,
}

/// Opens the source of pods and namespaces `config` names: the API server for a cluster (Events
/// and TokenReview through the same client), or a manifest file (no Events, no tokens).
pub async fn open_inventory(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Inventoried, ServeError> {
    Ok(match &config.inventory {
        Inventory::Kube(path) => {
            let source = KubeSource::connect(path.clone())
                .await?
                .watching_for(config.watch_timeout)
                .with_service_accounts(config.core.policy.service_account_roles);
            let events = KubeEvents::new(source.client(), config.pod_name.clone(), shutdown.clone());
            let settings = &config.settings;
            let tokens = TokenVerifier::new(
                source.client(),
                &settings.agent_token_audience,
                &settings.agent_service_account,
                &settings.pod_token_audience,
            );
            let nodes = Some(source.client());
            Inventoried {
                source: AnySource::Kube(source),
                events: Arc::new(events),
                tokens: Some(tokens),
                nodes,
            }
        }
        Inventory::File(path) => Inventoried {
            source: AnySource::File(FileSource::open(path, Duration::from_secs(1))?),
            events: Arc::new(NoEvents),
            tokens: None,
            nodes: None,
        },
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
    /// Checks agents' tokens (node binding and the node view by token); `None` without an API.
    pub tokens: Option<TokenVerifier>,
    /// Writes node taints (`--node-readiness-taint`); `None` without an API.
    pub nodes: Option<kube::Client>,
    /// The gRPC listener, bound to `--bind` (or wherever a test likes).
    pub listener: TcpListener,
    /// `--prometheus-listen-addr`, bound.
    pub metrics_listener: Option<TcpListener>,
    /// The process's one set of metrics.
    pub metrics: Arc<Metrics>,
    /// Resolves `--peers`; `None`: the system resolver.
    pub peers: Option<Arc<dyn crate::client::Resolve>>,
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

/// Assembles a server on the request core ([`crate::core`]): loads its TLS material (and follows rotation), builds the cluster view,
/// the cache and the core, starts the source and the prefetcher, waits until both caches have
/// synced, and then serves. Returns `None` when `shutdown` fires before the caches sync.
pub async fn assemble<A: AssumeRole, S: Source>(
    config: &Config,
    deps: Deps<A, S>,
    shutdown: CancellationToken,
) -> Result<Option<Server<A>>, ServeError> {
    let Deps { sts, source, events, tokens, nodes, listener, metrics_listener, metrics, peers } = deps;
    let addr =
        listener.local_addr().map_err(|source| ServeError::Bind { addr: config.bind.clone(), source })?;
    let tls = Reloading::load(&config.tls, Side::Server, metrics.tls_server.clone(), tls::server_config)?;
    tls.spawn_watch(config.tls_poll, shutdown.clone());
    let settings = &config.settings;
    let mut hub = Hub::new(FENCE_TIMEOUT, STREAMS_PER_NODE);
    if let (Some(taint), Some(client)) = (&settings.readiness_taint, &nodes) {
        let (tx, rx) = mpsc::channel(1024);
        hub = hub.with_readiness(tx);
        let readiness = readiness::Settings { taint: taint.clone(), reapply: settings.readiness_reapply };
        readiness::spawn(client.clone(), readiness, rx, &shutdown);
    }
    let hub = Arc::new(hub);
    let fence = settings.node_view.then(|| Arc::clone(&hub) as Arc<dyn crate::cluster::Fence>);
    let sharing = match &settings.peers {
        Some(peers_config) => {
            let me = peers::own_address(addr, peers_config.pod_ip).ok_or_else(|| {
                ConfigError::Flag(format!(
                    "--peers needs this server's own address: --bind {} names every address, and POD_IP is not set",
                    config.bind
                ))
            })?;
            let resolver = peers.unwrap_or_else(|| Arc::new(crate::client::Dns));
            let membership = peers::first(peers_config, resolver.as_ref(), me).await;
            Some((membership, resolver, peers_config.clone()))
        }
        None => None,
    };
    let ownership = sharing.as_ref().map(|(m, _, _)| Arc::clone(m) as Arc<dyn crate::core::Ownership>);
    let hooks = crate::core::Hooks { fence, ownership };
    let core = crate::core::start(&config.core, sts, source, events, Arc::clone(&metrics), hooks, &shutdown);
    if let Some((membership, resolver, peers_config)) = sharing {
        peers::spawn(membership, peers_config, resolver, Arc::clone(&core), &shutdown);
    }
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(listener, Arc::clone(&metrics), shutdown.clone()));
    }
    tracing::info!(%addr, "waiting for the pod and namespace caches to sync");
    tokio::select! {
        () = core.cluster().wait_synced() => {}
        () = shutdown.cancelled() => return Ok(None),
    }
    tracing::info!(pods = core.cluster().pod_count(), "caches synced; serving");
    let identities = Arc::new(Identities::new(tokens));
    let debug = debug::DebugService::new(Arc::clone(&core), settings.node_binding);
    let service =
        service::KiamService::new(Arc::clone(&core), settings.node_binding, Arc::clone(&identities));
    let view = settings.node_view.then(|| {
        NodeViewService::new(
            Arc::clone(&core),
            hub,
            Arc::clone(&identities),
            settings.node_binding,
            shutdown.clone(),
        )
    });
    let tokens = token_service::PodTokenService::new(Arc::clone(&core), identities, settings.node_binding);
    let services = grpc::Services { kiam: service, debug, view, tokens };
    let grpc_settings = config.grpc.clone();
    let task =
        tokio::spawn(async move { grpc::run(listener, tls, services, &grpc_settings, shutdown).await });
    Ok(Some(Server { core, addr, task }))
}

/// Runs the server process until `shutdown`.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let config = config.autodetect().await?;
    let metrics = Arc::new(Metrics::default());
    let sts = Sts::from_env(&config.sts).await;
    let Inventoried { source, events, tokens, nodes } = open_inventory(&config, &shutdown).await?;
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
    let deps = Deps { sts, source, events, tokens, nodes, listener, metrics_listener, metrics, peers: None };
    match assemble(&config, deps, shutdown).await? {
        Some(server) => server.wait().await,
        None => Ok(()),
    }
}
