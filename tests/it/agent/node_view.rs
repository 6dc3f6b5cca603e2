//! The agent's node view, end to end against the real server: hits answered with no call to
//! the server, one fetch per identity, invalidation when an IP changes hands under load, static
//! stability through a server outage, fallback to kiam's unary calls, failover of the stream,
//! and the node proven by certificate or by token (TokenReview on the fake API server).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::agent_node::TestAgent;
use crate::support::fake_kube_auth::TokenIdentity;
use crate::support::http::request;
use crate::support::metrics::sample;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack, start_server};
use crate::support::wait::{eventually, until};

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const LIMIT: Duration = Duration::from_secs(15);

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A GET from `from`: status and, on 200, the AccessKeyId.
async fn get(agent: &TestAgent, from: &str, path: &str) -> (u16, Option<String>) {
    let r = request("GET", &format!("{}{path}", agent.url()), &[], "", Some(ip(from))).await.expect("answer");
    let key = (r.status == 200 && path.len() > CREDS.len())
        .then(|| serde_json::from_str::<Value>(&r.body).ok())
        .flatten()
        .and_then(|v| v["AccessKeyId"].as_str().map(str::to_string));
    (r.status, key)
}

/// Waits until `agent`'s view is live with at least `entries` entries.
async fn live(agent: &TestAgent, entries: i64) {
    let m = Arc::clone(&agent.metrics);
    let ready =
        move || std::future::ready(m.agent.view_live.get() == 1 && m.agent.view_entries.get() >= entries);
    until("the node view is live", LIMIT, ready).await;
}

/// A stack with namespace `team-a` permitting everything and the given `(name, ip, role, node)`.
async fn stack_with(options: Options, pods: &[(&str, &str, &str, &str)]) -> Stack {
    let stack = Stack::start_with(options).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    for (name, at, role, node) in pods {
        stack.kube.apply(pod("team-a", name).ip(at).role(role).node(node).build());
    }
    for (_, at, _, _) in pods {
        stack.wait_for_pod(ip(at)).await;
    }
    stack
}

