//! Tests of the test peers themselves (`support/`): each one fails if its helper is broken, so a
//! failing product test can be trusted to point at the product.
//!
//! Tests that run a blocking SDK helper or a pod-side request use a multi-thread runtime and
//! `block_in_place`, so the fakes keep serving while the test thread waits.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use aws_sdk_sts::config::{BehaviorVersion, Credentials, Region};
use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, block_in_place};

use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::{self, FakeImds, NODE_ACCESS_KEY_ID};
use crate::support::moto::Moto;
use crate::support::netns::PodNet;
use crate::support::{http, sdk};

/// Any key moto does not know gets this identity from GetCallerIdentity (moto's default caller).
const MOTO_DEFAULT_CALLER: &str = "arn:aws:sts::123456789012:user/moto";

#[tokio::test]
async fn moto_assume_role_is_recorded_with_session_and_region() {
    let moto = Moto::start().await;
    assert_eq!(moto.endpoint(), format!("http://{}", moto.addr()));
    moto.reset().await;
    moto.start_recording().await;
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-central-1"))
        .endpoint_url(moto.endpoint())
        .credentials_provider(Credentials::new("AKIDPEERSTEST", "secret", None, None, "test"))
        .build();
    let role_arn = "arn:aws:iam::123456789012:role/peers-role";
    let out = aws_sdk_sts::Client::from_conf(conf)
        .assume_role()
        .role_arn(role_arn)
        .role_session_name("peers-session")
        .external_id("peers-external")
        .duration_seconds(900)
        .send()
        .await
        .expect("AssumeRole against moto");
    let creds = out.credentials().expect("AssumeRole returns credentials");
    assert!(creds.access_key_id().starts_with("ASIA"), "{creds:?}");
    let user = out.assumed_role_user().expect("AssumeRole returns the user");
    assert_eq!(user.arn(), "arn:aws:sts::123456789012:assumed-role/peers-role/peers-session");

    let calls = moto.recorded_assume_roles().await;
    assert_eq!(calls.len(), 1, "{calls:?}\nmoto log:\n{}", moto.log());
    assert_eq!(calls[0].role_arn, role_arn);
    assert_eq!(calls[0].session_name, "peers-session");
    assert_eq!(calls[0].external_id.as_deref(), Some("peers-external"));
    assert_eq!(calls[0].duration_seconds, Some(900));
    assert_eq!(calls[0].region, "eu-central-1");
}

