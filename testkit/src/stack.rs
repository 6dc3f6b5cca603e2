//! A whole kiam-rs deployment in the test process: a server (fed by the fake API server through
//! a kubeconfig, calling moto for STS) and an agent (talking to it over mutual TLS, forwarding
//! allow-listed paths to a fake node metadata service), on real sockets.
//!
//! The agent listens on every interface, so that pods in network namespaces reach it at their
//! host-side veth address; tests that pose as pods from 127.0.0.x reach it on loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiam::agent;
use kiam::aws::Sts;
use kiam::cli::{Cli, Command};
use kiam::client::{ClientConfig, GrpcClient};
use kiam::core::Core;
use kiam::server;
use kiam::tls::TlsFiles;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent_node::agent_config;
use crate::certs::{CertFiles, TestPki};
use crate::fake_imds::FakeImds;
use crate::fake_kube::FakeKube;
use crate::moto::Moto;

/// The account every test role lives in.
pub const ACCOUNT: &str = "123456789012";
/// `--role-base-arn` of the test server.
pub const BASE_ARN: &str = "arn:aws:iam::123456789012:role/";

/// Knobs a test may turn.
pub struct Options {
    /// The agent's `--pod-wait-timeout`.
    pub pod_wait: Duration,
    /// The agent's `--allow-route-regexp`.
    pub allow_routes: &'static str,
    /// The server's `--prefetch-buffer-size`.
    pub prefetch_buffer: usize,
    /// The server's `--region`.
    pub region: &'static str,
    /// The server's `--agent-node-binding`.
    pub node_binding: bool,
    /// The server's node view (`--disable-node-view` when false).
    pub node_view: bool,
    /// More `kiam server` flags.
    pub server_flags: Vec<&'static str>,
    /// The server's `--cert/--key/--ca`, when not the PKI's own files (rotation tests).
    pub server_tls: Option<CertFiles>,
    /// The PKI to use instead of a fresh one.
    pub pki: Option<TestPki>,
    /// The server's `--grpc-max-connection-idle-duration`.
    pub max_connection_idle: Duration,
    /// The server's STS endpoint, when not moto itself (a fault-injecting proxy in front of it).
    pub sts_endpoint: Option<String>,
    /// How long each of the server's watches lasts (and, plus 5 s, may stay silent).
    pub watch_timeout: Duration,
    /// Resolves the server's `--peers` (the test's own name); `None`: the system resolver.
    pub peers: Option<Arc<dyn kiam::client::Resolve>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pod_wait: Duration::from_millis(300),
            allow_routes: "^$",
            prefetch_buffer: 1000,
            region: "us-east-1",
            node_binding: false,
            node_view: true,
            server_flags: Vec::new(),
            server_tls: None,
            pki: None,
            max_connection_idle: Duration::from_secs(900),
            sts_endpoint: None,
            watch_timeout: kiam::cluster::kube::WATCH_TIMEOUT,
            peers: None,
        }
    }
}

/// The running deployment; everything stops when it is dropped.
pub struct Stack {
    pub pki: TestPki,
    pub kube: FakeKube,
    pub moto: Moto,
    pub imds: FakeImds,
    pub server_addr: SocketAddr,
    pub agent_port: u16,
    /// The server's core, for tests that look inside (cache counters, the cluster view).
    pub core: Arc<Core<Sts>>,
    /// The server's TLS gauges.
    pub tls_gauges: kiam::metrics::TlsGauges,
    /// The agent's metrics (the server's are `core.metrics()`).
    pub agent_metrics: Arc<kiam::metrics::Metrics>,
    clients: std::sync::Mutex<Vec<GrpcClient>>,
    shutdown: CancellationToken,
}

/// One kiam server in the test process, fed by the fake API server (through a kubeconfig, as
/// `--kubeconfig` would give it) and calling moto for STS.
pub struct TestServer {
    pub core: Arc<Core<Sts>>,
    pub addr: SocketAddr,
    pub tls_gauges: kiam::metrics::TlsGauges,
    /// Cancelling it stops the server (its listener closes; calls in flight finish).
    pub shutdown: CancellationToken,
}

