//! The agent ↔ server link: certificate rotation without restarts, and agents bound to their
//! node.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use kiam::pb;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::Code;

use rustls::pki_types::pem::PemObject;

use crate::support::certs::{CertFiles, TestPki};
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};

fn creds(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

#[tokio::test]
async fn with_node_binding_an_agent_is_answered_only_about_its_own_node() {
    let stack = Stack::start_with(Options { node_binding: true, ..Options::default() }).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "here").ip("10.71.0.1").role("app").node("node-a").build());
    stack.kube.apply(pod("team-a", "there").ip("10.71.0.2").role("app").node("node-b").build());
    let node_a = stack.client(&stack.pki.agent_for_node("agent-a", "node-a"));
    let mut grpc = node_a.service();
    // The server waits for pods it has not seen yet, so no synchronisation is needed here.
    grpc.get_pod_credentials(creds("10.71.0.1", "app")).await.expect("its own node's pod");
    let other = grpc.get_pod_credentials(creds("10.71.0.2", "app")).await.expect_err("another node's pod");
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("not on node node-a"), "{}", other.message());
    let role =
        grpc.get_pod_role(pb::GetPodRoleRequest { ip: "10.71.0.2".into() }).await.expect_err("role too");
    assert_eq!(role.code(), Code::PermissionDenied);

    // A certificate that names no node gets nothing but health.
    let unbound = stack.client(&stack.pki.agent());
    let denied = unbound.service().get_pod_credentials(creds("10.71.0.1", "app")).await.expect_err("no node");
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert_eq!(unbound.get_health().await.expect("health is open"), "ok");
}

/// The `Debug` service answers only debug-role certificates, and under node binding only about
/// identities in use on the node the certificate names.
#[tokio::test]
async fn with_node_binding_a_debug_certificate_sees_only_its_nodes_identities() {
    use kiam::creds::Identity;
    use kiam::explain::{ServerQuery, remote};
    let stack = Stack::start_with(Options { node_binding: true, ..Options::default() }).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "here").ip("10.71.1.1").role("app-a").node("node-a").build());
    stack.kube.apply(pod("team-a", "there").ip("10.71.1.2").role("app-b").node("node-b").build());
    let known = || {
        let found = ["10.71.1.1", "10.71.1.2"].iter().all(|ip| {
            matches!(stack.core.cluster().pod_by_ip(ip.parse().expect("ip")), kiam::cluster::Lookup::Found(_))
        });
        std::future::ready(found)
    };
    crate::support::wait::until("the server knows both pods", Duration::from_secs(10), known).await;
    let identity = |role: &str| {
        let arn = kiam::model::RoleArn::resolve(&format!("arn:aws:iam::123456789012:role/{role}"), None);
        Identity::plain(arn.expect("arn"), "kiam-kiam".into(), None)
    };
    let (a, b) = (identity("app-a"), identity("app-b"));
    let ask = |cert: CertFiles| {
        let query = ServerQuery {
            address: format!("127.0.0.1:{}", stack.server_addr.port()),
            tls: crate::support::stack::tls_files(&cert),
        };
        let (a, b) = (a.clone(), b.clone());
        async move {
            let views = remote::views(&query, Duration::from_secs(5), &[Some(&a), Some(&b)]).await;
            views.into_iter().map(|v| v.and_then(|v| v.error)).collect::<Vec<_>>()
        }
    };
    let on_a = ask(stack.pki.debug("debug-a", Some("node-a"))).await;
    assert!(on_a[0].is_none(), "its own node's identity: {on_a:?}");
    assert!(on_a[1].as_deref().is_some_and(|e| e.contains("no pod on node node-a")), "{on_a:?}");
    let unbound = ask(stack.pki.debug("debug-any", None)).await;
    assert!(unbound.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("names no node"))), "{unbound:?}");
    let agent = ask(stack.pki.agent_for_node("agent-a", "node-a")).await;
    assert!(agent.iter().all(|e| e.as_deref().is_some_and(|e| e.contains("debug role"))), "{agent:?}");
}

/// Lays out TLS files as kubelet does: `name -> ..data/name`, `..data -> ..<version>/`, and
/// returns the stable names a server is configured with.
fn publish(dir: &Path, version: &str, files: &CertFiles) -> CertFiles {
    let versioned = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&versioned).expect("version dir");
    std::fs::copy(&files.cert, versioned.join("cert.pem")).expect("cert");
    std::fs::copy(&files.key, versioned.join("key.pem")).expect("key");
    std::fs::copy(&files.ca, versioned.join("ca.pem")).expect("ca");
    swap_data(dir, version);
    for name in ["cert.pem", "key.pem", "ca.pem"] {
        let link = dir.join(name);
        if !link.exists() {
            std::os::unix::fs::symlink(Path::new("..data").join(name), link).expect("link");
        }
    }
    CertFiles { cert: dir.join("cert.pem"), key: dir.join("key.pem"), ca: dir.join("ca.pem") }
}

/// The atomic part of kubelet's update: a new `..data` link renamed over the old one.
fn swap_data(dir: &Path, version: &str) {
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("tmp link");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
}

