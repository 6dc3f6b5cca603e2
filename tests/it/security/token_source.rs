//! `GET /v1/credentials` answers a pod's token only from where that pod can be: the pod's own
//! address, or, for a hostNetwork pod, the node (its address, which is the pod's, or loopback);
//! and only on the agent of the pod's node. A valid token replayed from anywhere else that
//! reaches the agent's port is refused.

use std::net::IpAddr;

use crate::pod_token::endpoint::setup;
use crate::support::agent_node::TestAgent;
use crate::support::fake_kube_auth::TokenIdentity;
use crate::support::http::request;

async fn get_from(agent: &TestAgent, from: &str, token: &str) -> (u16, String) {
    let url = format!("{}/v1/credentials", agent.url());
    let from: IpAddr = from.parse().expect("an address");
    let r = request("GET", &url, &[("authorization", token)], "", Some(from)).await.expect("an answer");
    (r.status, r.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pods_token_is_served_only_from_the_pods_address_or_its_node() {
    // `web` at 127.0.0.1, `host` (hostNetwork) at the node's 127.0.0.190, both on node-a, the
    // agent's node; `away` on node-b.
    let (_stack, agent) = setup().await;
    let web = TokenIdentity::pod("team-a", "web", "uid-web", "node-a").jwt();
    let host = TokenIdentity::pod("team-a", "host", "uid-host", "node-a").jwt();
    let away = TokenIdentity::pod("team-a", "away", "uid-away", "node-b").jwt();
    let cases = [
        ("a pod, from its own address", &web, "127.0.0.1", 200),
        ("a hostNetwork pod, from the node's address", &host, "127.0.0.190", 200),
        ("a hostNetwork pod, from the node's loopback", &host, "127.0.0.1", 200),
        ("a pod's token, from a neighbour's address", &web, "127.0.0.193", 403),
        ("a pod's token, from an address no pod has", &web, "127.0.0.199", 403),
        ("a pod-network pod's token, from the node's address", &web, "127.0.0.190", 403),
        ("a pod of another node, from its own address", &away, "127.0.0.192", 403),
    ];
    for (case, token, from, want) in cases {
        let (status, body) = get_from(&agent, from, token).await;
        assert_eq!(status, want, "{case}: {body}");
        assert!(!body.contains(token.as_str()), "{case}: the answer repeats the token");
    }
}
