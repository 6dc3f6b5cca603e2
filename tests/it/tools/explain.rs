//! `kiam explain`: the verdict and reason for each case users ask about, read from the fake API
//! server and from manifests, through the library and through the real binary (exit codes,
//! JSON), and the server's cache state through a real server's `Debug` service.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiam::explain::{self, Config, Inventory, NodeBinding, Output, Report, ServerQuery, Settings, Target};
use kiam::model::BaseArn;
use kiam::policy::Policy;
use serde_json::Value;

use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_kube::FakeKube;
use crate::support::objects::{namespace, pod};
use crate::support::process::kiam_explain;
use crate::support::stack::{BASE_ARN, Options, Stack, tls_files};

fn config(inventory: Inventory, target: Target, requested: Option<&str>) -> Config {
    Config {
        settings: Settings {
            policy: Policy {
                base_arn: Some(BaseArn::parse(BASE_ARN).expect("base ARN")),
                strict_namespace_regexp: true,
                kube2iam: None,
                session_tags: None,
                source_identity: false,
                service_account_roles: false,
            },
            default_session: "kiam".into(),
            node_binding: NodeBinding::Off,
        },
        autodetect_base_arn: false,
        inventory,
        target,
        requested: requested.map(Into::into),
        server: None,
        timeout: Duration::from_secs(10),
        output: Output::Text,
    }
}

fn target(s: &str) -> Target {
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Target::Ip(ip),
        Err(_) => explain::parse_pod(s).expect("namespace/pod"),
    }
}

/// The cases every source must answer alike: (target, --role, verdict code, reason excerpt).
const CASES: [(&str, Option<&str>, &str, &str); 8] = [
    ("team-a/web", None, "allowed", "may assume arn:aws:iam::123456789012:role/team-a-web"),
    (
        "team-a/intruder",
        None,
        "namespace-forbids",
        "expression 'arn:aws:iam::123456789012:role/team-a-.*' forbids",
    ),
    ("team-b/api", None, "namespace-unset", "namespace policy expression '(empty)' forbids"),
    (
        "team-a/web",
        Some("team-a-other"),
        "role-mismatch",
        "requested 'team-a-other' but annotated with 'team-a-web'",
    ),
    ("team-a/bare", None, "no-role-annotation", "no iam.amazonaws.com/role annotation"),
    ("team-a/ghost", None, "pod-not-found", "pod team-a/ghost not found"),
    ("team-a/host", None, "host-network", "uses hostNetwork"),
    ("127.0.0.99", None, "pod-not-found", "no pod found for IP 127.0.0.99"),
];

fn check(report: &Report, case: &str, code: &str, reason: &str) {
    let [e] = report.explanations.as_slice() else { panic!("{case}: one explanation") };
    assert_eq!(e.verdict.code, code, "{case}: {:?}", e.verdict);
    assert!(e.verdict.reason.contains(reason), "{case}: {:?} should contain {reason:?}", e.verdict.reason);
    assert_eq!(report.exit_code(), if code == "allowed" { 0 } else { 1 }, "{case}");
}

fn apply_cluster(kube: &FakeKube) {
    kube.apply(namespace("team-a").permitted("arn:aws:iam::123456789012:role/team-a-.*").build());
    kube.apply(namespace("team-b").build());
    kube.apply(pod("team-a", "web").ip("127.0.0.41").node("n1").role("team-a-web").build());
    kube.apply(pod("team-a", "intruder").ip("127.0.0.42").role("other-app").build());
    kube.apply(pod("team-b", "api").ip("127.0.0.43").role("team-b-api").build());
    kube.apply(pod("team-a", "bare").ip("127.0.0.44").build());
    kube.apply(pod("team-a", "host").ip("10.250.0.1").host_network(true).role("team-a-web").build());
}

