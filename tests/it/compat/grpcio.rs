//! Wire compatibility with kiam, through grpcio (an independent gRPC implementation): a grpcio
//! client calls our server as a kiam v4 agent would, and our agent is served by a grpcio server
//! that answers as a kiam v4 server does. Together: a mixed fleet works during a migration.

use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::support::agent_node::{TestAgent, agent_config};
use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::FakeImds;
use crate::support::http::request;
use crate::support::moto::venv_bin;
use crate::support::objects::{namespace, pod};
use crate::support::stack::Stack;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/py/kiam_grpc.py");

fn python(mode: &str, target: Option<&str>, files: &CertFiles) -> Command {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(SCRIPT).arg(mode);
    if let Some(target) = target {
        cmd.arg(target);
    }
    cmd.arg(&files.ca).arg(&files.cert).arg(&files.key);
    cmd
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grpcio_client_gets_what_a_kiam_agent_expects_from_our_server() {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(pod("team-a", "web").ip("10.80.0.1").role("app").build());
    stack.kube.apply(pod("locked", "blocked").ip("10.80.0.2").role("app").build());
    stack.wait_for_pod("10.80.0.1".parse().expect("ip")).await;
    stack.wait_for_pod("10.80.0.2".parse().expect("ip")).await;
    let calls = json!([
        {"rpc": "GetHealth"},
        {"rpc": "GetPodRole", "ip": "10.80.0.1"},
        {"rpc": "GetPodCredentials", "ip": "10.80.0.1", "role": "app"},
        {"rpc": "GetPodCredentials", "ip": "10.80.0.2", "role": "app"},
        // kiam agents call within their 5 s handler deadline; the server waits for the pod within it.
        {"rpc": "GetPodCredentials", "ip": "10.80.0.9", "role": "app", "timeout": 2},
        {"rpc": "GetPodRole", "ip": "10.80.0.9", "timeout": 1},
    ]);
    let target = format!("127.0.0.1:{}", stack.server_addr.port());
    let mut cmd = python("client", Some(&target), &stack.pki.agent());
    let results: Value = tokio::task::block_in_place(|| {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python");
        child.stdin.take().expect("stdin").write_all(calls.to_string().as_bytes()).expect("write");
        let out = child.wait_with_output().expect("client runs");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("JSON results")
    });
    assert_eq!(results[0]["ok"]["message"], "ok");
    assert_eq!(results[1]["ok"]["name"], "app");
    let creds = &results[2]["ok"];
    assert_eq!((creds["code"].as_str(), creds["type"].as_str()), (Some("Success"), Some("AWS-HMAC")));
    assert!(creds["access_key_id"].as_str().is_some_and(|k| k.starts_with("ASIA")), "{creds}");
    assert_eq!((creds["secret_access_key"].as_bool(), creds["token"].as_bool()), (Some(true), Some(true)));
    assert!(kiam::creds::time::parse(creds["expiration"].as_str().expect("expiration")).is_some());
    // kiam agents compare these messages exactly.
    assert_eq!(results[3]["details"], "forbidden by policy");
    assert_eq!(results[4]["details"], "no pod found");
    assert_eq!(results[5]["details"], "pod not found");
}

#[tokio::test(flavor = "multi_thread")]
async fn our_agent_is_served_by_a_grpcio_server_speaking_kiam_v4() {
    kiam::install_crypto_provider();
    let pki = TestPki::new();
    let imds = FakeImds::start().await;
    let mut child = python("server", None, &pki.server())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the grpcio server");
    let port = tokio::task::block_in_place(|| {
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("PORT line");
        line.trim().strip_prefix("PORT ").and_then(|p| p.parse::<u16>().ok()).expect("a port")
    });
    let server = format!("127.0.0.1:{port}");
    let upstream = imds.addr().to_string();
    let flags = ["--host", "127.0.0.1", "--server-address", &server, "--metadata-addr", &upstream];
    let config = agent_config(&pki.agent(), &flags);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let agent = TestAgent::assemble(&config, listener, kiam::agent::iptables::Command::default());
    let url = format!("{}/latest/meta-data/iam/security-credentials/", agent.url());
    let from = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));

    let listed = request("GET", &url, &[], "", from("127.0.0.71")).await.expect("answer");
    assert_eq!((listed.status, listed.body.as_str()), (200, "py-role"));
    let creds = request("GET", &format!("{url}py-role"), &[], "", from("127.0.0.71")).await.expect("answer");
    assert_eq!(creds.status, 200, "{}", creds.body);
    let doc: Value = serde_json::from_str(&creds.body).expect("JSON");
    assert_eq!(doc["AccessKeyId"], "ASIAPYTHONSERVER0001");
    // kiam servers send every error as Unknown; the message decides, as it did for kiam agents.
    let denied = request("GET", &format!("{url}py-role"), &[], "", from("127.0.0.72")).await.expect("answer");
    assert_eq!(denied.status, 403, "{}", denied.body);
    let unknown = request("GET", &url, &[], "", from("127.0.0.73")).await.expect("answer");
    assert_eq!(unknown.status, 404, "{}", unknown.body);
    // Identity by token is ours alone: a kiam server has no such call, and the pod is told so.
    let token_url = format!("{}/v1/credentials", agent.url());
    let token = request("GET", &token_url, &[("authorization", "eyJ.x.y")], "", from("127.0.0.71")).await;
    let token = token.expect("answer");
    assert_eq!(token.status, 404, "{}", token.body);
    assert!(token.body.contains("does not serve identity by token"), "{}", token.body);
    drop(agent);
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}
