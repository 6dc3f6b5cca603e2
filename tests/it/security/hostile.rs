//! Hostile requests against the agent, each with the answer it must get, and one rule over all
//! of them: none may yield the node's credentials, and nothing credential-bearing may reach the
//! node's metadata service. Requests are written by hand on raw sockets, so paths and headers
//! arrive exactly as an attacker would send them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kiam::agent::Limits;
use kiam::policy::paths::AllowRoutes;
use tokio::io::AsyncWriteExt;

use crate::support::agent_node::TestAgent;
use crate::support::fake_imds::{
    NODE_ACCESS_KEY_ID, NODE_ROLE, NODE_SECRET_ACCESS_KEY, NODE_SESSION_TOKEN, USER_DATA,
};
use crate::support::objects::{namespace, pod};
use crate::support::raw_http::{self, RawResponse};
use crate::support::stack::Stack;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const EXTENDED: &str = "/latest/meta-data/iam/security-credentials-extended/";
/// A pod annotated with a short role name.
const SHORT: &str = "127.0.0.41";
/// A pod annotated with a full role ARN.
const FULL: &str = "127.0.0.42";
const FULL_ARN: &str = "arn:aws:iam::210987654321:role/team/full-app";
/// An address no pod has.
const NOBODY: &str = "127.0.0.49";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

async fn cluster() -> Stack {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "short").ip(SHORT).role("app").build());
    stack.kube.apply(pod("team-a", "full").ip(FULL).role(FULL_ARN).build());
    for p in [SHORT, FULL] {
        stack.wait_for_pod(ip(p)).await;
    }
    stack
}

fn assert_nothing_of_the_node(what: &str, r: &RawResponse) {
    for secret in [NODE_ACCESS_KEY_ID, NODE_SECRET_ACCESS_KEY, NODE_SESSION_TOKEN, USER_DATA.trim()] {
        assert!(!r.text.contains(secret), "{what}: the node's {secret:?} leaked:\n{}", r.text);
    }
    // Error messages may echo the path; only a listing that names the node's role is a leak.
    assert_ne!(r.body().trim(), NODE_ROLE, "{what}: the node's role was listed");
}

/// Only the paths a test allowed (none credential-bearing) ever reached the node.
fn assert_node_saw_nothing_sensitive(stack: &Stack, node: &crate::support::fake_imds::FakeImds) {
    for seen in node.requests().into_iter().chain(stack.imds.requests()) {
        let p = seen.path.to_ascii_lowercase();
        let sensitive = ["iam", "identity-credentials", "user-data", "instance-identity", "%", ".."];
        assert!(!sensitive.iter().any(|s| p.contains(s)), "reached the node: {seen:?}");
        assert!(seen.header("x-forwarded-for").is_none(), "{seen:?}");
    }
}

