//! Credentials ready before the pod asks, one STS call per identity however many pods share
//! it, what exactly reaches STS, and service through an STS outage.

use std::net::IpAddr;

use kiam::pb;

use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn creds_request(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

#[tokio::test]
async fn credentials_are_fetched_before_the_pod_asks() {
    let stack = Stack::start().await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("127.0.0.41").role("app").build());
    // The call happens with no request at all: the pod's appearance triggers it.
    let calls = stack.wait_for_sts_calls(1).await;
    assert_eq!(calls[0].role_arn, "arn:aws:iam::123456789012:role/app");

    let url = format!("{}/latest/meta-data/iam/security-credentials/app", stack.agent_url(ip("127.0.0.1")));
    let r = request("GET", &url, &[], "", Some(ip("127.0.0.41"))).await.expect("answer");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(stack.moto.recorded_assume_roles().await.len(), 1, "the request was served from the cache");
    assert_eq!(stack.core.cache().stats().sts_calls.get(), 1);
}

#[tokio::test]
async fn a_burst_of_1000_pods_on_10_roles_makes_10_calls() {
    let stack = Stack::start().await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("burst").permitted(".*").build());
    for i in 0..1000u32 {
        let address = format!("10.77.{}.{}", i / 250, i % 250 + 1);
        stack
            .kube
            .apply(pod("burst", &format!("p{i}")).ip(&address).role(&format!("role-{}", i % 10)).build());
    }
    let calls = stack.wait_for_sts_calls(10).await;
    // Every pod now asks at once, 20 of each role's pods.
    let client = stack.client(&stack.pki.agent());
    let asks = (0..200u32).map(|i| {
        let mut grpc = client.service();
        let address = format!("10.77.{}.{}", i / 250, i % 250 + 1);
        async move { grpc.get_pod_credentials(creds_request(&address, &format!("role-{}", i % 10))).await }
    });
    for answer in futures::future::join_all(asks).await {
        answer.expect("credentials");
    }
    let after = stack.moto.recorded_assume_roles().await;
    assert_eq!(
        after.len(),
        10,
        "one AssumeRole per identity: {:?}",
        after.iter().map(|c| &c.role_arn).collect::<Vec<_>>()
    );
    let mut roles: Vec<&str> = calls.iter().map(|c| c.role_arn.as_str()).collect();
    roles.sort_unstable();
    roles.dedup();
    assert_eq!(roles.len(), 10);
}

#[tokio::test]
async fn session_name_external_id_and_region_reach_sts() {
    let stack = Stack::start_with(Options { region: "eu-west-1", ..Options::default() }).await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let web = pod("team-a", "web").ip("10.78.0.1").role("app");
    let web = web
        .annotation("iam.amazonaws.com/session-name", "web frontend")
        .annotation("iam.amazonaws.com/external-id", "ext-7");
    stack.kube.apply(web.build());
    let calls = stack.wait_for_sts_calls(1).await;
    assert_eq!(calls[0].session_name, "kiam-web-frontend");
    assert_eq!(calls[0].external_id.as_deref(), Some("ext-7"));
    assert_eq!(calls[0].region, "eu-west-1");
    assert_eq!(calls[0].duration_seconds, Some(3600));
}

#[tokio::test]
async fn an_sts_outage_keeps_cached_credentials_served() {
    let mut stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("10.79.0.1").role("app").build());
    stack.kube.apply(pod("team-a", "late").ip("10.79.0.2").role("late-role").build());
    let mut grpc = stack.client(&stack.pki.agent()).service();
    let before =
        grpc.get_pod_credentials(creds_request("10.79.0.1", "app")).await.expect("before").into_inner();
    // Prefetch fetched "late-role" too; forget nothing, then take STS away.
    stack.wait_for_pod(ip("10.79.0.2")).await;
    stack.moto.stop();
    let during =
        grpc.get_pod_credentials(creds_request("10.79.0.1", "app")).await.expect("during the outage");
    assert_eq!(during.into_inner().access_key_id, before.access_key_id);
    // A pod whose identity was never fetched gets a clear error, not someone else's credentials.
    stack.kube.apply(pod("team-a", "new").ip("10.79.0.3").role("never-fetched").build());
    let status =
        grpc.get_pod_credentials(creds_request("10.79.0.3", "never-fetched")).await.expect_err("no STS");
    assert!(status.message().contains("error fetching credentials"), "{}", status.message());
}
