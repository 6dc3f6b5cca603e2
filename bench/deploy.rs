//! The deployment the benchmarks measure: the real `kiam` binary (built with `--release`) as
//! server and agent, moto as STS, and the integration tests' fake API server as Kubernetes, all
//! on loopback. Pods are told apart by source address, so a benchmark poses as a pod by
//! connecting from the pod's 127.x.y.z address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiam::client::{ClientConfig, GrpcClient};
use kiam::tls::TlsFiles;
use serde_json::Value;
use tempfile::TempDir;

use crate::procs::{self, Child};
use kiam_testkit::certs::{CertFiles, TestPki};
use kiam_testkit::fake_kube::FakeKube;
use kiam_testkit::moto::Moto;
use kiam_testkit::objects;

/// `--role-base-arn`; every role lives in this account.
pub const BASE_ARN: &str = "arn:aws:iam::123456789012:role/";
/// What the server logs once its caches have synced, right before it serves.
pub const READY_LINE: &str = "caches synced; serving";
/// The node the benchmark agent runs on: its certificate names it, and the pods it serves are
/// scheduled there (`spec.nodeName`), so the server streams them in its node view.
pub const NODE: &str = "node-1";
/// How long a server may take to become ready (100k pods take seconds; this is the bound).
const READY_LIMIT: Duration = Duration::from_secs(120);

/// What every benchmark shares: the binary under test, certificates, moto and a scratch folder.
pub struct Env {
    pub kiam: PathBuf,
    pub pki: TestPki,
    pub moto: Moto,
    pub dir: TempDir,
}

impl Env {
    /// Starts moto and mints the certificates.
    pub async fn new(kiam: PathBuf) -> Env {
        kiam::install_crypto_provider();
        let dir = tempfile::Builder::new().prefix("kiam-bench-").tempdir().expect("create a scratch folder");
        Env { kiam, pki: TestPki::new(), moto: Moto::start().await, dir }
    }

    /// A scratch subfolder called `name` (created if needed).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("create a scratch subfolder");
        path
    }

    /// Starts `kiam server` against `kube` and waits until it logs that it serves. Returns the
    /// process, its port, and the time from spawning it to that log line.
    pub async fn server(&self, name: &str, kube: &FakeKube) -> (Child, u16, Duration) {
        self.server_with_sts(name, kube, &self.moto.endpoint()).await
    }

    /// [`server`](Self::server) with its STS calls sent to `sts` (figure 2's timing tap in
    /// front of moto).
    pub async fn server_with_sts(&self, name: &str, kube: &FakeKube, sts: &str) -> (Child, u16, Duration) {
        let port = procs::free_port();
        let (child, ready) = self.server_on(name, kube, port, sts).await;
        (child, port, ready)
    }

    /// [`server`](Self::server) on `port` (a server restarted where its agents expect it).
    /// Returns the process and the time from spawning it to its ready line.
    pub async fn server_at(&self, name: &str, kube: &FakeKube, port: u16) -> (Child, Duration) {
        self.server_on(name, kube, port, &self.moto.endpoint()).await
    }

    async fn server_on(&self, name: &str, kube: &FakeKube, port: u16, sts: &str) -> (Child, Duration) {
        let scratch = self.scratch(name);
        let kubeconfig = kube.write_kubeconfig(&scratch);
        let files = self.pki.server();
        let mut args = vec!["server".to_owned()];
        args.extend(flag("--bind", &format!("127.0.0.1:{port}")));
        args.extend(flag("--kubeconfig", &kubeconfig.display().to_string()));
        args.extend(flag("--role-base-arn", BASE_ARN));
        args.extend(flag("--sts-endpoint", sts));
        args.extend(flag("--region", "us-east-1"));
        args.push("--json-log".into());
        args.extend(tls_flags(&files));
        let home = scratch.display().to_string();
        let env = [
            ("HOME", home.as_str()),
            ("AWS_ACCESS_KEY_ID", "AKIDBENCH"),
            ("AWS_SECRET_ACCESS_KEY", "bench-secret"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
        ];
        let started = Instant::now();
        let mut child = Child::spawn(name, &self.kiam, &args, &env, &scratch);
        let ready = child.wait_for_log(READY_LINE, started, READY_LIMIT).await;
        (child, ready)
    }

    /// Starts `kiam agent` on 127.0.0.1 in front of the server on `server_port`, with a
    /// certificate naming [`NODE`] (so the server streams it that node's view) and its metrics on
    /// a port of its own, and waits until it listens.
    pub async fn agent(&self, name: &str, server_port: u16) -> Agent {
        self.agent_with(name, server_port, NODE, &[]).await
    }

    /// [`agent`](Self::agent) on `node`, with `extra` flags.
    pub async fn agent_with(&self, name: &str, server_port: u16, node: &str, extra: &[&str]) -> Agent {
        let scratch = self.scratch(name);
        let (port, metrics_port) = (procs::free_port(), procs::free_port());
        let mut args = vec!["agent".to_owned()];
        args.extend(flag("--host", "127.0.0.1"));
        args.extend(flag("--port", &port.to_string()));
        args.extend(flag("--server-address", &format!("127.0.0.1:{server_port}")));
        args.extend(flag("--prometheus-listen-addr", &format!("127.0.0.1:{metrics_port}")));
        args.extend(flag("--node-name", node));
        // Nothing listens there: no benchmark path may reach a metadata service.
        args.extend(flag("--metadata-addr", "127.0.0.1:9"));
        args.extend(tls_flags(&self.pki.agent_for_node(&format!("{name}-node"), node)));
        args.extend(extra.iter().map(|arg| (*arg).to_owned()));
        let home = scratch.display().to_string();
        let child = Child::spawn(name, &self.kiam, &args, &[("HOME", home.as_str())], &scratch);
        procs::wait_listening(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(20)).await;
        Agent { child, port, metrics_port }
    }

    /// The gRPC client of an agent of `node` (its certificate names the node), to the server on
    /// `server_port`: what the agent's node view uses.
    pub fn node_client(&self, server_port: u16, node: &str) -> GrpcClient {
        client_with(server_port, self.pki.agent_for_node(&format!("bench-client-{node}"), node))
    }

    /// The agent's own gRPC client (mutual TLS with the agent's certificate), to the server on
    /// `server_port`.
    pub fn client(&self, server_port: u16) -> GrpcClient {
        client_with(server_port, self.pki.agent())
    }
}

