//! `kiam certs`: what `generate` writes works with the server and agents (health, node
//! binding), openssl accepts it for the right roles only, existing keys survive, and `inspect`
//! reports what it should.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use kiam::certs::{self, Plan};
use kiam::pb;
use tonic::Code;

use crate::support::certs::{CertFiles, TestPki};
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};

const KIAM: &str = env!("CARGO_BIN_EXE_kiam");

fn plan(out: &Path, nodes: &[&str]) -> Plan {
    Plan {
        out: out.to_path_buf(),
        server_sans: Plan::default_server_sans("kiam-server", "kube-system"),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        ca_lifetime: Duration::from_secs(10 * 365 * 86_400),
        leaf_lifetime: Duration::from_secs(365 * 86_400),
        force: false,
    }
}

fn files(dir: &Path, stem: &str) -> CertFiles {
    CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

fn creds(ip: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: "app".into() }
}

#[tokio::test]
async fn generated_material_serves_health_and_binds_agents_to_their_nodes() {
    let dir = tempfile::tempdir().expect("temp dir");
    certs::generate(&plan(dir.path(), &["node-a"])).expect("generate");
    let options =
        Options { node_binding: true, server_tls: Some(files(dir.path(), "server")), ..Options::default() };
    let stack = Stack::start_with(options).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "here").ip("10.72.0.1").role("app").node("node-a").build());
    stack.kube.apply(pod("team-a", "there").ip("10.72.0.2").role("app").node("node-b").build());

    // The generic agent certificate: mutual TLS works (health), but it names no node.
    let agent = stack.client(&files(dir.path(), "agent"));
    assert_eq!(agent.get_health().await.expect("health over the generated TLS"), "ok");
    let unbound = agent.service().get_pod_credentials(creds("10.72.0.1")).await.expect_err("no node named");
    assert_eq!(unbound.code(), Code::PermissionDenied);

    // The node's certificate: its own node's pods only.
    let node_a = stack.client(&files(dir.path(), "agent-node-a"));
    let mut grpc = node_a.service();
    grpc.get_pod_credentials(creds("10.72.0.1")).await.expect("its own node's pod");
    let other = grpc.get_pod_credentials(creds("10.72.0.2")).await.expect_err("another node's pod");
    assert_eq!(other.code(), Code::PermissionDenied);
    assert!(other.message().contains("not on node node-a"), "{}", other.message());

    // A client from another CA is refused by the server the generated CA protects.
    let stranger = TestPki::new();
    let refused = stack.client(&stranger.agent());
    assert!(refused.get_health().await.is_err(), "a certificate from another CA");
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().expect("openssl is installed (scripts/test-deps)");
    (
        out.status.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
    )
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

#[test]
fn the_binary_writes_keys_privately_and_openssl_verifies_each_role() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("pki");
    let status = Command::new(KIAM)
        .args(["certs", "generate", "--out"])
        .arg(&out)
        .args(["--node", "node-a", "--san", "kiam.example,10.0.0.9"])
        .status()
        .expect("run kiam certs generate");
    assert!(status.success());
    assert_eq!(mode(&out), 0o700);
    for key in ["ca-key.pem", "server-key.pem", "agent-key.pem", "agent-node-a-key.pem"] {
        assert_eq!(mode(&out.join(key)), 0o600, "{key}");
        let (ok, text) = openssl(&["pkey", "-noout", "-text", "-in", &out.join(key).to_string_lossy()]);
        assert!(ok && text.contains("prime256v1"), "{key}: an ECDSA P-256 key\n{text}");
    }
    let path = |name: &str| out.join(name).to_string_lossy().into_owned();
    let ca = path("ca.pem");
    let verify =
        |purpose: &str, name: &str| openssl(&["verify", "-CAfile", &ca, "-purpose", purpose, &path(name)]);
    assert!(verify("sslserver", "server.pem").0, "{}", verify("sslserver", "server.pem").1);
    assert!(verify("sslclient", "server.pem").0, "the server's probes present it as a client");
    assert!(verify("sslclient", "agent.pem").0);
    assert!(verify("sslclient", "agent-node-a.pem").0);
    assert!(!verify("sslserver", "agent.pem").0, "an agent certificate cannot serve");
    assert!(!verify("sslserver", "agent-node-a.pem").0);

    let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &ca]);
    assert!(text.contains("CA:TRUE, pathlen:0") && text.contains("Certificate Sign"), "{text}");
    let (_, text) = openssl(&["x509", "-noout", "-text", "-in", &path("server.pem")]);
    assert!(
        text.contains("DNS:kiam.example") && text.contains("IP Address:10.0.0.9"),
        "--san replaces\n{text}"
    );
    assert!(!text.contains("DNS:localhost") && text.contains("CA:FALSE"), "{text}");
    let (_, text) = openssl(&["x509", "-noout", "-ext", "subjectAltName", "-in", &path("agent-node-a.pem")]);
    assert!(text.contains("URI:urn:kiam:node:node-a"), "{text}");

    // inspect: exit 0 with the right CA, 1 with another one.
    let inspect = |ca: &Path| {
        Command::new(KIAM)
            .args(["certs", "inspect", "--ca"])
            .arg(ca)
            .arg(out.join("agent-node-a.pem"))
            .output()
    };
    let good = inspect(&out.join("ca.pem")).expect("run inspect");
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(good.status.success(), "{text}");
    assert!(text.contains("node binding: node-a") && text.contains("as client:    verified"), "{text}");
    let stranger = TestPki::new();
    let bad = inspect(&stranger.agent().ca).expect("run inspect");
    assert_eq!(bad.status.code(), Some(1), "{}", String::from_utf8_lossy(&bad.stdout));
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(path).expect("read")
}

