//! kube2iam mode in the chart (`kube2iam.*`), its kustomize overlay and the guide's commands
//! (docs/migrating-from-kube2iam.md), on the objects `deploy.rs` rendered and parsed.

use std::path::Path;

use k8s_openapi::api::core::v1::Container;
use kiam::cli::Command as Sub;
use kiam::kube2iam::Kube2iamArgs;
use serde_json::json;

use crate::deploy::cases::{caps_added, has, run_as};
use crate::deploy::render::{HOST_IP, NODE_NAME, Object, Rendered, Report, parse_command};

/// kube2iam mode's flags as the binary parses them (through the image's entrypoint: no command).
fn kube2iam_args(r: &Rendered) -> Kube2iamArgs {
    let container = r.container("kube2iam");
    assert_eq!(container.command, None, "kube2iam's manifests give only args: the entrypoint runs");
    match parse_command(container, Path::new("/no-tls")) {
        Sub::Kube2iam(args) => args,
        other => panic!("kube2iam runs {other:?}"),
    }
}

fn env_value(c: &Container, name: &str) -> Option<String> {
    c.env.iter().flatten().find(|e| e.name == name).and_then(|e| e.value.clone())
}

fn env_field(c: &Container, name: &str) -> Option<String> {
    let var = c.env.iter().flatten().find(|e| e.name == name)?;
    var.value_from.as_ref()?.field_ref.as_ref().map(|f| f.field_path.clone())
}

/// What every kube2iam-mode rendering has: the host network, the node from the downward API
/// (`--node`, `--host-ip`), `/healthz` probes on the app port, the API token mounted, and RBAC of
/// get/list/watch on pods and namespaces for its ServiceAccount (`account`), nothing else.
fn kube2iam_common(r: &Rendered, account: &str) -> Kube2iamArgs {
    let args = kube2iam_args(r);
    assert_eq!((args.node.as_str(), args.host_ip.as_str()), (NODE_NAME, HOST_IP));
    let container = r.container("kube2iam");
    assert_eq!(env_field(container, "NODE_NAME").as_deref(), Some("spec.nodeName"));
    assert_eq!(env_field(container, "HOST_IP").as_deref(), Some("status.podIP"));
    let pod = r.pod("kube2iam");
    assert_eq!(pod.host_network, Some(true));
    assert_ne!(pod.automount_service_account_token, Some(false), "it watches the API");
    assert_eq!(pod.service_account_name.as_deref(), Some(account));
    assert!(r.has(&format!("ServiceAccount/{account}")));
    for probe in [&container.liveness_probe, &container.readiness_probe] {
        let get = probe.as_ref().and_then(|p| p.http_get.as_ref()).expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some("/healthz"));
        assert_eq!(serde_json::to_value(&get.port).expect("a port"), json!(args.app_port));
    }
    let role = match &r.0["ClusterRole/kiam-kube2iam"].1 {
        Object::ClusterRole(role) => role.rules.clone().unwrap_or_default(),
        _ => unreachable!(),
    };
    assert_eq!(role.len(), 1, "{role:?}");
    assert_eq!(role[0].api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(role[0].resources.as_deref(), Some(&["namespaces".to_string(), "pods".into()][..]));
    assert_eq!(role[0].verbs, ["get", "list", "watch"]);
    assert_eq!(r.kinds("ClusterRole").len(), 1, "no events, no tokenreviews");
    assert_eq!(
        r.json("ClusterRoleBinding/kiam-kube2iam")["subjects"],
        json!([{"kind": "ServiceAccount", "name": account, "namespace": "kube-system"}])
    );
    assert_eq!(r.json("ClusterRoleBinding/kiam-kube2iam")["roleRef"]["name"], "kiam-kube2iam");
    args
}

fn xtables_mounted(r: &Rendered) -> bool {
    let mounts = r.container("kube2iam").volume_mounts.clone().unwrap_or_default();
    let mounted = mounts.iter().any(|m| m.name == "xtables" && m.mount_path == "/run/xtables.lock");
    let volumes = r.pod("kube2iam").volumes.clone().unwrap_or_default();
    let volume = volumes.iter().find(|v| v.name == "xtables").and_then(|v| v.host_path.as_ref());
    assert_eq!(mounted, volume.is_some(), "the mount and its volume come together");
    volume.is_some_and(|h| h.path == "/run/xtables.lock" && h.type_.as_deref() == Some("FileOrCreate"))
}

/// With --iptables: root with NET_ADMIN and NET_RAW (legacy mode) only (kube2iam's chart: privileged), the lock shared.
fn kube2iam_iptables(r: &Rendered) {
    let container = r.container("kube2iam");
    assert!(kube2iam_args(r).iptables);
    assert_eq!(caps_added(container), ["NET_ADMIN", "NET_RAW"]);
    assert_eq!(run_as(container, None), Some(0));
    let sc = container.security_context.as_ref().expect("a security context");
    assert_eq!((sc.privileged, sc.allow_privilege_escalation), (None, Some(false)));
    assert!(xtables_mounted(r));
}

