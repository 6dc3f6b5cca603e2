//! `kiam server` flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{LogArgs, ObservabilityArgs, PolicyArgs, TlsArgs, go_duration};
use crate::aws::StsConfig;
use crate::creds::Lifetimes;
use crate::server::config::resolve_assume_role;
use crate::server::{Config, ConfigError, GrpcSettings, Inventory, Peers, Settings, TLS_POLL};

/// STS refuses sessions shorter than this.
const MIN_SESSION: Duration = Duration::from_secs(15 * 60);

/// Flags of `kiam server`.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// gRPC listen address.
    #[arg(long, env = "KIAM_BIND", default_value = "localhost:9610")]
    pub bind: String,
    /// kubeconfig path; empty means in-cluster configuration.
    #[arg(long, env = "KIAM_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Read pods and namespaces from this manifest file instead of the Kubernetes API (local
    /// development; the file is re-read when it changes).
    #[arg(long, env = "KIAM_MANIFEST", conflicts_with = "kubeconfig")]
    pub manifest: Option<PathBuf>,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// A role the server assumes first and uses to assume the pods' roles (short names allowed).
    #[arg(long, env = "KIAM_ASSUME_ROLE_ARN")]
    pub assume_role_arn: Option<String>,
    /// Prefetch workers, which is also the most STS calls in flight.
    #[arg(long, env = "KIAM_FETCHERS", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
    pub fetchers: u16,
    /// AssumeRole calls a second at most, per server: live requests first, then prefetch of new
    /// pods, then refreshes. STS's default quota (600/s per account and region) is shared by
    /// every caller in the account.
    #[arg(long, env = "KIAM_STS_RATE", default_value_t = crate::core::DEFAULT_STS_RATE, value_parser = clap::value_parser!(u32).range(1..))]
    pub sts_rate: u32,
    /// Share the identities with the other servers behind this DNS name (`host:port`, the
    /// servers' headless Service): each identity is prefetched and refreshed by one owner
    /// (rendezvous hashing over the resolved addresses), and any server still answers any
    /// request. A server recognises itself by its --bind address, or POD_IP when it binds all
    /// addresses. Off by default: every server keeps every identity warm.
    #[arg(long, env = "KIAM_PEERS")]
    pub peers: Option<String>,
    /// How often --peers is resolved again (and each peer checked for a listener).
    #[arg(long, env = "KIAM_PEERS_INTERVAL", default_value = "5s", value_parser = go_duration)]
    pub peers_interval: Duration,
    /// The server's own pod IP (from the downward API), to find itself among --peers.
    #[arg(long, env = "POD_IP", hide = true)]
    pub pod_ip: Option<std::net::IpAddr>,
    /// Pod announcements waiting for a prefetch worker; more are dropped (and counted).
    #[arg(long, env = "KIAM_PREFETCH_BUFFER_SIZE", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub prefetch_buffer_size: u32,
    /// Accepted for kiam compatibility: the watch keeps the caches current without resyncs.
    #[arg(long, env = "KIAM_SYNC", default_value = "1m", value_parser = go_duration)]
    pub sync: Duration,
    /// Deprecated and ignored (kiam never used it).
    #[arg(long, env = "KIAM_PROMETHEUS_SYNC_INTERVAL", value_parser = go_duration, hide = true)]
    pub prometheus_sync_interval: Option<Duration>,
    /// gRPC keepalive ping interval.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIME_DURATION", default_value = "10s", value_parser = go_duration)]
    pub grpc_keepalive_time_duration: Duration,
    /// gRPC keepalive ping acknowledgement timeout.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIMEOUT_DURATION", default_value = "2s", value_parser = go_duration)]
    pub grpc_keepalive_timeout_duration: Duration,
    /// Close connections idle for this long.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_IDLE_DURATION", default_value = "15m", value_parser = go_duration)]
    pub grpc_max_connection_idle_duration: Duration,
    /// Close connections after this age, so that clients re-resolve and spread over new servers.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_AGE_DURATION", default_value = "15m", value_parser = go_duration)]
    pub grpc_max_connection_age_duration: Duration,
    /// Grace period for calls in flight on a connection closed for its age.
    #[arg(long, env = "KIAM_GRPC_MAX_CONNECTION_AGE_GRACE_DURATION", default_value = "15m", value_parser = go_duration)]
    pub grpc_max_connection_age_grace_duration: Duration,
    /// STS session length (at least 15m).
    #[arg(long, env = "KIAM_SESSION_DURATION", default_value = "1h", value_parser = go_duration)]
    pub session_duration: Duration,
    /// Credentials with less than this left are refreshed before they are served.
    #[arg(long, env = "KIAM_SESSION_REFRESH", default_value = "5m", value_parser = go_duration)]
    pub session_refresh: Duration,
    /// AWS region: sign for and call this region's STS endpoint.
    #[arg(long, env = "KIAM_REGION")]
    pub region: Option<String>,
    /// An STS-compatible endpoint URL (a VPC endpoint, or an emulator).
    #[arg(long, env = "KIAM_STS_ENDPOINT")]
    pub sts_endpoint: Option<String>,
    /// Do not serve agents the node view (they then ask for every request, as kiam agents do).
    #[arg(long, env = "KIAM_DISABLE_NODE_VIEW")]
    pub disable_node_view: bool,
    /// The audience of the projected ServiceAccount tokens agents prove their node with.
    #[arg(long, env = "KIAM_AGENT_TOKEN_AUDIENCE", default_value = "kiam")]
    pub agent_token_audience: String,
    /// The agents' ServiceAccount, `namespace:name`: only its tokens prove a node.
    #[arg(long, env = "KIAM_AGENT_SERVICE_ACCOUNT", default_value = "kube-system:kiam-agent")]
    pub agent_service_account: String,
    /// A startup taint (key) nodes register with; the server removes it from a node once that
    /// node's agent is ready (interception installed, node view synchronised). Needs patch on
    /// nodes. Off by default: then the server writes nothing to nodes.
    #[arg(long, env = "KIAM_NODE_READINESS_TAINT")]
    pub node_readiness_taint: Option<String>,
    /// With --node-readiness-taint: put the taint back on a node whose agent has been gone for a
    /// minute.
    #[arg(long, env = "KIAM_NODE_READINESS_REAPPLY", requires = "node_readiness_taint")]
    pub node_readiness_reapply: bool,
    /// The audience of the projected ServiceAccount tokens pods present to the agent's
    /// `GET /v1/credentials` (EKS Pod Identity's by default, so pods set up for it work as they are).
    #[arg(long, env = "KIAM_POD_TOKEN_AUDIENCE", default_value = crate::server::DEFAULT_POD_TOKEN_AUDIENCE)]
    pub pod_token_audience: String,
    /// The server's own pod (from the downward API), named in the Events it records.
    #[arg(long, env = "POD_NAME", hide = true)]
    pub pod_name: Option<String>,
}

