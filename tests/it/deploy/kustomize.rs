//! The kustomize manifests (issue 26): the base, the overlays, and every combination of the
//! components (each pair and all three), on the objects `deploy.rs` rendered and parsed.
//! `py/deploy_check.py` already checked that each one equals the chart with its components'
//! values merged (in every order); here each component's effect is asserted where it is
//! listed, and its absence where it is not, so that a component whose patch another one undoes
//! fails here.

use crate::deploy::cases::{caps_added, has, proves_no_node_by_token, proves_node_by_token, run_as};
use crate::deploy::render::{Rendered, Report};

const COMPONENTS: [&str; 3] = ["iptables", "mixed-fleet", "node-certificates"];

/// `iptables`: the agent writes its DNAT rule, as root with NET_ADMIN and NET_RAW only, keeps it at
/// shutdown, and shares the node's xtables lock; without it, an unprivileged agent.
fn iptables(r: &Rendered, on: bool) {
    let agent = r.container("agent");
    let args = r.args("agent");
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    let xtables = mounts.iter().any(|m| m.name == "xtables" && m.mount_path == "/run/xtables.lock");
    if on {
        assert_eq!(
            caps_added(agent),
            ["NET_ADMIN", "NET_RAW"],
            "iptables needs NET_ADMIN (and legacy iptables NET_RAW)"
        );
        assert_eq!(run_as(agent, None), Some(0));
        assert!(has(&args, "--iptables") && has(&args, "--iptables-remove=false"), "{args:?}");
        assert!(xtables, "the node's xtables lock");
    } else {
        assert!(caps_added(agent).is_empty());
        assert_eq!(run_as(agent, None), Some(65532));
        assert!(!args.iter().any(|a| a.starts_with("--iptables")), "{args:?}");
        assert!(!xtables);
    }
}

/// `mixed-fleet`: the servers bind no agent to a node (kiam agents prove none), while kiam-rs
/// agents still send their tokens.
fn mixed_fleet(r: &Rendered, on: bool) {
    let server = r.args("server");
    assert_eq!(!has(&server, "--agent-node-binding"), on, "{server:?}");
}

/// `node-certificates`: each agent's certificate from its node, no tokens, IMDSv2 required;
/// without it, tokens prove the node and the agent's certificate is the shared secret's.
fn node_certificates(r: &Rendered, on: bool) {
    let volumes = r.pod("agent").volumes.clone().unwrap_or_default();
    let tls = volumes.iter().find(|v| v.name == "tls").expect("a tls volume");
    let host_path = tls.host_path.as_ref().map(|h| h.path.as_str());
    let secret = tls.secret.as_ref().and_then(|s| s.secret_name.as_deref());
    assert_eq!(has(&r.args("agent"), "--require-imdsv2"), on);
    if on {
        assert_eq!((host_path, secret), (Some("/etc/kiam/tls"), None), "each node's own cert");
        proves_no_node_by_token(r);
    } else {
        assert_eq!((host_path, secret), (None, Some("kiam-agent-tls")));
        proves_node_by_token(r, "kiam", 3600, "kube-system:kiam-agent");
    }
}

pub fn check(report: &Report) {
    let mut combinations = Vec::new();
    for (name, rendered) in &report.kustomize {
        if name == "kube2iam" {
            continue; // deploy_kube2iam.rs
        }
        let listed: Vec<&str> = if name == "base" { Vec::new() } else { name.split('+').collect() };
        assert!(listed.iter().all(|c| COMPONENTS.contains(c)), "an unknown component in {name}");
        if listed.len() > 1 {
            combinations.push(name.as_str());
        }
        assert!(rendered.kinds("Secret").is_empty(), "{name}: TLS from the user's secrets");
        iptables(rendered, listed.contains(&"iptables"));
        mixed_fleet(rendered, listed.contains(&"mixed-fleet"));
        node_certificates(rendered, listed.contains(&"node-certificates"));
        for value in rendered.0.values().map(|(v, _)| v) {
            if value["kind"] != "ClusterRole" && value["kind"] != "ClusterRoleBinding" {
                assert_eq!(
                    value["metadata"]["namespace"], "kube-system",
                    "{name}: {}",
                    value["metadata"]["name"]
                );
            }
        }
    }
    assert_eq!(
        combinations,
        [
            "iptables+mixed-fleet",
            "iptables+mixed-fleet+node-certificates",
            "iptables+node-certificates",
            "mixed-fleet+node-certificates"
        ],
        "every pair and all three"
    );
    for single in ["base", "iptables", "mixed-fleet", "node-certificates"] {
        assert!(report.kustomize.contains_key(single), "no {single}");
    }
}
