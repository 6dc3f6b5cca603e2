//! Agents ask an identity's owner first (`kiam server --peers`): the node view gives each entry
//! its identity's key, and so does kiam's `GetPodRole` for an agent without the view; the agent
//! ranks the servers it resolves as the servers do. So with three servers sharing the
//! identities, an agent fetching every pod's credentials (through the view or through kiam's
//! unary calls) makes no STS call beyond the owners' own, and a stopped owner's pods are still
//! served.

use std::net::IpAddr;
use std::sync::Arc;

use kiam::client::Resolve;
use kiam::cluster::Lookup;
use tokio::net::TcpListener;

use crate::server::scale_out::{Peers, ROLES, WAIT, owner_index, servers};
use crate::support::agent_node::{TestAgent, agent_config};
use crate::support::fake_imds::FakeImds;
use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::wait::until;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn apply_pods_on_node(c: &Peers) {
    c.kube.apply(namespace("team-a").permitted(".*").build());
    for i in 0..ROLES {
        let ip = pod_ip(i).to_string();
        let role = format!("role-{i}");
        c.kube.apply(pod("team-a", &format!("p{i}")).ip(&ip).role(&role).node("node-a").build());
    }
}

/// Waits until the agent's node view is live with every pod (so that its requests go through
/// the view, where the owner is known, not through kiam's unary call, which is balanced), then
/// until every pod is served.
async fn every_pod_served(agent: &TestAgent) {
    let m = Arc::clone(&agent.metrics);
    let live = move || {
        std::future::ready(m.agent.view_live.get() == 1 && m.agent.view_entries.get() >= ROLES as i64)
    };
    until("the node view is live with every pod", WAIT, live).await;
    for i in 0..ROLES {
        let from = pod_ip(i);
        let url = format!("http://{}{CREDS}role-{i}", agent.addr);
        let served =
            || async { request("GET", &url, &[], "", Some(from)).await.is_ok_and(|r| r.status == 200) };
        until("the agent serves the pod", WAIT, served).await;
    }
}

/// Pod `i`'s address (as [`apply_pods_on_node`] gives it).
fn pod_ip(i: usize) -> IpAddr {
    format!("127.0.0.{}", i + 201).parse().expect("ip")
}

/// Stops server 1 while the name still lists it (DNS lags, so agents still rank it first for
/// its identities and find it refusing connections), and waits until the other two see it gone.
/// The survivors.
async fn stop_server_one(c: &Peers) -> [usize; 2] {
    c.servers[1].shutdown.cancel();
    let survivors = [0, 2];
    let seen = || {
        let peers = |i: usize| c.servers[i].core.metrics().scale.peers.get();
        std::future::ready(survivors.iter().all(|i| peers(*i) == 2))
    };
    until("the survivors see the peer gone", WAIT, seen).await;
    survivors
}

