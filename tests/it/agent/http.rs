//! The agent's HTTP surface against a real server, posing as pods from 127.0.0.x source
//! addresses: the credential paths, IMDSv2 tokens, denials, what may reach the node's metadata
//! service, how the agent talks to a node that requires IMDSv2, and `/health`.

use std::net::IpAddr;

use kiam::policy::paths::AllowRoutes;

use crate::support::agent_node::TestAgent;
use crate::support::fake_imds::{FakeImds, INSTANCE_ID, NODE_ACCESS_KEY_ID};
use crate::support::http::{Response, request};
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A stack with: `good` (team-a, role app), `locked` (namespace without permitted), `norole`.
async fn cluster(options: Options) -> Stack {
    let stack = Stack::start_with(options).await;
    stack.kube.apply(namespace("team-a").permitted("arn:aws:iam::123456789012:role/app").build());
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(pod("team-a", "good").ip("127.0.0.11").role("app").build());
    stack.kube.apply(pod("locked", "locked").ip("127.0.0.12").role("app").build());
    stack.kube.apply(pod("team-a", "norole").ip("127.0.0.13").build());
    for p in ["127.0.0.11", "127.0.0.12", "127.0.0.13"] {
        stack.wait_for_pod(ip(p)).await;
    }
    // The server warms `good`'s role as it appears. A first AssumeRole from a cold moto on a
    // loaded machine can outlast the agent's 300 ms budget (the pod then gets a 503, rightly),
    // which is not what these tests are about: wait until the server holds it.
    let fetched = || {
        let text = stack.core.metrics().encode();
        let count = crate::support::metrics::sample(&text, "kiam_sts_assumerole_timing_seconds_count");
        std::future::ready(count.is_some_and(|n| n >= 1.0))
    };
    let what = "the server fetched the role";
    crate::support::wait::until(what, std::time::Duration::from_secs(20), fetched).await;
    stack
}

async fn get(stack: &Stack, from: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    let url = format!("{}{path}", stack.agent_url(ip("127.0.0.1")));
    request("GET", &url, headers, "", Some(ip(from))).await.expect("agent answers")
}

fn assert_no_credentials(r: &Response) {
    assert!(!r.body.contains("AccessKeyId") && !r.body.contains(NODE_ACCESS_KEY_ID), "leaked: {}", r.body);
}

#[tokio::test]
async fn a_pod_gets_its_role_and_credentials() {
    let stack = cluster(Options::default()).await;
    let list = get(&stack, "127.0.0.11", CREDS, &[]).await;
    assert_eq!((list.status, list.body.as_str()), (200, "app"));

    let creds = get(&stack, "127.0.0.11", &format!("{CREDS}app"), &[]).await;
    assert_eq!(creds.status, 200, "{}", creds.body);
    assert_eq!(creds.header("content-type"), Some("application/json"));
    let doc: serde_json::Value = serde_json::from_str(&creds.body).expect("JSON");
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    let key = doc["AccessKeyId"].as_str().expect("AccessKeyId");
    assert!(key.starts_with("ASIA") && key != NODE_ACCESS_KEY_ID, "{key}");
    for field in ["Expiration", "LastUpdated"] {
        let t = doc[field].as_str().expect(field);
        assert!(kiam::creds::time::parse(t).is_some() && t.len() == 20, "{field} = {t}");
    }
    let redirect = get(&stack, "127.0.0.11", CREDS.trim_end_matches('/'), &[]).await;
    assert_eq!(redirect.status, 301);
    assert_eq!(redirect.header("location"), Some(CREDS));
    assert_eq!(get(&stack, "127.0.0.99", "/ping", &[]).await.body, "pong");
}

#[tokio::test]
async fn denials_are_clear_and_carry_no_credentials() {
    let stack = cluster(Options::default()).await;
    let table = [
        // (source, path, status, message fragment)
        ("127.0.0.11", format!("{CREDS}other-role"), 404, "not this pod's role"),
        ("127.0.0.12", format!("{CREDS}app"), 403, "forbidden by policy"),
        ("127.0.0.13", CREDS.to_string(), 404, "no role"),
        ("127.0.0.13", format!("{CREDS}app"), 404, "no role"),
        ("127.0.0.14", CREDS.to_string(), 404, "no pod found"),
        ("127.0.0.14", format!("{CREDS}app"), 404, "no pod found"),
    ];
    for (from, path, status, message) in table {
        let r = get(&stack, from, &path, &[]).await;
        assert_eq!(r.status, status, "{from} {path}: {}", r.body);
        assert!(r.body.contains(message), "{from} {path}: {}", r.body);
        assert_no_credentials(&r);
    }
}

