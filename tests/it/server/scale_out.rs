//! `kiam server --peers`: three servers behind one name (on 127.0.0.2, .3 and .4, the test's own
//! resolver standing for the headless Service) share the identities, each fetched once
//! cluster-wide; a server that stops has its identities taken over by the survivors at once;
//! without `--peers` every server keeps every identity warm, as before. And `--sts-rate`: live
//! requests go before prefetch, and STS's throttling is counted and backed off from.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kiam::agent::Backend;
use kiam::client::{ClientConfig, GrpcClient, Resolve, Transport};
use kiam::creds::Identity;
use kiam::pb;
use kiam::policy::rendezvous;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::resilience::failover::Name;
use crate::support::certs::TestPki;
use crate::support::fake_kube::FakeKube;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack, TestServer, start_server, tls_files};
use crate::support::sts_faults::{Fault, StsFaults};
use crate::support::wait::until;

pub(crate) const ROLES: usize = 12;
pub(crate) const WAIT: Duration = Duration::from_secs(30);

pub(crate) struct Peers {
    pub(crate) pki: TestPki,
    pub(crate) kube: FakeKube,
    pub(crate) moto: Moto,
    pub(crate) name: Arc<Name>,
    pub(crate) port: u16,
    pub(crate) servers: Vec<TestServer>,
}

