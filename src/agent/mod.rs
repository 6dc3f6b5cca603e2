//! `kiam agent`: the metadata endpoint pods reach through the node's DNAT rule. It serves the
//! credential paths and IMDSv2 tokens itself, asks a [`Backend`] (a kiam server, over gRPC) for
//! roles and credentials, forwards only allow-listed paths to the node's metadata service, and
//! refuses the rest.
//!
//! [`main`] wires the process from a validated [`Config`]; [`run`] serves a bound listener until
//! shutdown; [`app`] is the router, for tests that need no socket.

pub mod backend;
pub mod handlers;
pub mod iptables;
pub mod proxy;
pub mod token;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use backend::{Backend, BackendError};
use proxy::Upstream;
use token::Tokens;

use crate::client::{ClientConfig, ClientError, GrpcClient};
use crate::policy::paths::AllowRoutes;

/// The validated agent configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// `--port`: the HTTP port.
    pub port: u16,
    /// `--host` (`HOST_IP`): the node's IP, the DNAT target. The agent listens on `--host:--port`
    /// only (kiam listened on every interface), which is all the DNAT rule and kubelet's probes
    /// need, and keeps the endpoint off the node's other addresses.
    pub host: std::net::IpAddr,
    pub allow_routes: AllowRoutes,
    /// `--metadata-addr`: the node's metadata service, `host[:port]`.
    pub metadata_addr: String,
    /// How long a request may wait for a pod the server has not seen yet.
    pub pod_wait: Duration,
    pub client: ClientConfig,
}

/// The agent's shared state.
pub struct Agent<B> {
    backend: B,
    tokens: Tokens,
    upstream: Upstream,
    allow_routes: AllowRoutes,
    pod_wait: Duration,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentStartError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("cannot listen on port {port}: {source}")]
    Bind { port: u16, source: std::io::Error },
    #[error("cannot create the IMDSv2 token key")]
    TokenKey,
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
}

impl<B: Backend> Agent<B> {
    /// Assembles an agent around `backend`.
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
        })
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
    let service = app(agent).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(AgentStartError::Serve)
}

/// Runs the agent process until `shutdown`. It serves at once, whether or not a server is
/// reachable yet: the gRPC connection is made on first use.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), AgentStartError> {
    let backend = GrpcClient::connect_lazy(&config.client)?;
    let agent = Agent::new(backend, config.allow_routes, &config.metadata_addr, config.pod_wait)?;
    let addr = SocketAddr::new(config.host, config.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AgentStartError::Bind { port: config.port, source })?;
    tracing::info!(%addr, server = %config.client.server_address, "agent listening");
    run(listener, Arc::new(agent), shutdown).await
}