/// The chart's defaults with kube2iam mode alone: non-root, no DNAT rule, metrics on a port of
/// their own; no agent, no server, no certificates.
fn kube2iam_default(r: &Rendered) {
    let args = kube2iam_common(r, "kiam-kube2iam");
    assert!(!args.iptables && !args.verbose && !args.namespace_restrictions);
    assert_eq!(args.host_interface, "cali+");
    assert_eq!((args.app_port, args.metrics_port), (8181, 9620));
    let config = args.config().expect("valid");
    assert_eq!(config.metrics_port, Some(9620), "metrics are served");
    let container = r.container("kube2iam");
    assert_eq!(container.image.as_deref(), Some("kiam-rs:0.1.0"));
    assert!(caps_added(container).is_empty());
    assert_eq!(run_as(container, None), Some(65532));
    assert_eq!(container.security_context.as_ref().and_then(|s| s.run_as_non_root), Some(true));
    assert!(!xtables_mounted(r));
    assert_eq!(env_value(container, "AWS_REGION"), None);
    let ports: Vec<_> =
        container.ports.iter().flatten().map(|p| (p.name.clone(), p.container_port)).collect();
    assert_eq!(ports, [(Some("http".into()), 8181), (Some("metrics".into()), 9620)]);
    assert_eq!(r.json("DaemonSet/kiam-kube2iam")["spec"]["updateStrategy"], json!({"type": "OnDelete"}));
    for gone in
        ["DaemonSet/kiam-agent", "DaemonSet/kiam-server", "Service/kiam-server", "Service/kiam-kube2iam"]
    {
        assert!(!r.has(gone), "{gone}");
    }
    assert!(r.kinds("Secret").is_empty() && r.kinds("ServiceMonitor").is_empty());
    assert!(r.kinds("PodDisruptionBudget").is_empty());
}

/// A values file written for kube2iam's chart, under kube2iam:.
fn kube2iam_values(r: &Rendered) {
    let args = kube2iam_common(r, "kube2iam");
    kube2iam_iptables(r);
    assert_eq!(args.host_interface, "eni+");
    assert_eq!((args.app_port, args.metrics_port), (8182, 9181));
    assert_eq!(args.base_role_arn, "arn:aws:iam::123456789012:role/");
    assert_eq!(args.default_role, "kube2iam-default");
    assert!(args.namespace_restrictions && args.debug && args.verbose);
    assert_eq!(args.namespace_restriction_format, "regexp");
    assert!(!args.auto_discover_base_arn);
    assert!(
        r.args("kube2iam").iter().any(|a| a == "--auto-discover-base-arn=false"),
        "a \"false\" string as written"
    );
    let container = r.container("kube2iam");
    assert_eq!(container.image.as_deref(), Some("registry.example/kiam-rs:v1"));
    assert_eq!(env_value(container, "AWS_REGION").as_deref(), Some("eu-west-1"));
    assert_eq!(env_value(container, "AWS_STS_REGIONAL_ENDPOINTS").as_deref(), Some("regional"));
    let pod = r.pod("kube2iam");
    let secrets: Vec<_> = pod.image_pull_secrets.iter().flatten().map(|s| s.name.as_str()).collect();
    assert_eq!(secrets, ["regcred", "mirror"]);
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.tolerations.as_ref().map(|t| t[0].operator.as_deref()), Some(Some("Exists")));
    let daemonset = r.json("DaemonSet/kiam-kube2iam");
    assert_eq!(daemonset["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"], "10m");
    assert_eq!(daemonset["spec"]["template"]["metadata"]["annotations"]["example.com/team"], "platform");
    assert_eq!(
        daemonset["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 2}})
    );
    // Metrics: a Service and a ServiceMonitor selecting it, on --metrics-port.
    let service = r.json("Service/kiam-kube2iam");
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "metrics", "port": 9181, "targetPort": 9181, "protocol": "TCP"}])
    );
    assert_eq!(service["metadata"]["annotations"]["example.com/scrape"], "true");
    let labels = service["metadata"]["labels"].as_object().expect("labels");
    let monitor = r.json("ServiceMonitor/kiam-kube2iam");
    for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().expect("a selector") {
        assert_eq!(labels.get(k), Some(v), "the monitor selects the service");
    }
    let pod_labels = &daemonset["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().expect("a selector") {
        assert_eq!(&pod_labels[k], v, "the service selects the pods");
    }
    assert_eq!(monitor["spec"]["endpoints"], json!([{"port": "metrics", "interval": "30s"}]));
    assert_eq!(monitor["metadata"]["labels"]["release"], "prom");
}

