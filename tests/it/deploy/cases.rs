//! What each chart value set and each kustomize overlay must change, on the objects
//! `deploy.rs` rendered and parsed. Each assertion fails if the feature it names were wrong.

use k8s_openapi::api::core::v1::Container;
use serde_json::{Value, json};

use crate::deploy::render::{Object, Rendered, Report};

pub fn has(args: &[String], flag: &str) -> bool {
    args.iter().any(|a| a == flag)
}

pub fn caps_added(c: &Container) -> Vec<String> {
    let caps = c.security_context.as_ref().and_then(|s| s.capabilities.as_ref());
    caps.and_then(|c| c.add.clone()).unwrap_or_default()
}

pub fn run_as(c: &Container, pod_level: Option<i64>) -> Option<i64> {
    c.security_context.as_ref().and_then(|s| s.run_as_user).or(pod_level)
}

fn server_user(r: &Rendered) -> Option<i64> {
    run_as(r.container("server"), r.pod("server").security_context.as_ref().and_then(|s| s.run_as_user))
}

/// The agent's projected node token: (audience, expirationSeconds), if it has one.
fn node_token(r: &Rendered) -> Option<(String, i64)> {
    let volumes = r.pod("agent").volumes.clone().unwrap_or_default();
    let volume = volumes.into_iter().find(|v| v.name == "node-token")?;
    let sources = volume.projected.and_then(|p| p.sources).unwrap_or_default();
    let token = sources.into_iter().find_map(|s| s.service_account_token).expect("a token source");
    assert_eq!(token.path, "token");
    Some((token.audience.unwrap_or_default(), token.expiration_seconds.unwrap_or_default()))
}

/// Node proof by token, end to end: the agent's projected token (`audience`, `lifetime`), mounted
/// where `--token-file` reads it; the server checking that audience and the agent's
/// `service_account`, with TokenReview in its RBAC.
pub fn proves_node_by_token(r: &Rendered, audience: &str, lifetime: i64, service_account: &str) {
    assert_eq!(node_token(r), Some((audience.to_string(), lifetime)));
    assert!(has(&r.args("agent"), "--token-file=/var/run/secrets/kiam/token"), "{:?}", r.args("agent"));
    let mounts = r.container("agent").volume_mounts.clone().unwrap_or_default();
    let mount = mounts.iter().find(|m| m.name == "node-token").expect("the token is mounted");
    assert_eq!((mount.mount_path.as_str(), mount.read_only), ("/var/run/secrets/kiam", Some(true)));
    assert_eq!(r.pod("agent").automount_service_account_token, Some(false), "no API token for the agent");
    let server = r.args("server");
    for flag in
        [format!("--agent-token-audience={audience}"), format!("--agent-service-account={service_account}")]
    {
        assert!(has(&server, &flag), "{flag} in {server:?}");
    }
    let sa = service_account.split_once(':').map(|(_, name)| name);
    assert_eq!(r.pod("agent").service_account_name.as_deref(), sa, "the server names the agents' account");
    rbac(r, true);
}

/// No tokens: none projected or sent, none checked, no TokenReview permission.
pub fn proves_no_node_by_token(r: &Rendered) {
    assert_eq!(node_token(r), None);
    assert!(!r.args("agent").iter().any(|a| a.starts_with("--token-file")));
    assert!(!r.args("server").iter().any(|a| a.starts_with("--agent-token-audience")));
    assert!(!r.args("server").iter().any(|a| a.starts_with("--agent-service-account")));
    rbac(r, false);
}

/// NODE_NAME comes from the downward API: the agent's own node, for the node view.
fn knows_its_node(r: &Rendered) {
    let env = r.container("agent").env.clone().unwrap_or_default();
    let node = env.iter().find(|e| e.name == "NODE_NAME").and_then(|e| e.value_from.as_ref());
    let field = node.and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("spec.nodeName"));
}

