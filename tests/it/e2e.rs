//! End to end with real AWS SDKs as pods: each SDK runs in its own network namespace (its own
//! pod IP), reaches the agent, gets credentials for its own pod's role through the server and
//! moto, and proves them with `sts get-caller-identity`.

use std::net::IpAddr;

use crate::support::fake_imds::NODE_ACCESS_KEY_ID;
use crate::support::netns::PodNet;
use crate::support::objects::{namespace, pod};
use crate::support::sdk::{self, SdkOutcome};
use crate::support::stack::{ACCOUNT, Stack};

fn assumed(role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/kiam-kiam")
}

/// Runs a blocking SDK probe without stalling the runtime the stack lives on.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread")]
async fn boto3_and_awscli_get_their_own_pods_role() {
    let (alpha, beta) = (PodNet::create(), PodNet::create());
    let stack = Stack::with_pod_nets(&[(&alpha, "alpha", "alpha-role"), (&beta, "beta", "beta-role")]).await;
    let sts = stack.moto.endpoint();

    let a: SdkOutcome =
        blocking(|| sdk::boto3(&alpha, &stack.agent_url(alpha.host_ip), &sts)).expect("boto3 in alpha");
    let b = blocking(|| sdk::boto3(&beta, &stack.agent_url(beta.host_ip), &sts)).expect("boto3 in beta");
    assert_eq!(a.caller_arn, assumed("alpha-role"));
    assert_eq!(b.caller_arn, assumed("beta-role"));
    assert_ne!(a.access_key_id, b.access_key_id, "two roles, two sets of credentials");

    let cli = blocking(|| sdk::awscli(&beta, &stack.agent_url(beta.host_ip), &sts)).expect("awscli in beta");
    assert_eq!(cli.caller_arn, assumed("beta-role"));
    assert_eq!(cli.access_key_id, b.access_key_id, "one cached identity serves both clients");
    for key in [&a.access_key_id, &b.access_key_id] {
        assert_ne!(key, NODE_ACCESS_KEY_ID);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rust_sdk_gets_credentials_through_imdsv2() {
    let net = PodNet::create();
    let stack = Stack::with_pod_nets(&[(&net, "rusty", "rust-role")]).await;
    let sts = stack.moto.endpoint();
    let out =
        blocking(|| sdk::rust_sdk(&net, &stack.agent_url(net.host_ip), &sts)).expect("aws-config in the pod");
    assert_eq!(out.caller_arn, assumed("rust-role"));
    // The Rust SDK has no IMDSv1 fallback: it got here only through the agent's own tokens.
    assert!(stack.imds.requests().is_empty(), "nothing reached the node's metadata service");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdks_in_denied_pods_get_no_credentials() {
    let (locked, unknown) = (PodNet::create(), PodNet::create());
    let stack = Stack::start().await;
    // A namespace without `permitted` allows no role at all.
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(pod("locked", "app").ip(&locked.pod_ip.to_string()).role("app-role").build());
    stack.wait_for_pod(IpAddr::V4(locked.pod_ip)).await;
    let sts = stack.moto.endpoint();

    let denied = blocking(|| sdk::boto3(&locked, &stack.agent_url(locked.host_ip), &sts));
    let err = denied.expect_err("a pod in a namespace without permitted gets nothing");
    assert!(!err.contains(NODE_ACCESS_KEY_ID), "{err}");
    let nobody = blocking(|| sdk::rust_sdk(&unknown, &stack.agent_url(unknown.host_ip), &sts));
    assert!(nobody.is_err(), "an IP no pod has gets nothing: {nobody:?}");
}
