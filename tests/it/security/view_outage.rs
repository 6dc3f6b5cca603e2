//! The node view under attack while no server answers, and for a terminating pod's IP: a pod
//! deleted during an outage, whose IP a new pod is given, must not lend the new pod its role or
//! credentials (the view is confirmed from a stand-in of the kubelet's PodResources API, served
//! on a unix socket in a temporary directory); without a confirming source, entries are served
//! only for a short bound; and a new pod on a terminating pod's IP is told its own role.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiam::agent::Config;
use kiam::pb::podresources::pod_resources_lister_server::{PodResourcesLister, PodResourcesListerServer};
use kiam::pb::podresources::{ListPodResourcesRequest, ListPodResourcesResponse, PodResources};
use serde_json::Value;
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::support::agent_node::TestAgent;
use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack, TestServer, start_server};
use crate::support::wait::until;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";
const LIMIT: Duration = Duration::from_secs(15);

/// The kubelet's PodResources API, listing what the test says runs on the node.
#[derive(Clone, Default)]
struct Kubelet {
    running: Arc<Mutex<HashSet<(String, String)>>>,
    lists: Arc<std::sync::atomic::AtomicUsize>,
}

#[tonic::async_trait]
impl PodResourcesLister for Kubelet {
    async fn list(
        &self,
        _: tonic::Request<ListPodResourcesRequest>,
    ) -> Result<tonic::Response<ListPodResourcesResponse>, tonic::Status> {
        self.lists.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let running = self.running.lock().expect("lock").clone();
        let pod_resources =
            running.into_iter().map(|(namespace, name)| PodResources { name, namespace }).collect();
        Ok(tonic::Response::new(ListPodResourcesResponse { pod_resources }))
    }
}