fn secret_keys(r: &Rendered, name: &str) -> Vec<String> {
    let data = r.json(&format!("Secret/{name}"))["data"].as_object().cloned().unwrap_or_default();
    data.keys().cloned().collect()
}

fn default(r: &Rendered) {
    // The agent: host network, no API access, no privileges without iptables.
    let pod = r.pod("agent");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let agent = r.container("agent");
    assert!(caps_added(agent).is_empty(), "NET_ADMIN only with iptables");
    assert_eq!(run_as(agent, None), Some(65532));
    let args = r.args("agent");
    assert!(!has(&args, "--iptables") && !has(&args, "--require-imdsv2"), "{args:?}");
    for flag in ["--server-address=kiam-server:443", "--port=8181", "--host-interface=cali+"] {
        assert!(has(&args, flag), "{flag} in {args:?}");
    }
    let env = agent.env.clone().unwrap_or_default();
    let host_ip = env.iter().find(|e| e.name == "HOST_IP").and_then(|e| e.value_from.as_ref());
    let field = host_ip.and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("status.podIP"));
    // Node binding by token, the default.
    knows_its_node(r);
    proves_node_by_token(r, "kiam", 3600, "kube-system:kiam-agent");
    // The server: non-root, no capabilities, port 443 through the unprivileged-port sysctl.
    let server = r.args("server");
    for flag in ["--bind=0.0.0.0:443", "--role-base-arn-autodetect"] {
        assert!(has(&server, flag), "{flag} in {server:?}");
    }
    assert!(has(&server, "--agent-node-binding"), "node binding is on by default");
    assert!(caps_added(r.container("server")).is_empty());
    assert_eq!(server_user(r), Some(65532));
    let sysctls =
        r.pod("server").security_context.as_ref().and_then(|s| s.sysctls.clone()).unwrap_or_default();
    assert!(sysctls.iter().any(|s| s.name == "net.ipv4.ip_unprivileged_port_start" && s.value == "0"));
    assert_eq!(r.json("DaemonSet/kiam-server")["kind"], "DaemonSet", "a DaemonSet, as kiam's chart");
    // Headless service named as kiam's, so kiam agents find kiam-rs servers.
    assert_eq!(r.json("Service/kiam-server")["spec"]["clusterIP"], "None");
    assert_eq!(r.json("Service/kiam-server")["spec"]["ports"][0]["port"], 443);
    // TLS generated at install, one CA for both, under kiam's secret names and keys.
    for name in ["kiam-agent", "kiam-server"] {
        assert_eq!(secret_keys(r, name), ["ca", "cert", "key"]);
    }
    assert_eq!(r.json("Secret/kiam-agent")["data"]["ca"], r.json("Secret/kiam-server")["data"]["ca"]);
    assert!(!r.has("PodDisruptionBudget/kiam-server"), "no budget over a DaemonSet: drains skip its pods");
    assert!(!r.has("NetworkPolicy/kiam-server") && r.kinds("ServiceMonitor").is_empty());
}

/// Exactly: the server reads pods and namespaces, writes events, and reviews tokens when agents
/// send them (`tokens`); nothing is bound to the agent.
fn rbac(r: &Rendered, tokens: bool) {
    let rules = |name: &str| match &r.0[&format!("ClusterRole/{name}")].1 {
        Object::ClusterRole(role) => role.rules.clone().unwrap_or_default(),
        _ => unreachable!(),
    };
    let read = rules("kiam-read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].api_groups.as_deref(), Some(&[String::new()][..]));
    assert_eq!(read[0].resources.as_deref(), Some(&["namespaces".to_string(), "pods".into()][..]));
    assert_eq!(read[0].verbs, ["get", "list", "watch"]);
    let write = rules("kiam-write");
    assert_eq!(write.len(), if tokens { 2 } else { 1 }, "{write:?}");
    if tokens {
        assert_eq!(write[1].api_groups.as_deref(), Some(&["authentication.k8s.io".to_string()][..]));
        assert_eq!(write[1].resources.as_deref(), Some(&["tokenreviews".to_string()][..]));
        assert_eq!(write[1].verbs, ["create"]);
    }
    assert_eq!(write[0].api_groups.as_deref(), Some(&["events.k8s.io".to_string()][..]));
    assert_eq!(write[0].resources.as_deref(), Some(&["events".to_string()][..]));
    assert_eq!(write[0].verbs, ["create", "patch"]);
    assert_eq!(r.kinds("ClusterRole").len(), 2);
    assert!(r.kinds("Role").is_empty() && r.kinds("RoleBinding").is_empty());
    for binding in r.kinds("ClusterRoleBinding") {
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": "kiam-server", "namespace": "kube-system"}])
        );
    }
}