#[tokio::test]
async fn verdicts_from_the_api_server() {
    let (pki, kube) = (TestPki::new(), FakeKube::start().await);
    apply_cluster(&kube);
    let inventory = Inventory::Kube(Some(kube.write_kubeconfig(pki.dir())));
    for (case, role, code, reason) in CASES {
        let report =
            explain::run(config(inventory.clone(), target(case), role)).await.expect("reads the cluster");
        check(&report, case, code, reason);
    }
    // By IP, the pod is found as the server finds it, and the hostNetwork pod never is.
    let report = explain::run(config(inventory.clone(), target("127.0.0.41"), None)).await.expect("reads");
    check(&report, "by IP", "allowed", "pod team-a/web may assume");
    let report = explain::run(config(inventory.clone(), target("10.250.0.1"), None)).await.expect("reads");
    check(&report, "hostNetwork by IP", "host-network", "no pod found for IP 10.250.0.1");
    // A terminating pod whose IP went to a new pod: the new pod is the one the server answers for.
    kube.apply(pod("team-a", "old").ip("127.0.0.45").role("team-a-web").terminating().build());
    kube.apply(pod("team-a", "new").ip("127.0.0.45").role("team-a-web").build());
    let report = explain::run(config(inventory.clone(), target("team-a/old"), None)).await.expect("reads");
    check(&report, "reused IP", "ip-reused", "now belongs to team-a/new");
    let report = explain::run(config(inventory, target("127.0.0.45"), None)).await.expect("reads");
    assert_eq!(report.explanations[0].pod.as_ref().map(|p| p.name.as_str()), Some("new"));
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  annotations:
    iam.amazonaws.com/permitted: "arn:aws:iam::123456789012:role/team-a-.*"
---
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
"#;

/// Pods as they sit in a repository: no status, so no IP and no phase.
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: team-a
  annotations:
    iam.amazonaws.com/role: team-a-web
    iam.amazonaws.com/session-name: web
    iam.amazonaws.com/external-id: ext-file-secret-31
spec: {containers: [{name: app, image: app}]}
---
kind: Pod
metadata: {name: intruder, namespace: team-a, annotations: {iam.amazonaws.com/role: other-app}}
spec: {containers: [{name: app, image: app}]}
---
kind: Pod
metadata: {name: api, namespace: team-b, annotations: {iam.amazonaws.com/role: team-b-api}}
spec: {containers: [{name: app, image: app}]}
---
kind: Pod
metadata: {name: bare, namespace: team-a}
spec: {containers: [{name: app, image: app}]}
---
kind: Pod
metadata: {name: host, namespace: team-a, annotations: {iam.amazonaws.com/role: team-a-web}}
spec: {hostNetwork: true, containers: [{name: app, image: app}]}
"#;

fn write_manifests(dir: &Path) -> (PathBuf, PathBuf) {
    let (pods, namespaces) = (dir.join("pods.yaml"), dir.join("namespaces.yaml"));
    std::fs::write(&pods, PODS).expect("write pods");
    std::fs::write(&namespaces, NAMESPACES).expect("write namespaces");
    (pods, namespaces)
}

#[tokio::test]
async fn verdicts_from_manifests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pods, namespaces) = write_manifests(dir.path());
    let inventory = Inventory::Files(vec![pods, namespaces]);
    for (case, role, code, reason) in CASES {
        let report =
            explain::run(config(inventory.clone(), target(case), role)).await.expect("reads the files");
        check(&report, case, code, reason);
    }
    let every = explain::run(config(inventory, Target::Every, None)).await.expect("reads the files");
    let codes: Vec<&str> = every.explanations.iter().map(|e| e.verdict.code).collect();
    assert_eq!(
        codes,
        ["allowed", "namespace-forbids", "namespace-unset", "no-role-annotation", "host-network"]
    );
    assert_eq!(every.explanations[0].lookup.outcome, "no-ip", "manifests have no status");
}

#[tokio::test]
async fn the_binary_lints_manifests_with_exit_codes_and_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (pods, namespaces) = write_manifests(dir.path());
    let (pods, namespaces) = (pods.to_str().expect("utf-8"), namespaces.to_str().expect("utf-8"));
    let files = ["-f", pods, "-f", namespaces, "--role-base-arn", BASE_ARN];

    let ok = kiam_explain(&[&files[..], &["team-a/web"]].concat()).await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert!(
        ok.stdout.contains("ALLOWED: pod team-a/web may assume arn:aws:iam::123456789012:role/team-a-web")
    );
    assert!(ok.stdout.contains("kiam-web (from iam.amazonaws.com/session-name)"), "{}", ok.stdout);
    assert!(ok.stdout.contains("set (not shown)") && !ok.stdout.contains("ext-file-secret-31"));

    let wrong = kiam_explain(&[&files[..], &["team-a/web", "--role", "team-a-other"]].concat()).await;
    assert_eq!(wrong.code, 1, "{}{}", wrong.stdout, wrong.stderr);
    assert!(wrong.stdout.contains("DENIED (role-mismatch)"), "{}", wrong.stdout);

    // Every pod of the manifests, as JSON: one denial makes the exit code 1.
    let all = kiam_explain(&[&files[..], &["--output", "json"]].concat()).await;
    assert_eq!(all.code, 1, "{}", all.stderr);
    let json: Value = serde_json::from_str(&all.stdout).expect("JSON");
    let verdicts: Vec<(&str, bool)> = json
        .as_array()
        .expect("an array for every pod")
        .iter()
        .map(|e| (e["query"].as_str().unwrap_or(""), e["verdict"]["allowed"].as_bool().unwrap_or(true)))
        .collect();
    assert_eq!(verdicts[0], ("team-a/web", true));
    assert!(verdicts[1..].iter().all(|(_, allowed)| !allowed), "{verdicts:?}");
    assert!(!all.stdout.contains("ext-file-secret-31"));

    // One named pod in JSON is one object.
    let one = kiam_explain(&[&files[..], &["team-a/intruder", "-o", "json"]].concat()).await;
    let json: Value = serde_json::from_str(&one.stdout).expect("JSON");
    assert_eq!(json["verdict"]["code"], "namespace-forbids");
    assert_eq!(json["role"]["arn"], "arn:aws:iam::123456789012:role/other-app");
    assert_eq!(json["namespace"]["matches"], false);
    assert_eq!(json["session"]["external_id_set"], false);

    let bad = kiam_explain(&["-f", "/nonexistent/pods.yaml", "team-a/web"]).await;
    assert_eq!(bad.code, 3, "unreadable manifests: {}", bad.stderr);
    let usage = kiam_explain(&["team-a/web", "--ip", "10.0.0.1"]).await;
    assert_eq!(usage.code, 2, "bad flags: {}", usage.stderr);
}

