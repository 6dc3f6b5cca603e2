//! Node readiness: a node registered with the startup taint keeps it while no agent of that node
//! is ready; once its agent has installed its interception and synchronised its node view, the
//! server removes the taint. With the feature off, the server writes nothing to nodes.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::agent_node::TestAgent;
use crate::support::stack::{Options, Stack};
use crate::support::wait::until;

const TAINT: &str = "kiam.amazonaws.com/agent-not-ready";

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
        "spec": {"taints": [
            {"key": TAINT, "effect": "NoSchedule"},
            {"key": "other.example.com/keep", "effect": "NoExecute"},
        ]},
    })
}

fn taints(stack: &Stack, name: &str) -> Vec<String> {
    let node = stack.kube.get("Node", None, name).expect("the node exists");
    let list = node["spec"]["taints"].as_array().cloned().unwrap_or_default();
    list.iter().filter_map(|t| t["key"].as_str().map(str::to_string)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_taint_goes_once_the_nodes_agent_is_ready() {
    let flags = vec!["--node-readiness-taint=kiam.amazonaws.com/agent-not-ready"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.kube.apply(node("node-r"));
    stack.kube.apply(node("node-idle"));
    // An agent that proves no node gets no view: the taint stays.
    let anonymous = TestAgent::on_loopback(&stack, stack.imds.addr(), |_| ()).await;
    let refused = || std::future::ready(anonymous.metrics.agent.view_refusals.get() >= 1);
    until("the anonymous agent is refused a view", Duration::from_secs(10), refused).await;
    assert!(taints(&stack, "node-r").contains(&TAINT.to_string()));

    let cert = stack.pki.agent_for_node("agent-r", "node-r");
    let _agent = TestAgent::on_loopback_as(&cert, stack.server_addr, stack.imds.addr(), &[], |_| ()).await;
    let gone = || std::future::ready(!taints(&stack, "node-r").contains(&TAINT.to_string()));
    until("the taint is removed", Duration::from_secs(10), gone).await;
    assert_eq!(taints(&stack, "node-r"), ["other.example.com/keep"], "other taints are kept");
    assert!(
        taints(&stack, "node-idle").contains(&TAINT.to_string()),
        "a node without a ready agent keeps it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_feature_off_nodes_are_never_written() {
    let stack = Stack::start_with(Options::default()).await;
    stack.kube.apply(node("node-r"));
    let cert = stack.pki.agent_for_node("agent-r", "node-r");
    let agent = TestAgent::on_loopback_as(&cert, stack.server_addr, stack.imds.addr(), &[], |_| ()).await;
    let live = || std::future::ready(agent.metrics.agent.view_live.get() == 1);
    until("the agent's view is live", Duration::from_secs(10), live).await;
    assert!(taints(&stack, "node-r").contains(&TAINT.to_string()));
    let touched = stack.kube.requests().into_iter().filter(|r| r.contains("/nodes")).collect::<Vec<_>>();
    assert!(touched.is_empty(), "no node requests at all: {touched:?}");
}