fn kiam_values(r: &Rendered) {
    let agent = r.container("agent");
    assert_eq!(caps_added(agent), ["NET_ADMIN", "NET_RAW"], "iptables needs NET_ADMIN (NET_RAW: legacy)");
    assert_eq!(run_as(agent, None), Some(0));
    assert_eq!(agent.image.as_deref(), Some("registry.example/kiam-rs:v1"));
    let args = r.args("agent");
    for flag in [
        "--iptables",
        "--iptables-remove=false",
        "--host-interface=!eth0",
        "--allow-route-regexp=^/latest/meta-data/placement/",
        "--grpc-keepalive-time-duration=10s",
        "--grpc-keepalive-permit-without-stream",
        "--iptables-check-interval=10s",
        "--grpc-keepalive-timeout-duration=3s",
    ] {
        assert!(has(&args, flag), "{flag} in {args:?}");
    }
    assert!(has(&args, "--allow-ip-query=false"), "a \"false\" string is passed as written");
    let path = &r.json("DaemonSet/kiam-agent")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"];
    assert_eq!(path["httpGet"]["path"], "/health?deep=1");
    let mounts: Vec<_> = agent.volume_mounts.iter().flatten().map(|m| m.mount_path.as_str()).collect();
    assert!(mounts.contains(&"/run/xtables.lock"));
    let pod = r.pod("agent");
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    assert_eq!(pod.image_pull_secrets.as_ref().map(|s| s[0].name.as_str()), Some("regcred"));
    // The server as a Deployment, with kiam's server values.
    let deployment = r.json("Deployment/kiam-server");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let server = r.args("server");
    for flag in [
        "--role-base-arn=arn:aws:iam::123456789012:role/",
        "--assume-role-arn=arn:aws:iam::123456789012:role/kiam-server",
        "--session-duration=15m",
        "--session-refresh=2m",
        "--grpc-max-connection-age-duration=10m",
        "--grpc-keepalive-timeout-duration=3s",
    ] {
        assert!(has(&server, flag), "{flag} in {server:?}");
    }
    assert!(!has(&server, "--role-base-arn-autodetect"));
    let env = r.container("server").env.clone().unwrap_or_default();
    assert!(
        env.iter().any(|e| e.name == "AWS_STS_REGIONAL_ENDPOINTS" && e.value.as_deref() == Some("regional"))
    );
    let sa = r.json("ServiceAccount/kiam-server");
    assert_eq!(
        sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/kiam-server"
    );
    // Secrets named by the user: the chart makes none.
    assert!(r.kinds("Secret").is_empty());
    let volumes = r.pod("agent").volumes.clone().unwrap_or_default();
    let tls = volumes.iter().find(|v| v.name == "tls").and_then(|v| v.secret.as_ref());
    assert_eq!(tls.and_then(|s| s.secret_name.as_deref()), Some("kiam-agent-tls"));
}

/// Per-node certificates instead of tokens.
fn node_certificates(r: &Rendered) {
    assert!(has(&r.args("server"), "--agent-node-binding"));
    knows_its_node(r);
    proves_no_node_by_token(r);
    assert!(has(&r.args("agent"), "--require-imdsv2"));
    let volumes = r.pod("agent").volumes.clone().unwrap_or_default();
    let tls = volumes.iter().find(|v| v.name == "tls").expect("a tls volume");
    assert_eq!(
        tls.host_path.as_ref().map(|h| h.path.as_str()),
        Some("/etc/kiam/tls"),
        "each node's own cert"
    );
    assert!(tls.secret.is_none());
}