#[tokio::test]
async fn the_binary_reads_the_cluster() {
    let (pki, kube) = (TestPki::new(), FakeKube::start().await);
    apply_cluster(&kube);
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let base = ["--kubeconfig", kubeconfig.to_str().expect("utf-8"), "--role-base-arn", BASE_ARN];
    let ok = kiam_explain(&[&base[..], &["team-a/web"]].concat()).await;
    assert_eq!(ok.code, 0, "{}{}", ok.stdout, ok.stderr);
    assert!(ok.stdout.contains("127.0.0.41") && ok.stdout.contains("Running"), "{}", ok.stdout);
    let host = kiam_explain(&[&base[..], &["--ip", "10.250.0.1", "-o", "json"]].concat()).await;
    assert_eq!(host.code, 1, "{}", host.stderr);
    let json: Value = serde_json::from_str(&host.stdout).expect("JSON");
    assert_eq!(
        (json["verdict"]["code"].as_str(), json["lookup"]["pods"][0].as_str()),
        (Some("host-network"), Some("team-a/host"))
    );
    // With node binding, an agent on another node is refused before the policy is asked.
    let other =
        kiam_explain(&[&base[..], &["team-a/web", "--agent-node-binding", "--node", "n2"]].concat()).await;
    assert_eq!(other.code, 1);
    assert!(other.stdout.contains("DENIED (other-node)"), "{}", other.stdout);

    // No API server behind the kubeconfig: the answer is incomplete, exit 3.
    let dead = tempfile::tempdir().expect("tempdir");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let text = std::fs::read_to_string(&kubeconfig)
        .expect("kubeconfig")
        .replace(&kube.url(), &format!("http://{closed}"));
    let dead_config = dead.path().join("kubeconfig");
    std::fs::write(&dead_config, text).expect("write");
    let down = kiam_explain(&[
        "--kubeconfig",
        dead_config.to_str().expect("utf-8"),
        "team-a/web",
        "--timeout",
        "5s",
    ])
    .await;
    assert_eq!(down.code, 3, "{}{}", down.stdout, down.stderr);
    assert!(down.stderr.contains("pod team-a/web"), "{}", down.stderr);
}

fn request_again() -> kiam::pb::GetPodCredentialsRequest {
    kiam::pb::GetPodCredentialsRequest { ip: "10.66.0.1".into(), role: "app".into() }
}

fn server_query(stack: &Stack, cert: &CertFiles) -> ServerQuery {
    ServerQuery { address: format!("127.0.0.1:{}", stack.server_addr.port()), tls: tls_files(cert) }
}