#[tokio::test]
async fn fake_imds_meets_the_token_contract() {
    let imds = FakeImds::start().await;
    let url = |path: &str| format!("{}{path}", imds.url());
    let token_url = url("/latest/api/token");
    let ttl = "x-aws-ec2-metadata-token-ttl-seconds";

    let issued = http::request("PUT", &token_url, &[(ttl, "21600")], "", None).await.unwrap();
    assert_eq!(issued.status, 200);
    assert_eq!(issued.header(ttl), Some("21600"), "the TTL is echoed");
    let token = issued.body.clone();
    for bad in ["0", "21601", "x"] {
        let resp = http::request("PUT", &token_url, &[(ttl, bad)], "", None).await.unwrap();
        assert_eq!(resp.status, 400, "TTL {bad}");
    }
    let no_ttl = http::request("PUT", &token_url, &[], "", None).await.unwrap();
    assert_eq!(no_ttl.status, 400);
    let forwarded = [(ttl, "60"), ("x-forwarded-for", "10.0.0.1")];
    let resp = http::request("PUT", &token_url, &forwarded, "", None).await.unwrap();
    assert_eq!(resp.status, 403);

    let creds_path = url("/latest/meta-data/iam/security-credentials/node-role");
    let with = |t| [("x-aws-ec2-metadata-token", t)];
    let resp = http::request("GET", &creds_path, &with(token.as_str()), "", None).await.unwrap();
    assert_eq!(resp.status, 200);
    let json: serde_json::Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(json["AccessKeyId"], NODE_ACCESS_KEY_ID);
    assert_eq!(json["Code"], "Success");
    let bad = http::request("GET", &creds_path, &with("nope"), "", None).await.unwrap();
    assert_eq!(bad.status, 401, "unknown token");
    let v1 = http::get(&url("/latest/meta-data/instance-id"), None).await.unwrap();
    assert_eq!((v1.status, v1.body.as_str()), (200, fake_imds::INSTANCE_ID));
    let region = http::get(&url("/latest/meta-data/placement/region"), None).await.unwrap();
    assert_eq!(region.body, "us-east-1");
    let missing = http::get(&url("/latest/meta-data/nothing-here"), None).await.unwrap();
    assert_eq!(missing.status, 404);

    let recorded = imds.requests();
    assert_eq!(recorded.len(), 11, "{recorded:?}");
    assert_eq!(recorded[0].method, "PUT");
    assert_eq!(recorded[0].header(ttl), Some("21600"));

    let strict = FakeImds::start_v2_only().await;
    let doc = format!("{}/latest/dynamic/instance-identity/document", strict.url());
    assert_eq!(http::get(&doc, None).await.unwrap().status, 401, "v2-only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_in_a_pod_gets_the_node_credentials_from_the_fake_imds() {
    let (moto, net) = (Moto::start().await, PodNet::create());
    let imds = FakeImds::start_on(SocketAddr::from((net.host_ip, 0))).await;
    assert_eq!(imds.addr().ip(), IpAddr::V4(net.host_ip));
    let outcome = block_in_place(|| sdk::boto3(&net, &imds.url(), &moto.endpoint()))
        .expect("boto3 gets credentials from the fake IMDS");
    assert_eq!(outcome.access_key_id, NODE_ACCESS_KEY_ID);
    assert_eq!(outcome.caller_arn, MOTO_DEFAULT_CALLER);
    let recorded = imds.requests();
    assert!(!recorded.is_empty());
    assert!(
        recorded.iter().all(|r| r.peer.ip() == IpAddr::V4(net.pod_ip)),
        "every request comes from the pod's IP: {recorded:?}"
    );
    assert!(recorded.iter().any(|r| r.path.ends_with("/node-role")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awscli_in_a_pod_gets_the_node_credentials_from_the_fake_imds() {
    let (moto, net) = (Moto::start().await, PodNet::create());
    let imds = FakeImds::start_on(SocketAddr::from((net.host_ip, 0))).await;
    let outcome = block_in_place(|| sdk::awscli(&net, &imds.url(), &moto.endpoint()))
        .expect("awscli gets credentials from the fake IMDS");
    assert_eq!(outcome.access_key_id, NODE_ACCESS_KEY_ID);
    assert_eq!(outcome.caller_arn, MOTO_DEFAULT_CALLER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_sdk_in_a_pod_uses_the_token_flow() {
    let (moto, net) = (Moto::start().await, PodNet::create());
    let imds = FakeImds::start_with(SocketAddr::from((net.host_ip, 0)), true).await;
    let outcome = block_in_place(|| sdk::rust_sdk(&net, &imds.url(), &moto.endpoint()))
        .expect("the Rust SDK gets credentials from a v2-only fake IMDS");
    assert_eq!(outcome.access_key_id, NODE_ACCESS_KEY_ID);
    assert_eq!(outcome.caller_arn, MOTO_DEFAULT_CALLER);
    let recorded = imds.requests();
    assert_eq!(recorded[0].method, "PUT", "{recorded:?}");
    assert_eq!(recorded[0].path, "/latest/api/token");
    assert_eq!(recorded[0].peer.ip(), IpAddr::V4(net.pod_ip));
    assert!(recorded[1..].iter().all(|r| r.header("x-aws-ec2-metadata-token").is_some()), "{recorded:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdks_in_a_pod_report_no_credentials_without_imds() {
    let (moto, net) = (Moto::start().await, PodNet::create());
    // Nothing listens there: the connection is refused, as from a node with no metadata service.
    let dead = format!("http://{}:9", net.host_ip);
    let err =
        block_in_place(|| sdk::boto3(&net, &dead, &moto.endpoint())).expect_err("no IMDS, no credentials");
    assert!(err.contains("no credentials"), "{err}");
    let err =
        block_in_place(|| sdk::awscli(&net, &dead, &moto.endpoint())).expect_err("no IMDS, no credentials");
    assert!(err.contains("Unable to locate credentials"), "{err}");
    let err =
        block_in_place(|| sdk::rust_sdk(&net, &dead, &moto.endpoint())).expect_err("no IMDS, no credentials");
    assert!(err.contains("IMDS credentials"), "{err}");
}

#[tokio::test]
async fn mtls_accepts_the_agent_and_refuses_the_stranger() {
    let pki = TestPki::new();
    let (server, client) = mtls_exchange(&pki, &pki.agent(), "kiam-server").await;
    server.expect("server accepts the agent");
    client.expect("agent completes the exchange");
    let (_, client) = mtls_exchange(&pki, &pki.agent(), "127.0.0.1").await;
    client.expect("the server cert is valid for 127.0.0.1");
    let other = pki.client("other-agent", "kiam-agent-2");
    assert!(other.cert.starts_with(pki.dir()) && other.key.starts_with(pki.dir()));
    let (server, _) = mtls_exchange(&pki, &other, "localhost").await;
    server.expect("any client cert from the CA is accepted");

    let (server, client) = mtls_exchange(&pki, &pki.stranger(), "kiam-server").await;
    let refusal = server.expect_err("server refuses a client cert from another CA");
    assert!(refusal.contains("UnknownIssuer"), "{refusal}");
    client.expect_err("the stranger gets no answer");
}

#[tokio::test]
async fn http_client_connects_from_the_chosen_source_ip() {
    let (addr, _server) = peer_echo(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await;
    let url = format!("http://{addr}/");
    let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 7));
    let resp = http::get(&url, Some(from)).await.expect("request from 127.0.0.7");
    assert_eq!((resp.status, resp.body.as_str()), (200, "127.0.0.7"));
    assert!(resp.header("Content-Type").is_some_and(|v| v.starts_with("text/plain")));
    let resp = http::get(&url, None).await.expect("request from the default address");
    assert_eq!(resp.body, "127.0.0.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_distinct_ips_seen_by_a_host_server() {
    let (a, b) = (PodNet::create(), PodNet::create());
    assert_ne!(a.name, b.name);
    assert_ne!(a.pod_ip, b.pod_ip);
    let (addr, _server) = peer_echo(SocketAddr::from((a.host_ip, 0))).await;
    for net in [&a, &b] {
        let url = format!("http://{addr}/");
        let seen =
            block_in_place(|| net.run_in(|| in_pod(&url))).expect("a pod reaches a server on the host");
        assert_eq!(seen.body, net.pod_ip.to_string());
        let out = net.command("ip").args(["-4", "-o", "addr"]).output().unwrap();
        let addrs = String::from_utf8_lossy(&out.stdout);
        assert!(addrs.contains(&format!("{}/30", net.pod_ip)), "{addrs}");
    }
    // A loopback-only server is reachable from a pod through `expose`.
    let (loopback, _local) = peer_echo(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await;
    let relay = b.expose(loopback);
    assert_eq!(relay.addr().ip(), IpAddr::V4(b.host_ip));
    let seen = block_in_place(|| b.run_in(|| in_pod(&format!("{}/", relay.url()))))
        .expect("a pod reaches a loopback server through the relay");
    assert_eq!(seen.body, "127.0.0.1", "the relay connects from loopback");
    drop(relay);

    let name = a.name.clone();
    drop(a);
    let list = std::process::Command::new("ip").args(["netns", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(!list.lines().any(|l| l.split_whitespace().next() == Some(&name)), "{list}");
}

/// A GET on a current-thread runtime built on the calling (pod) thread.
fn in_pod(url: &str) -> Result<http::Response, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime inside the pod")
        .block_on(http::get(url, None))
}

/// An HTTP server on `bind` whose body is the caller's IP.
async fn peer_echo(bind: SocketAddr) -> (SocketAddr, AbortOnDrop) {
    let listener = TcpListener::bind(bind).await.expect("bind the echo server");
    let addr = listener.local_addr().expect("echo server address");
    let app = Router::new()
        .route("/", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }));
    let task = tokio::spawn(async move {
        let service = app.into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(listener, service).await.expect("echo server");
    });
    (addr, AbortOnDrop(task))
}

/// Aborts a server task when the test's handle goes away.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One mTLS connection: server (trusting only the real CA for clients) and a client presenting
/// `client` and verifying the server as `server_name`. Returns (server result, client result),
/// where success means "ping" went up and "pong" came back.
async fn mtls_exchange(
    pki: &TestPki,
    client: &CertFiles,
    server_name: &str,
) -> (Result<(), String>, Result<(), String>) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_files = pki.server();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(&server_files.ca)),
        Arc::clone(&provider),
    )
    .build()
    .expect("client verifier");
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain(&server_files.cert), key(&server_files.key))
        .expect("server cert and key");
    let client_config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots(&client.ca))
        .with_client_auth_cert(chain(&client.cert), key(&client.key))
        .expect("client cert and key");

    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind TLS server");
    let addr = listener.local_addr().expect("TLS server address");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("{e:?}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("{e:?}"))?;
        tls.write_all(b"pong").await.map_err(|e| format!("{e:?}"))?;
        tls.shutdown().await.map_err(|e| format!("{e:?}"))
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let client = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("{e:?}"))?;
        tls.write_all(b"ping").await.map_err(|e| format!("{e:?}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("{e:?}"))?;
        if &buf == b"pong" { Ok(()) } else { Err(format!("got {buf:?}")) }
    };
    let bound = std::time::Duration::from_secs(10);
    let client = tokio::time::timeout(bound, client).await.expect("client finishes");
    let server = tokio::time::timeout(bound, server).await.expect("server finishes").expect("server task");
    (server, client)
}

fn roots(ca: &std::path::Path) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    for cert in chain(ca) {
        store.add(cert).expect("add CA to root store");
    }
    store
}

fn chain(path: &std::path::Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("open PEM certificate")
        .collect::<Result<_, _>>()
        .expect("parse PEM certificate")
}

fn key(path: &std::path::Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("parse PEM key")
}
