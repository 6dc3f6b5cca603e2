//! The command line: kiam v4's subcommands and flag names, each flag also read from an
//! environment variable (`KIAM_<FLAG>`; `HOST_IP` for `--host`, as kiam). Parsing produces
//! validated, typed configurations, so that a bad value fails at start-up with a clear message.

mod agent;
mod certs;
mod client;
pub mod duration;
mod explain;
mod health;
mod policy;
mod server;
mod webhook;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub use agent::AgentArgs;
pub use certs::{CertsArgs, CertsCommand, GenerateArgs, InspectArgs};
pub use client::ClientArgs;
pub use explain::ExplainArgs;
pub use health::HealthArgs;
pub use policy::PolicyArgs;
pub use server::ServerArgs;
pub use webhook::WebhookArgs;

use crate::tls::TlsFiles;

/// Per-pod AWS IAM credentials for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "kiam", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The per-node metadata endpoint pods reach through the DNAT rule.
    Agent(AgentArgs),
    /// The policy and credentials server agents ask over mutual TLS.
    Server(Box<ServerArgs>),
    /// Probe a server: exit 0 when it is healthy, 1 otherwise.
    Health(HealthArgs),
    /// Why a pod does or does not get its role: the server's decision chain, from the cluster or
    /// from manifests. Exit 0 allowed, 1 denied, 3 when something could not be read.
    Explain(ExplainArgs),
    /// Make the mutual-TLS certificates (a CA, server, agents, per-node agents) or inspect them.
    Certs(CertsArgs),
    /// The mutating admission webhook that sets opted-in pods up for the container credentials
    /// endpoint (GET /v1/credentials), as EKS Pod Identity's webhook does.
    Webhook(WebhookArgs),
    /// kube2iam mode: one process per node, with kube2iam's flags (also run as `kube2iam`).
    Kube2iam(crate::kube2iam::Kube2iamArgs),
}

/// Log level names, as kiam's `--level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// `--json-log` and `--level`, shared by every subcommand.
#[derive(Clone, Debug, Args)]
pub struct LogArgs {
    /// Log as JSON lines instead of text.
    #[arg(long, env = "KIAM_JSON_LOG")]
    pub json_log: bool,
    /// The lowest level logged.
    #[arg(long, env = "KIAM_LEVEL", value_enum, default_value = "info")]
    pub level: Level,
}

/// `--cert`, `--key` and `--ca`: the mutual-TLS material, as PEM files.
#[derive(Clone, Debug, Args)]
pub struct TlsArgs {
    /// This side's certificate (PEM; a chain may follow the leaf).
    #[arg(long, env = "KIAM_CERT", value_parser = existing_file)]
    pub cert: PathBuf,
    /// This side's private key (PEM).
    #[arg(long, env = "KIAM_KEY", value_parser = existing_file)]
    pub key: PathBuf,
    /// The CA bundle that signs the other side (PEM; several CAs allowed).
    #[arg(long, env = "KIAM_CA", value_parser = existing_file)]
    pub ca: PathBuf,
}

impl TlsArgs {
    fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.cert.clone(), key: self.key.clone(), ca: self.ca.clone() }
    }
}

/// `--prometheus-listen-addr` and `--pprof-listen-addr`, shared by `agent` and `server`.
#[derive(Clone, Debug, Args)]
pub struct ObservabilityArgs {
    /// Serve Prometheus metrics at /metrics on this address (e.g. 0.0.0.0:9620); off when empty.
    #[arg(long, env = "KIAM_PROMETHEUS_LISTEN_ADDR", default_value = "")]
    pub prometheus_listen_addr: String,
    /// Accepted for kiam compatibility; there is no pprof endpoint.
    #[arg(long, env = "KIAM_PPROF_LISTEN_ADDR", default_value = "", hide = true)]
    pub pprof_listen_addr: String,
}

impl ObservabilityArgs {
    /// The metrics address, if any.
    pub fn listen_addr(&self) -> Option<String> {
        if !self.pprof_listen_addr.is_empty() {
            tracing::warn!("--pprof-listen-addr is accepted for compatibility and ignored");
        }
        Some(self.prometheus_listen_addr.clone()).filter(|a| !a.is_empty())
    }
}

fn existing_file(s: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(s);
    if path.is_file() { Ok(path) } else { Err(format!("{s}: no such file")) }
}

/// Parses a Go duration (`1m30s`), as kiam's and kube2iam's flags take them.
pub fn go_duration(s: &str) -> Result<std::time::Duration, String> {
    duration::parse(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