/// kube2iam's chart's default metrics port is its app port: no metrics, so no port or Service.
fn kube2iam_metrics_on_app_port(r: &Rendered) {
    let args = kube2iam_common(r, "kiam-kube2iam");
    assert_eq!((args.app_port, args.metrics_port), (8181, 8181));
    assert_eq!(args.config().expect("valid").metrics_port, None);
    let container = r.container("kube2iam");
    assert!(container.ports.iter().flatten().all(|p| p.name.as_deref() != Some("metrics")));
    assert!(!r.has("Service/kiam-kube2iam") && r.kinds("ServiceMonitor").is_empty());
}

/// docs/migrating-from-kube2iam.md, command by command (each with --reuse-values on the last).
fn docs_kube2iam(report: &Report) {
    let case = |n: u32| &report.cases[&format!("docs/migrating-from-kube2iam#{n}")];
    // 1: kube2iam mode alone, installing its rule.
    let install = case(1);
    let args = kube2iam_common(install, "kiam-kube2iam");
    kube2iam_iptables(install);
    assert_eq!(
        (args.host_interface.as_str(), args.base_role_arn.as_str()),
        ("eni+", "arn:aws:iam::123456789012:role/")
    );
    assert_eq!(env_value(install.container("kube2iam"), "AWS_REGION").as_deref(), Some("eu-west-1"));
    assert!(!install.has("DaemonSet/kiam-agent") && !install.has("DaemonSet/kiam-server"));
    // 2: namespace restrictions on, the rest kept.
    let restricted = kube2iam_args(case(2));
    assert!(restricted.namespace_restrictions && restricted.iptables);
    assert_eq!(restricted.base_role_arn, args.base_role_arn);
    // 3: servers beside kube2iam mode, on the host network, no agents yet.
    let servers = case(3);
    assert!(kube2iam_args(servers).namespace_restrictions);
    assert_eq!(servers.pod("server").host_network, Some(true));
    assert!(has(&servers.args("server"), "--role-base-arn=arn:aws:iam::123456789012:role/"));
    assert!(!servers.has("DaemonSet/kiam-agent"));
    let taken = [kube2iam_args(servers).metrics_port, kube2iam_args(servers).app_port, 9620];
    let server_metrics = servers.args("server").into_iter().find_map(|a| {
        a.strip_prefix("--prometheus-listen-addr=0.0.0.0:").and_then(|p| p.parse::<u16>().ok())
    });
    assert!(server_metrics.is_some_and(|p| !taken.contains(&p)), "host ports collide: {server_metrics:?}");
    // 4: agents on the labelled nodes, kube2iam mode on the others.
    let split = case(4);
    let agent_nodes = split.pod("agent").node_selector.clone().unwrap_or_default();
    assert_eq!(agent_nodes.get("kiam-rs/mode").map(String::as_str), Some("agent"));
    let affinity = &split.json("DaemonSet/kiam-kube2iam")["spec"]["template"]["spec"]["affinity"];
    let term =
        &affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0];
    assert_eq!(
        term["matchExpressions"][0],
        json!({"key": "kiam-rs/mode", "operator": "NotIn", "values": ["agent"]})
    );
    assert!(has(&split.args("agent"), "--iptables") && has(&split.args("agent"), "--host-interface=eni+"));
    // 5: agents everywhere, kube2iam mode gone.
    let agents = case(5);
    assert!(!agents.has("DaemonSet/kiam-kube2iam") && !agents.has("ClusterRole/kiam-kube2iam"));
    assert_eq!(agents.pod("agent").node_selector, None, "new nodes get an agent");
    assert!(has(&agents.args("agent"), "--iptables"));
}

pub fn check(report: &Report) {
    let case = |name: &str| report.cases.get(name).unwrap_or_else(|| panic!("no case {name}"));
    kube2iam_default(case("kube2iam"));
    kube2iam_values(case("kube2iam-values"));
    kube2iam_metrics_on_app_port(case("kube2iam-metrics-on-app-port"));
    docs_kube2iam(report);
    // kube2iam mode and agents on the same nodes: refused, saying how to fix it.
    assert!(report.refused["kube2iam-with-agent"].contains("agent.enabled=false"), "{:?}", report.refused);
    assert_eq!(report.refused.len(), 1);
    // The kustomize overlay: kube2iam mode alone, installing its rule.
    let kustomize = &report.kustomize["kube2iam"];
    kube2iam_common(kustomize, "kiam-kube2iam");
    kube2iam_iptables(kustomize);
    assert!(!kustomize.has("DaemonSet/kiam-agent") && kustomize.kinds("Secret").is_empty());
}
