//! kube2iam mode's validated configuration: the server's settings (kube2iam's policy), the
//! agent's (the metadata endpoint and the DNAT rule), and how to reach the API server.

use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use std::path::PathBuf;

use super::flags::Kube2iamArgs;
use crate::agent::iptables::{self, DEFAULT_CHAIN, Interface};
use crate::cluster::kube::KubeAccess;
use crate::cluster::project::Projection;
use crate::core::Settings;
use crate::creds::Lifetimes;
use crate::model::BaseArn;
use crate::policy::Policy;
use crate::policy::kube2iam::{PatternFormat, Rules};
use crate::policy::paths::AllowRoutes;

/// STS refuses sessions shorter than this; kube2iam asks for twice the session TTL.
const MIN_SESSION: Duration = Duration::from_secs(15 * 60);

/// Everything kube2iam mode runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Policy, lifetimes, prefetch: the request core's settings, with kube2iam's rules.
    pub settings: Settings,
    /// The metadata endpoint, as an agent without a server link.
    pub agent: crate::agent::Config,
    /// How to reach the API server, and whether to skip verifying it.
    pub access: KubeAccess,
    pub insecure: bool,
    /// Which annotations are read.
    pub projection: Projection,
    /// `--node`: watch only this node's pods.
    pub node: Option<String>,
    /// `--metrics-port`, unless it is the app port.
    pub metrics_port: Option<u16>,
    /// `--debug`: serve /debug/store (to loopback callers, on the metrics port).
    pub debug: bool,
    /// `--auto-discover-base-arn` and `--auto-discover-default-role`, resolved at start-up.
    pub discover_base_arn: bool,
    pub discover_default_role: bool,
}

impl Kube2iamArgs {
    /// Validates the flags.
    pub fn config(&self) -> Result<Config, String> {
        validate(self)
    }
}

/// A path flag's value, `None` when empty.
pub fn path(value: &str) -> Option<PathBuf> {
    Some(PathBuf::from(value)).filter(|p| !p.as_os_str().is_empty())
}

/// An IP flag's value, `None` when empty.
pub fn ip(flag: &str, value: &str) -> Result<Option<IpAddr>, String> {
    match value.trim() {
        "" => Ok(None),
        v => v.parse().map(Some).map_err(|_| format!("--{flag} {v:?} is not an IP address")),
    }
}

