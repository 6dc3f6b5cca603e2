//! `--iptables` on a node made of network namespaces: pods behind veth pairs reach
//! 169.254.169.254:80 with no endpoint override, as on a real node, and the agent's DNAT sends
//! them to it. Every test has a node namespace of its own, so its `nat` table (and a decoy
//! "real" metadata service at 169.254.169.254 inside it) concerns no other test. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kiam::agent::iptables::METADATA_IP;
use tokio::task::block_in_place;

use crate::support::agent_node::{TestAgent, pod_get, wait_until};
use crate::support::fake_imds::{FakeImds, NODE_ACCESS_KEY_ID, NODE_ROLE};
use crate::support::netns::{NodeNet, PodNet};
use crate::support::sdk::{self, SdkOutcome};
use crate::support::stack::{ACCOUNT, Stack};

const METADATA: &str = "http://169.254.169.254";
const ROLE_LIST: &str = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";

fn assumed(role: &str) -> String {
    format!("arn:aws:sts::{ACCOUNT}:assumed-role/{role}/kiam-kiam")
}

/// The node's own metadata service, as the pods would find it without interception.
fn decoy_imds(node: &NodeNet) -> FakeImds {
    node.add_address(METADATA_IP).expect("169.254.169.254 on the node");
    FakeImds::start_on_listener(node.listen(SocketAddr::from((METADATA_IP, 80))), false)
}

#[tokio::test(flavor = "multi_thread")]
async fn sdks_in_pods_get_their_own_credentials_through_the_dnat() {
    let node = NodeNet::create();
    let (alpha, beta, gamma) = (PodNet::create_in(&node), PodNet::create_in(&node), PodNet::create_in(&node));
    let stack = Stack::with_pod_nets(&[
        (&alpha, "alpha", "alpha-role"),
        (&beta, "beta", "beta-role"),
        (&gamma, "gamma", "gamma-role"),
    ])
    .await;
    let agent = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+"]).await;
    let sts = stack.moto.endpoint();

    // No endpoint override anywhere: each SDK goes to 169.254.169.254 as in a real pod.
    let boto3: SdkOutcome = block_in_place(|| sdk::boto3_at(&alpha, None, &sts)).expect("boto3 in alpha");
    let cli = block_in_place(|| sdk::awscli_at(&alpha, None, &sts)).expect("awscli in alpha");
    let rust = block_in_place(|| sdk::rust_sdk_at(&beta, None, &sts)).expect("aws-config in beta");
    let node_js = block_in_place(|| sdk::node_sdk(&gamma, None, &sts)).expect("node SDK in gamma");
    assert_eq!(boto3.caller_arn, assumed("alpha-role"));
    assert_eq!(cli.caller_arn, assumed("alpha-role"));
    assert_eq!(rust.caller_arn, assumed("beta-role"));
    assert_eq!(node_js.caller_arn, assumed("gamma-role"));
    let keys = [&boto3.access_key_id, &rust.access_key_id, &node_js.access_key_id];
    assert!(keys[0] != keys[1] && keys[1] != keys[2] && keys[0] != keys[2], "three pods, three identities");
    assert!(keys.iter().all(|k| *k != NODE_ACCESS_KEY_ID));
    assert!(stack.imds.requests().is_empty(), "nothing reached the node's metadata service");

    // The rules: one jump at the top of PREROUTING, one DNAT in our chain.
    let rules = node.nat_rules();
    let ours: Vec<&str> = rules.lines().filter(|l| l.contains("KIAM-RS") && l.starts_with("-A")).collect();
    assert_eq!(ours.len(), 2, "{rules}");
    assert!(ours.iter().any(|l| l.contains(&format!("--to-destination {}", agent.addr))), "{rules}");
    assert_eq!(agent.interception.as_ref().map(|i| i.restorations()), Some(0));
}