/// Tokens for another audience and lifetime, and an agent ServiceAccount the user named.
fn node_token_values(r: &Rendered) {
    assert!(has(&r.args("server"), "--agent-node-binding"));
    proves_node_by_token(r, "kiam.example", 7200, "kube-system:node-agent");
    assert!(r.has("ServiceAccount/node-agent"));
}

/// ServiceAccount roles, session tags and node readiness: the flags, and exactly the RBAC each
/// needs.
fn issue_16(r: &Rendered) {
    let args = r.args("server");
    for flag in [
        "--service-account-roles",
        "--session-tags=kubernetes-namespace,eks-cluster-name",
        "--cluster-name=prod",
        "--node-readiness-taint=kiam.amazonaws.com/agent-not-ready",
        "--node-readiness-reapply",
    ] {
        assert!(has(&args, flag), "{flag} in {args:?}");
    }
    let rules = |name: &str| match &r.0[&format!("ClusterRole/{name}")].1 {
        Object::ClusterRole(role) => role.rules.clone().unwrap_or_default(),
        _ => unreachable!(),
    };
    let read = rules("kiam-read");
    assert_eq!(read[1].resources.as_deref(), Some(&["serviceaccounts".to_string()][..]));
    assert_eq!(read[1].verbs, ["list", "watch"]);
    let write = rules("kiam-write");
    let nodes = write.iter().find(|rule| rule.resources.as_deref() == Some(&["nodes".to_string()][..]));
    assert_eq!(nodes.map(|rule| rule.verbs.clone()), Some(vec!["get".to_string(), "patch".to_string()]));
}

/// Servers that share identities: `--peers` names the headless Service and the servers' own
/// port, and each server learns its address from the downward API; the default has neither.
fn scale_out(r: &Rendered, default: &Rendered) {
    let args = r.args("server");
    assert!(has(&args, "--peers=kiam-server:443") && has(&args, "--sts-rate=20"), "{args:?}");
    let env = r.container("server").env.clone().unwrap_or_default();
    let pod_ip = env.iter().find(|e| e.name == "POD_IP").and_then(|e| e.value_from.as_ref());
    let field = pod_ip.and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
    assert_eq!(field, Some("status.podIP"), "{env:?}");
    let plain = default.args("server");
    assert!(!plain.iter().any(|a| a.starts_with("--peers") || a.starts_with("--sts-rate")), "{plain:?}");
}

/// kiam's behaviour: no binding, no token.
fn no_node_binding(r: &Rendered) {
    assert!(!has(&r.args("server"), "--agent-node-binding"));
    proves_no_node_by_token(r);
}

/// The container endpoint: its DNAT flag, and TokenReview for pods' tokens even though the
/// agents prove their node by certificate.
fn container_endpoint(r: &Rendered) {
    let args = r.args("agent");
    assert!(has(&args, "--iptables") && has(&args, "--container-endpoint"), "{args:?}");
    assert_eq!(node_token(r), None, "certificates prove the node");
    rbac(r, true);
}

