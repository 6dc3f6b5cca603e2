//! `kiam certs renew`: leaves renewed from their CA keep their names, verify against the same CA,
//! last longer, and still serve a pod over mutual TLS with node binding; leaves of another CA are
//! refused without anything written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use kiam::certs::{self, CertInfo, Plan, RenewPlan};
use kiam::pb;

use crate::support::certs::CertFiles;
use crate::support::objects::{namespace, pod};
use crate::support::process::kiam;
use crate::support::stack::{Options, Stack};

const KIAM: &str = env!("CARGO_BIN_EXE_kiam");
const DAY: u64 = 86_400;

fn generate(out: &Path, nodes: &[&str], leaf_days: u64) {
    let plan = Plan {
        out: out.to_path_buf(),
        server_sans: Plan::default_server_sans("kiam-server", "kube-system"),
        nodes: nodes.iter().map(|n| n.to_string()).collect(),
        ca_lifetime: Duration::from_secs(3650 * DAY),
        leaf_lifetime: Duration::from_secs(leaf_days * DAY),
        force: false,
    };
    certs::generate(&plan).expect("generate");
}

fn files(dir: &Path, stem: &str) -> CertFiles {
    CertFiles {
        cert: dir.join(format!("{stem}.pem")),
        key: dir.join(format!("{stem}-key.pem")),
        ca: dir.join("ca.pem"),
    }
}

/// The leaf of `stem`, verified against the directory's ca.pem at `now`.
fn leaf(dir: &Path, stem: &str, now: SystemTime) -> (CertInfo, bool) {
    let report = certs::inspect(&[dir.join(format!("{stem}.pem"))], Some(&dir.join("ca.pem")), now)
        .expect("inspect")
        .remove(0);
    let ok = report.ok();
    (report.certs[0].clone(), ok)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).expect("read")
}

#[tokio::test]
async fn renewed_leaves_keep_their_names_verify_against_the_same_ca_and_serve_a_pod() {
    let dir = tempfile::tempdir().expect("temp dir");
    let stems = ["agent", "agent-node-a", "server"];
    generate(dir.path(), &["node-a"], 30);
    let now = SystemTime::now();
    let before: Vec<_> = stems.iter().map(|s| leaf(dir.path(), s, now).0).collect();
    let (ca, old_key) = (read(&dir.path().join("ca.pem")), read(&dir.path().join("server-key.pem")));

    let out = Command::new(KIAM)
        .args(["certs", "renew", "--dir"])
        .arg(dir.path())
        .args(["--validity", "4380h"])
        .output()
        .expect("run kiam certs renew");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.lines().filter(|l| l.starts_with("renewed ")).count(), 3, "{stdout}");

    assert_eq!(read(&dir.path().join("ca.pem")), ca, "the CA is not touched");
    assert_ne!(read(&dir.path().join("server-key.pem")), old_key, "a new key");
    let mode = std::fs::metadata(dir.path().join("agent-node-a-key.pem")).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    for (stem, old) in stems.iter().zip(&before) {
        let (new, verified) = leaf(dir.path(), stem, now);
        assert!(verified, "{stem} verifies against the same CA");
        assert!(new.not_after > old.not_after + Duration::from_secs(150 * DAY), "{stem} lasts longer");
        assert_ne!(new.serial, old.serial, "{stem}: a new serial");
        assert_eq!((&new.subject, &new.sans, &new.node), (&old.subject, &old.sans, &old.node), "{stem}");
        assert_eq!((&new.key_usage, &new.ext_key_usage), (&old.key_usage, &old.ext_key_usage), "{stem}");
    }
    assert_eq!(before[1].node.as_deref(), Some("node-a"));

    // The renewed pair: the server serves, the node's agent certificate gets its pod (node binding).
    let options =
        Options { node_binding: true, server_tls: Some(files(dir.path(), "server")), ..Options::default() };
    let stack = Stack::start_with(options).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "here").ip("10.73.0.1").role("app").node("node-a").build());
    stack.wait_for_pod("10.73.0.1".parse().expect("ip")).await;
    let agent = stack.client(&files(dir.path(), "agent-node-a"));
    assert_eq!(agent.get_health().await.expect("health over the renewed TLS"), "ok");
    let request = pb::GetPodCredentialsRequest { ip: "10.73.0.1".into(), role: "app".into() };
    agent.service().get_pod_credentials(request).await.expect("the node's pod gets credentials");

    // `kiam health`, the server's probe, handshakes with the renewed server certificate too.
    let server = stack.server_addr.to_string();
    let args = ["health", "--server-address", server.as_str(), "--timeout", "5s"];
    let log = dir.path().join("health.log");
    let mut health = kiam(&args, &files(dir.path(), "server"), &log);
    let status =
        tokio::time::timeout(Duration::from_secs(30), health.status()).await.expect("health returns");
    assert!(status.expect("health runs").success(), "kiam health: {}", read(&log));
}

