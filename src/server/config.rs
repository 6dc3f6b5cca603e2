//! The server's validated configuration, and its typed errors. Flags become a [`Config`] in
//! `cli::server`; what needs the network to resolve (`--role-base-arn-autodetect`, and then a
//! short `--assume-role-arn`) is resolved by [`Config::autodetect`] before assembly.

use std::path::PathBuf;
use std::time::Duration;

use crate::aws::StsConfig;
use crate::model::{BaseArn, RoleArn, RoleError};
use crate::tls::TlsFiles;

/// Where the server learns about pods and namespaces.
#[derive(Clone, Debug)]
pub enum Inventory {
    /// The Kubernetes API: a kubeconfig file, or in-cluster configuration when `None`.
    Kube(Option<PathBuf>),
    /// A manifest file, re-read when it changes (`--manifest`, for local development).
    File(PathBuf),
}

/// What the server adds to the core's settings: node binding, the node view, tokens, readiness.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `--agent-node-binding`: answer an agent only about pods on the node it proves.
    pub node_binding: bool,
    /// Serve agents the node view (`--disable-node-view` turns it off).
    pub node_view: bool,
    /// `--agent-token-audience`: the audience agents' projected tokens are for.
    pub agent_token_audience: String,
    /// `--agent-service-account`: `namespace:name` of the agents' ServiceAccount.
    pub agent_service_account: String,
    /// `--node-readiness-taint`: the startup taint removed once a node's agent is ready.
    pub readiness_taint: Option<String>,
    /// `--node-readiness-reapply`: put the taint back when a node's agent stays gone.
    pub readiness_reapply: bool,
    /// `--pod-token-audience`: the audience of pods' tokens for `GET /v1/credentials`.
    pub pod_token_audience: String,
    /// `--peers`: share the identities with the servers behind this name (`None`: keep all).
    pub peers: Option<Peers>,
}

/// `--peers`: where the other servers are, and how this one finds itself among them.
#[derive(Clone, Debug)]
pub struct Peers {
    pub host: String,
    pub port: u16,
    /// `--peers-interval`: how often the name is resolved again.
    pub every: Duration,
    /// `POD_IP`: this server's address when `--bind` names all addresses.
    pub pod_ip: Option<std::net::IpAddr>,
}

/// gRPC connection management (`--grpc-keepalive-*`, `--grpc-max-connection-*`).
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub max_connection_idle: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
}

/// The validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub tls: TlsFiles,
    /// How often the certificate files are checked for rotation (not a flag).
    pub tls_poll: Duration,
    /// How long each watch of the API server lasts before it is renewed (not a flag): the
    /// watcher also gives up on a watch that stays silent this long plus 5 s, so a watch that
    /// stalls without closing blinds the server for about a minute, not five.
    pub watch_timeout: Duration,
    pub inventory: Inventory,
    /// `--role-base-arn-autodetect`: take the base ARN from the instance profile at start-up.
    pub autodetect_base_arn: bool,
    /// A short `--assume-role-arn` that can only be resolved once the base ARN is detected.
    pub pending_assume_role: Option<String>,
    /// How the request core decides and caches (shared with kube2iam mode).
    pub core: crate::core::Settings,
    pub settings: Settings,
    pub grpc: GrpcSettings,
    /// STS, with `--assume-role-arn` already resolved to a full ARN.
    pub sts: StsConfig,
    /// `--prometheus-listen-addr`: where `/metrics` is served.
    pub prometheus_listen_addr: Option<String>,
    /// `POD_NAME`: the server's own pod, named as the instance in the Events it records.
    pub pod_name: Option<String>,
}

/// Why the server's configuration is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// STS refuses sessions under 15 minutes.
    #[error("--session-duration {0:?} is shorter than the 15m minimum STS allows")]
    SessionTooShort(Duration),
    /// Refreshing at or after the end of a session would serve expired credentials.
    #[error("--session-refresh ({refresh:?}) must be shorter than --session-duration ({session:?})")]
    RefreshTooLong { refresh: Duration, session: Duration },
    /// Short role names need a base ARN.
    #[error(
        "one of --role-base-arn (e.g. arn:aws:iam::123456789012:role/) or --role-base-arn-autodetect is required"
    )]
    NoBaseArn,
    /// `--sts-endpoint` is not a URL.
    #[error("--sts-endpoint {0:?} must be an http:// or https:// URL")]
    StsEndpoint(String),
    /// `--assume-role-arn` cannot be resolved.
    #[error("--assume-role-arn: {0}")]
    AssumeRole(RoleError),
    /// The instance profile could not be read.
    #[error("--role-base-arn-autodetect: {0}")]
    Autodetect(String),
    /// Another flag is invalid (the message names it).
    #[error("{0}")]
    Flag(String),
}

/// Resolves `--assume-role-arn` against the base ARN, warning about the chained-session cap.
pub fn resolve_assume_role(
    role: &str,
    base: Option<&BaseArn>,
    session: Duration,
) -> Result<RoleArn, ConfigError> {
    let arn = RoleArn::resolve(role, base).map_err(ConfigError::AssumeRole)?;
    if session > Duration::from_secs(3600) {
        tracing::warn!(
            ?session,
            "--assume-role-arn chains roles, and AWS caps chained sessions at 1h: STS will refuse longer ones"
        );
    }
    Ok(arn)
}

impl Config {
    /// With `--role-base-arn-autodetect`, reads the base ARN from the instance profile (over
    /// IMDSv2) and resolves a short `--assume-role-arn` against it; otherwise returns `self`.
    pub async fn autodetect(mut self) -> Result<Config, ConfigError> {
        if !self.autodetect_base_arn {
            return Ok(self);
        }
        let base = crate::aws::detect_base_arn().await.map_err(ConfigError::Autodetect)?;
        tracing::info!(base_arn = base.as_str(), "role base ARN detected from the instance profile");
        if let Some(role) = self.pending_assume_role.take() {
            let arn = resolve_assume_role(&role, Some(&base), self.core.lifetimes.session)?;
            self.sts.assume_role_arn = Some(arn.to_string());
        }
        self.core.policy.base_arn = Some(base);
        Ok(self)
    }
}
