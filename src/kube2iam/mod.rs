//! kube2iam mode: existing kube2iam DaemonSets run unchanged on this binary (invoked as
//! `kube2iam`, or as `kiam kube2iam`). One process per node holds the server's core (watch,
//! kube2iam's policy, the single-flight cache with prefetch and refresh, STS with the node's own
//! credentials from the SDK's default chain) and the agent's metadata surface, with no gRPC and
//! no certificates: the agent's [`Backend`](crate::agent::Backend) is the core itself
//! ([`backend::InProcess`]).
//!
//! Not kube2iam's holes: the cache key holds the external ID and session name; regular
//! expressions are anchored; `/debug/store` answers loopback callers only, on the metrics port;
//! the node's credentials and `user-data` are never forwarded (only [`DEFAULT_ALLOWED_PATHS`]).

pub mod backend;
pub mod config;
pub mod flags;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use flags::{Kube2iamArgs, Kube2iamCli};

use crate::agent::iptables::{self, Runner};
use crate::aws::{Sts, StsConfig};
use crate::cluster::events::NoEvents;
use crate::cluster::kube::KubeSource;
use crate::cluster::{Lookup, Source, SourceError};
use crate::core::Core;
use crate::creds::AssumeRole;
use crate::metrics::Metrics;

/// The metadata paths forwarded to the node by default: what pods commonly read (instance ID,
/// placement, local address, the unsigned identity document), never user-data (which holds
/// kubelet bootstrap material on many clusters), the node's credentials, or the signed identity
/// documents. `--allow-route-regexp` widens or closes it.
pub const DEFAULT_ALLOWED_PATHS: &str = "^/[^/]+/(meta-data/?|meta-data/(ami-id|ami-launch-index|availability-zone|hostname|instance-id|instance-life-cycle|instance-type|local-hostname|local-ipv4|mac|placement/[a-z0-9/-]*|public-hostname|public-ipv4|reservation-id|services/domain|services/partition)|dynamic/instance-identity/document)$";

/// Why kube2iam mode could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Kube2iamError {
    #[error("{0}")]
    Discover(String),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentStartError),
}

/// What the process takes from outside: `main` makes these from the environment, tests from
/// their peers.
pub struct Deps<A, S, R> {
    /// STS with the node's own credentials (tests: moto).
    pub sts: A,
    pub source: S,
    /// The metadata endpoint's listener (`--host-ip:--app-port`).
    pub listener: TcpListener,
    /// `--metrics-port`, bound.
    pub metrics_listener: Option<TcpListener>,
    /// Registered with kube2iam's families ([`Metrics::with_kube2iam`]).
    pub metrics: Arc<Metrics>,
    pub iptables: R,
}

/// kube2iam mode, running.
pub struct Running<A, R> {
    pub core: Arc<Core<A>>,
    pub agent: crate::agent::Running<R>,
}

/// Assembles and starts kube2iam mode: the core and its watch, metrics (and `/debug/store`),
/// then, once the caches have synced, the metadata endpoint with its DNAT rule. `None` when
/// `shutdown` fires first.
pub async fn assemble<A: AssumeRole, S: Source, R: Runner>(
    config: &Config,
    deps: Deps<A, S, R>,
    shutdown: CancellationToken,
) -> Result<Option<Running<A, R>>, Kube2iamError> {
    let Deps { sts, source, listener, metrics_listener, metrics, iptables } = deps;
    let events = Arc::new(NoEvents);
    let core = crate::core::start(
        &config.settings,
        sts,
        source,
        events,
        Arc::clone(&metrics),
        crate::core::Hooks::default(),
        &shutdown,
    );
    if let Some(listener) = metrics_listener {
        let mut app = crate::metrics::router(Arc::clone(&metrics));
        if config.debug {
            let store = axum::Router::new().route("/debug/store", axum::routing::get(debug_store::<A>));
            app = app.merge(store.with_state(Arc::clone(&core)));
        }
        tokio::spawn(crate::metrics::serve_app(listener, app, shutdown.clone()));
    }
    tokio::select! {
        () = core.cluster().wait_synced() => {}
        () = shutdown.cancelled() => return Ok(None),
    }
    tracing::info!(pods = core.cluster().pod_count(), "caches synced; serving");
    let backend = backend::InProcess::new(Arc::clone(&core), Arc::clone(&metrics), config.agent.pod_wait);
    let deps = crate::agent::Deps {
        backend,
        listener,
        listener6: None,
        metrics_listener: None,
        metrics,
        iptables,
        view_client: None,
    };
    let agent = crate::agent::assemble(&config.agent, deps, shutdown)?;
    Ok(Some(Running { core, agent }))
}

