//! `--container-endpoint` on a node made of network namespaces: a pod reaches
//! `http://169.254.170.23/v1/credentials` (EKS Pod Identity's address, no override) through the
//! agent's DNAT, with botocore configured only by the two container variables; and the node
//! itself, where hostNetwork pods run, reaches it through the `OUTPUT` jump. The same over IPv6
//! (`[fd00:ec2::23]`, through `ip6tables`) on a node with an IPv6 address. Needs root.

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
const ENDPOINT6: &str = "http://[fd00:ec2::23]/v1/credentials";

/// Issues a pod-bound token for `name` (UID `uid-<name>`, on node-a) and writes it to a file;
/// returns the token and the file's path.
fn token_for(stack: &Stack, name: &str) -> (String, String) {
    let identity = TokenIdentity::pod("team-a", name, &format!("uid-{name}"), "node-a");
    let token = identity.jwt();
    stack.kube.issue_token(&token, identity);
    let file = stack.pki.dir().join(format!("{name}-token"));
    std::fs::write(&file, &token).expect("write the token");
    (token, file.to_string_lossy().to_string())
}

/// A stack whose server knows two pods of node-a: `alpha` on the pod network (also at the first
/// of `v6`, when given, and `host` at the second) with the role `alpha-role`, and the hostNetwork pod `host` with `host-role`.
async fn two_pods(
    node: &NodeNet,
    net: &PodNet,
    v6: Option<(std::net::Ipv6Addr, std::net::Ipv6Addr)>,
) -> Stack {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let (pod_ip, node_ip) = (net.pod_ip.to_string(), node.agent_ip.to_string());
    let mut alpha = pod("team-a", "alpha").ip(&pod_ip).uid("uid-alpha").role("alpha-role").node("node-a");
    let mut host = pod("team-a", "host").ip(&node_ip).uid("uid-host").role("host-role").node("node-a");
    // A hostNetwork pod's addresses are the node's, both families on a dual-stack node.
    if let Some((pod6, node6)) = v6 {
        alpha = alpha.also_ip(&pod6.to_string());
        host = host.also_ip(&node6.to_string());
    }
    stack.kube.apply(alpha.build());
    stack.kube.apply(host.host_network(true).build());
    let cluster = std::sync::Arc::clone(stack.core.cluster());
    until("the server knows both pods", Duration::from_secs(10), move || {
        std::future::ready(["alpha", "host"].iter().all(|n| cluster.pod_by_name("team-a", n).is_some()))
    })
    .await;
    stack
}

/// `GET url` with `token` from the node's own network (where hostNetwork pods run).
fn node_get(node: &NodeNet, url: &str, token: &str) -> Result<crate::support::http::Response, String> {
    node.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime on the node")
            .block_on(request("GET", url, &[("authorization", token)], "", None))
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_and_host_network_pods_reach_the_container_endpoint_through_the_dnat() {
    let node = NodeNet::create();
    node.add_default_route().expect("a default route on the node");
    let net = PodNet::create_in(&node);
    let stack = two_pods(&node, &net, None).await;
    let cert = stack.pki.agent_for_node("agent-node-a", "node-a");
    let flags = ["--iptables", "--host-interface=kv+", "--container-endpoint"];
    let _agent = TestAgent::in_node_as(&stack, &node, &cert, &flags).await;

    // A pod: botocore with nothing but the two variables, through the DNAT.
    let (_, file) = token_for(&stack, "alpha");
    let sts = stack.moto.endpoint();
    let boto3 =
        block_in_place(|| sdk::boto3_container_in(&net, ENDPOINT, &file, &sts)).expect("boto3 in the pod");
    assert_eq!(boto3.caller_arn, format!("arn:aws:sts::{ACCOUNT}:assumed-role/alpha-role/kiam-kiam"));

    // A hostNetwork pod: the node's own connection, through the OUTPUT jump.
    let (token, _) = token_for(&stack, "host");
    let answer = node_get(&node, ENDPOINT, &token).expect("the agent answers the node");
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(answer.body.contains(ACCOUNT), "{}", answer.body);

    // Without a token the endpoint refuses, whoever asks.
    let refused = block_in_place(|| crate::support::agent_node::pod_get(&net, ENDPOINT)).expect("answer");
    assert_eq!(refused.status, 401);
}

/// On a node with an IPv6 address (`--host-ipv6`), `[fd00:ec2::23]` reaches the agent through
/// `ip6tables`, from a pod (botocore, which accepts that host) and from the node itself, where
/// nothing else owns the address.
#[tokio::test(flavor = "multi_thread")]
async fn on_a_node_with_ipv6_the_ipv6_container_endpoint_is_intercepted() {
    let node = NodeNet::create();
    node.add_default_route().expect("a default route on the node");
    let net = PodNet::create_in(&node);
    let (pod6, agent6) = (net.enable_ipv6(), node.enable_ipv6());
    node.add_default_route6();
    let stack = two_pods(&node, &net, Some((pod6, agent6))).await;
    let (_, file) = token_for(&stack, "alpha");
    let (host_token, _) = token_for(&stack, "host");

    let cert = stack.pki.agent_for_node("agent-node-a", "node-a");
    let host6 = format!("--host-ipv6={agent6}");
    let flags = ["--iptables", "--host-interface=kv+", "--container-endpoint", host6.as_str()];
    let agent = TestAgent::in_node_as(&stack, &node, &cert, &flags).await;
    let rules = node.nat_rules6();
    assert!(rules.contains("-d fd00:ec2::23/128") && rules.contains("-j KIAM-RS-CT"), "{rules}");
    // The agent's IPv6 listener and the pod's route can settle after the rules (addresses may be
    // tentative under load): wait for the node's first answer, bounded.
    let answered =
        || std::future::ready(node_get(&node, ENDPOINT6, &host_token).is_ok_and(|r| r.status == 200));
    until("the agent answers the node over IPv6", Duration::from_secs(15), answered).await;
    let answer = node_get(&node, ENDPOINT6, &host_token).expect("the agent answers the node");
    assert!(answer.body.contains(ACCOUNT), "{}", answer.body);
    let refused = node_get(&node, ENDPOINT6, "not-a-token").expect("the agent answers");
    assert_eq!(refused.status, 401, "{}", refused.body);

    let sts = stack.moto.endpoint();
    let boto3 =
        block_in_place(|| sdk::boto3_container_in(&net, ENDPOINT6, &file, &sts)).expect("boto3 in the pod");
    assert_eq!(boto3.caller_arn, format!("arn:aws:sts::{ACCOUNT}:assumed-role/alpha-role/kiam-kiam"));

    agent.stop().await.expect("clean stop");
    assert!(!node.nat_rules6().contains("KIAM-RS"), "removed:\n{}", node.nat_rules6());
}
