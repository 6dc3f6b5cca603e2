//! `kiam health` flags.

use std::time::Duration;

use clap::Args;

use super::{ClientArgs, LogArgs, TlsArgs, go_duration};
use crate::client::{ClientConfig, Transport};

/// Flags of `kiam health`.
#[derive(Clone, Debug, Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub client: ClientArgs,
    /// Give up after this long.
    #[arg(long, env = "KIAM_TIMEOUT", default_value = "1s", value_parser = go_duration)]
    pub timeout: Duration,
}

impl HealthArgs {
    /// The client configuration, its transport, and the overall timeout.
    pub fn config(&self) -> Result<(ClientConfig, Transport, Duration), String> {
        if self.timeout.is_zero() {
            return Err("--timeout must be positive".into());
        }
        let (client, transport) = self.client.config(&self.tls, self.timeout)?;
        Ok((client, transport, self.timeout))
    }
}