/// The certificate the server presents to a new connection.
async fn presented(stack: &Stack) -> CertificateDer<'static> {
    let files = stack.pki.agent();
    let ca = CertificateDer::pem_file_iter(&files.ca).expect("ca").map(|c| c.expect("ca cert"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in ca {
        roots.add(cert).expect("root");
    }
    let chain: Vec<_> =
        CertificateDer::pem_file_iter(&files.cert).expect("cert").map(|c| c.expect("pem")).collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).expect("key");
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("config");
    let tcp = tokio::net::TcpStream::connect(stack.server_addr).await.expect("connect");
    let name = ServerName::try_from("kiam-server").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("handshake");
    tls.get_ref().1.peer_certificates().expect("server cert")[0].clone().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_certificate_rotates_under_load_without_a_restart() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let files = publish(dir.path(), "1", &pki.server());
    let stack =
        Stack::start_with(Options { pki: Some(pki), server_tls: Some(files), ..Options::default() }).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("10.72.0.1").role("app").build());
    stack.wait_for_pod("10.72.0.1".parse().expect("ip")).await;
    let first = presented(&stack).await;

    // Steady load while the certificate changes under it.
    let (stop, calls, failures) =
        (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (stop, calls, failures) = (stop.clone(), calls.clone(), failures.clone());
        let client = stack.client(&stack.pki.agent());
        tokio::spawn(async move {
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                if client.service().get_pod_credentials(creds("10.72.0.1", "app")).await.is_err() {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                calls.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    publish(dir.path(), "2", &stack.pki.server_leaf("server-2"));
    let second = eventually_presented(&stack, |c| *c != first).await;

    // Broken files: the server keeps the certificate it has, and says so.
    let broken = dir.path().join("..3");
    std::fs::create_dir_all(&broken).expect("dir");
    for name in ["cert.pem", "key.pem", "ca.pem"] {
        std::fs::write(
            broken.join(name),
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        )
        .expect("write");
    }
    swap_data(dir.path(), "3");
    let reported = || std::future::ready(stack.tls_gauges.update_error.get() == 1);
    crate::support::wait::until("the failed reload is reported", Duration::from_secs(10), reported).await;
    assert_eq!(presented(&stack).await, second, "the old certificate stays in use");

    stop.store(true, Ordering::SeqCst);
    load.await.expect("load task");
    assert!(calls.load(Ordering::SeqCst) > 0);
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no request failed during the rotation");
}

async fn eventually_presented(
    stack: &Stack,
    changed: impl Fn(&CertificateDer<'static>) -> bool,
) -> CertificateDer<'static> {
    let probe = || async {
        let cert = presented(stack).await;
        changed(&cert).then_some(cert)
    };
    crate::support::wait::eventually(
        "new handshakes present the new certificate",
        Duration::from_secs(10),
        probe,
    )
    .await
}

#[tokio::test]
async fn idle_connections_are_closed_and_the_next_call_reconnects() {
    let options = Options { max_connection_idle: Duration::from_millis(300), ..Options::default() };
    let stack = Stack::start_with(options).await;
    let client = stack.client(&stack.pki.agent());
    assert_eq!(client.get_health().await.expect("first call"), "ok");
    let closed = &stack.core.metrics().server.idle_connections_closed;
    let idle = || std::future::ready(closed.get() > 0);
    crate::support::wait::until("the idle connection is closed", Duration::from_secs(10), idle).await;
    assert_eq!(client.get_health().await.expect("a new connection serves the next call"), "ok");
}

#[tokio::test]
async fn a_ca_bundle_with_two_cas_trusts_both_for_an_overlapping_rotation() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let bundle = dir.path().join("ca-bundle.pem");
    let mut both = std::fs::read_to_string(pki.dir().join("ca.pem")).expect("old CA");
    both.push_str(&std::fs::read_to_string(pki.dir().join("stranger-ca.pem")).expect("new CA"));
    std::fs::write(&bundle, both).expect("bundle");
    let server = pki.server();
    let files = CertFiles { cert: server.cert, key: server.key, ca: bundle };
    let stack =
        Stack::start_with(Options { pki: Some(pki), server_tls: Some(files), ..Options::default() }).await;
    assert_eq!(stack.client(&stack.pki.agent()).get_health().await.expect("a client of the old CA"), "ok");
    assert_eq!(stack.client(&stack.pki.stranger()).get_health().await.expect("a client of the new CA"), "ok");
}

/// Files that cannot be read at rotation (the new `..data` names a version whose files are
/// missing, or a directory where the certificate should be) keep the old certificate in use,
/// and say so; the next readable version is taken up.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_certificate_files_at_rotation_keep_the_old_certificate() {
    let pki = TestPki::new();
    let dir = tempfile::tempdir().expect("dir");
    let files = publish(dir.path(), "1", &pki.server());
    let stack =
        Stack::start_with(Options { pki: Some(pki), server_tls: Some(files), ..Options::default() }).await;
    let first = presented(&stack).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("10.73.0.1").role("app").build());
    stack.wait_for_pod("10.73.0.1".parse().expect("ip")).await;

    for (version, unreadable) in [("2", "missing"), ("3", "a directory")] {
        let versioned = dir.path().join(format!("..{version}"));
        std::fs::create_dir_all(&versioned).expect("version dir");
        if unreadable == "a directory" {
            for name in ["cert.pem", "key.pem", "ca.pem"] {
                std::fs::create_dir_all(versioned.join(name)).expect("a directory in its place");
            }
        }
        swap_data(dir.path(), version);
        let reported = || std::future::ready(stack.tls_gauges.update_error.get() == 1);
        crate::support::wait::until(unreadable, Duration::from_secs(10), reported).await;
        assert_eq!(presented(&stack).await, first, "{unreadable}: the old certificate stays in use");
        grpc.get_pod_credentials(creds("10.73.0.1", "app")).await.expect("still serving");
        // The next good version clears the error, in a fresh state for the next round.
        publish(dir.path(), &format!("{version}-good"), &stack.pki.server());
        let cleared = || std::future::ready(stack.tls_gauges.update_error.get() == 0);
        crate::support::wait::until("a readable version again", Duration::from_secs(10), cleared).await;
    }
    publish(dir.path(), "4", &stack.pki.server_leaf("server-4"));
    eventually_presented(&stack, |c| *c != first).await;
}