fn addr(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// Servers on 127.0.0.2.. (`count` of them), all behind one name; with `peers`, each started with
/// `--peers` on that name. Returns once every server sees all the others.
pub(crate) async fn servers(count: u8, peers: bool) -> Peers {
    let (pki, kube, moto) = (TestPki::new(), FakeKube::start().await, Moto::start().await);
    let probe = std::net::TcpListener::bind("127.0.0.2:0").expect("probe a port");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let name = Arc::new(Name::default());
    let all: Vec<SocketAddr> = (2..2 + count).map(|last| addr(last, port)).collect();
    name.set(&all);
    let target: &'static str = Box::leak(format!("kiam-peers:{port}").into_boxed_str());
    let mut servers = Vec::new();
    for a in &all {
        let options = if peers {
            Options {
                server_flags: vec!["--peers", target, "--peers-interval", "100ms"],
                peers: Some(Arc::clone(&name) as Arc<dyn Resolve>),
                ..Options::default()
            }
        } else {
            Options::default()
        };
        let listener = TcpListener::bind(a).await.expect("bind a server address");
        servers.push(start_server(&kube, &moto, &pki, listener, &options, CancellationToken::new()).await);
    }
    let c = Peers { pki, kube, moto, name, port, servers };
    if peers {
        c.wait_for_peers(0..c.servers.len(), usize::from(count)).await;
    }
    c
}

impl Peers {
    async fn wait_for_peers(&self, which: std::ops::Range<usize>, n: usize) {
        let seen = || {
            let servers = &self.servers[which.clone()];
            std::future::ready(servers.iter().all(|s| s.core.metrics().scale.peers.get() == n as i64))
        };
        until(&format!("every server sees {n} peers"), WAIT, seen).await;
    }

    fn apply_pods(&self) {
        self.kube.apply(namespace("team-a").permitted(".*").build());
        for i in 0..ROLES {
            let ip = format!("10.90.0.{}", i + 1);
            self.kube.apply(pod("team-a", &format!("p{i}")).ip(&ip).role(&format!("role-{i}")).build());
        }
    }

    /// The identities in use, as the first server sees them.
    pub(crate) fn identities(&self) -> Vec<Identity> {
        let mut ids: Vec<Identity> = self.servers[0].core.active_identities().into_iter().collect();
        ids.sort_by(|a, b| a.role.as_str().cmp(b.role.as_str()));
        ids
    }

    pub(crate) fn holds(&self, server: usize, identity: &Identity) -> bool {
        self.servers[server].core.cache().state(identity).is_some_and(|s| s.issued.is_some())
    }

    /// AssumeRole calls moto recorded, by role ARN.
    pub(crate) async fn calls_by_role(&self) -> HashMap<String, usize> {
        let mut calls = HashMap::new();
        for call in self.moto.recorded_assume_roles().await {
            *calls.entry(call.role_arn).or_default() += 1;
        }
        calls
    }

    pub(crate) async fn wait_for_calls(&self, n: usize) -> HashMap<String, usize> {
        let enough = || async { self.moto.recorded_assume_roles().await.len() >= n };
        until(&format!("{n} AssumeRole calls"), WAIT, enough).await;
        self.calls_by_role().await
    }

    pub(crate) fn client(&self) -> GrpcClient {
        let config = ClientConfig {
            server_address: format!("kiam-server:{}", self.port),
            tls: tls_files(&self.pki.agent()),
            call_timeout: Duration::from_secs(10),
            token_file: None,
        };
        let transport = Transport { resolve_every: Duration::from_millis(100), ..Transport::default() };
        GrpcClient::connect_with(&config, &transport, Arc::clone(&self.name) as Arc<dyn Resolve>)
            .expect("client")
    }
}

fn ip_of(server: &TestServer) -> IpAddr {
    server.addr.ip()
}

/// The index (in `servers`) of the owner of `identity` among `live`.
pub(crate) fn owner_index(servers: &[TestServer], live: &[usize], identity: &Identity) -> usize {
    let ips: Vec<IpAddr> = live.iter().map(|i| ip_of(&servers[*i])).collect();
    let owner = rendezvous::owner(identity.affinity_key(), &ips).expect("an owner");
    live.iter().copied().find(|i| ip_of(&servers[*i]) == owner).expect("a live server")
}

#[tokio::test(flavor = "multi_thread")]
async fn three_peers_fetch_each_identity_once_and_only_its_owner_holds_it() {
    let c = servers(3, true).await;
    c.moto.start_recording().await;
    c.apply_pods();
    let calls = c.wait_for_calls(ROLES).await;
    let ids = c.identities();
    assert_eq!(ids.len(), ROLES);
    let live = [0, 1, 2];
    for id in &ids {
        let owner = owner_index(&c.servers, &live, id);
        let held = || std::future::ready(c.holds(owner, id));
        until("the owner holds its identity", WAIT, held).await;
        for other in live.iter().filter(|i| **i != owner) {
            assert!(!c.holds(*other, id), "server {other} fetched {} it does not own", id.role.as_str());
        }
    }
    assert_eq!(calls.len(), ROLES, "every identity fetched: {calls:?}");
    assert!(calls.values().all(|n| *n == 1), "each identity fetched once cluster-wide: {calls:?}");
    let owned: i64 = c.servers.iter().map(|s| s.core.metrics().scale.identities_owned.get()).sum();
    let counted = || {
        let owned: i64 = c.servers.iter().map(|s| s.core.metrics().scale.identities_owned.get()).sum();
        std::future::ready(owned == ROLES as i64)
    };
    until(&format!("the owned gauges add up to {ROLES} (now {owned})"), WAIT, counted).await;
    for (i, s) in c.servers.iter().enumerate() {
        let prefetched = s.core.metrics().scale.sts_calls.get_or_create(&reason("prefetch")).get();
        let mine = ids.iter().filter(|id| owner_index(&c.servers, &live, id) == i).count() as u64;
        assert_eq!(prefetched, mine, "server {i} prefetched exactly what it owns");
    }
}

fn reason(reason: &'static str) -> kiam::metrics::Reason {
    kiam::metrics::Reason { reason }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_peers_every_server_fetches_every_identity() {
    let c = servers(2, false).await;
    c.moto.start_recording().await;
    c.apply_pods();
    let calls = c.wait_for_calls(2 * ROLES).await;
    assert_eq!(calls.len(), ROLES);
    assert!(calls.values().all(|n| *n == 2), "each server fetched each identity: {calls:?}");
    for id in c.identities() {
        let both = || std::future::ready(c.holds(0, &id) && c.holds(1, &id));
        until("both servers hold every identity", WAIT, both).await;
    }
    // No owner to find: the role lookup carries no key, and agents balance.
    let role = c.client().get_pod_role("10.90.0.1".parse().expect("ip")).await.expect("role");
    assert_eq!((role.name.as_str(), role.affinity), ("role-0", 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn survivors_take_over_a_stopped_peers_identities_and_every_request_is_served() {
    let c = servers(3, true).await;
    c.moto.start_recording().await;
    c.apply_pods();
    c.wait_for_calls(ROLES).await;
    let ids = c.identities();
    let all = [0, 1, 2];
    let gone = 1;
    let orphans: Vec<&Identity> = ids.iter().filter(|id| owner_index(&c.servers, &all, id) == gone).collect();
    assert!(!orphans.is_empty(), "the stopped server owned some identities");
    for id in &ids {
        let held = || std::future::ready(c.holds(owner_index(&c.servers, &all, id), id));
        until("every owner holds its identities", WAIT, held).await;
    }

    // The server stops; the name still lists it (DNS lags), but it no longer accepts connections.
    c.servers[gone].shutdown.cancel();
    let survivors = [0, 2];
    let seen = || {
        let peers = |i: usize| c.servers[i].core.metrics().scale.peers.get();
        std::future::ready(survivors.iter().all(|i| peers(*i) == 2))
    };
    until("the survivors see the peer gone", WAIT, seen).await;
    let calls = c.wait_for_calls(ROLES + orphans.len()).await;
    for id in &orphans {
        let heir = owner_index(&c.servers, &survivors, id);
        let held = || std::future::ready(c.holds(heir, id));
        until("the heir prefetched the identity it took over", WAIT, held).await;
    }
    for id in &ids {
        let expected = if orphans.contains(&id) { 2 } else { 1 };
        assert_eq!(
            calls.get(id.role.as_str()).copied(),
            Some(expected),
            "{}: an identity a survivor already owned is not fetched again: {calls:?}",
            id.role.as_str()
        );
    }
    let handoffs: u64 = survivors.iter().map(|i| c.servers[*i].core.metrics().scale.handoffs.get()).sum();
    assert_eq!(handoffs, orphans.len() as u64, "each taken-over identity counted once");

    // An agent asking for every pod is served (the client drops the stopped server once the
    // name stops listing it, as the Service's endpoints would).
    c.name.set(&[addr(2, c.port), addr(4, c.port)]);
    let client = c.client();
    for i in 0..ROLES {
        let ip: IpAddr = format!("10.90.0.{}", i + 1).parse().expect("ip");
        client.pod_credentials(ip, &format!("role-{i}"), 0).await.expect("served after the loss of a server");
    }
}

fn creds(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

#[tokio::test(flavor = "multi_thread")]
async fn live_requests_go_before_a_queue_of_prefetches() {
    let flags = vec!["--sts-rate", "2", "--fetchers", "32"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    for i in 0..30 {
        let ip = format!("10.91.0.{}", i + 1);
        stack.kube.apply(pod("team-a", &format!("p{i}")).ip(&ip).role(&format!("queued-{i}")).build());
    }
    // Once the first prefetches have gone, the rest wait half a second each for the budget.
    stack.wait_for_sts_calls(1).await;
    for i in 0..5 {
        let ip = format!("10.91.1.{}", i + 1);
        stack.kube.apply(pod("team-a", &format!("live{i}")).ip(&ip).role(&format!("live-{i}")).build());
    }
    stack.wait_for_pod("10.91.1.5".parse().expect("ip")).await;
    let client = stack.client(&stack.pki.agent());
    let asks =
        (0..5).map(|i| {
            let mut grpc = client.service();
            async move {
                grpc.get_pod_credentials(creds(&format!("10.91.1.{}", i + 1), &format!("live-{i}"))).await
            }
        });
    for answer in futures::future::join_all(asks).await {
        answer.expect("served");
    }
    let calls = stack.moto.recorded_assume_roles().await;
    let live: Vec<usize> =
        calls.iter().enumerate().filter(|(_, c)| c.role_arn.contains("/live-")).map(|(i, _)| i).collect();
    let roles: Vec<&str> = calls.iter().map(|c| c.role_arn.rsplit('/').next().unwrap_or("")).collect();
    assert_eq!(live.len(), 5, "{roles:?}");
    // The requests took the next five slots, one after another: no queued prefetch got one
    // between them (drawing lots with the 25-odd queued prefetches, they would rarely be
    // consecutive), and prefetches were still waiting when they were served.
    assert_eq!(live[4] - live[0], 4, "the requests' calls are consecutive: {roles:?}");
    assert!(calls.len() < 35, "prefetches were still waiting: {roles:?}");
}

#[tokio::test]
async fn throttling_is_counted_and_every_call_backs_off() {
    let faults = StsFaults::start().await;
    let stack =
        Stack::start_with(Options { sts_endpoint: Some(faults.endpoint()), ..Options::default() }).await;
    faults.forward_to(stack.moto.addr());
    faults.set(Fault::Status(400, "Throttling"));
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "busy").ip("10.92.0.1").role("app").build());
    let throttled = || std::future::ready(stack.core.metrics().scale.sts_throttled.get() >= 1);
    until("the throttled call is counted", WAIT, throttled).await;
    assert!(stack.core.cache().throttle_pause() > Duration::ZERO, "every later call waits a pause");
    let text = stack.core.metrics().encode();
    assert!(text.contains("kiam_sts_throttled_total"), "exposed");
    faults.set(Fault::None);
    let grpc = stack.client(&stack.pki.agent()).service();
    let served = || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds("10.92.0.1", "app")).await.is_ok() }
    };
    until("served once STS stops throttling", WAIT, served).await;
}

#[tokio::test]
async fn replicas_of_one_identity_take_one_prefetch_worker_and_the_next_identity_is_not_kept_waiting() {
    let faults = StsFaults::start().await;
    let options = Options {
        sts_endpoint: Some(faults.endpoint()),
        server_flags: vec!["--fetchers", "2"],
        ..Options::default()
    };
    let stack = Stack::start_with(options).await;
    faults.forward_to(stack.moto.addr());
    stack.moto.start_recording().await;
    // STS keeps every call waiting: a prefetch holds its worker until the fault lifts.
    faults.set(Fault::Hold);
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    // A Deployment's replicas arrive together, then a pod of another identity.
    for i in 0..3 {
        stack
            .kube
            .apply(pod("team-a", &format!("web-{i}")).ip(&format!("10.93.0.{}", i + 1)).role("web").build());
    }
    stack.kube.apply(pod("team-a", "api").ip("10.93.1.1").role("api").build());
    // Both identities' calls are out at once: the replicas took one worker, not both (with a
    // worker each, the second replica's wait for the first one's call kept `api` from starting).
    let both = || std::future::ready(faults.held() >= 2);
    until("both identities' prefetches reach STS together", WAIT, both).await;
    faults.set(Fault::None);
    let grpc = stack.client(&stack.pki.agent()).service();
    for (ip, role) in [("10.93.0.1", "web"), ("10.93.0.3", "web"), ("10.93.1.1", "api")] {
        grpc.clone().get_pod_credentials(creds(ip, role)).await.expect("served");
    }
    let calls = stack.moto.recorded_assume_roles().await;
    let mut roles: Vec<&str> = calls.iter().map(|c| c.role_arn.rsplit('/').next().unwrap_or("")).collect();
    roles.sort_unstable();
    assert_eq!(roles, ["api", "web"], "one call per identity");
}
