//! Several servers behind one name, an agent that starts before any server, and the agent's
//! certificate rotating under load. Name resolution is the test's own (a name the test moves
//! between servers); everything else is real sockets and mutual TLS.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kiam::client::{ClientConfig, GrpcClient, Resolve, Transport};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::agent_node::TestAgent;
use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::FakeImds;
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::metrics::sample;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, TestServer, start_server, tls_files};

pub(crate) use crate::support::names::Name;

fn transport() -> Transport {
    Transport { resolve_every: Duration::from_millis(100), ..Transport::default() }
}

fn client(cert: &CertFiles, port: u16, name: &Arc<Name>) -> GrpcClient {
    client_with_timeout(cert, port, name, Duration::from_secs(5))
}

fn client_with_timeout(cert: &CertFiles, port: u16, name: &Arc<Name>, call_timeout: Duration) -> GrpcClient {
    let config = ClientConfig {
        server_address: format!("kiam-server:{port}"),
        tls: tls_files(cert),
        call_timeout,
        token_file: None,
    };
    GrpcClient::connect_with(&config, &transport(), Arc::clone(name) as Arc<dyn Resolve>).expect("client")
}

struct Cluster {
    pki: TestPki,
    kube: FakeKube,
    moto: Moto,
}

async fn cluster() -> Cluster {
    let cluster = Cluster { pki: TestPki::new(), kube: FakeKube::start().await, moto: Moto::start().await };
    cluster.kube.apply(namespace("team-a").permitted(".*").build());
    cluster.kube.apply(pod("team-a", "web").ip("127.0.0.61").role("app").node("node-a").build());
    cluster.kube.apply(pod("team-a", "api").ip("127.0.0.62").role("app").node("node-b").build());
    cluster
}

async fn server_on(c: &Cluster, addr: SocketAddr, options: &Options) -> TestServer {
    let listener = TcpListener::bind(addr).await.expect("bind a server address");
    start_server(&c.kube, &c.moto, &c.pki, listener, options, CancellationToken::new()).await
}

/// Credential requests (or health checks, with no IP) in a loop until stopped (at most 100k),
/// counting calls and failures.
struct Load {
    stop: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: GrpcClient, ip: &'static str) -> Load {
        let (stop, calls, failures) =
            (Arc::<AtomicBool>::default(), Arc::<AtomicUsize>::default(), Arc::<AtomicUsize>::default());
        let (s, c, f) = (Arc::clone(&stop), Arc::clone(&calls), Arc::clone(&failures));
        let task = tokio::spawn(async move {
            use kiam::agent::Backend;
            for _ in 0..100_000 {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let ok = if ip.is_empty() {
                    client.health().await.is_ok()
                } else {
                    client.pod_credentials(ip.parse().expect("ip"), "app", 0).await.is_ok()
                };
                if !ok {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                c.fetch_add(1, Ordering::SeqCst);
            }
        });
        Load { stop, calls, failures, task }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("load task");
        (self.calls.load(Ordering::SeqCst), self.failures.load(Ordering::SeqCst))
    }
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let check = move || std::future::ready(check());
    crate::support::wait::until(what, Duration::from_secs(15), check).await;
}