#[test]
fn an_expired_leaf_is_renewed_and_a_secret_layout_is_understood() {
    let dir = tempfile::tempdir().expect("temp dir");
    generate(dir.path(), &["node-b"], 30);
    // A secret's layout: cert, key beside it.
    let secret = dir.path().join("secret");
    std::fs::create_dir(&secret).expect("dir");
    std::fs::copy(dir.path().join("agent-node-b.pem"), secret.join("cert")).expect("copy");
    std::fs::copy(dir.path().join("agent-node-b-key.pem"), secret.join("key")).expect("copy");
    let later = SystemTime::now() + Duration::from_secs(60 * DAY); // both leaves have ended
    let plan = RenewPlan {
        ca_cert: dir.path().join("ca.pem"),
        ca_key: dir.path().join("ca-key.pem"),
        leaves: vec![dir.path().join("agent-node-b.pem"), secret.join("cert")],
        lifetime: Duration::from_secs(365 * DAY),
    };
    let renewed = certs::renew(&plan, later).expect("renew ended leaves");
    assert_eq!(renewed[1].key, secret.join("key"));
    for r in &renewed {
        assert!(r.old_not_after < later && r.not_after > later + Duration::from_secs(360 * DAY));
    }
    let report = certs::inspect(&[secret.join("cert")], Some(&dir.path().join("ca.pem")), later)
        .expect("inspect")
        .remove(0);
    assert!(report.ok(), "{report}");
    assert_eq!(report.certs[0].node.as_deref(), Some("node-b"));
}

#[test]
fn a_leaf_of_another_ca_is_refused_and_nothing_is_written() {
    let (ours, theirs) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
    generate(ours.path(), &[], 30);
    generate(theirs.path(), &[], 30);
    let agent = ours.path().join("agent.pem");
    let before = read(&agent);
    let plan = RenewPlan {
        ca_cert: ours.path().join("ca.pem"),
        ca_key: ours.path().join("ca-key.pem"),
        leaves: vec![agent.clone(), theirs.path().join("server.pem")],
        lifetime: Duration::from_secs(365 * DAY),
    };
    let err = certs::renew(&plan, SystemTime::now()).expect_err("another CA's leaf");
    assert!(err.to_string().contains("not issued by this CA"), "{err}");
    assert_eq!(read(&agent), before, "nothing written");

    // The CA itself is no leaf, and a CA key that does not match its certificate is refused.
    let ca_as_leaf = RenewPlan { leaves: vec![ours.path().join("ca.pem")], ..plan.clone() };
    assert!(certs::renew(&ca_as_leaf, SystemTime::now()).is_err());
    let wrong_key =
        RenewPlan { ca_key: theirs.path().join("ca-key.pem"), leaves: vec![agent.clone()], ..plan };
    let err = certs::renew(&wrong_key, SystemTime::now()).expect_err("a key that is not the CA's");
    assert!(err.to_string().contains("is not the key of the CA"), "{err}");
    assert_eq!(read(&agent), before, "nothing written");
}