#[test]
fn existing_keys_are_kept_the_ca_is_reused_and_only_force_replaces() {
    let dir = tempfile::tempdir().expect("temp dir");
    let first = certs::generate(&plan(dir.path(), &[])).expect("generate");
    assert!(!first.reused_ca && first.kept.is_empty());
    let (ca, server_key) = (read(dir.path().join("ca.pem")), read(dir.path().join("server-key.pem")));

    // Adding a node later: the CA signs it, nothing else changes.
    let second = certs::generate(&plan(dir.path(), &["node-c"])).expect("add a node");
    assert!(second.reused_ca);
    assert_eq!(second.kept, [dir.path().join("server.pem"), dir.path().join("agent.pem")]);
    assert_eq!(read(dir.path().join("server-key.pem")), server_key);
    assert_eq!(read(dir.path().join("ca.pem")), ca);
    let report = certs::inspect(
        &[dir.path().join("agent-node-c.pem")],
        Some(&dir.path().join("ca.pem")),
        SystemTime::now(),
    )
    .expect("inspect");
    assert!(report[0].ok(), "the reused CA signed the new node's certificate");

    // Keys whose CA key is gone are not orphaned silently.
    std::fs::remove_file(dir.path().join("ca-key.pem")).expect("remove the CA key");
    match certs::generate(&plan(dir.path(), &[])) {
        Err(certs::Error::Exists(paths)) => {
            assert!(paths.contains(&dir.path().join("server-key.pem")), "{paths:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(read(dir.path().join("server-key.pem")), server_key, "nothing written on refusal");

    let forced = certs::generate(&Plan { force: true, ..plan(dir.path(), &[]) }).expect("force");
    assert!(forced.kept.is_empty() && !forced.reused_ca);
    assert_ne!(read(dir.path().join("server-key.pem")), server_key);
    assert_ne!(read(dir.path().join("ca.pem")), ca);
}

#[test]
fn inspect_reports_the_node_usages_validity_and_the_bundle_verdict() {
    let dir = tempfile::tempdir().expect("temp dir");
    certs::generate(&plan(dir.path(), &["ip-10-0-1-2.eu-west-1.compute.internal"])).expect("generate");
    let leaf = dir.path().join("agent-ip-10-0-1-2.eu-west-1.compute.internal.pem");
    let ca = dir.path().join("ca.pem");
    let now = SystemTime::now();
    let reports = certs::inspect(&[leaf.clone(), dir.path().join("server.pem"), ca.clone()], Some(&ca), now)
        .expect("inspect");
    let node = &reports[0].certs[0];
    assert_eq!(node.node.as_deref(), Some("ip-10-0-1-2.eu-west-1.compute.internal"));
    assert_eq!(node.ext_key_usage, ["clientAuth"]);
    let verdict = node.verification.as_ref().expect("verified against the bundle");
    assert!(verdict.as_client.is_ok() && verdict.as_server.is_err(), "{verdict:?}");
    assert!(node.not_after.duration_since(now).is_ok_and(|left| left > Duration::from_secs(364 * 86_400)));
    let server = &reports[1].certs[0];
    assert!(server.sans.contains(&"DNS:kiam-server.kube-system.svc".to_string()), "{:?}", server.sans);
    assert!(server.sans.contains(&"IP:127.0.0.1".to_string()));
    assert!(server.node.is_none() && !server.is_ca);
    assert!(reports[2].certs[0].is_ca && reports[2].certs[0].verification.is_none());
    assert!(reports.iter().all(|r| r.ok()));

    // Two years on, the leaf has expired: the report says so.
    let later = now + Duration::from_secs(2 * 365 * 86_400);
    let expired = certs::inspect(std::slice::from_ref(&leaf), Some(&ca), later).expect("inspect");
    assert!(!expired[0].ok());
    assert!(expired[0].to_string().contains("EXPIRED"), "{}", expired[0]);
    // Another CA does not verify it.
    let stranger = TestPki::new();
    let foreign = certs::inspect(&[leaf], Some(&stranger.agent().ca), now).expect("inspect");
    let verdict = foreign[0].certs[0].verification.clone().expect("a verdict");
    assert_eq!(verdict.as_client, Err("not signed by a CA in the bundle".into()));
    assert!(!foreign[0].ok());
}