fn hits(server: &TestServer) -> u64 {
    server.core.cache().stats().hits.get() + server.core.cache().stats().misses.get()
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_can_die_and_join_behind_one_name_without_a_failed_request() {
    let c = cluster().await;
    let probe = std::net::TcpListener::bind("127.0.0.2:0").expect("probe a port");
    let port = probe.local_addr().expect("addr").port();
    drop(probe);
    let addr = |last: u8| SocketAddr::from(([127, 0, 0, last], port));
    let one = server_on(&c, addr(2), &Options::default()).await;
    let two = server_on(&c, addr(3), &Options::default()).await;
    let name = Arc::new(Name::default());
    name.set(&[addr(2), addr(3)]);
    let client = client(&c.pki.agent(), port, &name);
    // Steady load of credential requests (each one reaches a server's cache).
    let load = Load::start(client.clone(), "127.0.0.61");
    eventually("both servers serve", || hits(&one) > 0 && hits(&two) > 0).await;

    one.shutdown.cancel();
    name.set(&[addr(3)]);
    let before = hits(&two);
    eventually("the survivor carries the load", || hits(&two) > before + 20).await;

    let three = server_on(&c, addr(4), &Options::default()).await;
    name.set(&[addr(3), addr(4)]);
    eventually("a new server gets traffic within the re-resolution period", || hits(&three) > 0).await;
    let (calls, failures) = load.finish().await;
    assert!(calls > 0);
    assert_eq!(failures, 0, "no request failed while servers came and went ({calls} calls)");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_serves_before_any_server_exists_and_works_once_one_appears() {
    let c = cluster().await;
    let imds = FakeImds::start().await;
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    let server_addr = probe.local_addr().expect("addr");
    drop(probe);
    let name = Arc::new(Name::default());
    name.set(&[server_addr]);
    // As the agent's CLI does: one call may take the whole wait budget.
    let resolver = Arc::clone(&name) as Arc<dyn Resolve>;
    let agent =
        TestAgent::resolving(&c.pki.agent(), server_addr.port(), imds.addr(), "500ms", resolver).await;
    let url = agent.url();
    let pod: IpAddr = "127.0.0.61".parse().expect("ip");

    assert_eq!(request("GET", &format!("{url}/ping"), &[], "", None).await.expect("ping").body, "pong");
    let deep = request("GET", &format!("{url}/health?deep=1"), &[], "", None).await.expect("health");
    assert_eq!(deep.status, 503, "not ready without a server: {}", deep.body);
    let creds_url = format!("{url}/latest/meta-data/iam/security-credentials/app");
    let early = request("GET", &creds_url, &[], "", Some(pod)).await.expect("answer");
    assert_eq!(early.status, 503, "{}", early.body);

    let server = server_on(&c, server_addr, &Options::default()).await;
    let health = format!("{url}/health?deep=1");
    let ready = || async { request("GET", &health, &[], "", None).await.is_ok_and(|r| r.status == 200) };
    let what = "the agent becomes ready once a server appears, without a restart";
    crate::support::wait::until(what, Duration::from_secs(15), ready).await;
    // The server warms the pod's role as it starts. A first AssumeRole from a cold moto on a
    // loaded machine can take longer than this agent's 500 ms budget (the request then gets a
    // 503, rightly), which is not what this test is about: wait until the server holds it.
    let fetched = || {
        let text = server.core.metrics().encode();
        let count = sample(&text, "kiam_sts_assumerole_timing_seconds_count");
        std::future::ready(count.is_some_and(|n| n >= 1.0))
    };
    crate::support::wait::until("the server fetched the role", Duration::from_secs(15), fetched).await;
    let served = request("GET", &creds_url, &[], "", Some(pod)).await.expect("answer");
    assert_eq!(served.status, 200, "{}", served.body);
    drop(agent);
}

/// Lays the agent's files out as kubelet does (`name -> ..data/name`, `..data -> ..<version>`).
fn publish(dir: &std::path::Path, version: &str, files: &CertFiles) {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&versioned).expect("dir");
    std::fs::copy(&files.cert, versioned.join("cert.pem")).expect("cert");
    std::fs::copy(&files.key, versioned.join("key.pem")).expect("key");
    std::fs::copy(&files.ca, versioned.join("ca.pem")).expect("ca");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("link");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap");
    for name in ["cert.pem", "key.pem", "ca.pem"] {
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(std::path::Path::new("..data").join(name), link).expect("link");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_certificate_rotates_under_load_and_broken_files_keep_the_old_one() {
    let c = cluster().await;
    // With node binding, which pods the server answers about shows which certificate it saw.
    let options = Options { node_binding: true, ..Options::default() };
    let server = server_on(&c, "127.0.0.1:0".parse().expect("addr"), &options).await;
    let dir = tempfile::tempdir().expect("dir");
    publish(dir.path(), "1", &c.pki.agent_for_node("agent-a", "node-a"));
    let files = CertFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
        ca: dir.path().join("ca.pem"),
    };
    let name = Arc::new(Name::default());
    name.set(&[server.addr]);
    let config = ClientConfig {
        server_address: format!("kiam-server:{}", server.addr.port()),
        tls: tls_files(&files),
        call_timeout: Duration::from_secs(5),
        token_file: None,
    };
    let gauges = kiam::metrics::TlsGauges::default();
    let transport = Transport { tls_gauges: gauges.clone(), ..transport() };
    let client =
        GrpcClient::connect_with(&config, &transport, Arc::clone(&name) as Arc<dyn Resolve>).expect("client");
    use kiam::agent::Backend;
    client.pod_credentials("127.0.0.61".parse().expect("ip"), "app", 0).await.expect("node-a's pod");
    assert!(
        client.pod_credentials("127.0.0.62".parse().expect("ip"), "app", 0).await.is_err(),
        "not node-b's"
    );

    let load = Load::start(client.clone(), "");
    publish(dir.path(), "2", &c.pki.agent_for_node("agent-b", "node-b"));
    let rotated =
        || async { client.pod_credentials("127.0.0.62".parse().expect("ip"), "app", 0).await.is_ok() };
    crate::support::wait::until(
        "new connections present the new certificate",
        Duration::from_secs(15),
        rotated,
    )
    .await;

    let broken = dir.path().join("..3");
    std::fs::create_dir_all(&broken).expect("dir");
    for f in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::write(broken.join(f), "not PEM").expect("write");
    }
    let tmp = dir.path().join("..data_tmp");
    std::os::unix::fs::symlink("..3", &tmp).expect("link");
    std::fs::rename(&tmp, dir.path().join("..data")).expect("swap");
    eventually("the failed reload is reported", || gauges.update_error.get() == 1).await;
    client
        .pod_credentials("127.0.0.62".parse().expect("ip"), "app", 0)
        .await
        .expect("the last good certificate stays");
    let (calls, failures) = load.finish().await;
    assert!(calls > 0);
    assert_eq!(failures, 0, "no request failed during the rotation");
    drop(server);
}