/// An agent for `node` (its certificate names the node), asking the stack's server.
async fn agent_on(stack: &Stack, node: &str) -> TestAgent {
    let cert = stack.pki.agent_for_node(&format!("agent-{node}"), node);
    TestAgent::on_loopback_as(&cert, stack.server_addr, stack.imds.addr(), &[], |_| ()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_answered_from_the_view_without_asking_the_server() {
    let stack = stack_with(Options::default(), &[("web", "127.0.0.121", "app", "node-a")]).await;
    let agent = agent_on(&stack, "node-a").await;
    live(&agent, 1).await;
    let first = get(&agent, "127.0.0.121", &format!("{CREDS}app")).await;
    assert_eq!(first.0, 200);
    let lookups = || sample(&stack.core.metrics().encode(), "kiam_server_pod_lookup_seconds_count");
    let (before, hits) = (lookups(), agent.metrics.agent.view_hits.get());
    for _ in 0..20 {
        assert_eq!(get(&agent, "127.0.0.121", CREDS).await, (200, None));
        assert_eq!(get(&agent, "127.0.0.121", &format!("{CREDS}app")).await, first);
    }
    assert_eq!(lookups(), before, "no request reached the server");
    assert_eq!(agent.metrics.agent.view_hits.get(), hits + 20);
    // A pod the view does not have is waited for, then not found (never guessed).
    assert_eq!(get(&agent, "127.0.0.129", CREDS).await.0, 404);
    // Another node's pod is not in this node's view, and the server refuses it too.
    stack.kube.apply(pod("team-a", "elsewhere").ip("127.0.0.122").role("app").node("node-b").build());
    stack.wait_for_pod(ip("127.0.0.122")).await;
    assert_eq!(get(&agent, "127.0.0.122", CREDS).await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_one_identity_cost_one_fetch_and_never_get_another_identitys_credentials() {
    let pods = [
        ("a1", "127.0.0.161", "app", "node-a"),
        ("a2", "127.0.0.162", "app", "node-a"),
        ("a3", "127.0.0.163", "app", "node-a"),
        ("o1", "127.0.0.165", "other", "node-a"),
    ];
    let stack = stack_with(Options::default(), &pods).await;
    // The same role with an external ID: another identity, so other credentials.
    let x1 = pod("team-a", "x1").ip("127.0.0.164").role("app").node("node-a");
    stack.kube.apply(x1.annotation("iam.amazonaws.com/external-id", "tenant-x").build());
    stack.wait_for_pod(ip("127.0.0.164")).await;
    let lookups = || sample(&stack.core.metrics().encode(), "kiam_server_pod_lookup_seconds_count");
    let before = lookups().unwrap_or_default();
    let agent = agent_on(&stack, "node-a").await;
    live(&agent, 5).await;
    let ask = |at: &'static str, role: &'static str| {
        let agent = &agent;
        async move { get(agent, at, &format!("{CREDS}{role}")).await }
    };
    let answers = futures::future::join_all([
        ask("127.0.0.161", "app"),
        ask("127.0.0.162", "app"),
        ask("127.0.0.163", "app"),
        ask("127.0.0.164", "app"),
        ask("127.0.0.165", "other"),
    ])
    .await;
    let keys: Vec<String> = answers
        .into_iter()
        .map(|(status, key)| {
            assert_eq!(status, 200);
            key.expect("an AccessKeyId")
        })
        .collect();
    assert!(keys[0] == keys[1] && keys[1] == keys[2], "one identity, one set of credentials: {keys:?}");
    assert!(keys[3] != keys[0] && keys[4] != keys[0] && keys[4] != keys[3], "{keys:?}");
    // Five pods, three identities: the agent asked the server three times (once per identity),
    // where one call per pod made five.
    assert_eq!(lookups().unwrap_or_default() - before, 3.0, "fetches for 5 pods of 3 identities");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_ip_never_gets_the_old_pods_credentials_under_load() {
    let stack = stack_with(Options::default(), &[("old", "127.0.0.131", "old-role", "node-a")]).await;
    let agent = Arc::new(agent_on(&stack, "node-a").await);
    live(&agent, 1).await;
    let (status, old_key) = get(&agent, "127.0.0.131", &format!("{CREDS}old-role")).await;
    assert_eq!(status, 200);
    let old_key = old_key.expect("a key");

    // Hammer from the IP (bounded: at most 4000 requests or 20 s), recording when each started.
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (agent, stop) = (Arc::clone(&agent), Arc::clone(&stop));
        tokio::spawn(async move {
            let (started, mut seen) = (Instant::now(), Vec::new());
            for n in 0..4000 {
                if stop.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(20) {
                    break;
                }
                let role = if n % 2 == 0 { "old-role" } else { "new-role" };
                let at = Instant::now();
                seen.push((at, get(&agent, "127.0.0.131", &format!("{CREDS}{role}")).await));
            }
            seen
        })
    };
    // The IP changes hands: the old pod goes, a pod with another role takes its IP.
    stack.kube.delete("Pod", Some("team-a"), "old");
    stack.kube.apply(pod("team-a", "new").ip("127.0.0.131").role("new-role").node("node-a").build());
    let cluster = Arc::clone(stack.core.cluster());
    let moved = || {
        let lookup = cluster.pod_by_ip(ip("127.0.0.131"));
        std::future::ready(!matches!(lookup, kiam::cluster::Lookup::Found(p) if &*p.name == "old"))
    };
    until("the server sees the old pod gone", LIMIT, moved).await;
    let server_moved = Instant::now();
    let new_key = eventually("the new pod is served", LIMIT, || async {
        get(&agent, "127.0.0.131", &format!("{CREDS}new-role")).await.1
    })
    .await;
    // Keep hammering a while after the change.
    let after = eventually("enough requests after the change", LIMIT, || async {
        let n = agent
            .metrics
            .agent
            .responses
            .get_or_create(&kiam::metrics::Response { handler: "credentials", code: 200 });
        (n.get() > 400).then_some(())
    });
    after.await;
    stop.store(true, Ordering::SeqCst);
    let seen = hammer.await.expect("hammer");
    assert!(seen.len() >= 400, "the hammer ran: {}", seen.len());
    let late: Vec<_> = seen.iter().filter(|(at, _)| *at >= server_moved).collect();
    assert!(!late.is_empty(), "requests were made after the change");
    let leaked = late.iter().filter(|(_, (_, key))| key.as_deref() == Some(old_key.as_str())).count();
    assert_eq!(
        leaked,
        0,
        "{leaked} of {} requests after the change got the old pod's credentials",
        late.len()
    );
    assert!(late.iter().any(|(_, (_, key))| key.as_deref() == Some(new_key.as_str())));
    assert!(agent.metrics.agent.view_invalidations.get() >= 1, "the agent was fenced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_serves_through_a_server_outage_and_resynchronises() {
    let stack = stack_with(
        Options::default(),
        &[("web", "127.0.0.141", "app", "node-a"), ("api", "127.0.0.142", "app", "node-a")],
    )
    .await;
    // A second server of our own, which the test stops and starts again.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let options = Options::default();
    let _server = start_server(&stack.kube, &stack.moto, &stack.pki, listener, &options, stop.clone()).await;
    let cert = stack.pki.agent_for_node("agent-a", "node-a");
    let agent = TestAgent::on_loopback_as(&cert, addr, stack.imds.addr(), &[], |_| ()).await;
    live(&agent, 2).await;
    let web = get(&agent, "127.0.0.141", &format!("{CREDS}app")).await;
    assert_eq!(web.0, 200);
    let held = || std::future::ready(agent.metrics.agent.view_hits.get() >= 1);
    get(&agent, "127.0.0.142", &format!("{CREDS}app")).await;
    get(&agent, "127.0.0.142", &format!("{CREDS}app")).await;
    until("credentials are held", LIMIT, held).await;

    stop.cancel();
    let down = || std::future::ready(agent.metrics.agent.view_live.get() == 0);
    until("the agent sees the server gone", LIMIT, down).await;
    // Known pods keep their credentials; a pod the view does not know gets a clear 503.
    for _ in 0..5 {
        assert_eq!(get(&agent, "127.0.0.141", &format!("{CREDS}app")).await, web);
    }
    stack.kube.apply(pod("team-a", "late").ip("127.0.0.143").role("app").node("node-a").build());
    assert_eq!(get(&agent, "127.0.0.143", CREDS).await.0, 503);
    let health =
        request("GET", &format!("{}/health?deep=1", agent.url()), &[], "", None).await.expect("health");
    assert_eq!(health.status, 503, "{}", health.body);

    // While it was down, `api` went away. The server comes back on the same address.
    stack.kube.delete("Pod", Some("team-a"), "api");
    let listener = TcpListener::bind(addr).await.expect("rebind the server's address");
    let _back =
        start_server(&stack.kube, &stack.moto, &stack.pki, listener, &options, CancellationToken::new())
            .await;
    live(&agent, 2).await;
    assert_eq!(agent.metrics.agent.view_entries.get(), 2, "web and late; api dropped by the snapshot");
    assert_eq!(get(&agent, "127.0.0.142", CREDS).await.0, 404);
    assert_eq!(get(&agent, "127.0.0.143", CREDS).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_stream_the_agent_uses_unary_calls() {
    let options = Options { node_view: false, ..Options::default() };
    let stack = stack_with(options, &[("web", "127.0.0.151", "app", "node-a")]).await;
    let agent = agent_on(&stack, "node-a").await;
    let refused = || std::future::ready(agent.metrics.agent.view_refusals.get() >= 1);
    until("the server refuses the stream", LIMIT, refused).await;
    assert_eq!(get(&agent, "127.0.0.151", CREDS).await, (200, None));
    assert_eq!(get(&agent, "127.0.0.151", &format!("{CREDS}app")).await.0, 200);
    assert_eq!(agent.metrics.agent.view_hits.get(), 0, "answered by unary calls");
    assert_eq!(agent.metrics.agent.view_entries.get(), 0);
}

/// The agent's token file, holding `token`.
fn token_file(stack: &Stack, name: &str, token: &str) -> std::path::PathBuf {
    let path = stack.pki.dir().join(name);
    std::fs::write(&path, token).expect("write the token");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_proves_the_node_and_bad_tokens_prove_none() {
    let options = Options { node_binding: true, ..Options::default() };
    let stack = stack_with(
        options,
        &[("web", "127.0.0.161", "app", "node-a"), ("other", "127.0.0.162", "app", "node-b")],
    )
    .await;
    stack.kube.issue_token("good", TokenIdentity::agent_on("node-a"));
    let path = token_file(&stack, "good-token", "good");
    let flags = ["--token-file", path.to_str().expect("path")];
    // The plain agent certificate names no node: only the token does.
    let agent =
        TestAgent::on_loopback_as(&stack.pki.agent(), stack.server_addr, stack.imds.addr(), &flags, |_| ())
            .await;
    live(&agent, 1).await;
    assert_eq!(get(&agent, "127.0.0.161", &format!("{CREDS}app")).await.0, 200);
    assert_eq!(get(&agent, "127.0.0.162", CREDS).await.0, 404, "node-b's pod is not in node-a's view");

    let other_sa =
        TokenIdentity { service_account: "default:someone".into(), ..TokenIdentity::agent_on("node-a") };
    let wrong_audience =
        TokenIdentity { audiences: vec!["vault".into()], ..TokenIdentity::agent_on("node-a") };
    let expired = TokenIdentity { expired: true, ..TokenIdentity::agent_on("node-a") };
    let no_node = TokenIdentity { node: None, ..TokenIdentity::agent_on("node-a") };
    let cases: [(&str, Option<TokenIdentity>, &[&str]); 6] = [
        ("other-sa", Some(other_sa), &[]),
        ("wrong-audience", Some(wrong_audience), &[]),
        ("expired", Some(expired), &[]),
        ("no-node", Some(no_node), &[]),
        ("unknown", None, &[]),
        ("forged-node", Some(TokenIdentity::agent_on("node-a")), &["--node-name", "node-b"]),
    ];
    for (name, identity, extra) in cases {
        if let Some(identity) = identity {
            stack.kube.issue_token(name, identity);
        }
        let path = token_file(&stack, name, name);
        let mut flags = vec!["--token-file", path.to_str().expect("path")];
        flags.extend_from_slice(extra);
        let refused = TestAgent::on_loopback_as(
            &stack.pki.agent(),
            stack.server_addr,
            stack.imds.addr(),
            &flags,
            |_| (),
        )
        .await;
        let m = Arc::clone(&refused.metrics);
        until(&format!("{name}: the stream is refused"), LIMIT, move || {
            std::future::ready(m.agent.view_refusals.get() >= 1)
        })
        .await;
        assert_eq!(refused.metrics.agent.view_entries.get(), 0, "{name}: no view");
        let status = get(&refused, "127.0.0.161", &format!("{CREDS}app")).await.0;
        if name == "forged-node" {
            assert_eq!(status, 200, "{name}: its unary calls still prove node-a");
        } else {
            assert_eq!(status, 403, "{name}: node binding refuses an agent that proves no node");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_fails_over_to_another_server_and_resynchronises() {
    let stack = stack_with(Options::default(), &[("web", "127.0.0.171", "app", "node-a")]).await;
    let name = Arc::new(crate::resilience::failover::Name::default());
    let options = Options::default();
    let mut servers = Vec::new();
    for _ in 0..2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stop = CancellationToken::new();
        let server =
            start_server(&stack.kube, &stack.moto, &stack.pki, listener, &options, stop.clone()).await;
        servers.push((server.addr, stop, server));
    }
    name.set(&[servers[0].0]);
    let cert = stack.pki.agent_for_node("agent-a", "node-a");
    let resolver = Arc::clone(&name) as Arc<dyn kiam::client::Resolve>;
    let agent = TestAgent::resolving(&cert, servers[0].0.port(), stack.imds.addr(), "1s", resolver).await;
    live(&agent, 1).await;
    // The name moves to the second server, then the first one stops.
    let second: SocketAddr = servers[1].0;
    name.set(&[second]);
    servers[0].1.cancel();
    let down = || std::future::ready(agent.metrics.agent.view_live.get() == 0);
    until("the stream breaks with its server", LIMIT, down).await;
    stack.kube.apply(pod("team-a", "joined").ip("127.0.0.172").role("app").node("node-a").build());
    live(&agent, 2).await;
    assert_eq!(get(&agent, "127.0.0.172", &format!("{CREDS}app")).await.0, 200);
}
