//! `kiam explain`: why a pod does, or does not, get its role.
//!
//! It reads the pod and its namespace (from the cluster, or offline from manifests), finds the
//! pod as the server would ([`find`]), and walks the server's decision with the server's own
//! pure functions ([`chain`]): lookup by IP, node binding, role annotation and ARN, the
//! namespace's `permitted` expression, session name. With `--server-address` it also asks a
//! running server what its cache holds for the pod's identity ([`remote`]). [`render`] prints
//! the result as a short list or as JSON.
//!
//! Exit codes: 0 when every pod explained would get its role, 1 when one would be denied
//! (unknown pods included), 3 when the cluster, the manifests or the server could not be read
//! (2 is clap's, for bad flags).

pub mod chain;
pub mod find;
pub mod inputs;
pub mod remote;
pub mod render;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::time::Duration;

pub use chain::Explanation;
pub use inputs::Inventory;

use crate::policy::Policy;
use crate::tls::TlsFiles;

/// What decides: the server's flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    /// `--session`: the session-name suffix for pods without the annotation.
    pub default_session: String,
    pub node_binding: NodeBinding,
}

/// `--agent-node-binding` and `--node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeBinding {
    Off,
    /// An agent may ask only about pods on its own node: `agent_node` (`--node`), or, when
    /// `None`, the pod's own node (the usual case: is the pod on some node at all?).
    On {
        agent_node: Option<String>,
    },
}

/// Which pod to explain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `namespace/name`.
    Pod { namespace: String, name: String },
    /// The pod the server finds at this IP.
    Ip(IpAddr),
    /// Every pod in the manifests.
    Every,
}

/// A running server to ask about its cache (`--server-address` and the TLS flags).
#[derive(Clone, Debug)]
pub struct ServerQuery {
    pub address: String,
    pub tls: TlsFiles,
}

/// How the answer is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

/// The validated `kiam explain` configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub settings: Settings,
    /// `--role-base-arn-autodetect`: take the base ARN from the instance profile first.
    pub autodetect_base_arn: bool,
    pub inventory: Inventory,
    pub target: Target,
    /// `--role`: the role the pod asks for, when not its annotation.
    pub requested: Option<String>,
    pub server: Option<ServerQuery>,
    /// Bounds each read of the cluster and each call to the server.
    pub timeout: Duration,
    pub output: Output,
}

/// Why explain could not give an answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cluster or a manifest could not be read.
    #[error(transparent)]
    Input(#[from] inputs::InputError),
    /// `--role-base-arn-autodetect` failed.
    #[error("--role-base-arn-autodetect: {0}")]
    Autodetect(String),
}

/// The explanations, and how to print them.
#[derive(Debug)]
pub struct Report {
    pub explanations: Vec<Explanation>,
    /// One pod was asked for (printed as one object), rather than every pod in the manifests.
    pub single: bool,
    pub output: Output,
}

impl Report {
    /// 0 when every pod would get its role, 1 when one would not, 3 when the server could not
    /// be asked.
    pub fn exit_code(&self) -> u8 {
        let server_failed =
            self.explanations.iter().any(|e| e.server.as_ref().is_some_and(|s| s.error.is_some()));
        if server_failed {
            3
        } else if self.explanations.iter().all(|e| e.verdict.allowed) {
            0
        } else {
            1
        }
    }

    /// The printed answer.
    pub fn render(&self) -> String {
        match self.output {
            Output::Text => render::text(&self.explanations),
            Output::Json => render::json(&self.explanations, self.single),
        }
    }
}

/// Explains the target: reads, decides, and asks the server when configured.
pub async fn run(mut config: Config) -> Result<Report, Error> {
    if config.autodetect_base_arn {
        let base = crate::aws::detect_base_arn().await.map_err(Error::Autodetect)?;
        config.settings.policy.base_arn = Some(base);
    }
    let snapshot = inputs::read(&config.inventory, &config.target, config.timeout).await?;
    let mut explanations = snapshot.explain(&config.settings, &config.target, config.requested.as_deref());
    if let Some(server) = &config.server {
        let identities: Vec<_> = explanations.iter().map(|e| e.identity.as_ref()).collect();
        let views = remote::views(server, config.timeout, &identities).await;
        for (explanation, view) in explanations.iter_mut().zip(views) {
            explanation.server = view;
        }
    }
    Ok(Report { explanations, single: config.target != Target::Every, output: config.output })
}

/// `namespace/name` as a target.
pub fn parse_pod(s: &str) -> Result<Target, String> {
    match s.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(Target::Pod { namespace: namespace.into(), name: name.into() })
        }
        _ => Err(format!("{s:?}: expected namespace/pod")),
    }
}
