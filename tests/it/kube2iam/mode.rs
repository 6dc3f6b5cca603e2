//! kube2iam mode: the binary run as `kube2iam` with the flag set of kube2iam's README DaemonSet
//! serves real SDKs in pods through its own iptables rule; in-process, kube2iam's semantics
//! (default role, cross-account ARNs, a custom role key, external IDs, namespace restrictions)
//! and not its holes (debug store, user-data, the node's credentials).

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiam::agent::iptables::{self, Interception};
use kiam::aws::Sts;
use kiam::cluster::kube::KubeSource;
use kiam::kube2iam::{self, Kube2iamCli};
use kiam::metrics::Metrics;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::block_in_place;
use tokio_util::sync::CancellationToken;

use crate::support::certs::TestPki;
use crate::support::fake_imds::{FakeImds, INSTANCE_ID, NODE_ACCESS_KEY_ID};
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::moto::Moto;
use crate::support::netns::{NodeNet, PodNet, Relay};
use crate::support::objects::{namespace, pod};
use crate::support::process::kiam_explain;
use crate::support::sdk;
use crate::support::wait::until;

const KIAM: &str = env!("CARGO_BIN_EXE_kiam");
const BASE: &str = "arn:aws:iam::123456789012:role/";
const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn assumed(account: &str, role: &str) -> String {
    format!("arn:aws:sts::{account}:assumed-role/{role}/kiam-kube2iam")
}

/// A relay inside `node` (on its loopback) to a peer on the test's loopback.
fn relay_into(node: &NodeNet, target: SocketAddr) -> Relay {
    Relay::on(node.run_in(|| std::net::TcpListener::bind("127.0.0.1:0")).expect("bind in node"), target)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_readme_daemonset_serves_sdks_in_pods_through_its_iptables_rule() {
    let node = NodeNet::create();
    let (alpha, beta) = (PodNet::create_in(&node), PodNet::create_in(&node));
    let (kube, moto, imds) = (FakeKube::start().await, Moto::start().await, FakeImds::start().await);
    kube.apply(namespace("team-a").build());
    kube.apply(
        pod("team-a", "alpha").ip(&alpha.pod_ip.to_string()).role("alpha-role").node("node-k").build(),
    );
    kube.apply(pod("team-a", "beta").ip(&beta.pod_ip.to_string()).role("beta-role").node("node-k").build());
    let api = relay_into(&node, kube.url().trim_start_matches("http://").parse().expect("addr"));
    let sts = relay_into(&node, moto.addr());
    let metadata = relay_into(&node, imds.addr());

    // The image's entrypoint link: the same binary, named kube2iam.
    let pki = TestPki::new();
    let link = pki.dir().join("kube2iam");
    std::os::unix::fs::symlink(KIAM, &link).expect("link kube2iam");
    let host_ip = node.agent_ip.to_string();
    let flags = [
        "--base-role-arn=arn:aws:iam::123456789012:role/".to_string(),
        "--node=node-k".into(),
        "--iptables=true".into(),
        format!("--host-ip={host_ip}"),
        "--host-interface=kv+".into(),
        "--app-port=8181".into(),
        "--metrics-port=9191".into(),
        "--verbose".into(),
        "--debug=true".into(),
        format!("--api-server={}", api.url()),
        "--api-token=fake-token".into(),
        format!("--metadata-addr={}", metadata.addr()),
    ];
    let log = pki.dir().join("kube2iam.log");
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &node.name])
        .arg(&link)
        .args(&flags)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "AKIDNODE")
        .env("AWS_SECRET_ACCESS_KEY", "node-secret")
        .env("AWS_ENDPOINT_URL_STS", sts.url())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .kill_on_drop(true)
        .spawn()
        .expect("kube2iam starts");
    let target = std::net::SocketAddrV4::new(node.agent_ip, 8181);
    let rules = iptables::Config {
        interface: "kv+".parse().expect("interface"),
        target,
        target6: None,
        chain: iptables::DEFAULT_CHAIN.into(),
        remove_at_exit: true,
        check_interval: Duration::from_secs(5),
        container: false,
        connlimit: None,
    };
    let check = Arc::new(Interception::new(iptables::Command::with_program(node.iptables_program()), rules));
    let installed = || {
        let check = Arc::clone(&check);
        async move { check.is_installed().await.unwrap_or(false) }
    };
    until("kube2iam installs its rules", Duration::from_secs(30), installed).await;
    let ready =
        || std::future::ready(std::fs::read_to_string(&log).unwrap_or_default().contains("agent listening"));
    until("kube2iam serves", Duration::from_secs(30), ready).await;

    let sts_url = moto.endpoint();
    let boto3 = block_in_place(|| sdk::boto3_at(&alpha, None, &sts_url));
    let rust = block_in_place(|| sdk::rust_sdk_at(&beta, None, &sts_url));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let (boto3, rust) =
        (boto3.unwrap_or_else(|e| panic!("{e}\n{text}")), rust.unwrap_or_else(|e| panic!("{e}\n{text}")));
    assert_eq!(boto3.caller_arn, assumed("123456789012", "alpha-role"));
    assert_eq!(rust.caller_arn, assumed("123456789012", "beta-role"));
    assert!(boto3.access_key_id != rust.access_key_id && boto3.access_key_id != NODE_ACCESS_KEY_ID);
    // /healthz through the metadata address, as kube2iam answers it.
    let health =
        block_in_place(|| crate::support::agent_node::pod_get(&alpha, "http://169.254.169.254/healthz"))
            .expect("healthz");
    let body: Value = serde_json::from_str(&health.body).expect("JSON");
    assert_eq!(
        (health.status, body["hostIP"].as_str(), body["instanceId"].as_str()),
        (200, Some(host_ip.as_str()), Some(INSTANCE_ID))
    );

    // /debug/store is not for pods, even on the node's address.
    let store = format!("http://{host_ip}:9191/debug/store");
    let store = block_in_place(|| crate::support::agent_node::pod_get(&alpha, &store)).expect("answer");
    assert_eq!(store.status, 403, "{}", store.body);

    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child we spawned (`ip netns exec` execs in place).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status =
        tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("exits").expect("wait");
    assert!(status.success(), "{status}: {}", std::fs::read_to_string(&log).unwrap_or_default());
    // The rule stays, as kube2iam's did: while the process restarts, pods are refused rather than
    // reaching the node's own metadata service.
    assert!(check.is_installed().await.expect("check"), "rules kept at exit:\n{}", node.nat_rules());
}