#[tokio::test]
async fn the_server_reports_its_cache_and_last_sts_error() {
    use kiam::agent::Backend;
    let mut stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let web = pod("team-a", "web")
        .ip("10.66.0.1")
        .role("app")
        .annotation("iam.amazonaws.com/external-id", "ext-secret-77");
    stack.kube.apply(web.build());
    let ip = "10.66.0.1".parse().expect("ip");
    stack.wait_for_pod(ip).await;
    stack.client(&stack.pki.agent()).pod_credentials(ip, "app", 0).await.expect("credentials");

    let kubeconfig = stack.kube.write_kubeconfig(stack.pki.dir());
    let mut cfg = config(Inventory::Kube(Some(kubeconfig)), target("team-a/web"), None);
    // An agent's certificate may not ask; only one with the debug role.
    cfg.server = Some(server_query(&stack, &stack.pki.agent()));
    let refused = explain::run(cfg.clone()).await.expect("reads");
    let error = refused.explanations[0].server.as_ref().and_then(|s| s.error.clone()).unwrap_or_default();
    assert!(error.contains("urn:kiam:role:debug"), "{error}");
    let operator = stack.pki.debug("operator", None);
    cfg.server = Some(server_query(&stack, &operator));
    let report = explain::run(cfg.clone()).await.expect("reads");
    let server = report.explanations[0].server.clone().expect("asked the server");
    let cache = server.cache.unwrap_or_else(|| panic!("an answer: {:?}", server.error));
    // The entry is found only under the full key, external ID included.
    assert!(cache.known && cache.has_credentials && cache.fresh && !cache.refresh_due, "{cache:?}");
    assert!(cache.remaining_seconds > 3000 && cache.last_error.is_none(), "{cache:?}");
    assert_eq!(report.exit_code(), 0);
    let text = report.render();
    assert!(text.contains("served as they are") && !text.contains("ext-secret-77"), "{text}");

    // STS goes away; a new identity fails, and the server says why.
    stack.moto.stop();
    stack.kube.apply(pod("team-a", "unlucky").ip("10.66.0.2").role("app2").build());
    let ip2 = "10.66.0.2".parse().expect("ip");
    stack.wait_for_pod(ip2).await;
    let request = kiam::pb::GetPodCredentialsRequest { ip: "10.66.0.2".into(), role: "app2".into() };
    let mut grpc = stack.client(&stack.pki.agent()).service();
    grpc.get_pod_credentials(request).await.expect_err("STS is down");
    cfg.target = target("team-a/unlucky");
    let failed = || async {
        let report = explain::run(cfg.clone()).await.expect("reads");
        let cache = report.explanations[0].server.as_ref().and_then(|s| s.cache.clone());
        cache.filter(|c| !c.fetching && c.failures > 0)
    };
    let cache =
        crate::support::wait::eventually("the failure is reported", Duration::from_secs(10), failed).await;
    assert!(cache.known && !cache.has_credentials && cache.last_error.is_some(), "{cache:?}");

    // The debug certificate is refused credentials in turn.
    let status =
        stack.client(&operator).service().get_pod_credentials(request_again()).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    // Only certificates from the server's client CA may ask.
    cfg.server = Some(server_query(&stack, &stack.pki.stranger()));
    let refused = explain::run(cfg).await.expect("reads");
    assert!(refused.explanations[0].server.as_ref().is_some_and(|s| s.error.is_some()));
    assert_eq!(refused.exit_code(), 3);
}

/// Under `--session-tags` the cache keys an identity with its tags: `explain` sends them, so the
/// server finds the entry (it used to look the identity up without tags and report none).
#[tokio::test]
async fn the_server_finds_an_identity_with_session_tags() {
    use kiam::agent::Backend;
    use kiam::policy::session::{SessionTags, TagKey};
    let flags = vec!["--session-tags=kubernetes-namespace,kubernetes-pod-name"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("10.66.0.1").role("app").build());
    let ip = "10.66.0.1".parse().expect("ip");
    stack.wait_for_pod(ip).await;
    stack.client(&stack.pki.agent()).pod_credentials(ip, "app", 0).await.expect("credentials");

    let kubeconfig = stack.kube.write_kubeconfig(stack.pki.dir());
    let mut cfg = config(Inventory::Kube(Some(kubeconfig)), target("team-a/web"), None);
    let tags = |keys: Vec<TagKey>| {
        Some(SessionTags { keys, cluster_name: String::new(), cluster_arn: String::new() })
    };
    cfg.settings.policy.session_tags = tags(vec![TagKey::Namespace, TagKey::PodName]);
    cfg.server = Some(server_query(&stack, &stack.pki.debug("operator", None)));
    let cache = |report: Report| {
        let server = report.explanations[0].server.clone().expect("asked the server");
        server.cache.unwrap_or_else(|| panic!("an answer: {:?}", server.error))
    };
    let found = cache(explain::run(cfg.clone()).await.expect("reads"));
    assert!(found.known && found.has_credentials && found.fresh, "{found:?}");
    // The tags are part of the key: other tags name an identity the cache does not hold.
    cfg.settings.policy.session_tags = tags(vec![TagKey::Namespace]);
    let other = cache(explain::run(cfg).await.expect("reads"));
    assert!(!other.known, "{other:?}");
}