#[tokio::test]
async fn hostile_requests_get_their_expected_answers_and_never_the_nodes_credentials() {
    let stack = cluster().await;
    // The widest allow-list an operator might write: guarded paths must stay guarded anyway.
    let wide = AllowRoutes::new("^/latest/.*").expect("regexp");
    let agent = TestAgent::on_loopback(&stack, stack.imds.addr(), |c| c.allow_routes = wide).await;
    let strict = TestAgent::on_loopback(&stack, stack.imds.addr(), |c| c.require_imdsv2 = true).await;
    let token = {
        let put = "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60";
        let r = raw_http::send(ip(SHORT), agent.addr, put).await;
        assert_eq!(r.status, Some(200), "{}", r.text);
        r.body().to_string()
    };
    let xff_put = "PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: 10.0.0.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60";
    let node_creds = format!("{CREDS}{NODE_ROLE}");
    let absolute = format!("GET http://169.254.169.254{CREDS}{NODE_ROLE} HTTP/1.1\r\nHost: 169.254.169.254");

    // (from, agent, request head, expected status)
    let table: Vec<(&str, SocketAddr, String, u16)> = vec![
        (SHORT, agent.addr, xff_put.to_string(), 403),
        (SHORT, agent.addr, "PUT /latest/api/token HTTP/1.1\r\nHost: x".into(), 400),
        (SHORT, agent.addr, "GET /latest/api/token HTTP/1.1\r\nHost: x".into(), 405),
        (SHORT, strict.addr, format!("GET {CREDS} HTTP/1.1\r\nHost: x"), 401),
        (SHORT, strict.addr, format!("GET {CREDS}app HTTP/1.1\r\nHost: x"), 401),
        (
            SHORT,
            agent.addr,
            format!("GET {CREDS} HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: v1.9999999999.00ff"),
            401,
        ),
        (
            SHORT,
            agent.addr,
            format!("GET {CREDS}app HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: forged"),
            401,
        ),
        (
            FULL,
            agent.addr,
            format!("GET {CREDS} HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: {token}"),
            401,
        ),
        (SHORT, agent.addr, format!("GET {CREDS}..%2f{NODE_ROLE} HTTP/1.1\r\nHost: x"), 400),
        (SHORT, agent.addr, format!("GET {CREDS}%2e%2e/{NODE_ROLE} HTTP/1.1\r\nHost: x"), 400),
        (SHORT, agent.addr, "GET /latest/meta-data/%69am/info HTTP/1.1\r\nHost: x".into(), 400),
        (
            SHORT,
            agent.addr,
            format!(
                "GET /latest/meta-data/placement/../iam/security-credentials/{NODE_ROLE} HTTP/1.1\r\nHost: x"
            ),
            400,
        ),
        (
            SHORT,
            agent.addr,
            format!("GET /latest//meta-data/iam/security-credentials/{NODE_ROLE} HTTP/1.1\r\nHost: x"),
            400,
        ),
        (
            SHORT,
            agent.addr,
            format!("GET /latest/meta-data\\iam\\security-credentials\\{NODE_ROLE} HTTP/1.1\r\nHost: x"),
            400,
        ),
        (
            SHORT,
            agent.addr,
            format!("GET /latest/META-DATA/IAM/security-credentials/{NODE_ROLE} HTTP/1.1\r\nHost: x"),
            404,
        ),
        (
            SHORT,
            agent.addr,
            format!("GET /meta-data/iam/security-credentials/{NODE_ROLE} HTTP/1.1\r\nHost: x"),
            404,
        ),
        (SHORT, agent.addr, format!("GET {node_creds} HTTP/1.1\r\nHost: x"), 404),
        (SHORT, agent.addr, absolute, 404),
        (
            SHORT,
            agent.addr,
            format!("GET {CREDS}arn:aws:iam::123456789012:role/{NODE_ROLE} HTTP/1.1\r\nHost: x"),
            404,
        ),
        (SHORT, agent.addr, format!("GET {CREDS}full-app HTTP/1.1\r\nHost: x"), 404),
        (SHORT, agent.addr, format!("GET {CREDS}app?ip={FULL} HTTP/1.1\r\nHost: x"), 200),
        (NOBODY, agent.addr, format!("GET {CREDS}full-app?ip={FULL} HTTP/1.1\r\nHost: x"), 404),
        (
            SHORT,
            agent.addr,
            "GET /latest/identity-credentials/ec2/security-credentials/ec2-instance HTTP/1.1\r\nHost: x"
                .into(),
            404,
        ),
        (SHORT, agent.addr, "GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: x".into(), 404),
        (SHORT, agent.addr, format!("GET {EXTENDED} HTTP/1.1\r\nHost: x"), 404),
        (SHORT, agent.addr, format!("GET {EXTENDED}app HTTP/1.1\r\nHost: x"), 404),
        (SHORT, agent.addr, format!("GET {EXTENDED}{NODE_ROLE} HTTP/1.1\r\nHost: x"), 404),
        (FULL, agent.addr, format!("GET {EXTENDED}{NODE_ROLE} HTTP/1.1\r\nHost: x"), 404),
        (
            SHORT,
            agent.addr,
            "GET /latest/meta-data/iam/security-credentials-extended HTTP/1.1\r\nHost: x".into(),
            404,
        ),
        (SHORT, strict.addr, "GET /latest/user-data HTTP/1.1\r\nHost: x".into(), 401),
        (
            SHORT,
            strict.addr,
            "GET /latest/dynamic/instance-identity/document HTTP/1.1\r\nHost: x".into(),
            401,
        ),
        (NOBODY, agent.addr, format!("GET {CREDS} HTTP/1.1\r\nHost: x"), 404),
        (SHORT, agent.addr, format!("POST {CREDS}app HTTP/1.1\r\nHost: x\r\nContent-Length: 0"), 405),
        (SHORT, agent.addr, format!("PUT {CREDS}app HTTP/1.1\r\nHost: x\r\nContent-Length: 0"), 405),
        (SHORT, agent.addr, format!("DELETE {CREDS}app HTTP/1.1\r\nHost: x"), 405),
        (SHORT, agent.addr, format!("OPTIONS {CREDS} HTTP/1.1\r\nHost: x"), 405),
        (
            SHORT,
            agent.addr,
            "PATCH /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nContent-Length: 0".into(),
            405,
        ),
        (SHORT, agent.addr, "TRACE /latest/meta-data/instance-id HTTP/1.1\r\nHost: x".into(), 405),
        (SHORT, agent.addr, "POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0".into(), 405),
    ];
    for (from, to, head, want) in &table {
        let r = raw_http::send(ip(from), *to, head).await;
        assert_eq!(r.status, Some(*want), "{from} {head:?}:\n{}", r.text);
        assert_nothing_of_the_node(head, &r);
        if *want != 200 {
            assert!(!r.text.contains("AccessKeyId"), "{from} {head:?}:\n{}", r.text);
        }
    }
    assert_node_saw_nothing_sensitive(&stack, &stack.imds);
}

