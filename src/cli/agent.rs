//! `kiam agent` flags. Booleans take kingpin's forms, as kiam's manifests and Helm chart pass
//! them: `--flag`, `--no-flag`, and `--flag=true|false` (the last one given wins).

use std::net::{IpAddr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{ArgAction, Args};

use super::{ClientArgs, LogArgs, ObservabilityArgs, TlsArgs, go_duration};
use crate::agent::Config;
use crate::agent::iptables::{self, DEFAULT_CHAIN, Interface};
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
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub observability: ObservabilityArgs,
    /// Paths matching this expression are forwarded to the node's metadata service.
    #[arg(long, env = "KIAM_ALLOW_ROUTE_REGEXP", default_value = "^$")]
    pub allow_route_regexp: String,
    /// The node's IP: the DNAT target, and the address the agent listens on.
    #[arg(long, env = "HOST_IP")]
    pub host: IpAddr,
    /// New: the node's IPv6 address, when it has one. The agent also listens on it, and with
    /// --iptables intercepts the IPv6 metadata endpoint fd00:ec2::254 with ip6tables.
    #[arg(long, env = "HOST_IPV6")]
    pub host_ipv6: Option<Ipv6Addr>,
    /// The node's metadata service, host[:port].
    #[arg(long, env = "KIAM_METADATA_ADDR", default_value = "169.254.169.254")]
    pub metadata_addr: String,
    /// How long a request waits for a pod the server has not seen yet, or for a server.
    #[arg(long, env = "KIAM_POD_WAIT_TIMEOUT", default_value = "5s", value_parser = go_duration)]
    pub pod_wait_timeout: Duration,
    /// Install the DNAT rule sending pods' 169.254.169.254:80 to --host:--port, and keep it.
    #[arg(long, env = "KIAM_IPTABLES", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new(),
          overrides_with = "no_iptables")]
    pub iptables: bool,
    #[arg(long, hide = true, overrides_with = "iptables")]
    pub no_iptables: bool,
    /// Remove the DNAT rule at shutdown. --no-iptables-remove keeps it, so that pods on a node
    /// whose agent is restarting reach no metadata service rather than the node's (see README).
    #[arg(long, env = "KIAM_IPTABLES_REMOVE", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "true", default_missing_value = "true", value_parser = BoolishValueParser::new(),
          overrides_with = "no_iptables_remove")]
    pub iptables_remove: bool,
    /// Keep the DNAT rule at shutdown.
    #[arg(long, overrides_with = "iptables_remove")]
    pub no_iptables_remove: bool,
    /// The interface pod traffic arrives on: a name, a prefix with '+' (cali+), or '!' and a
    /// name for every interface but that one (!eth0, for the AWS VPC CNI).
    #[arg(long, env = "KIAM_HOST_INTERFACE", default_value = "docker0")]
    pub host_interface: String,
    /// How often the DNAT rule is checked, and restored if something deleted it.
    #[arg(long, env = "KIAM_IPTABLES_CHECK_INTERVAL", default_value = "5s", value_parser = go_duration)]
    pub iptables_check_interval: Duration,
    /// With --iptables, also have the kernel reset a new connection to --host:--port from a
    /// source address that already holds this many (iptables connlimit, in a filter chain of
    /// the agent's own jumped to first from INPUT), so that a flood from one pod is dropped
    /// before it costs the agent a file descriptor. Off (0) by default; set it above the
    /// agent's own per-source cap (64).
    #[arg(long, env = "KIAM_IPTABLES_CONNLIMIT", default_value_t = 0)]
    pub iptables_connlimit: u32,
    /// With --iptables, also send the container credentials endpoint (169.254.170.23:80, EKS
    /// Pod Identity's) to the agent, from pods and from the node itself (hostNetwork pods).
    /// Leave it off where EKS's own Pod Identity agent runs: it owns that address.
    #[arg(long, env = "KIAM_CONTAINER_ENDPOINT")]
    pub container_endpoint: bool,
    /// Take the caller's IP from ?ip= (development only: any pod can then get any pod's
    /// credentials).
    #[arg(long, env = "KIAM_ALLOW_IP_QUERY", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new(),
          overrides_with = "no_allow_ip_query")]
    pub allow_ip_query: bool,
    #[arg(long, hide = true, overrides_with = "allow_ip_query")]
    pub no_allow_ip_query: bool,
    /// Answer GETs that carry no IMDSv2 token with 401 (by default IMDSv1 works, as in kiam).
    #[arg(long, env = "KIAM_REQUIRE_IMDSV2", action = ArgAction::Set, num_args = 0..=1, require_equals = true,
          default_value = "false", default_missing_value = "true", value_parser = BoolishValueParser::new(),
          overrides_with = "no_require_imdsv2")]
    pub require_imdsv2: bool,
    #[arg(long, hide = true, overrides_with = "require_imdsv2")]
    pub no_require_imdsv2: bool,
    /// Ask for credentials on every request (as kiam agents do) instead of following the
    /// servers' node view.
    #[arg(long, env = "KIAM_DISABLE_NODE_VIEW")]
    pub disable_node_view: bool,
    /// The node this agent runs on (from the downward API); servers refuse a view whose node
    /// differs from the one the agent's certificate or token proves.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The kubelet's PodResources socket, from which the node view is confirmed while no server
    /// answers (an empty value: no such source, so entries are served only briefly then).
    #[arg(long, env = "KIAM_POD_RESOURCES_SOCKET", default_value = crate::agent::pod_resources::DEFAULT_SOCKET)]
    pub pod_resources_socket: String,
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
        let (client, transport) = self.client.config(&self.tls, self.pod_wait_timeout)?;
        let interface: Interface =
            self.host_interface.parse().map_err(|e| format!("--host-interface: {e}"))?;
        let iptables = if self.iptables && !self.no_iptables {
            let IpAddr::V4(host) = self.host else {
                return Err(format!("--iptables needs an IPv4 --host, not {}", self.host));
            };
            if self.iptables_check_interval.is_zero() {
                return Err("--iptables-check-interval must be positive".into());
            }
            Some(iptables::Config {
                interface,
                target: SocketAddrV4::new(host, self.port),
                target6: self.host_ipv6.map(|ip| SocketAddrV6::new(ip, self.port, 0, 0)),
                chain: DEFAULT_CHAIN.into(),
                remove_at_exit: self.iptables_remove && !self.no_iptables_remove,
                check_interval: self.iptables_check_interval,
                container: self.container_endpoint,
                connlimit: Some(self.iptables_connlimit).filter(|n| *n > 0),
            })
        } else if self.iptables_connlimit > 0 {
            return Err("--iptables-connlimit needs --iptables".into());
        } else {
            None
        };
        Ok(Config {
            port: self.port,
            host: self.host,
            host6: self.host_ipv6,
            allow_routes,
            metadata_addr: self.metadata_addr.clone(),
            pod_wait: self.pod_wait_timeout,
            require_imdsv2: self.require_imdsv2 && !self.no_require_imdsv2,
            allow_ip_query: self.allow_ip_query && !self.no_allow_ip_query,
            iptables,
            client: Some(client),
            transport,
            prometheus_listen_addr: self.observability.listen_addr(),
            limits: crate::agent::Limits::default(),
            node_view: !self.disable_node_view,
            node_name: self.node_name.clone().filter(|n| !n.is_empty()),
            healthz_host: None,
            pod_resources_socket: Some(std::path::PathBuf::from(&self.pod_resources_socket))
                .filter(|p| !p.as_os_str().is_empty()),
            unconfirmed_bound: crate::agent::view::confirm::UNCONFIRMED_BOUND,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    fn parse(flags: &[&str]) -> Result<crate::agent::Config, String> {
        let file = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let mut argv = vec!["kiam", "agent", "--cert", file, "--key", file, "--ca", file];
        if !flags.contains(&"--host") {
            argv.extend(["--host", "10.0.0.5"]);
        }
        argv.extend_from_slice(flags);
        match Cli::try_parse_from(argv).map_err(|e| e.to_string())?.command {
            Command::Agent(args) => args.config(),
            _ => Err("not the agent".into()),
        }
    }

    #[test]
    fn kiam_defaults() {
        let config = parse(&[]).expect("defaults");
        assert_eq!(config.port, 3100);
        assert!(config.iptables.is_none() && !config.require_imdsv2 && !config.allow_ip_query);
        let rules = parse(&["--iptables"]).expect("iptables").iptables.expect("rules");
        assert_eq!(rules.interface.to_string(), "docker0");
        assert_eq!(rules.target.to_string(), "10.0.0.5:3100");
        assert!(rules.remove_at_exit, "kiam removes the rule by default");
        assert_eq!(rules.chain, "KIAM-RS");
    }

    #[test]
    fn kingpin_style_booleans() {
        let remove = |flags: &[&str]| parse(flags).expect("parses").iptables.expect("rules").remove_at_exit;
        assert!(!remove(&["--iptables", "--no-iptables-remove"]));
        assert!(remove(&["--iptables", "--no-iptables-remove", "--iptables-remove"]));
        assert!(!remove(&["--iptables", "--iptables-remove", "--no-iptables-remove"]));
        assert!(!remove(&["--iptables", "--iptables-remove=false"]));
        assert!(parse(&["--iptables", "--no-iptables"]).expect("parses").iptables.is_none());
        assert!(parse(&["--iptables=true"]).expect("parses").iptables.is_some());
        assert!(parse(&["--require-imdsv2"]).expect("parses").require_imdsv2);
        assert!(!parse(&["--allow-ip-query", "--no-allow-ip-query"]).expect("parses").allow_ip_query);
        assert!(parse(&["--allow-ip-query"]).expect("parses").allow_ip_query);
    }

    #[test]
    fn interfaces_and_bad_values() {
        let iface =
            |v: &str| parse(&["--iptables", "--host-interface", v]).map(|c| c.iptables.expect("rules"));
        assert_eq!(iface("!eth0").expect("negated").interface.to_string(), "!eth0");
        assert_eq!(iface("cali+").expect("wildcard").interface.to_string(), "cali+");
        assert!(iface("eth0 -j ACCEPT").is_err());
        assert!(parse(&["--iptables", "--host", "::1"]).is_err_and(|e| e.contains("IPv4")));
        assert!(parse(&["--iptables-check-interval", "0s", "--iptables"]).is_err());
        let limited = parse(&["--iptables", "--iptables-connlimit=128"]).expect("a limit");
        assert_eq!(limited.iptables.expect("rules").connlimit, Some(128));
        let unlimited = parse(&["--iptables"]).expect("no limit");
        assert_eq!(unlimited.iptables.expect("rules").connlimit, None, "off by default");
        assert!(parse(&["--iptables-connlimit=128"]).is_err_and(|e| e.contains("needs --iptables")));
    }
}
