//! Certificates as kiam's cert-manager recipe issues them (`usages: [any]`: the extended key
//! usage anyExtendedKeyUsage, 2.5.29.37.0), and certificates without any EKU, work on both ends
//! of the link as they do with kiam (Go's crypto/tls): the server accepts such agents, agents and
//! `kiam health` accept such servers, and a pod gets credentials through them. A certificate whose
//! EKU names only another purpose (codeSigning) is still refused, and the logs say which file
//! (our own certificate, at load) or which peer, and why.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::ExtendedKeyUsagePurpose as Eku;
use tokio::process::Child;

use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::FakeImds;
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::process::{free_port, kiam};
use crate::support::stack::BASE_ARN;

/// A `kiam server` binary against the fake API server and moto, with `tls`.
struct Server {
    _child: Child,
    addr: String,
    log: std::path::PathBuf,
    _kube: FakeKube,
    _moto: Moto,
}

async fn server(pki: &TestPki, tls: &CertFiles, name: &str) -> Server {
    let (kube, moto) = (FakeKube::start().await, Moto::start().await);
    kube.apply(namespace("team-a").permitted(".*").build());
    kube.apply(pod("team-a", "web").ip("127.0.0.41").role("app").build());
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let addr = format!("127.0.0.1:{}", free_port());
    let log = pki.dir().join(format!("{name}.log"));
    let args = [
        "server",
        "--bind",
        &addr,
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--role-base-arn",
        BASE_ARN,
        "--sts-endpoint",
        &moto.endpoint(),
    ];
    let child = kiam(&args, tls, &log).spawn().expect("server starts");
    let listening = || async { tokio::net::TcpStream::connect(&addr).await.is_ok() };
    crate::support::wait::until("the server listens", Duration::from_secs(20), listening).await;
    Server { _child: child, addr, log, _kube: kube, _moto: moto }
}

