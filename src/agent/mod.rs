//! `kiam agent`: the metadata endpoint pods reach through the node's DNAT rule. It serves the
//! credential paths and IMDSv2 tokens itself, asks a [`Backend`] (a kiam server, over gRPC) for
//! roles and credentials, forwards only allow-listed paths to the node's metadata service, and
//! refuses the rest. With `--iptables` it also installs and keeps the DNAT rule
//! ([`iptables`]).
//!
//! [`main`] wires the process from a validated [`Config`]; [`serve`] runs a bound listener and
//! the interception rules until shutdown; [`run`] serves HTTP only; [`app`] is the router, for
//! tests that need no socket.

pub mod answers;
pub mod backend;
pub mod documents;
pub mod handlers;
pub mod http;
pub mod iptables;
pub mod proxy;
pub mod roles;
pub mod token;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use backend::{Backend, BackendError};
pub use http::Limits;
use iptables::{Interception, IptablesError, Runner};
use proxy::Upstream;
use token::Tokens;

use crate::client::{ClientConfig, ClientError, GrpcClient};
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
    pub client: ClientConfig,
    /// Keepalive, re-resolution and certificate polling of the link to the servers.
    pub transport: crate::client::Transport,
    /// `--prometheus-listen-addr`: where `/metrics` is served, on a listener of its own.
    pub prometheus_listen_addr: Option<String>,
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
    limits: Limits,
    metrics: Arc<Metrics>,
    roles: roles::RoleMemory,
}

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot create the IMDSv2 token key")]
    TokenKey,
    #[error("iptables: {0}")]
    Iptables(#[from] IptablesError),
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics { addr: String, source: std::io::Error },
}

impl<B: Backend> Agent<B> {
    /// Assembles an agent around `backend`, answering IMDSv1 and v2, with `?ip=` ignored.
    pub fn new(
        backend: B,
        allow_routes: AllowRoutes,
        metadata_addr: &str,
        pod_wait: Duration,
    ) -> Result<Agent<B>, AgentStartError> {
        Ok(Agent {
            backend,
            tokens: Tokens::new().map_err(|_| AgentStartError::TokenKey)?,
            upstream: Upstream::new(metadata_addr),
            allow_routes,
            pod_wait,
            require_imdsv2: false,
            allow_ip_query: false,
            limits: Limits::default(),
            metrics: Arc::new(Metrics::default()),
            roles: roles::RoleMemory::default(),
        })
    }

    /// Assembles an agent for `config` around `backend`.
    pub fn from_config(backend: B, config: &Config) -> Result<Agent<B>, AgentStartError> {
        Ok(Agent::new(backend, config.allow_routes.clone(), &config.metadata_addr, config.pod_wait)?
            .require_imdsv2(config.require_imdsv2)
            .allow_ip_query(config.allow_ip_query))
    }

    /// Whether a GET without a token gets 401.
    pub fn require_imdsv2(mut self, on: bool) -> Agent<B> {
        self.require_imdsv2 = on;
        self
    }

    /// Whether `?ip=` names the caller (development only).
    pub fn allow_ip_query(mut self, on: bool) -> Agent<B> {
        self.allow_ip_query = on;
        self
    }

    /// Counts into `metrics` instead of a private set.
    pub fn metrics(mut self, metrics: Arc<Metrics>) -> Agent<B> {
        self.metrics = metrics;
        self
    }

    /// The metrics this agent counts into.
    pub fn metrics_handle(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Replaces `--allow-route-regexp`.
    pub fn allow_routes(mut self, routes: AllowRoutes) -> Agent<B> {
        self.allow_routes = routes;
        self
    }

    /// Replaces the HTTP limits.
    pub fn limits(mut self, limits: Limits) -> Agent<B> {
        self.limits = limits;
        self
    }
}

/// The router: every path goes through one handler, because what a path means is decided by
/// [`crate::policy::paths::classify`] on the raw path, not by a route table.
pub fn app<B: Backend>(agent: Arc<Agent<B>>) -> Router {
    Router::new().fallback(handlers::handle::<B>).with_state(agent)
}

/// Serves `agent` on `listener` until `shutdown`.
pub async fn run<B: Backend>(
    listener: TcpListener,
    agent: Arc<Agent<B>>,
    shutdown: CancellationToken,
) -> Result<(), AgentStartError> {
    let limits = agent.limits.clone();
    http::serve(listener, app(agent), &limits, shutdown).await;
    Ok(())
}

/// Installs the interception rules (if any; a failure stops the agent, which is safer than
/// serving pods that are not intercepted), keeps them in place while serving `agent` on
/// `listener` until `shutdown`, and then removes them if configured to.
pub async fn serve<B: Backend, R: Runner>(
    listener: TcpListener,
    agent: Arc<Agent<B>>,
    interception: Option<Arc<Interception<R>>>,
    shutdown: CancellationToken,
) -> Result<(), AgentStartError> {
    let Some(rules) = interception else {
        return run(listener, agent, shutdown).await;
    };
    rules.install().await?;
    let iptables = rules.config();
    tracing::info!(chain = %iptables.chain, interface = %iptables.interface, target = %iptables.target, "iptables rules installed");
    let checks = shutdown.child_token();
    let keeper = tokio::spawn(Arc::clone(&rules).keep_installed(checks.clone()));
    let served = run(listener, agent, shutdown).await;
    checks.cancel();
    let _ = keeper.await;
    if rules.config().remove_at_exit {
        rules.remove_with_retries().await?;
        tracing::info!("iptables rules removed");
    } else {
        tracing::info!("iptables rules left in place (--no-iptables-remove)");
    }
    served
}

/// Runs the agent process until `shutdown`. It serves at once, whether or not a server is
/// reachable yet: the gRPC connection is made on first use.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), AgentStartError> {
    if config.allow_ip_query {
        tracing::warn!(
            "--allow-ip-query is on: any pod can ask for any other pod's credentials with ?ip=; \
             use it in development only"
        );
    }
    let metrics = Arc::new(Metrics::default());
    let transport = crate::client::Transport {
        tls_gauges: metrics.tls_client.clone(),
        grpc_metrics: metrics.grpc_client.clone(),
        ..config.transport.clone()
    };
    let backend = GrpcClient::connect_with(&config.client, &transport, Arc::new(crate::client::Dns))?;
    let agent = Agent::from_config(backend, &config)?.metrics(Arc::clone(&metrics));
    if let Some(addr) = &config.prometheus_listen_addr {
        crate::metrics::spawn(addr, Arc::clone(&metrics), shutdown.clone())
            .await
            .map_err(|source| AgentStartError::Metrics { addr: addr.clone(), source })?;
    }
    let addr = SocketAddr::new(config.host, config.port);
    let listener = crate::net::listen(addr).map_err(|source| AgentStartError::Bind { addr, source })?;
    tracing::info!(%addr, server = %config.client.server_address, "agent listening");
    let interception =
        config.iptables.map(|rules| Arc::new(Interception::new(iptables::Command::default(), rules)));
    if let Some(interception) = &interception {
        let (interception, counter) = (Arc::clone(interception), metrics.agent.iptables_restorations.clone());
        metrics.on_scrape(move || {
            counter.inner().store(interception.restorations(), std::sync::atomic::Ordering::Relaxed)
        });
    }
    serve(listener, Arc::new(agent), interception, shutdown).await
}