/// A gRPC client presenting `files` to the server on `server_port`.
fn client_with(server_port: u16, files: CertFiles) -> GrpcClient {
    GrpcClient::connect_lazy(&ClientConfig {
        server_address: format!("127.0.0.1:{server_port}"),
        tls: TlsFiles { cert: files.cert, key: files.key, ca: files.ca },
        call_timeout: Duration::from_secs(5),
        token_file: None,
    })
    .expect("build the gRPC client")
}

/// A running agent: the process, its metadata port and its metrics port.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
}

impl Agent {
    /// The value of the counter or gauge `name` (no labels) on the agent's `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let page = kiam_testkit::http::get(&url, None).await.expect("scrape the agent's metrics");
        assert_eq!(page.status, 200, "agent /metrics: {}", page.body);
        page.body
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("the agent's /metrics has no {name}"))
    }

    /// Waits (at most `limit`) until the agent's node view is live and holds `entries` entries.
    pub async fn wait_view(&self, entries: usize, limit: Duration) {
        let started = Instant::now();
        loop {
            let (live, held) =
                (self.metric("kiam_agent_view_live").await, self.metric("kiam_agent_view_entries").await);
            if live == 1.0 && held as usize == entries {
                return;
            }
            assert!(
                started.elapsed() < limit,
                "the agent's node view is not live with {entries} entries after {limit:?} \
                 (live {live}, {held} entries):\n{}",
                self.child.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn flag(name: &str, value: &str) -> [String; 2] {
    [name.to_owned(), value.to_owned()]
}

fn tls_flags(files: &CertFiles) -> Vec<String> {
    let path = |p: &Path| p.display().to_string();
    [flag("--cert", &path(&files.cert)), flag("--key", &path(&files.key)), flag("--ca", &path(&files.ca))]
        .concat()
}

/// A namespace whose pods may assume any role whose name starts with `role_prefix`.
pub fn namespace(name: &str, role_prefix: &str) -> Value {
    objects::namespace(name).permitted(&format!("{BASE_ARN}{role_prefix}.*")).build()
}

/// A running pod at `ip` with `role`, shaped like a Deployment's pod (labels, node, an owner).
pub fn pod(namespace: &str, name: &str, ip: IpAddr, role: &str, node: &str) -> Value {
    let mut pod = objects::pod(namespace, name)
        .ip(&ip.to_string())
        .role(role)
        .node(node)
        .label("app", namespace)
        .label("pod-template-hash", "5d8f7c9b6d")
        .build();
    pod["metadata"]["ownerReferences"] = serde_json::json!([{
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": format!("{namespace}-5d8f7c9b6d"),
        "uid": "0b8c3e0c-7a39-4d6b-9a55-4c1f5b0d2e11", "controller": true, "blockOwnerDeletion": true,
    }]);
    pod
}

/// The `n`-th address of `base`'s /8 or /16 block, counting from `base + 1`.
pub fn nth_ip(base: Ipv4Addr, n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(base) + 1 + n))
}

/// How many pods the server said it had when its caches synced (from its JSON log line).
pub fn synced_pods(server: &Child) -> Option<u64> {
    let log = server.log();
    let line = log.lines().find(|line| line.contains(READY_LINE))?;
    serde_json::from_str::<Value>(line).ok()?["pods"].as_u64()
}

/// An STS client of moto from this process, as the server builds one (static credentials).
pub fn sts(env: &Env) -> kiam::aws::Sts {
    let credentials = aws_sdk_sts::config::Credentials::new("AKIDBENCH", "bench-secret", None, None, "bench");
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sts::config::SharedCredentialsProvider::new(credentials))
        .build();
    let config = kiam::aws::StsConfig { endpoint: Some(env.moto.endpoint()), ..Default::default() };
    kiam::aws::Sts::from_sdk_config(&sdk, &config)
}

/// The identity a pod with role `name` and no session annotation gets.
pub fn identity(name: &str) -> kiam::creds::Identity {
    let base = kiam::model::BaseArn::parse(BASE_ARN).expect("the base ARN parses");
    let role = kiam::model::RoleArn::resolve(name, Some(&base)).expect("the role resolves");
    kiam::creds::Identity::plain(role, "kiam-kiam".into(), None)
}