/// `/debug/store` (with `--debug`): kube2iam's view of roles by IP and namespace, to loopback
/// callers only: a pod on the node's network cannot read it.
async fn debug_store<A: AssumeRole>(
    State(core): State<Arc<Core<A>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
) -> Response {
    if !peer.ip().is_loopback() {
        return (StatusCode::FORBIDDEN, "/debug/store answers loopback callers only\n").into_response();
    }
    let (mut roles, mut namespaces) = (serde_json::Map::new(), serde_json::Map::new());
    let mut ips = std::collections::BTreeSet::new();
    core.cluster().for_each_live_pod(|pod| ips.extend(pod.ip));
    // Each address under the pod that owns it, by the rule every request follows
    // (`model::ip_owner`): a terminating pod whose IP was reused is not listed, nor an IP that
    // several pods claim.
    for ip in ips {
        if let Lookup::Found(pod) = core.cluster().pod_by_ip(ip) {
            let role = core.policy().effective_role(&pod).unwrap_or_default();
            roles.insert(ip.to_string(), role.into());
            namespaces.insert(ip.to_string(), (*pod.namespace).into());
        }
    }
    let allowed: serde_json::Map<String, serde_json::Value> = core
        .cluster()
        .namespaces()
        .iter()
        .map(|ns| {
            let list = ns.allowed_roles.as_ref().and_then(|r| r.clone().ok()).unwrap_or_default();
            (ns.name.clone(), list.into())
        })
        .collect();
    let body =
        serde_json::json!({"rolesByIP": roles, "namespaceByIP": namespaces, "rolesByNamespace": allowed});
    ([(axum::http::header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// Resolves `--auto-discover-base-arn` and `--auto-discover-default-role` from the metadata
/// service (over IMDSv2).
async fn discover(mut config: Config) -> Result<Config, Kube2iamError> {
    let rules = config.settings.policy.kube2iam.get_or_insert_with(Default::default);
    if config.discover_default_role {
        let role = crate::aws::detect_instance_role().await.map_err(Kube2iamError::Discover)?;
        tracing::info!(role, "default role discovered: the instance's own");
        rules.default_role = Some(role);
    }
    if config.discover_base_arn || config.discover_default_role {
        let base = crate::aws::detect_base_arn().await.map_err(Kube2iamError::Discover)?;
        tracing::info!(base_arn = base.as_str(), "base ARN discovered from the instance profile");
        config.settings.policy.base_arn = Some(base);
    }
    Ok(config)
}

/// Runs kube2iam mode until `shutdown`.
pub async fn main(config: Config, shutdown: CancellationToken) -> Result<(), Kube2iamError> {
    let config = discover(config).await?;
    let metrics = Arc::new(Metrics::with_kube2iam());
    // The SDK's default chain: the node's credentials; AWS_REGION and AWS_ENDPOINT_URL_STS
    // as the SDK defines them.
    let sts = Sts::from_env(&StsConfig::default()).await;
    let source = KubeSource::connect_with(&config.access, config.insecure)
        .await?
        .with_projection(config.projection.clone())
        .on_node(config.node.clone());
    let addr = config.agent.listen_addr();
    let listener = crate::net::listen(addr).map_err(|source| Kube2iamError::Bind { addr, source })?;
    let metrics_listener = match config.metrics_port {
        Some(port) => {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
            Some(crate::net::listen(addr).map_err(|source| Kube2iamError::Bind { addr, source })?)
        }
        None => None,
    };
    let deps =
        Deps { sts, source, listener, metrics_listener, metrics, iptables: iptables::Command::default() };
    match assemble(&config, deps, shutdown).await? {
        Some(running) => Ok(running.agent.wait().await?),
        None => Ok(()),
    }
}