#[tokio::test]
async fn imdsv2_tokens_are_minted_and_checked_by_the_agent() {
    let stack = cluster(Options::default()).await;
    let url = format!("{}/latest/api/token", stack.agent_url(ip("127.0.0.1")));
    let from = Some(ip("127.0.0.11"));
    let ttl = ("x-aws-ec2-metadata-token-ttl-seconds", "21600");

    let missing = request("PUT", &url, &[], "", from).await.expect("answer");
    assert_eq!(missing.status, 400);
    let bad = request("PUT", &url, &[("x-aws-ec2-metadata-token-ttl-seconds", "0")], "", from)
        .await
        .expect("answer");
    assert_eq!(bad.status, 400);
    let proxied =
        request("PUT", &url, &[ttl, ("x-forwarded-for", "10.0.0.1")], "", from).await.expect("answer");
    assert_eq!(proxied.status, 403);
    let issued = request("PUT", &url, &[ttl], "", from).await.expect("answer");
    assert_eq!(issued.status, 200);
    assert_eq!(issued.header("x-aws-ec2-metadata-token-ttl-seconds"), Some("21600"));
    let token = issued.body.clone();

    let with = |t: &'static str| [("x-aws-ec2-metadata-token", t)];
    let token: &'static str = Box::leak(token.into_boxed_str());
    assert_eq!(get(&stack, "127.0.0.11", CREDS, &with(token)).await.status, 200);
    // Bound to the pod that asked: another pod cannot replay it, and forgeries fail.
    assert_eq!(get(&stack, "127.0.0.13", CREDS, &with(token)).await.status, 401);
    assert_eq!(get(&stack, "127.0.0.11", CREDS, &with("v1.9999999999.00ff")).await.status, 401);
    // No token at all is IMDSv1, which kiam users rely on.
    assert_eq!(get(&stack, "127.0.0.11", CREDS, &[]).await.status, 200);
    assert!(stack.imds.requests().is_empty(), "tokens never come from the node");
}

#[tokio::test]
async fn only_allow_listed_paths_reach_the_node() {
    let stack = cluster(Options {
        allow_routes: "^/latest/(meta-data/instance-id|meta-data/iam/.*)$",
        ..Options::default()
    })
    .await;
    let allowed = get(&stack, "127.0.0.11", "/latest/meta-data/instance-id", &[]).await;
    assert_eq!((allowed.status, allowed.body.as_str()), (200, INSTANCE_ID));
    let blocked = get(&stack, "127.0.0.11", "/latest/user-data", &[]).await;
    assert_eq!(blocked.status, 404);
    assert!(blocked.body.contains("allow-route-regexp"), "{}", blocked.body);
    // Credential-bearing paths are never forwarded, even when the allow-list matches them.
    for path in [
        "/latest/meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials-extended/node-role",
        "/latest/identity-credentials/ec2/security-credentials/ec2-instance",
    ] {
        let r = get(&stack, "127.0.0.11", path, &[]).await;
        assert_eq!(r.status, 404, "{path}: {}", r.body);
        assert_no_credentials(&r);
    }
    for path in [
        "/latest/meta-data/../meta-data/iam/info",
        "/latest/meta-data/iam/security-credentials/..%2fnode-role",
    ] {
        let r = get(&stack, "127.0.0.11", path, &[]).await;
        assert_eq!(r.status, 400, "{path}: {}", r.body);
        assert_no_credentials(&r);
    }
    let seen: Vec<String> =
        stack.imds.requests().into_iter().filter(|r| r.method == "GET").map(|r| r.path).collect();
    assert_eq!(
        seen,
        vec!["/latest/meta-data/instance-id".to_string()],
        "only the allowed path went upstream"
    );
}

#[tokio::test]
async fn the_agent_uses_imdsv2_towards_a_node_that_requires_it() {
    let stack = Stack::start().await;
    let node = FakeImds::start_v2_only().await;
    let allow = AllowRoutes::new("^/latest/meta-data/instance-id$").expect("regexp");
    let agent = TestAgent::on_loopback(&stack, node.addr(), |c| c.allow_routes = allow).await;
    let fetch = || async {
        let url = format!("{}/latest/meta-data/instance-id", agent.url());
        request("GET", &url, &[("x-forwarded-for", "10.9.9.9")], "", Some(ip("127.0.0.11")))
            .await
            .expect("answer")
    };
    for _ in 0..3 {
        let r = fetch().await;
        assert_eq!((r.status, r.body.as_str()), (200, INSTANCE_ID));
    }
    let puts =
        |imds: &FakeImds| imds.requests().into_iter().filter(|r| r.method == "PUT").collect::<Vec<_>>();
    let first = puts(&node);
    assert_eq!(first.len(), 1, "one token serves every request until it nears expiry");
    assert_eq!(first[0].header("x-forwarded-for"), None, "the node would refuse a proxied token request");
    assert_eq!(first[0].header("x-aws-ec2-metadata-token-ttl-seconds"), Some("21600"));
    for get in node.requests().iter().filter(|r| r.method == "GET") {
        assert!(get.header("x-aws-ec2-metadata-token").is_some(), "{get:?}");
        assert_eq!(get.header("x-forwarded-for"), None, "{get:?}");
    }

    // The node forgets its tokens (a reboot): one 401, a new token, and the answer.
    node.forget_tokens();
    assert_eq!(fetch().await.status, 200);
    assert_eq!(puts(&node).len(), 2);

    let health = request("GET", &format!("{}/health", agent.url()), &[], "", None).await.expect("health");
    // kiam's answer: the node's instance ID (scripts and liveness checks read it).
    assert_eq!((health.status, health.body.as_str()), (200, crate::support::fake_imds::INSTANCE_ID));
}

