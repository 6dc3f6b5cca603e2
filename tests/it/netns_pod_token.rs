//! `--container-endpoint` on a node made of network namespaces: a pod reaches
//! `http://169.254.170.23/v1/credentials` (EKS Pod Identity's address, no override) through the
//! agent's DNAT, with botocore configured only by the two container variables; and the node
//! itself, where hostNetwork pods run, reaches it through the `OUTPUT` jump. Needs root.

use std::time::Duration;

use tokio::task::block_in_place;

use crate::support::agent_node::TestAgent;
use crate::support::fake_kube_auth::TokenIdentity;
use crate::support::http::request;
use crate::support::netns::{NodeNet, PodNet};
use crate::support::objects::{namespace, pod};
use crate::support::sdk;
use crate::support::stack::{ACCOUNT, Stack};
use crate::support::wait::until;

const ENDPOINT: &str = "http://169.254.170.23/v1/credentials";

#[tokio::test(flavor = "multi_thread")]
async fn pods_and_host_network_pods_reach_the_container_endpoint_through_the_dnat() {
    let node = NodeNet::create();
    node.add_default_route().expect("a default route on the node");
    let net = PodNet::create_in(&node);
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let (pod_ip, node_ip) = (net.pod_ip.to_string(), node.agent_ip.to_string());
    stack
        .kube
        .apply(pod("team-a", "alpha").ip(&pod_ip).uid("uid-alpha").role("alpha-role").node("node-a").build());
    let host = pod("team-a", "host").ip(&node_ip).uid("uid-host").role("host-role").node("node-a");
    stack.kube.apply(host.host_network(true).build());
    let cluster = std::sync::Arc::clone(stack.core.cluster());
    until("the server knows both pods", Duration::from_secs(10), move || {
        std::future::ready(["alpha", "host"].iter().all(|n| cluster.pod_by_name("team-a", n).is_some()))
    })
    .await;
    let cert = stack.pki.agent_for_node("agent-node-a", "node-a");
    let flags = ["--iptables", "--host-interface=kv+", "--container-endpoint"];
    let _agent = TestAgent::in_node_as(&stack, &node, &cert, &flags).await;

    // A pod: botocore with nothing but the two variables, through the DNAT.
    let identity = TokenIdentity::pod("team-a", "alpha", "uid-alpha", "node-a");
    let token = identity.jwt();
    stack.kube.issue_token(&token, identity);
    let file = stack.pki.dir().join("alpha-token");
    std::fs::write(&file, &token).expect("write the token");
    let (file, sts) = (file.to_string_lossy().to_string(), stack.moto.endpoint());
    let boto3 =
        block_in_place(|| sdk::boto3_container_in(&net, ENDPOINT, &file, &sts)).expect("boto3 in the pod");
    assert_eq!(boto3.caller_arn, format!("arn:aws:sts::{ACCOUNT}:assumed-role/alpha-role/kiam-kiam"));

    // A hostNetwork pod: the node's own connection, through the OUTPUT jump.
    let identity = TokenIdentity::pod("team-a", "host", "uid-host", "node-a");
    let token = identity.jwt();
    stack.kube.issue_token(&token, identity);
    let answer = node.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime on the node")
            .block_on(request("GET", ENDPOINT, &[("authorization", &token)], "", None))
    });
    let answer = answer.expect("the agent answers the node");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains(ACCOUNT), "{}", answer.body);

    // Without a token the endpoint refuses, whoever asks.
    let refused = block_in_place(|| crate::support::agent_node::pod_get(&net, ENDPOINT)).expect("answer");
    assert_eq!(refused.status, 401);
}