/// The Ruby SDK and the JavaScript SDK v3's default chain, each as a pod: each gets its own role
/// through the DNAT over IMDSv2 (the agent refuses token-less requests), and a pod that names a
/// role its namespace does not permit (another pod's) gets nothing from either.
#[tokio::test(flavor = "multi_thread")]
async fn ruby_and_javascript_v3_sdks_get_their_own_role_over_imdsv2_and_no_other() {
    use crate::support::objects::{namespace, pod};
    let node = NodeNet::create();
    let (alpha, beta, gamma) = (PodNet::create_in(&node), PodNet::create_in(&node), PodNet::create_in(&node));
    let stack = Stack::start().await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(namespace("team-b").permitted(".*:role/team-b-.*").build());
    stack.kube.apply(pod("team-a", "alpha").ip(&alpha.pod_ip.to_string()).role("alpha-role").build());
    stack.kube.apply(pod("team-a", "beta").ip(&beta.pod_ip.to_string()).role("beta-role").build());
    // gamma names alpha's role, which its namespace does not permit.
    stack.kube.apply(pod("team-b", "gamma").ip(&gamma.pod_ip.to_string()).role("alpha-role").build());
    for net in [&alpha, &beta, &gamma] {
        stack.wait_for_pod(IpAddr::V4(net.pod_ip)).await;
    }
    // The server has fetched both permitted roles ahead of need, so the JavaScript chain's
    // one-second metadata timeout (its default, not configurable by environment) measures the
    // agent's answer, not STS.
    stack.wait_for_sts_calls(2).await;
    let flags = ["--iptables", "--host-interface=kv+", "--require-imdsv2"];
    let _agent = TestAgent::in_node(&stack, &node, &flags).await;
    let sts = stack.moto.endpoint();

    // Token-less requests are refused, so an SDK that gets credentials used IMDSv2.
    let v1 = block_in_place(|| pod_get(&alpha, ROLE_LIST)).expect("the agent answers");
    assert_eq!(v1.status, 401, "IMDSv1 is refused: {v1:?}");

    let ruby = block_in_place(|| sdk::ruby_sdk(&alpha, None, &sts)).expect("Ruby SDK in alpha");
    let js = block_in_place(|| sdk::node_default_chain(&beta, None, &sts)).expect("JS v3 chain in beta");
    assert_eq!(ruby.caller_arn, assumed("alpha-role"));
    assert_eq!(js.caller_arn, assumed("beta-role"));
    assert_ne!(ruby.access_key_id, js.access_key_id, "two pods, two identities");
    assert!([&ruby.access_key_id, &js.access_key_id].iter().all(|k| *k != NODE_ACCESS_KEY_ID));

    let ruby_refused = block_in_place(|| sdk::ruby_sdk(&gamma, None, &sts));
    let js_refused = block_in_place(|| sdk::node_default_chain(&gamma, None, &sts));
    assert!(ruby_refused.is_err(), "Ruby SDK in gamma got credentials: {ruby_refused:?}");
    assert!(js_refused.is_err(), "JS v3 chain in gamma got credentials: {js_refused:?}");
    assert!(stack.imds.requests().is_empty(), "nothing reached the node's metadata service");
}