#[tokio::test]
async fn health_reports_the_metadata_service_and_with_deep_the_server() {
    let stack = Stack::start().await;
    let health = |agent: &TestAgent, query: &'static str| {
        let url = format!("{}/health{query}", agent.url());
        async move { request("GET", &url, &[], "", None).await.expect("health answers") }
    };
    let up = TestAgent::on_loopback(&stack, stack.imds.addr(), |_| ()).await;
    assert_eq!(health(&up, "").await.status, 200);
    let deep = health(&up, "?deep=1").await;
    assert_eq!(deep.status, 200, "{}", deep.body);
    // This agent proves no node (no node in its certificate, no token): the servers give it no
    // view, and the deep check says so.
    assert_eq!(deep.body, crate::support::fake_imds::INSTANCE_ID);
    assert_eq!(
        deep.header("kiam-health"),
        Some("server: ok, node view: down (never synced), 0 entries held")
    );

    // Nothing listens at `dead`.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let no_metadata = TestAgent::on_loopback(&stack, dead, |_| ()).await;
    let r = health(&no_metadata, "").await;
    assert_eq!(r.status, 503, "{}", r.body);
    let no_server = TestAgent::on_loopback_with_server(&stack, dead, stack.imds.addr(), |_| ()).await;
    assert_eq!(health(&no_server, "").await.status, 200, "shallow health does not ask the server");
    let r = health(&no_server, "?deep").await;
    assert_eq!(r.status, 503, "{}", r.body);
}

/// The agent remembers a pod's role for a second; an IP reused inside that second must still
/// never get the old pod's credentials (the server checks the pod that has the IP now).
#[tokio::test]
async fn a_remembered_role_never_serves_a_reused_ip_the_old_pods_credentials() {
    let stack = cluster(Options::default()).await;
    stack.kube.apply(pod("team-a", "old").ip("127.0.0.91").role("app").build());
    stack.wait_for_pod(ip("127.0.0.91")).await;
    assert_eq!(get(&stack, "127.0.0.91", &format!("{CREDS}app"), &[]).await.status, 200);

    stack.kube.delete("Pod", Some("team-a"), "old");
    stack.kube.apply(pod("team-a", "new").ip("127.0.0.91").role("other").build());
    let grpc = stack.client(&stack.pki.agent()).service();
    crate::support::wait::until("the server sees the new pod", std::time::Duration::from_secs(10), || {
        let mut grpc = grpc.clone();
        async move {
            let role = grpc.get_pod_role(kiam::pb::GetPodRoleRequest { ip: "127.0.0.91".into() }).await;
            role.is_ok_and(|r| r.into_inner().name == "other")
        }
    })
    .await;
    let r = get(&stack, "127.0.0.91", &format!("{CREDS}app"), &[]).await;
    assert_ne!(r.status, 200, "{}", r.body);
    assert_no_credentials(&r);
}

/// How many times `imds` was asked for the instance ID (the health checks' question).
fn instance_id_calls(imds: &FakeImds) -> usize {
    imds.requests().iter().filter(|r| r.method == "GET" && r.path == "/latest/meta-data/instance-id").count()
}

/// Concurrent, then sequential, `url`s: all must answer 200. Returns how long they took.
async fn health_burst(url: &str) -> std::time::Duration {
    let started = std::time::Instant::now();
    let burst = (0..40).map(|_| request("GET", url, &[], "", None));
    for r in futures::future::join_all(burst).await {
        let r = r.expect("an answer");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for _ in 0..20 {
        let r = request("GET", url, &[], "", None).await.expect("an answer");
        assert_eq!(r.status, 200, "{}", r.body);
    }
    started.elapsed()
}

/// A pod spamming `/health` (or kube2iam mode's `/healthz`) used to cost the node's metadata
/// service one call each, which EC2 throttles per instance for the CNI and kubelet too. The
/// check is asked at most once per second (`instance_check::TTL`), concurrent callers sharing
/// one call: 60 requests within the window make one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_asks_the_node_once_per_second_whatever_the_callers() {
    let stack = Stack::start().await;
    let node = FakeImds::start().await;
    let agent = TestAgent::on_loopback(&stack, node.addr(), |_| ()).await;
    let took = health_burst(&format!("{}/health", agent.url())).await;
    let calls = instance_id_calls(&node);
    // One call per second at most (the bound allows for a slow machine; unbounded, it was 60).
    assert!(calls >= 1 && calls as u64 <= 1 + took.as_secs(), "{calls} calls in {took:?}");

    let k = crate::kube2iam::mode::start(&["--base-role-arn=arn:aws:iam::123456789012:role/"], vec![]).await;
    let before = instance_id_calls(&k.imds);
    let took = health_burst(&format!("{}/healthz", k.url)).await;
    let calls = instance_id_calls(&k.imds) - before;
    assert!(calls as u64 <= 1 + took.as_secs(), "kube2iam mode: {calls} calls in {took:?}");
}
