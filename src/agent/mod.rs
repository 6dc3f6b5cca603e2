//! `kiam agent`: the metadata endpoint pods reach through the node's DNAT rule. It serves the
//! credential paths and IMDSv2 tokens itself, asks a [`Backend`] (a kiam server, over gRPC) for
//! roles and credentials, forwards only allow-listed paths to the node's metadata service, and
//! refuses the rest. With `--iptables` it also installs and keeps the DNAT rule
//! ([`iptables`]).
//!
//! [`assemble`] builds and starts an agent from a validated [`Config`] and its [`Deps`]; `main`
//! and the integration tests both use it; [`handlers::respond`] answers one request, for tests
//! that need no socket.

pub mod answers;
pub mod backend;
pub mod container;
pub mod documents;
pub mod error;
pub mod handlers;
pub mod instance_check;
pub mod iptables;
pub mod pod_resources;
pub mod proxy;
pub mod remote;
pub mod token;
pub mod view;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use crate::listener::Limits;
use crate::listener::{self, workers};
pub use backend::{Backend, BackendError, ContainerCredentials, PodRole};
use iptables::{Interception, IptablesError, Runner};
use proxy::Upstream;
use token::Tokens;

use crate::client::{ClientConfig, ClientError, GrpcClient, Resolve};
use crate::metrics::Metrics;
use crate::policy::paths::AllowRoutes;

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--port`: the HTTP port.
    pub port: u16,
    /// `--host` (`HOST_IP`): the node's IP, the DNAT target. The agent listens on `--host:--port`
    /// only (kiam listened on every interface), which is all the DNAT rule and kubelet's probes
    /// need, and keeps the endpoint off the node's other addresses.
    pub host: IpAddr,
    /// `--host-ipv6` (`HOST_IPV6`): the node's IPv6 address, listened on as well, the target
    /// of the IPv6 DNAT.
    pub host6: Option<std::net::Ipv6Addr>,
    pub allow_routes: AllowRoutes,
    /// `--metadata-addr`: the node's metadata service, `host[:port]`.
    pub metadata_addr: String,
    /// How long a request may wait for a pod the server has not seen yet.
    pub pod_wait: Duration,
    /// `--require-imdsv2`: GETs without a token get 401.
    pub require_imdsv2: bool,
    /// `--allow-ip-query`: `?ip=` names the caller. For development only: any pod can then ask
    /// for any other pod's credentials.
    pub allow_ip_query: bool,
    /// `--iptables`: the interception rules to install and keep.
    pub iptables: Option<iptables::Config>,
    /// The link to the servers; `None` when the backend is in-process (kube2iam mode).
    pub client: Option<ClientConfig>,
    /// Keepalive and re-resolution of the link to the servers.
    pub transport: crate::client::Transport,
    /// `--prometheus-listen-addr`: where `/metrics` is served, on a listener of its own.
    pub prometheus_listen_addr: Option<String>,
    /// The HTTP server's limits (not flags).
    pub limits: Limits,
    /// Follow the servers' node view (`--disable-node-view` turns it off).
    pub node_view: bool,
    /// `--node-name` (`NODE_NAME`): the node the agent says it is on; servers check it against
    /// what its certificate or token proves.
    pub node_name: Option<String>,
    /// kube2iam mode: answer `/healthz` as kube2iam does, naming this host IP.
    pub healthz_host: Option<IpAddr>,
    /// `--pod-resources-socket`: the kubelet's PodResources socket the node view is confirmed
    /// from while no server answers (`None`: no such source).
    pub pod_resources_socket: Option<std::path::PathBuf>,
    /// How long the node view serves an entry it cannot confirm once no server answers
    /// ([`view::confirm::UNCONFIRMED_BOUND`]; not a flag).
    pub unconfirmed_bound: Duration,
}

impl Config {
    /// The address the agent listens on: `--host:--port`.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// The IPv6 address it also listens on: `[--host-ipv6]:--port`.
    pub fn listen_addr6(&self) -> Option<SocketAddr> {
        self.host6.map(|ip| SocketAddr::new(IpAddr::V6(ip), self.port))
    }
}

/// The agent's shared state.
pub struct Agent<B> {
    backend: B,
    tokens: Tokens,
    upstream: Upstream,
    allow_routes: AllowRoutes,
    pod_wait: Duration,
    require_imdsv2: bool,
    allow_ip_query: bool,
    metrics: Arc<Metrics>,
    /// The node view and the client that keeps it, when the servers stream one.
    view: Option<NodeViewLink>,
    /// kube2iam mode's `/healthz` answers with this host IP.
    healthz: Option<IpAddr>,
}

/// The node view and the client it fetches credentials with.
pub struct NodeViewLink {
    pub view: Arc<view::NodeView>,
    pub client: GrpcClient,
}

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot create the IMDSv2 token key")]
    TokenKey,
    #[error("iptables: {0}")]
    Iptables(#[from] IptablesError),
    #[error("cannot start the connection workers: {0}")]
    Workers(std::io::Error),
    #[error("the agent task failed: {0}")]
    Task(String),
}

impl<B: Backend> Agent<B> {
    /// An agent for `config` around `backend`, counting into `metrics`.
    pub fn new(backend: B, config: &Config, metrics: Arc<Metrics>) -> Result<Agent<B>, AgentStartError> {
        Ok(Agent {
            backend,
            tokens: Tokens::new().map_err(|_| AgentStartError::TokenKey)?,
            upstream: Upstream::new(&config.metadata_addr),
            allow_routes: config.allow_routes.clone(),
            pod_wait: config.pod_wait,
            require_imdsv2: config.require_imdsv2,
            allow_ip_query: config.allow_ip_query,
            metrics,
            view: None,
            healthz: config.healthz_host,
        })
    }
}

/// The listener's per-connection service: [`handlers::Direct`].
fn direct<B: Backend>(agent: Arc<Agent<B>>) -> impl Fn(SocketAddr) -> handlers::Direct<B> {
    move |peer| handlers::Direct::new(Arc::clone(&agent), peer)
}

/// What an agent process takes from outside: `main` makes these from the environment, the
/// tests from their peers.
pub struct Deps<B, R> {
    /// Who decides: the servers over gRPC ([`connect`]), or anything else behind the seam.
    pub backend: B,
    /// The metadata listener, bound to [`Config::listen_addr`] (or wherever a test likes).
    pub listener: TcpListener,
    /// The IPv6 metadata listener, bound to [`Config::listen_addr6`], if any.
    pub listener6: Option<TcpListener>,
    /// `--prometheus-listen-addr`, bound.
    pub metrics_listener: Option<TcpListener>,
    /// The process's one set of metrics.
    pub metrics: Arc<Metrics>,
    /// Runs `iptables` when `--iptables` is on.
    pub iptables: R,
    /// The client the node view is streamed and fetched through (the backend's own, in `main`).
    pub view_client: Option<GrpcClient>,
}

/// A running agent.
pub struct Running<R> {
    /// Where it serves.
    pub addr: SocketAddr,
    /// The interception rules, when `--iptables` is on.
    pub interception: Option<Arc<Interception<R>>>,
    task: JoinHandle<Result<(), AgentStartError>>,
}

impl<R> Running<R> {
    /// Waits until the agent stops (after shutdown, or when installing its rules failed).
    pub async fn wait(self) -> Result<(), AgentStartError> {
        self.task.await.map_err(|e| AgentStartError::Task(e.to_string()))?
    }
}

/// The gRPC backend for `config`: every server behind `--server-address`, found by `resolver`.
pub fn connect(
    config: &Config,
    metrics: &Metrics,
    resolver: Arc<dyn Resolve>,
) -> Result<GrpcClient, ClientError> {
    let transport = crate::client::Transport {
        tls_gauges: metrics.tls_client.clone(),
        grpc_metrics: metrics.grpc_client.clone(),
        ..config.transport.clone()
    };
    let client =
        config.client.as_ref().ok_or_else(|| ClientError::Address("none (in-process backend)".into()))?;
    GrpcClient::connect_with(client, &transport, resolver)
}

/// Assembles an agent from `config` and `deps` and starts it: metrics, then the interception
/// rules (if any; a failure stops the agent, which is safer than serving pods that are not
/// intercepted), then HTTP until `shutdown`, then the rules' removal if configured.
pub fn assemble<B: Backend, R: Runner>(
    config: &Config,
    deps: Deps<B, R>,
    shutdown: CancellationToken,
) -> Result<Running<R>, AgentStartError> {
    if config.allow_ip_query {
        tracing::warn!(
            "--allow-ip-query is on: any pod can ask for any other pod's credentials with ?ip=; \
             use it in development only"
        );
    }
    let Deps { backend, listener, listener6, metrics_listener, metrics, iptables: runner, view_client } =
        deps;
    let addr =
        listener.local_addr().map_err(|source| AgentStartError::Bind { addr: "agent".into(), source })?;
    let mut agent = Agent::new(backend, config, Arc::clone(&metrics))?;
    let mut follow = None;
    if let Some(client) = view_client.filter(|_| config.node_view) {
        let view = Arc::new(
            view::NodeView::new(Arc::clone(&metrics))
                .confirming_from(config.pod_resources_socket.clone(), config.unconfirmed_bound),
        );
        follow = Some((Arc::clone(&view), client.clone(), config.node_name.clone()));
        agent.view = Some(NodeViewLink { view, client });
    }
    let agent = Arc::new(agent);
    if let Some(listener) = metrics_listener {
        tokio::spawn(crate::metrics::serve(listener, Arc::clone(&metrics), shutdown.clone()));
    }
    let interception = config.iptables.clone().map(|rules| {
        Arc::new(Interception::new(runner, rules).counting_into(metrics.agent.iptables_restorations.clone()))
    });
    let server = config.client.as_ref().map_or("in-process", |c| c.server_address.as_str());
    tracing::info!(%addr, server, "agent listening");
    let cut = |reason| metrics.agent.connections_cut.get_or_create(&crate::metrics::Cut { reason }).clone();
    let tally = listener::Tally {
        open: metrics.agent.connections_open.clone(),
        source_cap: cut("source_cap"),
        head_timeout: cut("head_timeout"),
        write_timeout: cut("write_timeout"),
        max_age: cut("max_age"),
    };
    // Connections are served on one single-threaded runtime per core (`workers`), as nginx's
    // worker processes; everything else stays on the process's runtime.
    let workers = workers::Workers::per_core().map_err(AgentStartError::Workers)?;
    if let Some(listener6) = listener6 {
        // The same limits, counted alike; per-source shares are per listener, and a pod has
        // one address in each family.
        let (make, limits, tally, shutdown, workers) = (
            direct(Arc::clone(&agent)),
            config.limits.clone(),
            tally.clone(),
            shutdown.clone(),
            workers.clone(),
        );
        tokio::spawn(async move {
            listener::serve_with(listener6, make, &limits, &workers, tally, shutdown).await
        });
    }
    // The view is followed once the interception is in place: a server that sees this node's
    // agent subscribe knows its pods are intercepted (node readiness relies on it).
    let start_view = move |shutdown: &CancellationToken| {
        if let Some((view, client, node)) = follow {
            view::sync::spawn(view, client, node, shutdown);
        }
    };
    let limits = (config.limits.clone(), tally, workers);
    let task = tokio::spawn(serve(listener, agent, interception.clone(), limits, start_view, shutdown));
    Ok(Running { addr, interception, task })
}

/// Installs the interception rules, keeps them in place while serving `agent` on `listener`
/// until `shutdown`, and then removes them if configured to.
async fn serve<B: Backend, R: Runner>(
    listener: TcpListener,
    agent: Arc<Agent<B>>,
    interception: Option<Arc<Interception<R>>>,
    (limits, tally, workers): (Limits, listener::Tally, workers::Workers),
    start_view: impl FnOnce(&CancellationToken),
    shutdown: CancellationToken,
) -> Result<(), AgentStartError> {
    let Some(rules) = interception else {
        start_view(&shutdown);
        listener::serve_with(listener, direct(agent), &limits, &workers, tally, shutdown).await;
        return Ok(());
    };
    rules.install().await?;
    start_view(&shutdown);
    let iptables = rules.config();
    tracing::info!(chain = %iptables.chain, interface = %iptables.interface, target = %iptables.target, "iptables rules installed");
    let checks = shutdown.child_token();
    let keeper = tokio::spawn(Arc::clone(&rules).keep_installed(checks.clone()));
    listener::serve_with(listener, direct(agent), &limits, &workers, tally, shutdown).await;
    checks.cancel();
    let _ = keeper.await;
    if rules.config().remove_at_exit {
        rules.remove_with_retries().await?;
        tracing::info!("iptables rules removed");
    } else {
        tracing::info!("iptables rules left in place (--no-iptables-remove)");
    }
    Ok(())
}

/// Runs the agent process until `shutdown`. It serves at once, whether or not a server is
/// reachable yet: the gRPC connection is made on first use.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), AgentStartError> {
    let metrics = Arc::new(Metrics::default());
    let backend = connect(&config, &metrics, Arc::new(crate::client::Dns))?;
    let addr = config.listen_addr();
    let listener = crate::net::listen(addr)
        .map_err(|source| AgentStartError::Bind { addr: addr.to_string(), source })?;
    let listener6 = match config.listen_addr6() {
        Some(addr) => Some(
            crate::net::listen(addr)
                .map_err(|source| AgentStartError::Bind { addr: addr.to_string(), source })?,
        ),
        None => None,
    };
    let metrics_listener = match &config.prometheus_listen_addr {
        Some(addr) => Some(
            crate::net::listen_on(addr)
                .await
                .map_err(|source| AgentStartError::Bind { addr: addr.clone(), source })?,
        ),
        None => None,
    };
    let view_client = Some(backend.clone());
    let iptables = iptables::Command::default();
    let deps = Deps { backend, listener, listener6, metrics_listener, metrics, iptables, view_client };
    assemble(&config, deps, shutdown)?.wait().await
}
