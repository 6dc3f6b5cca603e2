//! `kiam agent` flags.

use std::net::IpAddr;
use std::time::Duration;

use clap::Args;

use super::{LogArgs, TlsArgs, go_duration};
use crate::agent::Config;
use crate::client::ClientConfig;
use crate::policy::paths::AllowRoutes;

/// Flags of `kiam agent`.
#[derive(Clone, Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// HTTP port to listen on, at --host.
    #[arg(long, env = "KIAM_PORT", default_value_t = 3100)]
    pub port: u16,
    /// The server, host:port (a headless Service name in a cluster).
    #[arg(long, env = "KIAM_SERVER_ADDRESS", default_value = "localhost:9610")]
    pub server_address: String,
    /// Paths matching this expression are forwarded to the node's metadata service.
    #[arg(long, env = "KIAM_ALLOW_ROUTE_REGEXP", default_value = "^$")]
    pub allow_route_regexp: String,
    /// The node's IP: the DNAT target, and the address the agent listens on.
    #[arg(long, env = "HOST_IP")]
    pub host: IpAddr,
    /// The node's metadata service, host[:port].
    #[arg(long, env = "KIAM_METADATA_ADDR", default_value = "169.254.169.254")]
    pub metadata_addr: String,
    /// How long a request waits for a pod the server has not seen yet, or for a server.
    #[arg(long, env = "KIAM_POD_WAIT_TIMEOUT", default_value = "5s", value_parser = go_duration)]
    pub pod_wait_timeout: Duration,
    /// Accepted for kiam compatibility; the agent never exits for a slow server.
    #[arg(long, env = "KIAM_GATEWAY_TIMEOUT_CREATION", default_value = "1s", value_parser = go_duration)]
    pub gateway_timeout_creation: Duration,
}

impl AgentArgs {
    /// Validates the flags into an agent configuration.
    pub fn config(&self) -> Result<Config, String> {
        let allow_routes =
            AllowRoutes::new(&self.allow_route_regexp).map_err(|e| format!("--allow-route-regexp: {e}"))?;
        if self.metadata_addr.is_empty() || self.metadata_addr.contains('/') {
            return Err(format!("--metadata-addr {:?} must be host[:port]", self.metadata_addr));
        }
        if self.pod_wait_timeout.is_zero() {
            return Err("--pod-wait-timeout must be positive".into());
        }
        Ok(Config {
            port: self.port,
            host: self.host,
            allow_routes,
            metadata_addr: self.metadata_addr.clone(),
            pod_wait: self.pod_wait_timeout,
            client: ClientConfig {
                server_address: self.server_address.clone(),
                tls: self.tls.files(),
                call_timeout: self.pod_wait_timeout,
            },
        })
    }
}