#[tokio::test]
async fn the_pods_own_role_is_served_on_the_extended_and_info_paths_and_ip_query_is_ignored() {
    let stack = cluster().await;
    let agent = TestAgent::on_loopback(&stack, stack.imds.addr(), |_| ()).await;
    let get = |from: &'static str, path: String| async move {
        raw_http::get(ip(from), agent.addr, &path, &[]).await
    };

    let list = get(FULL, EXTENDED.to_string()).await;
    assert_eq!((list.status, list.body()), (Some(200), "full-app"));
    let extended = get(FULL, format!("{EXTENDED}full-app")).await;
    assert_eq!(extended.status, Some(200), "{}", extended.text);
    let doc: serde_json::Value = serde_json::from_str(extended.body()).expect("JSON");
    assert_eq!(doc["AccountId"], "210987654321", "the account of the pod's role, not the node's");
    assert_eq!(doc["Code"], "Success");
    let key = doc["AccessKeyId"].as_str().expect("key");
    assert!(key.starts_with("ASIA") && key != NODE_ACCESS_KEY_ID);

    let info = get(FULL, "/latest/meta-data/iam/info".into()).await;
    assert_eq!(info.status, Some(200), "{}", info.text);
    let info: serde_json::Value = serde_json::from_str(info.body()).expect("JSON");
    assert_eq!(info["InstanceProfileArn"], "arn:aws:iam::210987654321:instance-profile/team/full-app");

    // `?ip=` is ignored without --allow-ip-query: the caller gets its own role, not FULL's.
    let own = get(SHORT, format!("{CREDS}?ip={FULL}")).await;
    assert_eq!((own.status, own.body()), (Some(200), "app"));
    assert_node_saw_nothing_sensitive(&stack, &stack.imds);

    // With it (development only), `?ip=` names the pod.
    let dev = TestAgent::on_loopback(&stack, stack.imds.addr(), |c| c.allow_ip_query = true).await;
    let other = raw_http::get(ip(NOBODY), dev.addr, &format!("{CREDS}?ip={FULL}"), &[]).await;
    assert_eq!((other.status, other.body()), (Some(200), "full-app"));
    let bad = raw_http::get(ip(NOBODY), dev.addr, &format!("{CREDS}?ip=not-an-ip"), &[]).await;
    assert_eq!(bad.status, Some(400));
}

#[tokio::test]
async fn oversized_heads_are_refused_and_the_agent_keeps_serving() {
    let stack = cluster().await;
    let agent = TestAgent::on_loopback(&stack, stack.imds.addr(), |_| ()).await;
    let big = "x".repeat(64 * 1024);
    let r = raw_http::get(ip(SHORT), agent.addr, CREDS, &[("X-Padding", &big)]).await;
    assert_eq!(r.status, Some(431), "{}", &r.text[..r.text.len().min(200)]);
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("X-H{i}"), "v".to_string())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let r = raw_http::get(ip(SHORT), agent.addr, CREDS, &many).await;
    assert_eq!(r.status, Some(431), "{}", r.text);
    let huge_path = format!("{CREDS}{}", "a".repeat(64 * 1024));
    let r = raw_http::get(ip(SHORT), agent.addr, &huge_path, &[]).await;
    assert!(matches!(r.status, Some(414 | 431 | 400)), "{:?}", r.status);
    let ok = raw_http::get(ip(SHORT), agent.addr, CREDS, &[]).await;
    assert_eq!((ok.status, ok.body()), (Some(200), "app"), "still serving");
}

#[tokio::test]
async fn a_slow_client_is_cut_off_without_holding_up_others() {
    let stack = cluster().await;
    let limits = Limits { header_read_timeout: Duration::from_millis(800), ..Limits::default() };
    let agent = TestAgent::on_loopback(&stack, stack.imds.addr(), |c| c.limits = limits).await;
    let started = tokio::time::Instant::now();

    // Slowloris: a head that starts and then trickles in a byte every 100 ms, never finishing.
    let mut slow = raw_http::connect(ip(SHORT), agent.addr).await;
    slow.write_all(format!("GET {CREDS} HTTP/1.1\r\nHost: x\r\nX-Slow: ").as_bytes()).await.expect("write");
    let trickle = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if slow.write_all(b"a").await.is_err() {
                return;
            }
        }
    };
    // Meanwhile another client is answered at once.
    let other = async {
        let r = raw_http::get(ip(SHORT), agent.addr, CREDS, &[]).await;
        assert_eq!((r.status, r.body()), (Some(200), "app"));
    };
    tokio::join!(trickle, other);
    let cut_after = started.elapsed();
    assert!(cut_after < Duration::from_secs(5), "the slow client was cut off after {cut_after:?}");
    let rest = raw_http::read_to_close(&mut slow).await;
    assert!(!rest.text.contains("AccessKeyId") && !rest.text.contains("\r\n\r\napp"), "{}", rest.text);

    // An idle kept-alive connection is closed by the same deadline.
    let mut idle = raw_http::connect(ip(SHORT), agent.addr).await;
    let waited = tokio::time::Instant::now();
    let r = raw_http::read_to_close(&mut idle).await;
    assert!(r.text.is_empty() || r.status == Some(408), "{}", r.text);
    assert!(waited.elapsed() < Duration::from_secs(5));
}