/// `kiam webhook`: its Deployment, and two webhook entries (pods that opt in; pods of namespaces
/// that opt in, less those that opt out) calling its two paths.
fn webhook(r: &Rendered) {
    let container = r.container("webhook");
    assert_eq!(container.command.as_deref(), Some(&["/kiam".to_string(), "webhook".into()][..]));
    assert!(has(&r.args("webhook"), "--token-audience=pods.eks.amazonaws.com"));
    assert_eq!(r.pod("webhook").automount_service_account_token, Some(false), "it needs no API access");
    let Object::MutatingWebhookConfiguration(config) = &r.0["MutatingWebhookConfiguration/kiam-webhook"].1
    else {
        unreachable!()
    };
    let hooks = config.webhooks.clone().unwrap_or_default();
    let paths: Vec<Option<String>> =
        hooks.iter().map(|h| h.client_config.service.as_ref().and_then(|s| s.path.clone())).collect();
    assert_eq!(paths, [Some("/mutate".to_string()), Some("/mutate-namespace".into())]);
    let label = |s: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>| {
        s.as_ref().and_then(|s| s.match_labels.clone()).unwrap_or_default()
    };
    assert_eq!(
        label(&hooks[0].object_selector).get("kiam-rs.io/container-credentials").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        label(&hooks[1].namespace_selector).get("kiam-rs.io/container-credentials").map(String::as_str),
        Some("true")
    );
    assert!(
        hooks
            .iter()
            .all(|h| h.failure_policy.as_deref() == Some("Ignore") && h.client_config.ca_bundle.is_some())
    );
    assert!(has(&r.args("agent"), "--container-endpoint"));
}

fn servicemonitor(r: &Rendered) {
    let monitors = r.kinds("ServiceMonitor");
    assert_eq!(monitors.len(), 2);
    for component in ["agent", "server"] {
        let monitor = r.json(&format!("ServiceMonitor/kiam-{component}"));
        let service = r.json(&format!("Service/kiam-{component}"));
        let labels = service["metadata"]["labels"].as_object().expect("labels");
        for (k, v) in monitor["spec"]["selector"]["matchLabels"].as_object().expect("a selector") {
            assert_eq!(labels.get(k), Some(v), "the monitor selects the {component} service");
        }
        let ports: Vec<&Value> =
            service["spec"]["ports"].as_array().expect("ports").iter().map(|p| &p["name"]).collect();
        assert!(ports.contains(&&json!("metrics")));
        assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    }
    assert_eq!(r.json("ServiceMonitor/kiam-agent")["metadata"]["labels"]["release"], "prom");
    assert_eq!(r.json("ServiceMonitor/kiam-server")["spec"]["endpoints"][0]["interval"], "30s");
}

fn cert_manager(r: &Rendered) {
    assert!(r.kinds("Secret").is_empty(), "cert-manager writes the secrets");
    assert_eq!(r.kinds("Issuer").len(), 2);
    assert_eq!(r.json("Certificate/kiam-ca")["spec"]["isCA"], true);
    let server = &r.json("Certificate/kiam-server")["spec"];
    assert_eq!(server["secretName"], "kiam-server");
    let names = server["dnsNames"].as_array().expect("dnsNames");
    for name in ["kiam-server", "kiam-server.kube-system.svc", "kiam.example"] {
        assert!(names.contains(&json!(name)), "{name}");
    }
    assert_eq!(server["ipAddresses"], json!(["127.0.0.1"]), "the probes connect to 127.0.0.1");
    assert!(server["usages"].as_array().is_some_and(|u| u.contains(&json!("server auth"))));
    let agent = &r.json("Certificate/kiam-agent")["spec"];
    assert_eq!(agent["usages"], json!(["digital signature", "client auth"]));
    assert_eq!(agent["issuerRef"], json!({"name": "kiam-ca", "kind": "Issuer"}));
    for component in ["agent", "server"] {
        let args = r.args(component);
        for flag in
            ["--cert=/etc/kiam/tls/tls.crt", "--key=/etc/kiam/tls/tls.key", "--ca=/etc/kiam/tls/ca.crt"]
        {
            assert!(has(&args, flag), "{component}: {flag} in {args:?}");
        }
    }
}

fn tls_files(r: &Rendered) {
    for name in ["kiam-agent", "kiam-server"] {
        let data = &r.json(&format!("Secret/{name}"))["data"];
        assert_eq!(data["cert"], "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==");
    }
}

