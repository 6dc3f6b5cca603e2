//! `kiam server` flags.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{LogArgs, TlsArgs, go_duration};
use crate::aws::StsConfig;
use crate::creds::Lifetimes;
use crate::policy::{BaseArn, Policy};
use crate::server::{Config, Inventory};

/// STS refuses sessions shorter than this.
const MIN_SESSION: Duration = Duration::from_secs(15 * 60);

/// Flags of `kiam server`.
#[derive(Clone, Debug, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
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
    /// Prefix that completes role names that are not ARNs, e.g. arn:aws:iam::123456789012:role/.
    #[arg(long, env = "KIAM_ROLE_BASE_ARN")]
    pub role_base_arn: Option<String>,
    /// Match the namespace's permitted expression anywhere in the ARN instead of anchoring it.
    #[arg(long, env = "KIAM_DISABLE_STRICT_NAMESPACE_REGEXP")]
    pub disable_strict_namespace_regexp: bool,
    /// Default session-name suffix (sessions are named kiam-<session>).
    #[arg(long, env = "KIAM_SESSION", default_value = "kiam")]
    pub session: String,
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
}

impl ServerArgs {
    /// Validates the flags into a server configuration.
    pub fn config(&self) -> Result<Config, String> {
        if self.session_duration < MIN_SESSION {
            return Err(format!(
                "--session-duration {:?} is shorter than the 15m minimum STS allows",
                self.session_duration
            ));
        }
        if self.session_refresh >= self.session_duration {
            return Err(format!(
                "--session-refresh ({:?}) must be shorter than --session-duration ({:?})",
                self.session_refresh, self.session_duration
            ));
        }
        let base = self.role_base_arn.as_deref().filter(|s| !s.is_empty());
        let base_arn = base.map(BaseArn::parse).transpose().map_err(|e| format!("--role-base-arn: {e}"))?;
        if base_arn.is_none() {
            return Err("--role-base-arn is required (e.g. arn:aws:iam::123456789012:role/)".into());
        }
        if let Some(endpoint) = &self.sts_endpoint
            && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
        {
            return Err(format!("--sts-endpoint {endpoint:?} must be an http:// or https:// URL"));
        }
        let inventory = match (&self.manifest, &self.kubeconfig) {
            (Some(path), _) => Inventory::File(path.clone()),
            (None, path) => Inventory::Kube(path.clone().filter(|p| !p.as_os_str().is_empty())),
        };
        Ok(Config {
            bind: self.bind.clone(),
            tls: self.tls.files(),
            inventory,
            policy: Policy { base_arn, strict_namespace_regexp: !self.disable_strict_namespace_regexp },
            lifetimes: Lifetimes { session: self.session_duration, refresh_lead: self.session_refresh },
            session: self.session.clone(),
            sts: StsConfig { region: self.region.clone(), endpoint: self.sts_endpoint.clone() },
        })
    }
}