/// kube2iam mode in the test process, assembled as `kube2iam` assembles it, from `flags`.
pub(crate) struct InProcess {
    pub(crate) kube: FakeKube,
    pub(crate) moto: Moto,
    pub(crate) imds: FakeImds,
    _pki: TestPki,
    pub(crate) url: String,
    metrics_url: String,
    shutdown: CancellationToken,
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn start(flags: &[&str], objects: Vec<Value>) -> InProcess {
    kiam::install_crypto_provider();
    let (kube, moto, imds, pki) =
        (FakeKube::start().await, Moto::start().await, FakeImds::start().await, TestPki::new());
    for object in objects {
        kube.apply(object);
    }
    moto.start_recording().await;
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let mut argv = vec!["kube2iam".to_string(), format!("--kubeconfig={}", kubeconfig.display())];
    argv.push(format!("--metadata-addr={}", imds.addr()));
    argv.push("--metrics-port=1".into());
    argv.extend(flags.iter().map(|f| f.to_string()));
    let args = Kube2iamCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).args;
    let config = args.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .credentials_provider(aws_sdk_sts::config::SharedCredentialsProvider::new(
            aws_sdk_sts::config::Credentials::new("AKIDNODE", "node-secret", None, None, "test"),
        ))
        .build();
    let sts_config = kiam::aws::StsConfig { endpoint: Some(moto.endpoint()), ..Default::default() };
    let sts = Sts::from_sdk_config(&sdk, &sts_config);
    let source = KubeSource::connect_with(&config.access, config.insecure)
        .await
        .expect("fake API server")
        .with_projection(config.projection.clone())
        .on_node(config.node.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind metrics");
    let (url, metrics_url) = (
        format!("http://{}", listener.local_addr().expect("addr")),
        format!("http://{}", metrics_listener.local_addr().expect("addr")),
    );
    let deps = kube2iam::Deps {
        sts,
        source,
        listener,
        metrics_listener: Some(metrics_listener),
        metrics: Arc::new(Metrics::with_kube2iam()),
        iptables: iptables::Command::default(),
    };
    let shutdown = CancellationToken::new();
    let running =
        tokio::time::timeout(Duration::from_secs(20), kube2iam::assemble(&config, deps, shutdown.clone()))
            .await
            .expect("syncs within 20 s")
            .expect("starts")
            .expect("running");
    std::mem::forget(running.agent);
    InProcess { kube, moto, imds, _pki: pki, url, metrics_url, shutdown }
}

pub(crate) async fn get(k: &InProcess, from: &str, path: &str) -> (u16, String) {
    let from = Some(from.parse::<IpAddr>().expect("ip"));
    let r = request("GET", &format!("{}{path}", k.url), &[], "", from).await.expect("answer");
    (r.status, r.body)
}

fn key(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["AccessKeyId"].as_str().map(str::to_string))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn kube2iam_semantics_default_role_cross_account_role_key_and_external_ids() {
    let objects = vec![
        namespace("team-a").build(),
        pod("team-a", "plain").ip("127.0.0.201").node("node-k").build(),
        pod("team-a", "cross")
            .ip("127.0.0.202")
            .annotation("example.com/role", "arn:aws:iam::999999999999:role/other-account")
            .node("node-k")
            .build(),
        pod("team-a", "ext-1")
            .ip("127.0.0.203")
            .annotation("example.com/role", "app")
            .annotation("iam.amazonaws.com/external-id", "one")
            .node("node-k")
            .build(),
        pod("team-a", "ext-2")
            .ip("127.0.0.204")
            .annotation("example.com/role", "app")
            .annotation("iam.amazonaws.com/external-id", "two")
            .node("node-k")
            .build(),
        pod("team-a", "wrong-key").ip("127.0.0.205").role("app").node("node-k").build(),
        pod("team-a", "elsewhere")
            .ip("127.0.0.206")
            .annotation("example.com/role", "app")
            .node("node-other")
            .build(),
    ];
    let flags = [
        &*format!("--base-role-arn={BASE}"),
        "--default-role=fallback",
        "--iam-role-key=example.com/role",
        "--node=node-k",
    ];
    let k = start(&flags, objects).await;
    // No annotation: the default role, listed and served.
    assert_eq!(get(&k, "127.0.0.201", CREDS).await, (200, "fallback".into()));
    assert_eq!(get(&k, "127.0.0.201", &format!("{CREDS}fallback")).await.0, 200);
    // A full ARN from another account is used as is.
    assert_eq!(get(&k, "127.0.0.202", CREDS).await, (200, "other-account".into()));
    assert_eq!(get(&k, "127.0.0.202", &format!("{CREDS}other-account")).await.0, 200);
    // A pod annotated under kiam's key is unannotated for --iam-role-key: the default role.
    assert_eq!(get(&k, "127.0.0.205", CREDS).await, (200, "fallback".into()));
    // Another role than the pod's: refused.
    assert_eq!(get(&k, "127.0.0.205", &format!("{CREDS}app")).await.0, 404);
    // Two pods whose roles differ only by external ID get different credentials (kube2iam's
    // cache keyed by role alone gave the second pod the first one's).
    let (one, two) = (
        get(&k, "127.0.0.203", &format!("{CREDS}app")).await,
        get(&k, "127.0.0.204", &format!("{CREDS}app")).await,
    );
    assert_eq!((one.0, two.0), (200, 200));
    assert_ne!(key(&one.1), key(&two.1));
    let calls = k.moto.recorded_assume_roles().await;
    let ext: Vec<_> = calls
        .iter()
        .filter(|c| c.role_arn.ends_with("role/app"))
        .filter_map(|c| c.external_id.clone())
        .collect();
    assert!(ext.contains(&"one".to_string()) && ext.contains(&"two".to_string()), "{calls:?}");
    assert!(calls.iter().any(|c| c.role_arn == "arn:aws:iam::999999999999:role/other-account"));
    assert!(calls.iter().all(|c| c.session_name == "kiam-kube2iam"), "{calls:?}");
    // --node: another node's pod is not watched at all.
    assert_eq!(get(&k, "127.0.0.206", CREDS).await.0, 404);
    // kube2iam's metric names.
    let metrics =
        request("GET", &format!("{}/metrics", k.metrics_url), &[], "", None).await.expect("metrics").body;
    for name in [
        "kube2iam_iam_request_duration_seconds_bucket",
        "kube2iam_http_request_duration_seconds_bucket",
        "kube2iam_info",
    ] {
        assert!(metrics.contains(name), "{name} missing");
    }
    assert!(metrics.contains("kube2iam_iam_cache_hits_total{role_arn="), "cache hits by role");
}

#[tokio::test(flavor = "multi_thread")]
async fn namespace_restrictions_and_what_pods_may_not_reach() {
    let allowed =
        |name: &str, roles: &str| namespace(name).annotation("iam.amazonaws.com/allowed-roles", roles);
    let objects = vec![
        allowed("globbed", r#"["app-*"]"#).build(),
        allowed("broken", "not json").build(),
        namespace("bare").build(),
        pod("globbed", "yes").ip("127.0.0.211").role("app-one").build(),
        pod("globbed", "no").ip("127.0.0.212").role("db").build(),
        pod("broken", "b").ip("127.0.0.213").role("app-one").build(),
        pod("bare", "c").ip("127.0.0.214").role("app-one").build(),
        pod("bare", "d").ip("127.0.0.215").build(),
    ];
    let flags = [
        &*format!("--base-role-arn={BASE}"),
        "--namespace-restrictions",
        "--default-role=fallback",
        "--debug=true",
    ];
    let k = start(&flags, objects).await;
    assert_eq!(get(&k, "127.0.0.211", &format!("{CREDS}app-one")).await.0, 200);
    assert_eq!(get(&k, "127.0.0.212", &format!("{CREDS}db")).await.0, 403, "not in the allowed list");
    assert_eq!(get(&k, "127.0.0.213", &format!("{CREDS}app-one")).await.0, 403, "malformed JSON denies");
    assert_eq!(get(&k, "127.0.0.214", &format!("{CREDS}app-one")).await.0, 403, "no annotation denies");
    assert_eq!(get(&k, "127.0.0.215", &format!("{CREDS}fallback")).await.0, 200, "the default role bypasses");
    // What kube2iam proxied and this refuses: the node's credentials and user-data; the harmless
    // paths pass.
    for (path, status) in [
        ("/latest/meta-data/iam/info", 404),
        ("/latest/user-data", 404),
        ("/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance", 404),
        ("/latest/dynamic/instance-identity/signature", 404),
        ("/latest/meta-data/instance-id", 200),
        ("/latest/meta-data/placement/region", 200),
        ("/latest/dynamic/instance-identity/document", 200),
    ] {
        let (got, body) = get(&k, "127.0.0.211", path).await;
        assert_eq!(got, status, "{path}: {body}");
        assert!(!body.contains(NODE_ACCESS_KEY_ID));
    }
    // Identity by token is kiam's: here the container endpoint says so, whatever the token.
    let from = Some("127.0.0.211".parse::<IpAddr>().expect("ip"));
    let url = format!("{}/v1/credentials", k.url);
    let token = request("GET", &url, &[("authorization", "eyJ.x.y")], "", from).await.expect("answer");
    assert_eq!((token.status, token.body.trim()), (404, kiam::agent::container::NOT_SERVED));
    // /debug/store only on the metrics port, only to loopback callers.
    assert_eq!(get(&k, "127.0.0.211", "/debug/store").await.0, 404, "never on the metadata port");
    let store =
        request("GET", &format!("{}/debug/store", k.metrics_url), &[], "", None).await.expect("store");
    let store: Value = serde_json::from_str(&store.body).expect("JSON");
    assert_eq!(store["rolesByIP"]["127.0.0.211"], "app-one");
    assert_eq!(store["rolesByNamespace"]["globbed"][0], "app-*");
    // Restrictions follow annotation edits.
    k.kube.apply(allowed("globbed", r#"["db"]"#).build());
    let edited = || async { get(&k, "127.0.0.212", &format!("{CREDS}db")).await.0 == 200 };
    until("the edited allowed-roles apply", Duration::from_secs(10), edited).await;
}

/// `kiam explain --kube2iam` decides as kube2iam mode does: the default role for an unannotated
/// pod, and the namespace's allowed-roles.
#[tokio::test]
async fn explain_follows_kube2iam_rules() {
    let pki = TestPki::new();
    let manifest = pki.dir().join("k2i.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    iam.amazonaws.com/allowed-roles: '[\"app-*\"]'\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: plain\n  namespace: ns\nspec:\n  containers: [{name: c}]\nstatus:\n  podIP: 10.0.0.1\n  phase: Running\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: db\n  namespace: ns\n  annotations:\n    iam.amazonaws.com/role: db\nspec:\n  containers: [{name: c}]\nstatus:\n  podIP: 10.0.0.2\n  phase: Running\n",
    )
    .expect("manifest");
    let manifest = manifest.to_str().expect("utf-8 path");
    let flags = ["-f", manifest, "--role-base-arn", BASE, "--kube2iam", "--default-role", "fallback"];
    let run = |pod: &'static str| async move {
        let out =
            kiam_explain(&[&flags[..], &["--namespace-restrictions", "-o", "json", pod]].concat()).await;
        (out.code, out.json())
    };
    let (code, plain) = run("ns/plain").await;
    assert_eq!(code, 0, "{plain}");
    assert_eq!(plain["verdict"]["reason"], "pod ns/plain may assume arn:aws:iam::123456789012:role/fallback");
    let (code, db) = run("ns/db").await;
    assert_eq!(code, 1, "{db}");
    assert_eq!(db["verdict"]["code"], "namespace-forbids");
    assert!(db["namespace"]["permitted"].as_str().is_some_and(|p| p.contains("app-*")), "{db}");
}
