//! `kiam explain` flags: the target, where to read it, the server's policy flags, and
//! optionally a server to ask about its cache.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{LogArgs, PolicyArgs, existing_file, go_duration};
use crate::explain::{self, Config, Inventory, NodeBinding, Output, ServerQuery, Settings, Target};
use crate::policy::kube2iam::{PatternFormat, Rules};
use crate::tls::TlsFiles;

/// `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Flags of `kiam explain`.
#[derive(Clone, Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// The pod to explain, as namespace/pod. With -f and neither this nor --ip, every pod in the
    /// manifests is explained.
    #[arg(value_name = "NAMESPACE/POD", conflicts_with = "ip")]
    pub pod: Option<String>,
    /// Explain the pod the server finds at this IP, as for an agent's request from it.
    #[arg(long)]
    pub ip: Option<IpAddr>,
    /// Read pods and namespaces from these manifests (YAML or JSON; repeatable) instead of the
    /// cluster: offline, e.g. to lint annotations in CI. `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// kubeconfig path; empty means in-cluster configuration, then the usual kubeconfig discovery.
    #[arg(long, env = "KIAM_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The role the pod asks for (what the SDK requests and a kiam agent forwards), when not its
    /// annotation: explains a "wrong role" denial.
    #[arg(long)]
    pub role: Option<String>,
    /// With --agent-node-binding: the node of the agent that asks (default: the pod's own node).
    #[arg(long, requires = "agent_node_binding")]
    pub node: Option<String>,
    /// text: a short list; json: the same information for scripts.
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    pub output: Format,
    /// Also ask this server (host:port) what its cache holds for the pod's identity; needs
    /// --cert, --key and --ca (an agent's certificate will do).
    #[arg(long, env = "KIAM_SERVER_ADDRESS", requires_all = ["cert", "key", "ca"])]
    pub server_address: Option<String>,
    /// Our client certificate for --server-address (PEM).
    #[arg(long, env = "KIAM_CERT", value_parser = existing_file)]
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "KIAM_KEY", value_parser = existing_file)]
    pub key: Option<PathBuf>,
    /// The CA bundle that signs the server's certificate (PEM).
    #[arg(long, env = "KIAM_CA", value_parser = existing_file)]
    pub ca: Option<PathBuf>,
    /// Bounds each read of the cluster and each call to the server.
    #[arg(long, env = "KIAM_TIMEOUT", default_value = "10s", value_parser = go_duration)]
    pub timeout: Duration,
    /// Decide as kube2iam mode does (its default role and allowed-roles restrictions) instead
    /// of as kiam's server does.
    #[arg(long)]
    pub kube2iam: bool,
    /// kube2iam mode's --default-role.
    #[arg(long, requires = "kube2iam")]
    pub default_role: Option<String>,
    /// kube2iam mode's --namespace-restrictions.
    #[arg(long, requires = "kube2iam")]
    pub namespace_restrictions: bool,
    /// kube2iam mode's --namespace-restriction-format: glob or regexp.
    #[arg(long, requires = "kube2iam", default_value = "glob")]
    pub namespace_restriction_format: String,
}

impl ExplainArgs {
    /// Validates the flags.
    pub fn config(&self) -> Result<Config, String> {
        if self.timeout.is_zero() {
            return Err("--timeout must be positive".into());
        }
        let target = match (&self.pod, self.ip) {
            (Some(pod), _) => explain::parse_pod(pod)?,
            (None, Some(ip)) => Target::Ip(ip),
            (None, None) if !self.files.is_empty() => Target::Every,
            (None, None) => {
                return Err("name a pod (namespace/pod) or --ip, or give manifests with -f".into());
            }
        };
        let inventory = if self.files.is_empty() {
            Inventory::Kube(self.kubeconfig.clone().filter(|p| !p.as_os_str().is_empty()))
        } else {
            Inventory::Files(self.files.clone())
        };
        let server = match self.server_address.as_deref().filter(|a| !a.is_empty()) {
            None => None,
            Some(address) => match (&self.cert, &self.key, &self.ca) {
                (Some(cert), Some(key), Some(ca)) => Some(ServerQuery {
                    address: address.to_string(),
                    tls: TlsFiles { cert: cert.clone(), key: key.clone(), ca: ca.clone() },
                }),
                _ => return Err("--server-address needs --cert, --key and --ca".into()),
            },
        };
        let node_binding = match self.policy.agent_node_binding {
            true => NodeBinding::On { agent_node: self.node.clone().filter(|n| !n.is_empty()) },
            false => NodeBinding::Off,
        };
        let mut policy = self.policy.policy()?;
        if self.kube2iam {
            let restrictions = match (self.namespace_restrictions, self.namespace_restriction_format.as_str())
            {
                (false, _) => None,
                (true, "glob") => Some(PatternFormat::Glob),
                (true, "regexp") => Some(PatternFormat::Regexp),
                (true, other) => {
                    return Err(format!("--namespace-restriction-format {other:?}: glob or regexp"));
                }
            };
            let default_role = self.default_role.clone().filter(|r| !r.trim().is_empty());
            policy.kube2iam = Some(Rules { default_role, restrictions });
        }
        Ok(Config {
            settings: Settings { policy, default_session: self.policy.session.clone(), node_binding },
            autodetect_base_arn: self.policy.role_base_arn_autodetect,
            inventory,
            target,
            requested: self.role.clone().filter(|r| !r.is_empty()),
            server,
            timeout: self.timeout,
            output: match self.output {
                Format::Text => Output::Text,
                Format::Json => Output::Json,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::{Cli, Command};
    use crate::explain::{Config, Inventory, NodeBinding, Target};
    use clap::Parser;

    fn config(args: &[&str]) -> Result<Config, String> {
        let argv = ["kiam", "explain"].iter().chain(args);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Command::Explain(args) => args.config(),
            other => Err(format!("parsed as {other:?}")),
        }
    }

    #[test]
    fn targets_and_sources() {
        let c = config(&["team-a/web", "--role-base-arn", "arn:aws:iam::1:role"]).expect("valid");
        assert_eq!(c.target, Target::Pod { namespace: "team-a".into(), name: "web".into() });
        assert!(matches!(c.inventory, Inventory::Kube(None)));
        assert_eq!(
            c.settings.policy.base_arn.map(|b| b.as_str().to_string()).as_deref(),
            Some("arn:aws:iam::1:role/")
        );
        let c = config(&["-f", "Cargo.toml", "-f", "build.rs"]).expect("valid");
        assert_eq!(c.target, Target::Every);
        assert!(matches!(c.inventory, Inventory::Files(f) if f.len() == 2));
        let c = config(&["--ip", "10.0.0.5", "--agent-node-binding", "--node", "n1", "--session", "s"])
            .expect("ok");
        assert_eq!(c.target, Target::Ip("10.0.0.5".parse().expect("ip")));
        assert_eq!(c.settings.node_binding, NodeBinding::On { agent_node: Some("n1".into()) });
        assert_eq!(c.settings.default_session, "s");
    }

    #[test]
    fn bad_combinations_are_refused() {
        for args in [
            &[][..],
            &["web"],
            &["a/b", "--ip", "10.0.0.1"],
            &["a/b", "--node", "n1"],
            &["a/b", "--server-address", "s:1"],
            &["a/b", "--role-base-arn", "nope"],
        ] {
            assert!(config(args).is_err(), "{args:?}");
        }
    }
}
