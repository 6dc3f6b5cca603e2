//! The compatibility table: what a user switching from kiam v4 or kube2iam 0.15 relies on, case
//! by case, each pinned against what kiam or kube2iam does for the same request. Where kiam-rs
//! is deliberately safer, the case pins that, and the README's tables of differences say so.
//!
//! | case | kiam / kube2iam | kiam-rs |
//! |---|---|---|
//! | kube2iam: the default role, named by the pod, in a restricted namespace | allowed | allowed |
//! | kube2iam: an annotation starting `ARN:` (another case) | sent to STS as is | refused, with why |
//! | kube2iam: `/healthz` when `instance-id` is empty | error | 500 |
//! | kiam: `/health` | 200, the instance ID | 200, the instance ID |
//! | kiam: `responses_total` by handler | every metered handler | the same series |
//! | kiam: roles with a path (`team/app`, ARN with a path) | every SDK works | every SDK works |
//! | both: an unknown pod with a 2 s pod wait | within the wait | within the wait (was 3.6 s) |

use std::net::IpAddr;
use std::time::{Duration, Instant};

use tokio::task::block_in_place;

use crate::kube2iam::mode::{InProcess, get as k2i_get, start as k2i_start};
use crate::support::agent_node::{TestAgent, pod_get};
use crate::support::fake_imds::INSTANCE_ID;
use crate::support::http::request;
use crate::support::netns::{NodeNet, PodNet};
use crate::support::objects::{namespace, pod};
use crate::support::sdk;
use crate::support::stack::{ACCOUNT, Options, Stack};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const BASE: &str = "arn:aws:iam::123456789012:role/";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