fn hardened(r: &Rendered) {
    // A port below 1024 on the host network: root, with NET_BIND_SERVICE and nothing else.
    assert_eq!(r.pod("server").host_network, Some(true));
    assert_eq!(server_user(r), Some(0));
    assert_eq!(caps_added(r.container("server")), ["NET_BIND_SERVICE"]);
    assert_eq!(r.pod("server").priority_class_name.as_deref(), Some("system-cluster-critical"));
    assert_eq!(r.json("PodDisruptionBudget/kiam-server")["spec"]["maxUnavailable"], 2);
    let ingress = &r.json("NetworkPolicy/kiam-server")["spec"]["ingress"];
    assert_eq!(ingress[0]["ports"], json!([{"port": 443, "protocol": "TCP"}]));
    assert_eq!(ingress[0]["from"], json!([{"ipBlock": {"cidr": "10.0.0.0/16"}}]));
    assert_eq!(ingress[1]["ports"], json!([{"port": 9620, "protocol": "TCP"}]));
    assert!(!r.has("Service/kiam-agent"), "no metrics, no agent service");
    assert!(!r.args("agent").iter().any(|a| a.starts_with("--prometheus-listen-addr")));
}

fn server_only_high_port(r: &Rendered) {
    assert!(r.0.keys().all(|k| !k.contains("agent")), "{:?}", r.0.keys());
    assert!(has(&r.args("server"), "--bind=0.0.0.0:9610"));
    assert!(r.pod("server").security_context.as_ref().and_then(|s| s.sysctls.as_ref()).is_none());
    assert_eq!(server_user(r), Some(65532));
}

/// The `helm install` command of docs/install.md.
fn docs_install(r: &Rendered) {
    let agent = r.args("agent");
    assert!(has(&agent, "--iptables") && has(&agent, "--host-interface=cali+"), "{agent:?}");
    assert_eq!(r.container("agent").image.as_deref(), Some("registry.example/kiam-rs:0.1.0"));
    assert!(has(&r.args("server"), "--role-base-arn=arn:aws:iam::123456789012:role/"));
    assert!(r.kinds("Secret").is_empty(), "the guide's secrets are named, so none is generated");
}

pub fn check(report: &Report) {
    let case = |name: &str| report.cases.get(name).unwrap_or_else(|| panic!("no case {name}"));
    default(case("default"));
    kiam_values(case("kiam-values"));
    node_certificates(case("node-certificates"));
    node_token_values(case("node-token"));
    no_node_binding(case("no-node-binding"));
    issue_16(case("issue-16"));
    scale_out(case("scale-out"), case("default"));
    servicemonitor(case("servicemonitor"));
    cert_manager(case("cert-manager"));
    tls_files(case("tls-files"));
    hardened(case("hardened"));
    server_only_high_port(case("server-only-high-port"));
    container_endpoint(case("container-endpoint"));
    webhook(case("webhook"));
    assert!(case("default").kinds("MutatingWebhookConfiguration").is_empty(), "the webhook is opt-in");
    docs_install(case("docs/install#1"));
    let kiam_upgrade = case("docs/migrating-from-kiam#1");
    assert!(!has(&kiam_upgrade.args("server"), "--agent-node-binding"), "kiam agents still run");
    assert_eq!(kiam_upgrade.container("server").image.as_deref(), Some("registry.example/kiam-rs:0.1.0"));
    crate::deploy::kube2iam::check(report);
    crate::deploy::monitoring::docs_monitoring(case("docs/monitoring#1"));
    // The kernel's per-source connection limit, in front of the agent and of kube2iam mode.
    assert!(has(&case("connlimit").args("agent"), "--iptables-connlimit=128"));
    assert!(has(&case("kube2iam-connlimit").args("kube2iam"), "--iptables-connlimit=128"));
    let default_agent = case("default").args("agent");
    assert!(!default_agent.iter().any(|a| a.starts_with("--iptables-connlimit")), "off by default");
    assert_eq!(report.cases.len(), 27, "a case without assertions");
    crate::deploy::kustomize::check(report);
    crate::deploy::helm_test::check(report);
}
