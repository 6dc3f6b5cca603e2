//! The flags of the client side of the link, shared by `kiam agent` and `kiam health`.

use std::time::Duration;

use clap::Args;

use super::{TlsArgs, go_duration};
use crate::client::{ClientConfig, Link, Transport};

/// How `agent` and `health` reach the servers.
#[derive(Clone, Debug, Args)]
pub struct ClientArgs {
    /// The servers, host:port: a headless Service name lists every one of them.
    #[arg(long, env = "KIAM_SERVER_ADDRESS", default_value = "localhost:9610")]
    pub server_address: String,
    /// How often the server name is resolved again, so new servers get traffic within seconds.
    #[arg(long, env = "KIAM_SERVER_RESOLVE_INTERVAL", default_value = "5s", value_parser = go_duration)]
    pub server_resolve_interval: Duration,
    /// Connect timeout. A slow or missing server is never fatal (kiam exited after this long).
    #[arg(long, env = "KIAM_GATEWAY_TIMEOUT_CREATION", default_value = "1s", value_parser = go_duration)]
    pub gateway_timeout_creation: Duration,
    /// gRPC keepalive ping interval.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIME_DURATION", default_value = "10s", value_parser = go_duration)]
    pub grpc_keepalive_time_duration: Duration,
    /// gRPC keepalive ping acknowledgement timeout.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_TIMEOUT_DURATION", default_value = "2s", value_parser = go_duration)]
    pub grpc_keepalive_timeout_duration: Duration,
    /// Also ping connections that carry no call.
    #[arg(long, env = "KIAM_GRPC_KEEPALIVE_PERMIT_WITHOUT_STREAM")]
    pub grpc_keepalive_permit_without_stream: bool,
    /// A projected ServiceAccount token (audience `--agent-token-audience` of the server) that
    /// proves the agent's node to servers with node binding, instead of a per-node certificate.
    #[arg(long, env = "KIAM_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// Deprecated and ignored (kiam's Helm chart still passes it).
    #[arg(long, env = "KIAM_SERVER_ADDRESS_REFRESH", value_parser = go_duration, hide = true)]
    pub server_address_refresh: Option<Duration>,
    /// Deprecated and ignored (kiam never used it).
    #[arg(long, env = "KIAM_PROMETHEUS_SYNC_INTERVAL", value_parser = go_duration, hide = true)]
    pub prometheus_sync_interval: Option<Duration>,
}

impl ClientArgs {
    /// The client configuration, with `call_timeout` as the deadline of one call.
    pub fn config(&self, tls: &TlsArgs, call_timeout: Duration) -> Result<(ClientConfig, Transport), String> {
        if self.server_resolve_interval.is_zero() {
            return Err("--server-resolve-interval must be positive".into());
        }
        if self.server_address_refresh.is_some() {
            tracing::warn!(
                "--server-address-refresh is deprecated and ignored; see --server-resolve-interval"
            );
        }
        if self.prometheus_sync_interval.is_some() {
            tracing::warn!("--prometheus-sync-interval is deprecated and ignored");
        }
        let config = ClientConfig {
            server_address: self.server_address.clone(),
            tls: tls.files(),
            call_timeout,
            token_file: self.token_file.clone(),
        };
        let transport = Transport {
            link: Link {
                keepalive_time: self.grpc_keepalive_time_duration,
                keepalive_timeout: self.grpc_keepalive_timeout_duration,
                permit_without_stream: self.grpc_keepalive_permit_without_stream,
                connect_timeout: self.gateway_timeout_creation.max(Duration::from_millis(100)),
            },
            resolve_every: self.server_resolve_interval,
            ..Transport::default()
        };
        Ok((config, transport))
    }
}