/// `kiam server` flags in the test's defaults: the fake API server through a kubeconfig, moto
/// for STS, and `options`.
pub fn server_config(kube: &FakeKube, moto: &Moto, pki: &TestPki, options: &Options) -> server::Config {
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let tls = options.server_tls.clone().unwrap_or_else(|| pki.server());
    let (cert, key, ca) = (tls.cert.to_string_lossy(), tls.key.to_string_lossy(), tls.ca.to_string_lossy());
    let endpoint = options.sts_endpoint.clone().unwrap_or_else(|| moto.endpoint());
    let kubeconfig = kubeconfig.to_string_lossy().to_string();
    let prefetch = options.prefetch_buffer.to_string();
    let idle = format!("{}ms", options.max_connection_idle.as_millis());
    let mut argv = vec![
        "kiam",
        "server",
        "--cert",
        &cert,
        "--key",
        &key,
        "--ca",
        &ca,
        "--kubeconfig",
        &kubeconfig,
        "--role-base-arn",
        BASE_ARN,
        "--region",
        options.region,
        "--sts-endpoint",
        &endpoint,
        "--prefetch-buffer-size",
        &prefetch,
        "--grpc-max-connection-idle-duration",
        &idle,
    ];
    if options.node_binding {
        argv.push("--agent-node-binding");
    }
    if !options.node_view {
        argv.push("--disable-node-view");
    }
    argv.extend(options.server_flags.iter().copied());
    let Command::Server(args) =
        Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command
    else {
        panic!("not a server command line: {argv:?}")
    };
    let mut config = args.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    // Rotation tests should not wait two seconds per step.
    config.tls_poll = Duration::from_millis(100);
    config.watch_timeout = options.watch_timeout;
    config
}

/// Starts a server on `listener`, assembled as `kiam server` assembles it (only STS's own
/// credentials differ: static ones, since moto checks none), and returns once its caches have
/// synced.
pub async fn start_server(
    kube: &FakeKube,
    moto: &Moto,
    pki: &TestPki,
    listener: TcpListener,
    options: &Options,
    shutdown: CancellationToken,
) -> TestServer {
    kiam::install_crypto_provider();
    let config = server_config(kube, moto, pki, options);
    let sdk = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .credentials_provider(aws_sdk_sts::config::SharedCredentialsProvider::new(
            aws_sdk_sts::config::Credentials::new("AKIDSERVER", "server-secret", None, None, "test"),
        ))
        .build();
    let sts = Sts::from_sdk_config(&sdk, &config.sts);
    let server::Inventoried { source, events, tokens, nodes } =
        server::open_inventory(&config, &shutdown).await.expect("the fake API server");
    let metrics = Arc::new(kiam::metrics::Metrics::default());
    let tls_gauges = metrics.tls_server.clone();
    let peers = options.peers.clone();
    let deps =
        server::Deps { sts, source, events, tokens, nodes, listener, metrics_listener: None, metrics, peers };
    let assembled =
        tokio::time::timeout(Duration::from_secs(20), server::assemble(&config, deps, shutdown.clone()));
    let server =
        assembled.await.expect("server caches sync within 20 s").expect("server starts").expect("running");
    TestServer { core: Arc::clone(&server.core), addr: server.addr, tls_gauges, shutdown }
}

/// TLS file paths in the library's shape.
pub fn tls_files(c: &CertFiles) -> TlsFiles {
    TlsFiles { cert: c.cert.clone(), key: c.key.clone(), ca: c.ca.clone() }
}

impl Stack {
    /// Starts with default options; the caller applies pods and namespaces to `kube` before or
    /// after.
    pub async fn start() -> Stack {
        Stack::start_with(Options::default()).await
    }