/// Validates `args`.
fn validate(args: &Kube2iamArgs) -> Result<Config, String> {
    let base_arn = match args.base_role_arn.trim() {
        "" => None,
        arn => Some(BaseArn::parse(arn).map_err(|e| format!("--base-role-arn: {e}"))?),
    };
    if args.auto_discover_base_arn && base_arn.is_some() {
        return Err("--auto-discover-base-arn and --base-role-arn cannot both be set".into());
    }
    let default_role = Some(args.default_role.trim().to_string()).filter(|r| !r.is_empty());
    if args.auto_discover_default_role && default_role.is_some() {
        return Err("--auto-discover-default-role and --default-role cannot both be set".into());
    }
    let session = args.iam_role_session_ttl.saturating_mul(2);
    if session < MIN_SESSION {
        return Err(format!(
            "--iam-role-session-ttl {:?} asks STS for {session:?}, under the 15m minimum",
            args.iam_role_session_ttl
        ));
    }
    let restrictions = match (
        args.namespace_restrictions,
        args.namespace_restriction_format.to_ascii_lowercase().as_str(),
    ) {
        (false, _) => None,
        (true, "glob") => Some(PatternFormat::Glob),
        (true, "regexp") => Some(PatternFormat::Regexp),
        (true, other) => {
            return Err(format!("--namespace-restriction-format {other:?}: expected glob or regexp"));
        }
    };
    if restrictions.is_none() {
        tracing::warn!(
            "--namespace-restrictions is off: any pod may assume any role it annotates, as in kube2iam"
        );
    }
    if args.resolve_duplicate_cache_ips {
        tracing::info!(
            "--resolve-duplicate-cache-ips is accepted and moot: an IP two live pods claim is refused"
        );
    }
    let host = ip("host-ip", &args.host_ip)?;
    let iptables = if args.iptables {
        let Some(IpAddr::V4(host)) = host else {
            return Err("--iptables needs an IPv4 --host-ip".into());
        };
        let interface: Interface =
            args.host_interface.parse().map_err(|e| format!("--host-interface: {e}"))?;
        Some(iptables::Config {
            interface,
            target: SocketAddrV4::new(host, args.app_port),
            target6: None,
            chain: DEFAULT_CHAIN.into(),
            // As kube2iam: the rule stays when the process stops, so that a restarting process
            // leaves pods refused (fail closed) rather than reaching the node's credentials.
            remove_at_exit: false,
            check_interval: Duration::from_secs(5),
            container: false,
            connlimit: Some(args.iptables_connlimit).filter(|n| *n > 0),
        })
    } else if args.iptables_connlimit > 0 {
        return Err("--iptables-connlimit needs --iptables".into());
    } else {
        None
    };
    if args.metadata_addr.is_empty() || args.metadata_addr.contains('/') {
        return Err(format!("--metadata-addr {:?} must be host[:port]", args.metadata_addr));
    }
    if args.backoff_max_elapsed_time.is_zero() {
        return Err("--backoff-max-elapsed-time must be positive".into());
    }
    let allow_routes =
        AllowRoutes::new(&args.allow_route_regexp).map_err(|e| format!("--allow-route-regexp: {e}"))?;
    let access = match (path(&args.kubeconfig), args.api_server.trim(), args.api_token.trim()) {
        (Some(path), _, _) => KubeAccess::Kubeconfig(Some(path)),
        (None, url, token) if !url.is_empty() && !token.is_empty() => {
            KubeAccess::Server { url: url.to_string(), token: token.to_string() }
        }
        _ => KubeAccess::Kubeconfig(None),
    };
    let metrics_port = Some(args.metrics_port).filter(|p| *p != args.app_port);
    if metrics_port.is_none() {
        tracing::warn!(
            port = args.app_port,
            "--metrics-port equals --app-port: metrics are not served, because pods reach the app port \
             through the metadata address; set --metrics-port to another port"
        );
    }
    let agent = crate::agent::Config {
        port: args.app_port,
        host: host.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        host6: None,
        allow_routes,
        metadata_addr: args.metadata_addr.clone(),
        pod_wait: args.backoff_max_elapsed_time,
        require_imdsv2: false,
        allow_ip_query: false,
        iptables,
        client: None,
        transport: crate::client::Transport::default(),
        prometheus_listen_addr: None,
        limits: crate::agent::Limits::default(),
        node_view: false,
        node_name: None,
        healthz_host: Some(host.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))),
        pod_resources_socket: None,
        unconfirmed_bound: crate::agent::view::confirm::UNCONFIRMED_BOUND,
    };
    let settings = Settings {
        policy: Policy {
            base_arn,
            strict_namespace_regexp: true,
            kube2iam: Some(Rules { default_role, restrictions }),
            session_tags: None,
            source_identity: args.source_identity,
            service_account_roles: false,
        },
        lifetimes: Lifetimes { session, refresh_lead: args.iam_role_session_ttl },
        session: "kube2iam".into(),
        fetchers: 8,
        prefetch_buffer: 1000,
        sts_rate: crate::core::DEFAULT_STS_RATE,
    };
    let projection = Projection {
        role_key: args.iam_role_key.clone(),
        external_id_key: args.iam_external_id.clone(),
        allowed_roles_key: args.namespace_key.clone(),
        ..Projection::default()
    };
    Ok(Config {
        settings,
        agent,
        access,
        insecure: args.insecure,
        projection,
        node: Some(args.node.trim().to_string()).filter(|n| !n.is_empty()),
        metrics_port,
        debug: args.debug,
        discover_base_arn: args.auto_discover_base_arn,
        discover_default_role: args.auto_discover_default_role,
    })
}
