//! The `kiam` binary itself, as a DaemonSet would run it: `server` with kiam's flags against the
//! fake API server (through `--kubeconfig`) and moto (through `--sts-endpoint`), `agent` in
//! front of it, and `health` as the exec probe.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use tokio::process::Child;

use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::FakeImds;
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::process::{free_port, kiam};
use crate::support::stack::BASE_ARN;

async fn health(server: &str, tls: &CertFiles, timeout: &str, log: &Path) -> bool {
    // The Helm chart's probe still passes the deprecated --server-address-refresh.
    let args = ["health", "--server-address", server, "--timeout", timeout, "--server-address-refresh=2s"];
    let mut cmd = kiam(&args, tls, log);
    let status = tokio::time::timeout(Duration::from_secs(30), cmd.status()).await.expect("health returns");
    status.expect("health runs").success()
}

async fn wait_for_ping(url: &str) {
    let ping = format!("{url}/ping");
    let up = || async { request("GET", &ping, &[], "", None).await.is_ok_and(|r| r.body == "pong") };
    crate::support::wait::until("the agent answers /ping", Duration::from_secs(15), up).await;
}

#[tokio::test]
async fn server_agent_and_health_binaries_end_to_end() {
    let pki = TestPki::new();
    let (kube, moto, imds) = (FakeKube::start().await, Moto::start().await, FakeImds::start().await);
    kube.apply(namespace("team-a").permitted(".*").build());
    kube.apply(
        pod("team-a", "web")
            .ip("127.0.0.31")
            .role("app")
            .annotation("iam.amazonaws.com/external-id", "ext-secret-42")
            .build(),
    );
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let logs = pki.dir();
    moto.start_recording().await;
    let server_addr = format!("127.0.0.1:{}", free_port());

    let server_args = [
        "server",
        "--bind",
        &server_addr,
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--role-base-arn",
        BASE_ARN,
        "--sts-endpoint",
        &moto.endpoint(),
        "--json-log",
        "--level",
        "debug",
    ];
    let mut server: Child =
        kiam(&server_args, &pki.server(), &logs.join("server.log")).spawn().expect("server starts");
    assert!(
        health(&server_addr, &pki.agent(), "20s", &logs.join("health.log")).await,
        "kiam health passes once the server serves"
    );

    let agent_port = free_port().to_string();
    let imds_addr = imds.addr().to_string();
    let agent_args = [
        "agent",
        "--port",
        &agent_port,
        "--host",
        "127.0.0.1",
        "--server-address",
        &server_addr,
        "--metadata-addr",
        &imds_addr,
        "--json-log",
        "--level",
        "debug",
    ];
    let _agent = kiam(&agent_args, &pki.agent(), &logs.join("agent.log")).spawn().expect("agent starts");
    let agent_url = format!("http://127.0.0.1:{agent_port}");
    wait_for_ping(&agent_url).await;

    let pod_ip: IpAddr = "127.0.0.31".parse().expect("ip");
    let url = format!("{agent_url}/latest/meta-data/iam/security-credentials/app");
    let creds = request("GET", &url, &[], "", Some(pod_ip)).await.expect("credentials");
    assert_eq!(creds.status, 200, "{}", creds.body);
    let doc: serde_json::Value = serde_json::from_str(&creds.body).expect("JSON");
    let secret = doc["SecretAccessKey"].as_str().expect("secret").to_string();
    let token = doc["Token"].as_str().expect("token").to_string();
    let calls = moto.recorded_assume_roles().await;
    assert!(
        calls.iter().any(|c| c.external_id.as_deref() == Some("ext-secret-42")),
        "external ID sent: {calls:?}"
    );

    server.kill().await.expect("kill server");
    assert!(
        !health(&server_addr, &pki.agent(), "300ms", &logs.join("health2.log")).await,
        "no server, exit 1"
    );

    // Logs are JSON lines and never carry a secret, even at debug level.
    for name in ["server.log", "agent.log"] {
        let text = std::fs::read_to_string(logs.join(name)).expect("log");
        assert!(text.lines().any(|l| l.contains("\"pod.ip\"")), "{name} has request lines: {text}");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            serde_json::from_str::<serde_json::Value>(line)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
        }
        for s in [secret.as_str(), token.as_str(), "ext-secret-42", "server-secret-key"] {
            assert!(!text.contains(s), "{name} leaks a secret");
        }
    }
}

#[tokio::test]
async fn bad_flags_fail_at_start_up_with_a_clear_message() {
    let pki = TestPki::new();
    let cases: [(&[&str], &str); 4] = [
        (&["server", "--role-base-arn", BASE_ARN, "--session-duration", "10m"], "15m minimum"),
        (
            &["server", "--role-base-arn", BASE_ARN, "--session-refresh", "2h"],
            "must be shorter than --session-duration",
        ),
        (&["server", "--role-base-arn", "not-an-arn"], "invalid base ARN"),
        (&["agent", "--host", "127.0.0.1", "--allow-route-regexp", "("], "--allow-route-regexp"),
    ];
    for (i, (args, message)) in cases.iter().enumerate() {
        let log = pki.dir().join(format!("bad{i}.log"));
        let mut cmd = kiam(args, &pki.server(), &log);
        let status =
            tokio::time::timeout(Duration::from_secs(20), cmd.status()).await.expect("exits").expect("runs");
        assert!(!status.success(), "{args:?} must fail");
        let stderr = std::fs::read_to_string(&log).expect("log");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn autodetected_base_arn_and_a_chained_server_role() {
    let pki = TestPki::new();
    let (kube, moto, imds) = (FakeKube::start().await, Moto::start().await, FakeImds::start().await);
    moto.start_recording().await;
    kube.apply(namespace("team-a").permitted(".*").build());
    kube.apply(pod("team-a", "web").ip("127.0.0.32").role("app").build());
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let server_addr = format!("127.0.0.1:{}", free_port());
    let args = [
        "server",
        "--bind",
        &server_addr,
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--role-base-arn-autodetect",
        "--assume-role-arn",
        "kiam-server",
        "--sts-endpoint",
        &moto.endpoint(),
        "--region",
        "eu-west-1",
    ];
    let mut cmd = kiam(&args, &pki.server(), &pki.dir().join("server.log"));
    // The instance profile comes from the node's metadata service, over IMDSv2.
    cmd.env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url());
    let _server = cmd.spawn().expect("server starts");
    assert!(health(&server_addr, &pki.agent(), "20s", &pki.dir().join("health.log")).await, "server serves");

    let calls = wait_for_calls(&moto, 2).await;
    let base = "arn:aws:iam::123456789012:role/";
    assert_eq!(calls[0].role_arn, format!("{base}kiam-server"), "the server's own role first");
    assert_eq!(calls[0].session_name, "kiam-server");
    assert_eq!(calls[1].role_arn, format!("{base}app"), "then the pod's, through the detected base ARN");
    assert!(calls.iter().all(|c| c.region == "eu-west-1"), "{calls:?}");
    let iam_info =
        imds.requests().into_iter().find(|r| r.path == "/latest/meta-data/iam/info").expect("iam/info read");
    assert!(iam_info.header("x-aws-ec2-metadata-token").is_some(), "read with an IMDSv2 token");
}

async fn wait_for_calls(moto: &Moto, n: usize) -> Vec<crate::support::moto::AssumeRoleCall> {
    let recorded = || async {
        let calls = moto.recorded_assume_roles().await;
        (calls.len() >= n).then_some(calls)
    };
    crate::support::wait::eventually("moto records the calls", Duration::from_secs(20), recorded).await
}