/// STS saw each identity once, and no server of `live` but its owner holds it.
async fn each_identity_fetched_once_by_its_owner(c: &Peers, live: &[usize]) {
    let calls = c.calls_by_role().await;
    assert_eq!(calls.len(), ROLES, "{calls:?}");
    assert!(calls.values().all(|n| *n == 1), "each identity fetched once, by its owner: {calls:?}");
    for id in c.identities() {
        let owner = owner_index(&c.servers, live, &id);
        for other in live.iter().filter(|i| **i != owner) {
            assert!(
                !c.holds(*other, &id),
                "server {other} holds {}, which it does not own",
                id.role.as_str()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_asks_each_identitys_owner_so_sts_sees_each_identity_once() {
    let c = servers(3, true).await;
    let imds = FakeImds::start().await;
    let cert = c.pki.agent_for_node("agent-a", "node-a");
    let resolver = Arc::clone(&c.name) as Arc<dyn Resolve>;
    let agent = TestAgent::resolving(&cert, c.port, imds.addr(), "5s", resolver).await;
    c.moto.start_recording().await;
    apply_pods_on_node(&c);
    every_pod_served(&agent).await;
    each_identity_fetched_once_by_its_owner(&c, &[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_owner_costs_the_agent_one_refused_connection_and_no_extra_sts_call() {
    let c = servers(3, true).await;
    let imds = FakeImds::start().await;
    let cert = c.pki.agent_for_node("agent-a", "node-a");
    let resolver = Arc::clone(&c.name) as Arc<dyn Resolve>;
    let agent = TestAgent::resolving(&cert, c.port, imds.addr(), "5s", resolver).await;
    let survivors = stop_server_one(&c).await;
    c.moto.start_recording().await;
    apply_pods_on_node(&c);
    every_pod_served(&agent).await;
    let ids = c.identities();
    assert!(ids.iter().any(|id| owner_index(&c.servers, &[0, 1, 2], id) == 1), "it owned some");
    // The next in rank after the stopped server is the survivors' owner: rendezvous moves only the
    // stopped server's identities, each to its next in rank.
    each_identity_fetched_once_by_its_owner(&c, &survivors).await;
}

/// An agent with `--disable-node-view` for node-a, finding the servers through `c`'s name: every
/// request goes through kiam's unary calls, `GetPodRole` then `GetPodCredentials`.
async fn unary_agent(c: &Peers, imds: &FakeImds) -> TestAgent {
    let cert = c.pki.agent_for_node("agent-a", "node-a");
    let (server, upstream) = (format!("kiam-server:{}", c.port), imds.addr().to_string());
    let flags = ["--host", "127.0.0.1", "--server-address", &server, "--metadata-addr", &upstream];
    let more = ["--pod-wait-timeout", "5s", "--server-resolve-interval", "100ms", "--disable-node-view"];
    let config = agent_config(&cert, &[&flags[..], &more[..]].concat());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the agent");
    let resolver = Arc::clone(&c.name) as Arc<dyn Resolve>;
    TestAgent::assemble_with(&config, listener, kiam::agent::iptables::Command::default(), resolver)
}

/// Waits until each of `live` knows every pod and its namespace, so that any of them answers
/// the role lookup with the pod's key (a server that has not seen the namespace yet answers 0,
/// and the agent would balance: right, but not what these tests check).
async fn known_everywhere(c: &Peers, live: &[usize]) {
    let known = || {
        let knows = |i: usize| {
            let cluster = c.servers[i].core.cluster();
            cluster.namespace("team-a").is_some()
                && (0..ROLES).all(|p| matches!(cluster.pod_by_ip(pod_ip(p)), Lookup::Found(_)))
        };
        std::future::ready(live.iter().all(|i| knows(*i)))
    };
    until("every server knows every pod", WAIT, known).await;
}

/// Serves every pod's credentials through `agent` (which has no view: each request is a role
/// lookup and a credentials call).
async fn every_pod_served_unary(agent: &TestAgent) {
    assert_eq!(agent.metrics.agent.view_live.get(), 0, "no node view");
    for i in 0..ROLES {
        let from = pod_ip(i);
        let url = format!("http://{}{CREDS}role-{i}", agent.addr);
        let answer = request("GET", &url, &[], "", Some(from)).await.expect("an answer");
        assert_eq!(answer.status, 200, "pod {i}: {}", answer.body);
    }
}

/// Balanced, most of these requests would reach a server that does not own the identity, which
/// holds nothing for it and calls STS (each of the twelve identities has two non-owners in
/// three): the count of calls would pass twelve.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_the_view_asks_each_identitys_owner_through_the_role_lookup() {
    let c = servers(3, true).await;
    let imds = FakeImds::start().await;
    let agent = unary_agent(&c, &imds).await;
    c.moto.start_recording().await;
    apply_pods_on_node(&c);
    known_everywhere(&c, &[0, 1, 2]).await;
    // Every server's role lookup carries the identity's key, the one the servers rank by.
    let client = c.client();
    for id in c.identities() {
        let i: usize = id.role.as_str().rsplit('-').next().and_then(|n| n.parse().ok()).expect("role-N");
        let ip = pod_ip(i);
        for _ in 0..3 {
            let role = client.get_pod_role(ip).await.expect("role");
            assert_eq!(role.affinity, id.affinity_key(), "{}", id.role.as_str());
        }
    }
    every_pod_served_unary(&agent).await;
    each_identity_fetched_once_by_its_owner(&c, &[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_without_the_view_is_served_when_an_owner_is_stopped() {
    let c = servers(3, true).await;
    let imds = FakeImds::start().await;
    let agent = unary_agent(&c, &imds).await;
    let survivors = stop_server_one(&c).await;
    c.moto.start_recording().await;
    apply_pods_on_node(&c);
    known_everywhere(&c, &survivors).await;
    let ids = c.identities();
    assert!(ids.iter().any(|id| owner_index(&c.servers, &[0, 1, 2], id) == 1), "it owned some");
    every_pod_served_unary(&agent).await;
    // The next in rank after the stopped server is the survivors' owner.
    each_identity_fetched_once_by_its_owner(&c, &survivors).await;
}