#[tokio::test(flavor = "multi_thread")]
async fn sdks_in_pods_are_answered_from_the_node_view() {
    use crate::support::objects::{namespace, pod};
    let node = NodeNet::create();
    let (alpha, beta) = (PodNet::create_in(&node), PodNet::create_in(&node));
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    for (net, name, role) in [(&alpha, "alpha", "alpha-role"), (&beta, "beta", "beta-role")] {
        stack.kube.apply(pod("team-a", name).ip(&net.pod_ip.to_string()).role(role).node("node-v").build());
    }
    let cert = stack.pki.agent_for_node("agent-v", "node-v");
    let agent = TestAgent::in_node_as(&stack, &node, &cert, &["--iptables", "--host-interface=kv+"]).await;
    let m = std::sync::Arc::clone(&agent.metrics);
    let ready = move || std::future::ready(m.agent.view_live.get() == 1 && m.agent.view_entries.get() == 2);
    crate::support::wait::until("the node view holds both pods", Duration::from_secs(15), ready).await;
    // The agent fetches both pods' credentials ahead of need.
    let m = std::sync::Arc::clone(&agent.metrics);
    let fetched = move || {
        let text = m.encode();
        let line = text.lines().find(|l| {
            l.contains(r#"grpc_method="Credentials",grpc_code="OK""#) && l.starts_with("grpc_client_handled")
        });
        let count = line.and_then(|l| l.split_whitespace().last()).and_then(|v| v.parse::<f64>().ok());
        std::future::ready(count.is_some_and(|c| c >= 2.0))
    };
    crate::support::wait::until("credentials are fetched ahead of need", Duration::from_secs(15), fetched)
        .await;
    let sts = stack.moto.endpoint();
    let boto3 = block_in_place(|| sdk::boto3_at(&alpha, None, &sts)).expect("boto3 in alpha");
    let rust = block_in_place(|| sdk::rust_sdk_at(&beta, None, &sts)).expect("aws-config in beta");
    assert_eq!(boto3.caller_arn, assumed("alpha-role"));
    assert_eq!(rust.caller_arn, assumed("beta-role"));
    // Both SDKs were answered from the view: their credential requests made no server call.
    assert!(agent.metrics.agent.view_hits.get() >= 2, "view hits: {}", agent.metrics.agent.view_hits.get());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_negated_interface_is_not_intercepted() {
    let node = NodeNet::create();
    let (excluded, included) = (PodNet::create_in(&node), PodNet::create_in(&node));
    let stack = Stack::with_pod_nets(&[
        (&excluded, "excluded", "excluded-role"),
        (&included, "included", "included-role"),
    ])
    .await;
    let decoy = decoy_imds(&node);
    let flag = format!("--host-interface=!{}", excluded.host_if);
    let _agent = TestAgent::in_node(&stack, &node, &["--iptables", &flag]).await;

    let mine = block_in_place(|| pod_get(&included, ROLE_LIST)).expect("the agent answers");
    assert_eq!((mine.status, mine.body.as_str()), (200, "included-role"));
    // Traffic from the excluded interface goes where it would without kiam: the node's service.
    let theirs = block_in_place(|| pod_get(&excluded, ROLE_LIST)).expect("the node answers");
    assert_eq!((theirs.status, theirs.body.as_str()), (200, NODE_ROLE));
    let peers: Vec<IpAddr> = decoy.requests().iter().map(|r| r.peer.ip()).collect();
    assert_eq!(peers, vec![IpAddr::V4(excluded.pod_ip)], "only the excluded pod reached the node's service");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_check_loop_restores_rules_something_else_deleted() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let stack = Stack::with_pod_nets(&[(&net, "app", "app-role")]).await;
    let flags = ["--iptables", "--host-interface=kv+", "--iptables-check-interval=200ms"];
    let agent = TestAgent::in_node(&stack, &node, &flags).await;
    let rules = agent.interception.clone().expect("rules");
    let restored = |n: u64| {
        let rules = rules.clone();
        move || {
            let rules = rules.clone();
            async move { rules.restorations() >= n && rules.is_installed().await.unwrap_or(false) }
        }
    };

    let jump: Vec<&str> = rules.rules().jump.iter().map(String::as_str).collect();
    node.iptables(&[&["-D", "PREROUTING"], jump.as_slice()].concat()).expect("delete the jump");
    wait_until("the jump is restored", Duration::from_secs(10), restored(1)).await;
    node.iptables(&["-F", "KIAM-RS"]).expect("flush our chain");
    wait_until("the DNAT is restored", Duration::from_secs(10), restored(2)).await;

    let pong = block_in_place(|| pod_get(&net, &format!("{METADATA}/ping"))).expect("intercepted again");
    assert_eq!(pong.body, "pong");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_removes_the_rules_unless_told_to_keep_them() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let stack = Stack::with_pod_nets(&[(&net, "app", "app-role")]).await;
    let _decoy = decoy_imds(&node);

    // --no-iptables-remove: the rules outlive the agent, and the pod reaches nothing at all
    // rather than the node's credentials.
    let keep =
        TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+", "--no-iptables-remove"])
            .await;
    let rules = keep.interception.clone().expect("rules");
    keep.stop().await.expect("clean stop");
    assert!(rules.is_installed().await.expect("check"), "kept:\n{}", node.nat_rules());
    let refused = block_in_place(|| pod_get(&net, ROLE_LIST));
    assert!(refused.is_err(), "fails closed: {refused:?}");

    // A new agent adopts the rules left behind; by default it removes them when it stops, and
    // the pod is back on the node's own service (kiam's behaviour, and its risk).
    let again = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+"]).await;
    assert_eq!(node.nat_rules().matches("-A KIAM-RS").count(), 1, "{}", node.nat_rules());
    let mine = block_in_place(|| pod_get(&net, ROLE_LIST)).expect("intercepted");
    assert_eq!(mine.body, "app-role");
    again.stop().await.expect("clean stop");
    assert!(!node.nat_rules().contains("KIAM-RS"), "removed:\n{}", node.nat_rules());
    let node_role = block_in_place(|| pod_get(&net, ROLE_LIST)).expect("the node answers");
    assert_eq!(node_role.body, NODE_ROLE);
}