impl ServerArgs {
    /// `--peers`, split into host and port.
    fn peers(&self) -> Result<Option<Peers>, ConfigError> {
        let Some(target) = self.peers.as_deref().map(str::trim).filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let bad = || {
            ConfigError::Flag(format!("--peers {target:?} must be host:port (the servers' headless Service)"))
        };
        let (host, port) = target.rsplit_once(':').ok_or_else(bad)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || port == 0 {
            return Err(bad());
        }
        if self.peers_interval.is_zero() {
            return Err(ConfigError::Flag("--peers-interval must be longer than 0s".into()));
        }
        Ok(Some(Peers { host: host.to_string(), port, every: self.peers_interval, pod_ip: self.pod_ip }))
    }

    /// Validates the flags into a server configuration, resolving everything that needs no
    /// network: a short `--assume-role-arn` against `--role-base-arn` (with autodetect, once the
    /// base is known), and the server's own pod name.
    pub fn config(&self) -> Result<Config, ConfigError> {
        if self.session_duration < MIN_SESSION {
            return Err(ConfigError::SessionTooShort(self.session_duration));
        }
        if self.session_refresh >= self.session_duration {
            return Err(ConfigError::RefreshTooLong {
                refresh: self.session_refresh,
                session: self.session_duration,
            });
        }
        let policy = self.policy.policy().map_err(ConfigError::Flag)?;
        let autodetect = self.policy.role_base_arn_autodetect;
        if policy.base_arn.is_none() && !autodetect {
            return Err(ConfigError::NoBaseArn);
        }
        if self.prometheus_sync_interval.is_some() {
            tracing::warn!("--prometheus-sync-interval is deprecated and ignored");
        }
        if let Some(endpoint) = &self.sts_endpoint
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            return Err(ConfigError::StsEndpoint(endpoint.clone()));
        }
        let inventory = match (&self.manifest, &self.kubeconfig) {
            (Some(path), _) => Inventory::File(path.clone()),
            (None, path) => Inventory::Kube(path.clone().filter(|p| !p.as_os_str().is_empty())),
        };
        let assume_role = self.assume_role_arn.clone().filter(|r| !r.trim().is_empty());
        // With autodetect, a short name waits for the detected base (autodetect wins over
        // --role-base-arn); a full ARN needs no base.
        let (assume_role_arn, pending_assume_role) = match assume_role {
            Some(role) if autodetect && !role.trim().starts_with("arn:") => (None, Some(role)),
            Some(role) => {
                let arn = resolve_assume_role(&role, policy.base_arn.as_ref(), self.session_duration)?;
                (Some(arn.to_string()), None)
            }
            None => (None, None),
        };
        Ok(Config {
            bind: self.bind.clone(),
            tls: self.tls.files(),
            tls_poll: TLS_POLL,
            watch_timeout: crate::cluster::kube::WATCH_TIMEOUT,
            inventory,
            autodetect_base_arn: autodetect,
            pending_assume_role,
            core: crate::core::Settings {
                policy,
                lifetimes: Lifetimes { session: self.session_duration, refresh_lead: self.session_refresh },
                session: self.policy.session.clone(),
                fetchers: usize::from(self.fetchers),
                prefetch_buffer: self.prefetch_buffer_size as usize,
                sts_rate: self.sts_rate,
            },
            settings: Settings {
                node_binding: self.policy.agent_node_binding,
                node_view: !self.disable_node_view,
                agent_token_audience: self.agent_token_audience.clone(),
                agent_service_account: self.agent_service_account.clone(),
                readiness_taint: self.node_readiness_taint.clone().filter(|t| !t.trim().is_empty()),
                readiness_reapply: self.node_readiness_reapply,
                pod_token_audience: self.pod_token_audience.clone(),
                peers: self.peers()?,
            },
            grpc: GrpcSettings {
                keepalive_time: self.grpc_keepalive_time_duration,
                keepalive_timeout: self.grpc_keepalive_timeout_duration,
                max_connection_idle: self.grpc_max_connection_idle_duration,
                max_connection_age: self.grpc_max_connection_age_duration,
                max_connection_age_grace: self.grpc_max_connection_age_grace_duration,
            },
            sts: StsConfig {
                region: self.region.clone().filter(|r| !r.is_empty()),
                endpoint: self.sts_endpoint.clone(),
                assume_role_arn,
            },
            prometheus_listen_addr: self.observability.listen_addr(),
            pod_name: self.pod_name.clone().filter(|n| !n.is_empty()),
        })
    }
}
