//! `GET /v1/credentials`, the EKS-Pod-Identity-compatible endpoint, end to end: the pod is
//! identified by its projected ServiceAccount token (verified by the server against the fake API
//! server's published signing key), never by its address. Real SDKs (botocore, the Rust and node SDKs)
//! configured only through `AWS_CONTAINER_CREDENTIALS_FULL_URI` and
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` get their pod's role, a hostNetwork pod's included;
//! and every kind of bad token is refused.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::support::agent_node::TestAgent;
use crate::support::fake_kube_auth::{Signer, TokenIdentity};
use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::sdk;
use crate::support::stack::{ACCOUNT, Options, Stack};
use crate::support::wait::until;

const LIMIT: Duration = Duration::from_secs(15);

fn caller_arn(role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/kiam-kiam")
}

/// A stack with namespace `team-a` permitting every role and these pods: `web` (role `app`, at
/// 127.0.0.1, where the tests' and SDKs' requests come from) and
/// `host` (hostNetwork, at the node's address, role `host-role`) on node-a, `away` on node-b,
/// `plain` (no role) on node-a; and an agent whose certificate proves node-a.
pub(crate) async fn setup() -> (Stack, TestAgent) {
    let stack = Stack::start_with(Options::default()).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let pods = [
        pod("team-a", "web").ip("127.0.0.1").uid("uid-web").role("app").node("node-a"),
        pod("team-a", "host")
            .ip("127.0.0.190")
            .uid("uid-host")
            .role("host-role")
            .node("node-a")
            .host_network(true),
        pod("team-a", "away").ip("127.0.0.192").uid("uid-away").role("app").node("node-b"),
        pod("team-a", "plain").ip("127.0.0.193").uid("uid-plain").node("node-a"),
    ];
    for p in pods {
        stack.kube.apply(p.build());
    }
    let cluster = std::sync::Arc::clone(stack.core.cluster());
    until("the server knows every pod", LIMIT, move || {
        std::future::ready(
            ["web", "host", "away", "plain"].iter().all(|n| cluster.pod_by_name("team-a", n).is_some()),
        )
    })
    .await;
    let cert = stack.pki.agent_for_node("agent-node-a", "node-a");
    let agent = TestAgent::on_loopback_as(&cert, stack.server_addr, stack.imds.addr(), &[], |_| ()).await;
    (stack, agent)
}

/// Issues a token for `identity` and writes it to a file, as the kubelet projects it.
fn token_file(stack: &Stack, identity: TokenIdentity) -> PathBuf {
    let token = identity.jwt();
    stack.kube.issue_token(&token, identity.clone());
    let path = stack.pki.dir().join(format!("token-{}", identity.pod_uid));
    std::fs::write(&path, token).expect("write the token");
    path
}

async fn get(agent: &TestAgent, authorization: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = authorization.map(|a| ("authorization", a)).into_iter().collect();
    let url = format!("{}/v1/credentials", agent.url());
    let r = request("GET", &url, &headers, "", None).await.expect("an answer");
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_names_the_pod_and_the_answer_has_eks_pod_identitys_shape() {
    let (stack, agent) = setup().await;
    let identity = TokenIdentity::pod("team-a", "web", "uid-web", "node-a");
    let token = identity.jwt();
    stack.kube.issue_token(&token, identity);
    let (status, body) = get(&agent, Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).expect("JSON");
    for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
        assert!(json[field].as_str().is_some_and(|v| !v.is_empty()), "{field} in {body}");
    }
    assert_eq!(json["AccountId"], ACCOUNT);
    // The verdict is remembered: a second request makes no second TokenReview.
    let reviews = || stack.kube.requests().iter().filter(|r| r.contains("tokenreviews")).count();
    let before = reviews();
    assert_eq!(get(&agent, Some(&format!("Bearer {token}"))).await.0, 200);
    assert_eq!(reviews(), before, "a cached verdict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tokens() {
    let (stack, agent) = setup().await;
    let web = || TokenIdentity::pod("team-a", "web", "uid-web", "node-a");
    let issue = |identity: TokenIdentity| {
        let token = identity.jwt();
        stack.kube.issue_token(&token, identity);
        token
    };
    let unknown = TokenIdentity { signer: Signer::Forger, ..web() }.jwt();
    let cases: Vec<(&str, Option<String>, u16)> = vec![
        ("no token", None, 401),
        ("empty", Some("Bearer ".into()), 401),
        ("malformed", Some("not a token".into()), 401),
        ("signed by another key", Some(unknown), 401),
        ("wrong audience", Some(issue(TokenIdentity { audiences: vec!["vault".into()], ..web() })), 401),
        ("expired", Some(issue(TokenIdentity { expired: true, ..web() })), 401),
        ("not pod-bound", Some(issue(TokenIdentity { pod_uid: String::new(), ..web() })), 401),
        (
            "deleted pod (UID mismatch)",
            Some(issue(TokenIdentity::pod("team-a", "web", "uid-old", "node-a"))),
            401,
        ),
        ("pod on another node", Some(issue(TokenIdentity::pod("team-a", "away", "uid-away", "node-b"))), 403),
        (
            "pod without a role",
            Some(issue(TokenIdentity::pod("team-a", "plain", "uid-plain", "node-a"))),
            403,
        ),
    ];
    for (case, authorization, want) in cases {
        let (status, body) = get(&agent, authorization.as_deref()).await;
        assert_eq!(status, want, "{case}: {body}");
        if let Some(token) = authorization.as_deref().filter(|t| t.len() > 20) {
            assert!(!body.contains(token), "{case}: the answer repeats the token");
        }
    }
    // A pod deleted after its token was verified and cached is refused too.
    let token = issue(web());
    assert_eq!(get(&agent, Some(&token)).await.0, 200);
    stack.kube.delete("Pod", Some("team-a"), "web");
    let cluster = std::sync::Arc::clone(stack.core.cluster());
    until("the server forgets the pod", LIMIT, move || {
        std::future::ready(cluster.pod_by_name("team-a", "web").is_none())
    })
    .await;
    assert_eq!(get(&agent, Some(&token)).await.0, 401, "deleted pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_configured_only_by_the_two_variables_get_their_pods_role() {
    let (stack, agent) = setup().await;
    let full_uri = format!("{}/v1/credentials", agent.url());
    let sts = stack.moto.endpoint();
    let cases = [("web", "uid-web", "app"), ("host", "uid-host", "host-role")];
    for (name, uid, role) in cases {
        let file = token_file(&stack, TokenIdentity::pod("team-a", name, uid, "node-a"));
        let file = file.to_string_lossy().to_string();
        let (uri, f, s) = (full_uri.clone(), file.clone(), sts.clone());
        let (boto3, method) = tokio::task::spawn_blocking(move || sdk::boto3_container(&uri, &f, &s))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{name}: boto3: {e}"));
        assert_eq!(boto3.caller_arn, caller_arn(role), "{name}: boto3");
        assert_eq!(method, "container-role", "{name}: botocore's container provider");
        let (uri, f, s) = (full_uri.clone(), file.clone(), sts.clone());
        let rust = tokio::task::spawn_blocking(move || sdk::rust_sdk_container(&uri, &f, &s))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{name}: Rust SDK: {e}"));
        assert_eq!(rust.caller_arn, caller_arn(role), "{name}: Rust SDK");
        let (uri, f, s) = (full_uri.clone(), file.clone(), sts.clone());
        let node = tokio::task::spawn_blocking(move || sdk::node_sdk_container(&uri, &f, &s))
            .await
            .expect("join")
            .unwrap_or_else(|e| panic!("{name}: node SDK: {e}"));
        assert_eq!(node.caller_arn, caller_arn(role), "{name}: node SDK");
    }
}

/// Not a test: the Rust SDK's pod, run by [`sdk::rust_sdk_container`] as a child process with a
/// scrubbed environment. Does nothing when run any other way.
#[tokio::test]
#[ignore = "run by sdks_configured_only_by_the_two_variables_get_their_pods_role"]
async fn rust_sdk_container_probe() {
    let Some(sts) = std::env::var_os(sdk::RUST_PROBE_STS) else { return };
    sdk::rust_probe(&sts.to_string_lossy()).await.expect("the Rust SDK's default chain");
}
