//! `kiam health` flags.

use std::time::Duration;

use clap::Args;

use super::{LogArgs, TlsArgs, go_duration};
use crate::client::ClientConfig;

/// Flags of `kiam health`.
#[derive(Clone, Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The server, host:port.
    #[arg(long, env = "KIAM_SERVER_ADDRESS", default_value = "localhost:9610")]
    pub server_address: String,
    /// Give up after this long.
    #[arg(long, env = "KIAM_TIMEOUT", default_value = "1s", value_parser = go_duration)]
    pub timeout: Duration,
    /// Accepted for kiam compatibility.
    #[arg(long, env = "KIAM_GATEWAY_TIMEOUT_CREATION", default_value = "1s", value_parser = go_duration)]
    pub gateway_timeout_creation: Duration,
    /// Deprecated and ignored (kiam's Helm chart still passes it).
    #[arg(long, env = "KIAM_SERVER_ADDRESS_REFRESH", value_parser = go_duration, hide = true)]
    pub server_address_refresh: Option<Duration>,
}

impl HealthArgs {
    /// The client configuration and the overall timeout.
    pub fn config(&self) -> Result<(ClientConfig, Duration), String> {
        if self.timeout.is_zero() {
            return Err("--timeout must be positive".into());
        }
        if self.server_address_refresh.is_some() {
            tracing::warn!("--server-address-refresh is deprecated and ignored");
        }
        let client = ClientConfig {
            server_address: self.server_address.clone(),
            tls: self.tls.files(),
            call_timeout: self.timeout,
        };
        Ok((client, self.timeout))
    }
}