async fn restricted_kube2iam() -> InProcess {
    let locked = namespace("locked")
        .annotation("iam.amazonaws.com/allowed-roles", r#"["arn:aws:iam::123456789012:role/only-this"]"#);
    let objects = vec![
        locked.build(),
        pod("locked", "plain").ip("127.0.0.221").build(),
        pod("locked", "by-name").ip("127.0.0.222").role("fallback").build(),
        pod("locked", "by-arn").ip("127.0.0.223").role(&format!("{BASE}fallback")).build(),
        pod("locked", "other").ip("127.0.0.224").role("other").build(),
        pod("locked", "miscased").ip("127.0.0.225").role("ARN:aws:iam::123456789012:role/only-this").build(),
    ];
    let flags = [&*format!("--base-role-arn={BASE}"), "--default-role=fallback", "--namespace-restrictions"];
    k2i_start(&flags, objects).await
}

#[tokio::test(flavor = "multi_thread")]
async fn kube2iam_exempts_the_default_role_however_named_and_refuses_a_miscased_arn() {
    let k = restricted_kube2iam().await;
    // Unannotated, or annotated with the default role by name or by ARN: all exempt from the
    // namespace's allowed-roles, as kube2iam's check compares the resolved ARN with the default.
    for pod_ip in ["127.0.0.221", "127.0.0.222", "127.0.0.223"] {
        assert_eq!(k2i_get(&k, pod_ip, CREDS).await, (200, "fallback".into()), "{pod_ip}");
        let (status, body) = k2i_get(&k, pod_ip, &format!("{CREDS}fallback")).await;
        assert_eq!(status, 200, "{pod_ip}: {body}");
    }
    // Any other role is still held to the namespace's list.
    let (status, _) = k2i_get(&k, "127.0.0.224", &format!("{CREDS}other")).await;
    assert_eq!(status, 403);
    // `ARN:` in another case: kube2iam took it for an ARN and sent STS a role it refuses; kiam-rs
    // refuses it before STS, saying why.
    let (status, body) = k2i_get(&k, "127.0.0.225", &format!("{CREDS}only-this")).await;
    assert!(status >= 400 && !body.contains("AccessKeyId"), "{status} {body}");
    let calls = k.moto.recorded_assume_roles().await;
    assert!(calls.iter().all(|c| c.role_arn.starts_with("arn:")), "{calls:?}");
    assert!(calls.iter().all(|c| !c.role_arn.ends_with("role/other")), "{calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_the_instance_id_and_an_empty_one_is_a_failure() {
    // kiam: `/health` answers the instance ID, which scripts read.
    let stack = Stack::start().await;
    let url = format!("{}/health", stack.agent_url(ip("127.0.0.1")));
    let health = request("GET", &url, &[], "", None).await.expect("health");
    assert_eq!((health.status, health.body.as_str()), (200, INSTANCE_ID));

    // kube2iam: an empty instance ID from the node is an error, not health.
    let k = restricted_kube2iam().await;
    assert_eq!(k2i_get(&k, "127.0.0.1", "/healthz").await.0, 200);
    k.imds.set_instance_id("");
    // The answer is reused for a second (the node's service is asked at most once a second).
    let empty = || async { k2i_get(&k, "127.0.0.1", "/healthz").await.0 == 500 };
    crate::support::wait::until("/healthz reports the empty instance ID", Duration::from_secs(5), empty)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kiams_response_counters_count_what_kiam_counts() {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "good").ip("127.0.0.31").role("app").build());
    stack.wait_for_pod(ip("127.0.0.31")).await;
    let base = stack.agent_url(ip("127.0.0.1"));
    let from = Some(ip("127.0.0.31"));
    let call =
        |method: &'static str, path: &'static str, headers: &'static [(&'static str, &'static str)]| {
            let url = format!("{base}{path}");
            async move { request(method, &url, headers, "", from).await.expect("agent answers").status }
        };
    assert_eq!(call("GET", CREDS, &[]).await, 200);
    assert_eq!(call("GET", "/latest/meta-data/iam/security-credentials/app", &[]).await, 200);
    assert_eq!(call("GET", "/latest/meta-data/iam/security-credentials", &[]).await, 301);
    // Not allowed by the default `--allow-route-regexp`: blocked by kiam's proxy handler.
    assert_eq!(call("GET", "/latest/user-data", &[]).await, 404);
    let ttl: &'static [(&str, &str)] = &[("x-aws-ec2-metadata-token-ttl-seconds", "60")];
    assert_eq!(call("PUT", "/latest/api/token", ttl).await, 200);
    assert_eq!(call("GET", "/health", &[]).await, 200);
    assert_eq!(call("GET", "/ping", &[]).await, 200);

    let text = stack.agent_metrics.encode();
    let count = |handler: &str, code: u16| {
        let series = format!("kiam_metadata_responses_total{{handler=\"{handler}\",code=\"{code}\"}}");
        text.lines()
            .find(|l| l.starts_with(&series))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // kiam meters its role-name, credentials, health and proxy handlers; the token PUT went
    // through its proxy handler; `/ping` and the trailing-slash redirect are not metered.
    assert_eq!(count("roleName", 200), 1.0, "{text}");
    assert_eq!(count("credentials", 200), 1.0, "{text}");
    assert_eq!(count("health", 200), 1.0, "{text}");
    assert_eq!(count("proxy", 404), 1.0, "{text}");
    assert_eq!(count("proxy", 200), 1.0, "{text}");
    assert_eq!(count("roleName", 301), 0.0, "{text}");
    assert!(!text.contains("handler=\"ping\"") && !text.contains("handler=\"token\""), "{text}");
    let success =
        |handler: &str| text.contains(&format!("kiam_metadata_success_total{{handler=\"{handler}\"}} 1"));
    assert!(success("roleName") && success("credentials") && success("proxy"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_pod_is_answered_within_the_pod_wait() {
    let stack = Stack::start_with(Options { pod_wait: Duration::from_secs(2), ..Options::default() }).await;
    let url = format!("{}{CREDS}", stack.agent_url(ip("127.0.0.1")));
    let started = Instant::now();
    let r = request("GET", &url, &[], "", Some(ip("127.0.0.99"))).await.expect("agent answers");
    let took = started.elapsed();
    assert_eq!(r.status, 404, "{}", r.body);
    // The wait plus a margin for a loaded machine; before, a second full server wait followed
    // the first (3.6 s). SDKs give up after one or two seconds per attempt.
    assert!(took < Duration::from_millis(2_800), "answered after {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_with_a_path_work_for_every_sdk() {
    let node = NodeNet::create();
    let (path, arn) = (PodNet::create_in(&node), PodNet::create_in(&node));
    let stack = Stack::start().await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "path").ip(&path.pod_ip.to_string()).role("team/path-role").build());
    let full = format!("arn:aws:iam::{ACCOUNT}:role/team/arn-role");
    stack.kube.apply(pod("team-a", "arn").ip(&arn.pod_ip.to_string()).role(&full).build());
    for net in [&path, &arn] {
        stack.wait_for_pod(IpAddr::V4(net.pod_ip)).await;
    }
    let _agent = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+"]).await;
    let sts = stack.moto.endpoint();
    for (net, role) in [(&path, "path-role"), (&arn, "arn-role")] {
        // The listing names the role's last segment, which is what every SDK asks for next.
        let listed =
            block_in_place(|| pod_get(net, &format!("http://169.254.169.254{CREDS}"))).expect("list");
        assert_eq!((listed.status, listed.body.as_str()), (200, role));
        let outcomes = [
            block_in_place(|| sdk::boto3_at(net, None, &sts)),
            block_in_place(|| sdk::rust_sdk_at(net, None, &sts)),
            block_in_place(|| sdk::node_sdk(net, None, &sts)),
        ];
        for outcome in outcomes {
            let outcome = outcome.unwrap_or_else(|e| panic!("{role}: {e}"));
            assert!(outcome.caller_arn.contains(&format!("assumed-role/{role}/")), "{outcome:?}");
        }
    }
    let calls = stack.moto.recorded_assume_roles().await;
    assert!(!calls.is_empty());
    let arns: Vec<&str> = calls.iter().map(|c| c.role_arn.as_str()).collect();
    assert!(arns.iter().all(|a| a.contains(":role/team/")), "the path is kept in the ARN assumed: {arns:?}");
}