impl Kubelet {
    /// Serves on `socket` until `stop`.
    fn serve(&self, socket: &Path, stop: CancellationToken) {
        let listener = UnixListener::bind(socket).expect("bind the PodResources socket");
        let incoming = futures::stream::unfold(listener, |l| async move {
            let conn = l.accept().await.map(|(s, _)| s);
            Some((conn, l))
        });
        let service = PodResourcesListerServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned()),
        );
    }

    fn runs(&self, name: &str, yes: bool) {
        let key = ("team-a".to_string(), name.to_string());
        let mut running = self.running.lock().expect("lock");
        if yes {
            running.insert(key)
        } else {
            running.remove(&key)
        };
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A GET from `from`: status and the body.
async fn get(agent: &TestAgent, from: &str, path: &str) -> (u16, String) {
    let r = request("GET", &format!("{}{path}", agent.url()), &[], "", Some(ip(from))).await.expect("answer");
    (r.status, r.body)
}

fn key(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    v["AccessKeyId"].as_str().map(str::to_string)
}

/// A stack with the given `(name, ip, role)` on node-a, a server of the test's own (stopped by
/// the token), and an agent for node-a asking it, live with credentials held for every pod.
async fn outage_setup(
    pods: &[(&str, &str, &str)],
    flags: &[&str],
    configure: impl FnOnce(&mut Config),
) -> (Stack, CancellationToken, TestAgent, Vec<String>, TestServer) {
    let stack = Stack::start_with(Options::default()).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    for (name, at, role) in pods {
        stack.kube.apply(pod("team-a", name).ip(at).role(role).node("node-a").build());
    }
    for (_, at, _) in pods {
        stack.wait_for_pod(ip(at)).await;
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let options = Options::default();
    let server = start_server(&stack.kube, &stack.moto, &stack.pki, listener, &options, stop.clone()).await;
    let cert = stack.pki.agent_for_node("agent-a", "node-a");
    let agent = TestAgent::on_loopback_as(&cert, addr, stack.imds.addr(), flags, configure).await;
    let m = Arc::clone(&agent.metrics);
    let n = pods.len() as i64;
    until("the node view is live", LIMIT, move || {
        std::future::ready(m.agent.view_live.get() == 1 && m.agent.view_entries.get() >= n)
    })
    .await;
    let mut keys = Vec::new();
    for (_, at, role) in pods {
        let (status, body) = get(&agent, at, &format!("{CREDS}{role}")).await;
        assert_eq!(status, 200, "{body}");
        keys.push(key(&body).expect("a key"));
    }
    let held = agent.metrics.agent.view_hits.get();
    for (_, at, role) in pods {
        get(&agent, at, &format!("{CREDS}{role}")).await;
    }
    let m = Arc::clone(&agent.metrics);
    until("credentials are held", LIMIT, move || std::future::ready(m.agent.view_hits.get() > held)).await;
    (stack, stop, agent, keys, server)
}

async fn outage(stop: &CancellationToken, agent: &TestAgent) {
    stop.cancel();
    let m = Arc::clone(&agent.metrics);
    until("the agent sees the server gone", LIMIT, move || std::future::ready(m.agent.view_live.get() == 0))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_an_ip_freed_during_an_outage_gets_neither_the_old_role_nor_its_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("kubelet.sock");
    let kubelet = Kubelet::default();
    kubelet.runs("web", true);
    kubelet.runs("api", true);
    let kubelet_stop = CancellationToken::new();
    kubelet.serve(&socket, kubelet_stop.clone());
    let flags = ["--pod-resources-socket", socket.to_str().expect("utf-8 path")];
    let pods = [("web", "127.0.0.181", "app-web"), ("api", "127.0.0.182", "app-api")];
    let (stack, stop, agent, keys, _server) = outage_setup(&pods, &flags, |_| ()).await;
    assert_eq!(kubelet.lists.load(std::sync::atomic::Ordering::SeqCst), 0, "no List while servers answer");

    outage(&stop, &agent).await;
    // Confirmed by the kubelet, both keep being served.
    let (status, body) = get(&agent, "127.0.0.182", &format!("{CREDS}app-api")).await;
    assert_eq!((status, key(&body)), (200, Some(keys[1].clone())));

    // `api` is deleted during the outage and a new pod is given its IP.
    stack.kube.delete("Pod", Some("team-a"), "api");
    kubelet.runs("api", false);
    stack.kube.apply(pod("team-a", "intruder").ip("127.0.0.182").node("node-a").build());
    kubelet.runs("intruder", true);
    until("the freed IP is no longer answered from the view", LIMIT, || async {
        get(&agent, "127.0.0.182", CREDS).await.0 == 503
    })
    .await;
    for _ in 0..5 {
        let (status, body) = get(&agent, "127.0.0.182", &format!("{CREDS}app-api")).await;
        assert_eq!(status, 503, "{body}");
        assert!(!body.contains(&keys[1]), "the deleted pod's credentials: {body}");
        let (status, body) = get(&agent, "127.0.0.182", CREDS).await;
        assert!(status == 503 && !body.contains("app-api"), "{status} {body}");
        // The pod that still runs is served throughout.
        let (status, body) = get(&agent, "127.0.0.181", &format!("{CREDS}app-web")).await;
        assert_eq!((status, key(&body)), (200, Some(keys[0].clone())));
    }
    kubelet_stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_confirming_source_the_view_is_served_only_for_a_short_bound_after_an_outage() {
    let bound = Duration::from_secs(2);
    let pods = [("solo", "127.0.0.183", "app-solo")];
    let (_stack, stop, agent, keys, _server) = outage_setup(&pods, &["--pod-resources-socket="], |c| {
        assert_eq!(c.pod_resources_socket, None, "an empty value disables the source");
        c.unconfirmed_bound = bound;
    })
    .await;
    outage(&stop, &agent).await;
    let down = Instant::now();
    let (status, body) = get(&agent, "127.0.0.183", &format!("{CREDS}app-solo")).await;
    assert_eq!((status, key(&body)), (200, Some(keys[0].clone())), "served within the bound");
    until("the entry is no longer served", LIMIT, || async {
        get(&agent, "127.0.0.183", &format!("{CREDS}app-solo")).await.0 == 503
    })
    .await;
    assert!(down.elapsed() >= bound / 2, "not before the bound: {:?}", down.elapsed());
    let (status, body) = get(&agent, "127.0.0.183", &format!("{CREDS}app-solo")).await;
    assert!(status == 503 && !body.contains(&keys[0]), "{status} {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pod_on_a_terminating_pods_ip_is_told_its_own_role() {
    let stack = Stack::start_with(Options::default()).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "old").ip("127.0.0.184").role("old-role").node("node-a").build());
    stack.wait_for_pod(ip("127.0.0.184")).await;
    let cert = stack.pki.agent_for_node("agent-a", "node-a");
    let agent = TestAgent::on_loopback_as(&cert, stack.server_addr, stack.imds.addr(), &[], |_| ()).await;
    let m = Arc::clone(&agent.metrics);
    until("the node view is live", LIMIT, move || {
        std::future::ready(m.agent.view_live.get() == 1 && m.agent.view_entries.get() >= 1)
    })
    .await;
    assert_eq!(get(&agent, "127.0.0.184", CREDS).await, (200, "old-role".to_string()));

    stack
        .kube
        .apply(pod("team-a", "old").ip("127.0.0.184").role("old-role").node("node-a").terminating().build());
    // Once the view knows `old` is terminating, its role is told only after the grace.
    until("a terminating pod's role waits for the grace", LIMIT, || async {
        let started = Instant::now();
        let answer = get(&agent, "127.0.0.184", CREDS).await;
        answer == (200, "old-role".to_string()) && started.elapsed() >= Duration::from_millis(400)
    })
    .await;
    // A new pod given the IP within the grace is told its own role, never the old one.
    let asking = {
        let url = agent.url();
        tokio::spawn(async move {
            request("GET", &format!("{url}{CREDS}"), &[], "", Some(ip("127.0.0.184"))).await
        })
    };
    stack.kube.apply(pod("team-a", "new").ip("127.0.0.184").role("new-role").node("node-a").build());
    let answer = asking.await.expect("join").expect("answer");
    assert_eq!((answer.status, answer.body.as_str()), (200, "new-role"));
    assert_eq!(get(&agent, "127.0.0.184", CREDS).await, (200, "new-role".to_string()));
}