    /// Starts with a namespace `team-a` permitting every role, and one pod per `(net, name, role)`
    /// at that pod network's IP; returns once the server knows every pod.
    pub async fn with_pod_nets(pods: &[(&crate::netns::PodNet, &str, &str)]) -> Stack {
        use crate::objects::{namespace, pod};
        let stack = Stack::start().await;
        stack.kube.apply(namespace("team-a").permitted(".*").build());
        for (net, name, role) in pods {
            stack.kube.apply(pod("team-a", name).ip(&net.pod_ip.to_string()).role(role).build());
        }
        for (net, _, _) in pods {
            stack.wait_for_pod(IpAddr::V4(net.pod_ip)).await;
        }
        stack
    }

    /// Starts everything and returns once the server's caches have synced.
    pub async fn start_with(mut options: Options) -> Stack {
        kiam::install_crypto_provider();
        let pki = options.pki.take().unwrap_or_default();
        let kube = FakeKube::start().await;
        let moto = Moto::start().await;
        let imds = FakeImds::start().await;
        let shutdown = CancellationToken::new();

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind server");
        let server = start_server(&kube, &moto, &pki, listener, &options, shutdown.child_token()).await;
        let (core, server_addr, tls_gauges) = (server.core, server.addr, server.tls_gauges);

        // Agent, from `kiam agent` flags, assembled as `kiam agent` assembles it.
        let (server, upstream) = (format!("127.0.0.1:{}", server_addr.port()), imds.addr().to_string());
        let wait = format!("{}ms", options.pod_wait.as_millis());
        let flags = [
            "--host",
            "0.0.0.0",
            "--server-address",
            &server,
            "--metadata-addr",
            &upstream,
            "--pod-wait-timeout",
            &wait,
            "--allow-route-regexp",
            options.allow_routes,
        ];
        let config = agent_config(&pki.agent(), &flags);
        let agent_metrics = Arc::new(kiam::metrics::Metrics::default());
        let backend =
            agent::connect(&config, &agent_metrics, Arc::new(kiam::client::Dns)).expect("gRPC client");
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).await.expect("bind agent");
        let deps = agent::Deps {
            view_client: Some(backend.clone()),
            backend,
            listener,
            listener6: None,
            metrics_listener: None,
            metrics: Arc::clone(&agent_metrics),
            iptables: kiam::agent::iptables::Command::default(),
        };
        let running = agent::assemble(&config, deps, shutdown.clone()).expect("agent");
        let agent_port = running.addr.port();

        Stack {
            pki,
            kube,
            moto,
            imds,
            server_addr,
            agent_port,
            core,
            tls_gauges,
            agent_metrics,
            clients: std::sync::Mutex::default(),
            shutdown,
        }
    }

    /// The agent's base URL as seen from `host` (127.0.0.1, or a pod's host-side veth IP).
    pub fn agent_url(&self, host: impl Into<IpAddr>) -> String {
        format!("http://{}:{}", host.into(), self.agent_port)
    }

    /// Waits (bounded) until the server knows the pod at `ip`, so that a test does not race the
    /// watch that delivers it.
    pub async fn wait_for_pod(&self, ip: IpAddr) {
        let cluster = Arc::clone(self.core.cluster());
        let known = || std::future::ready(matches!(cluster.pod_by_ip(ip), kiam::cluster::Lookup::Found(_)));
        crate::wait::until("the server learns of the pod", Duration::from_secs(10), known).await;
    }

    /// Waits (bounded) until moto has recorded `n` AssumeRole calls, and returns them.
    pub async fn wait_for_sts_calls(&self, n: usize) -> Vec<crate::moto::AssumeRoleCall> {
        let recorded = || async {
            let calls = self.moto.recorded_assume_roles().await;
            (calls.len() >= n).then_some(calls)
        };
        crate::wait::eventually("moto records the calls", Duration::from_secs(20), recorded).await
    }

    /// A gRPC client of the server presenting `cert`. The stack keeps it alive, so that the raw
    /// `service()` of a temporary client keeps its server pool.
    pub fn client(&self, cert: &CertFiles) -> GrpcClient {
        let client = GrpcClient::connect_lazy(&ClientConfig {
            server_address: format!("127.0.0.1:{}", self.server_addr.port()),
            tls: tls_files(cert),
            call_timeout: Duration::from_secs(5),
            token_file: None,
        })
        .expect("gRPC client");
        self.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(client.clone());
        client
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
