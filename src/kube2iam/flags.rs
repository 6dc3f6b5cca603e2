//! kube2iam 0.15's flags, with kube2iam's names, defaults and Go pflag syntax (`--iptables`,
//! `--iptables=true`, `--verbose=false`), validated into a [`Config`]. Values such as
//! `$(HOST_IP)` arrive already expanded by Kubernetes.

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args, Parser};

use crate::cli::go_duration;

/// `kube2iam`, invoked by that name (an image's entrypoint link), or as `kiam kube2iam`.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "kube2iam",
    version,
    about = "kube2iam mode: per-pod IAM credentials from one process per node"
)]
pub struct Kube2iamCli {
    #[command(flatten)]
    pub args: Kube2iamArgs,
}

/// Every kube2iam 0.15 flag (`kiam kube2iam --help` lists them with kube2iam's defaults), plus
/// `--allow-route-regexp` to widen or close the metadata paths forwarded.
#[derive(Clone, Debug, Args)]
pub struct Kube2iamArgs {
    /// Path to a kubeconfig; wins over --api-server/--api-token and in-cluster configuration.
    #[arg(long, default_value = "")]
    pub kubeconfig: String,
    /// The API server's URL (used with --api-token).
    #[arg(long, default_value = "")]
    pub api_server: String,
    /// A bearer token for --api-server.
    #[arg(long, default_value = "")]
    pub api_token: String,
    /// The metadata endpoint's port (the DNAT target).
    #[arg(long, default_value_t = 8181)]
    pub app_port: u16,
    /// Where /metrics is served; a listener of its own (never the app port: see the README).
    #[arg(long, default_value_t = 8181)]
    pub metrics_port: u16,
    /// Completes role names that are not ARNs, e.g. arn:aws:iam::123456789012:role/.
    #[arg(long, default_value = "")]
    pub base_role_arn: String,
    /// Serve /debug/store on the metrics port, to loopback callers only.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub debug: bool,
    /// The role of pods without the role annotation (name or ARN).
    #[arg(long, default_value = "")]
    pub default_role: String,
    /// The pod annotation naming the role.
    #[arg(long, default_value = "iam.amazonaws.com/role")]
    pub iam_role_key: String,
    /// The pod annotation carrying the STS external ID.
    #[arg(long, default_value = "iam.amazonaws.com/external-id")]
    pub iam_external_id: String,
    /// Credentials are served with at least this much left; STS is asked for twice as long.
    #[arg(long, default_value = "15m", value_parser = go_duration)]
    pub iam_role_session_ttl: Duration,
    /// Accepted; failed AssumeRole calls back off (1 s doubling to 60 s, jittered) instead.
    #[arg(long, default_value = "0s", value_parser = go_duration)]
    pub iam_role_error_ttl: Duration,
    /// Skip verifying the API server's certificate.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub insecure: bool,
    /// The node's metadata service, host[:port].
    #[arg(long, default_value = "169.254.169.254")]
    pub metadata_addr: String,
    /// Install the DNAT rule (needs --host-ip and NET_ADMIN).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub iptables: bool,
    /// kiam-rs: with --iptables, reset a new connection to --host-ip:--app-port from a source
    /// address that already holds this many (iptables connlimit); 0, the default, sets none.
    #[arg(long, default_value_t = 0)]
    pub iptables_connlimit: u32,
    /// kiam-rs: every AssumeRole carries the pod's STS SourceIdentity (`<pod>@<namespace>`),
    /// which CloudTrail records on every call and role chaining keeps (the pods' roles must allow
    /// sts:SetSourceIdentity); every pod is then its own STS session.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub source_identity: bool,
    /// Take the base ARN from the instance profile (over IMDSv2).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub auto_discover_base_arn: bool,
    /// Use the instance's own role as the default role (and its account as the base ARN).
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub auto_discover_default_role: bool,
    /// The pods' interface for the DNAT rule: `+` is a wildcard, `!` negates.
    #[arg(long, default_value = "docker0")]
    pub host_interface: String,
    /// Enforce namespaces' allowed-roles annotations.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub namespace_restrictions: bool,
    /// `glob` or `regexp` (anchored on the whole role ARN).
    #[arg(long, default_value = "glob")]
    pub namespace_restriction_format: String,
    /// The namespace annotation listing the roles its pods may use (a JSON array).
    #[arg(long, default_value = "iam.amazonaws.com/allowed-roles")]
    pub namespace_key: String,
    /// Accepted; the watch keeps the caches current without resyncs.
    #[arg(long, default_value = "30m", value_parser = go_duration)]
    pub cache_resync_period: Duration,
    /// Accepted; an IP two live pods claim is refused rather than guessed.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub resolve_duplicate_cache_ips: bool,
    /// The node's IP: the DNAT target and what the endpoint listens on.
    #[arg(long, default_value = "")]
    pub host_ip: String,
    /// Watch only this node's pods (recommended: without it every pod of the cluster is kept).
    #[arg(long, default_value = "")]
    pub node: String,
    /// Accepted; a pod not seen yet is waited for, woken by the watch, for --backoff-max-elapsed-time.
    #[arg(long, default_value = "1s", value_parser = go_duration)]
    pub backoff_max_interval: Duration,
    /// How long a request waits for a pod the watch has not delivered yet.
    #[arg(long, default_value = "2s", value_parser = go_duration)]
    pub backoff_max_elapsed_time: Duration,
    /// `text` or `json`.
    #[arg(long, default_value = "text")]
    pub log_format: String,
    /// `debug`, `info`, `warn` or `error` (also `trace`, `fatal`, `panic`, as logrus accepts).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Accepted; the regional endpoint is used when AWS_REGION is set, as the AWS SDK decides.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub use_regional_sts_endpoint: bool,
    /// Log at debug level.
    #[arg(long, action = ArgAction::Set, num_args = 0..=1, require_equals = true, default_value = "false",
          default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub verbose: bool,
    /// kiam-rs: the metadata paths forwarded to the node (a regular expression on the path).
    #[arg(long, default_value = super::DEFAULT_ALLOWED_PATHS)]
    pub allow_route_regexp: String,
}

impl Kube2iamArgs {
    /// Whether logs are JSON, and at which level.
    pub fn logging(&self) -> Result<(bool, crate::cli::Level), String> {
        let json = match self.log_format.as_str() {
            "json" => true,
            "text" => false,
            other => return Err(format!("--log-format {other:?}: expected text or json")),
        };
        use crate::cli::Level;
        let level = match self.log_level.to_ascii_lowercase().as_str() {
            _ if self.verbose => Level::Debug,
            "trace" | "debug" => Level::Debug,
            "info" => Level::Info,
            "warn" | "warning" => Level::Warn,
            "error" | "fatal" | "panic" => Level::Error,
            other => return Err(format!("--log-level {other:?}: not a level")),
        };
        Ok((json, level))
    }
}