/// `kiam health` against `server` presenting `tls`; its success and its log.
async fn health(server: &str, tls: &CertFiles, timeout: &str, log: &Path) -> (bool, String) {
    let args = ["health", "--server-address", server, "--timeout", timeout];
    let mut cmd = kiam(&args, tls, log);
    let status = tokio::time::timeout(Duration::from_secs(30), cmd.status()).await.expect("health returns");
    (status.expect("health runs").success(), std::fs::read_to_string(log).unwrap_or_default())
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn the_cert_manager_recipe_serves_a_pod_end_to_end() {
    let pki = TestPki::new();
    let server_any = pki.leaf_with_usages("server-any", true, &[Eku::Any]);
    let agent_any = pki.leaf_with_usages("agent-any", false, &[Eku::Any]);
    let s = server(&pki, &server_any, "server").await;
    let (healthy, log) = health(&s.addr, &agent_any, "20s", &pki.dir().join("health.log")).await;
    assert!(healthy, "kiam health with the recipe's certificates:\n{log}\n{}", read(&s.log));

    let imds = FakeImds::start().await;
    let (port, imds_addr) = (free_port().to_string(), imds.addr().to_string());
    let args = ["agent", "--port", &port, "--host", "127.0.0.1", "--server-address", &s.addr];
    let agent_log = pki.dir().join("agent.log");
    let mut cmd = kiam(&args, &agent_any, &agent_log);
    let _agent = cmd.args(["--metadata-addr", &imds_addr]).spawn().expect("agent starts");
    let base = format!("http://127.0.0.1:{port}");
    let ping = format!("{base}/ping");
    let up = || async { request("GET", &ping, &[], "", None).await.is_ok_and(|r| r.body == "pong") };
    crate::support::wait::until("the agent answers /ping", Duration::from_secs(15), up).await;

    let pod_ip: IpAddr = "127.0.0.41".parse().expect("ip");
    let url = format!("{base}/latest/meta-data/iam/security-credentials/app");
    let creds = request("GET", &url, &[], "", Some(pod_ip)).await.expect("an answer");
    assert_eq!(creds.status, 200, "{}\n{}\n{}", creds.body, read(&agent_log), read(&s.log));
    let doc: serde_json::Value = serde_json::from_str(&creds.body).expect("JSON");
    assert!(doc["AccessKeyId"].as_str().is_some_and(|k| !k.is_empty()), "{doc}");
}

/// `kiam certs inspect` applies the same rule: anyExtendedKeyUsage verifies for both roles,
/// codeSigning for neither.
#[tokio::test]
async fn inspect_applies_the_same_rule() {
    let pki = TestPki::new();
    let any = pki.leaf_with_usages("any", true, &[Eku::Any]);
    let signing = pki.leaf_with_usages("signing", true, &[Eku::CodeSigning]);
    let inspect = |leaf: &CertFiles| {
        let mut cmd = tokio::process::Command::new(crate::support::process::KIAM);
        cmd.args(["certs", "inspect", "--ca"]).arg(&leaf.ca).arg(&leaf.cert).kill_on_drop(true);
        cmd.output()
    };
    let out = inspect(&any).await.expect("inspect runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("as server:    verified") && text.contains("as client:    verified"), "{text}");
    let out = inspect(&signing).await.expect("inspect runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success() && text.matches("NOT verified").count() == 2, "{text}");
}

#[tokio::test]
async fn certificates_without_extended_key_usage_are_accepted_on_both_sides() {
    let pki = TestPki::new();
    let server_none = pki.leaf_with_usages("server-none", true, &[]);
    let agent_none = pki.leaf_with_usages("agent-none", false, &[]);
    let s = server(&pki, &server_none, "server").await;
    let (healthy, log) = health(&s.addr, &agent_none, "20s", &pki.dir().join("health.log")).await;
    assert!(healthy, "no EKU on either side:\n{log}\n{}", read(&s.log));
}

#[tokio::test]
async fn a_code_signing_certificate_is_refused_with_its_file_or_peer_and_why() {
    let pki = TestPki::new();
    let server_any = pki.leaf_with_usages("server-any", true, &[Eku::Any]);
    let agent_signing = pki.leaf_with_usages("agent-signing", false, &[Eku::CodeSigning]);
    let server_signing = pki.leaf_with_usages("server-signing", true, &[Eku::CodeSigning]);

    // An agent that signs code: the server refuses it and says which peer and why; the client
    // says at load which of its files is wrong and why.
    let s = server(&pki, &server_any, "server").await;
    let good = pki.leaf_with_usages("agent-any", false, &[Eku::Any]);
    let (healthy, log) = health(&s.addr, &good, "20s", &pki.dir().join("good.log")).await;
    assert!(healthy, "the server serves:\n{log}\n{}", read(&s.log));
    let (healthy, log) = health(&s.addr, &agent_signing, "2s", &pki.dir().join("agent-signing.log")).await;
    assert!(!healthy, "a codeSigning-only agent is refused:\n{log}");
    let file = agent_signing.cert.display().to_string();
    assert!(log.contains(&file) && log.contains("RequiredEkuNotFound"), "the file and why:\n{log}");
    let server_log = read(&s.log);
    assert!(
        server_log.contains("TLS handshake refused")
            && server_log.contains("127.0.0.1")
            && server_log.contains("extended key usage for client authentication"),
        "the peer and why:\n{server_log}"
    );

    // A server that signs code: refused by the client, which names it and says why; the server
    // says at load which of its files is wrong.
    let s = server(&pki, &server_signing, "server-signing").await;
    let (healthy, log) = health(&s.addr, &good, "3s", &pki.dir().join("server-signing-health.log")).await;
    assert!(!healthy, "a codeSigning-only server is refused:\n{log}");
    assert!(
        log.contains("server certificate refused")
            && log.contains("127.0.0.1")
            && log.contains("extended key usage for server authentication"),
        "the peer and why:\n{log}"
    );
    let file = server_signing.cert.display().to_string();
    let server_log = read(&s.log);
    assert!(server_log.contains(&file) && server_log.contains("RequiredEkuNotFound"), "{server_log}");
}
