//! Fault injection at the process level: a `kiam server` killed mid-request and started
//! again, and an agent whose `iptables` is missing or failing at start-up.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiam::agent::{self, Backend};
use kiam::client::{ClientConfig, GrpcClient};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;

use crate::support::agent_node::agent_config;
use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::metrics::sample;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::process::{free_port, kiam};
use crate::support::stack::{BASE_ARN, tls_files};
use crate::support::sts_faults::{Fault, StsFaults};
use crate::support::wait::until;

/// `kiam server` on `port` against the fake API server and `sts`, with metrics on `metrics`.
fn server(port: u16, metrics: u16, kubeconfig: &Path, sts: &str, tls: &CertFiles, log: &Path) -> Child {
    let (bind, metrics) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{metrics}"));
    let sa = ["server", "--bind", &bind, "--role-base-arn", BASE_ARN, "--sts-endpoint", sts];
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
    let args = [&sa[..], &["--prometheus-listen-addr", &metrics, "--kubeconfig", kubeconfig]].concat();
    kiam(&args, tls, log).spawn().expect("kiam server starts")
}

/// `kiam_sts_cache_miss_total`, from the server's metrics: the prefetch of a new pod makes
/// one, and a call that finds no credentials yet another.
async fn cache_misses(metrics: u16) -> u64 {
    let Ok(r) = request("GET", &format!("http://127.0.0.1:{metrics}/metrics"), &[], "", None).await else {
        return 0;
    };
    sample(&r.body, "kiam_sts_cache_miss_total").map_or(0, |v| v as u64)
}

/// The server dies (SIGKILL) while a credentials call waits on STS inside it, and comes back on
/// the same address: the agent's call, retried within its deadline, gets credentials.
#[tokio::test(flavor = "multi_thread")]
async fn a_server_killed_mid_request_and_restarted() {
    let pki = TestPki::new();
    let (kube, moto, faults) = (FakeKube::start().await, Moto::start().await, StsFaults::start().await);
    faults.forward_to(moto.addr());
    kube.apply(namespace("team-a").permitted(".*").build());
    kube.apply(pod("team-a", "web").ip("10.84.0.1").role("app").build());
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let (port, metrics) = (free_port(), free_port());
    faults.set(Fault::Hold);
    let log = |n: &str| pki.dir().join(format!("server-{n}.log"));
    let mut first = server(port, metrics, &kubeconfig, &faults.endpoint(), &pki.server(), &log("1"));

    let client = GrpcClient::connect_lazy(&ClientConfig {
        server_address: format!("127.0.0.1:{port}"),
        tls: tls_files(&pki.agent()),
        call_timeout: Duration::from_secs(30),
        token_file: None,
    })
    .expect("client");
    let pod_ip: IpAddr = "10.84.0.1".parse().expect("ip");
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.pod_credentials(pod_ip, "app", 0).await }
    });
    let in_flight = || async { cache_misses(metrics).await >= 2 && faults.held() >= 1 };
    until("the call waits on STS inside the server", Duration::from_secs(30), in_flight).await;

    first.kill().await.expect("kill the server");
    faults.set(Fault::None);
    let _second = server(port, metrics, &kubeconfig, &faults.endpoint(), &pki.server(), &log("2"));
    let creds = call.await.expect("task").expect("credentials from the restarted server");
    assert!(creds.access_key_id.starts_with("ASIA"), "{creds:?}");
}

/// Starts an agent with `--iptables` run by `program`, and returns how it ended.
async fn agent_with_iptables(program: Vec<String>) -> Result<(), agent::AgentStartError> {
    let pki = TestPki::new();
    let flags = ["--iptables", "--host", "127.0.0.1", "--port", "0", "--server-address", "127.0.0.1:9"];
    let config = agent_config(&pki.agent(), &flags);
    let metrics = Arc::new(kiam::metrics::Metrics::default());
    let backend = agent::connect(&config, &metrics, Arc::new(kiam::client::Dns)).expect("client");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let runner = agent::iptables::Command::with_program(program);
    let deps = agent::Deps {
        backend,
        listener,
        listener6: None,
        metrics_listener: None,
        metrics,
        iptables: runner,
        view_client: None,
    };
    let shutdown = CancellationToken::new();
    let running = agent::assemble(&config, deps, shutdown.clone()).expect("assembled");
    let ended = tokio::time::timeout(Duration::from_secs(20), running.wait()).await;
    shutdown.cancel();
    ended.expect("the agent stops by itself when its rules cannot be installed")
}

/// Without a working `iptables` the agent does not serve pods it cannot intercept: it stops
/// with the reason, whether the program is missing or fails.
#[tokio::test]
async fn a_missing_or_failing_iptables_stops_the_agent_at_start_up() {
    let missing = agent_with_iptables(vec!["/nonexistent/iptables".into()]).await;
    let error = missing.expect_err("no iptables").to_string();
    assert!(error.contains("cannot run") && error.contains("iptables"), "{error}");
    let failing = agent_with_iptables(vec!["false".into()]).await;
    let error = failing.expect_err("iptables fails").to_string();
    assert!(error.contains("failed"), "{error}");
}
