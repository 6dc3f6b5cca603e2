//! The server's roots of trust for STS under kiam's Helm chart, which mounts the node's
//! `/usr/share/ca-certificates` over `/etc/ssl/certs`: on Debian and Ubuntu nodes that holds only
//! `mozilla/*.crt` subfolders. A mount namespace of the test's reproduces it around the `kiam
//! server` binary (a directory bound over `/etc/ssl`), and STS is moto behind a TLS front on
//! loopback whose certificate the test CA signs. The server must get credentials when the test CA
//! is where the image keeps its bundle (`/etc/ssl/cert.pem`, outside the mount), log where its
//! roots came from and how many, and fall back to Mozilla's roots (which do not include the test
//! CA: no call reaches STS) when the mount leaves nothing. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::support::certs::{CertFiles, TestPki};
use crate::support::fake_imds::FakeImds;
use crate::support::fake_kube::FakeKube;
use crate::support::http::request;
use crate::support::moto::Moto;
use crate::support::objects::{namespace, pod};
use crate::support::process::{KIAM, free_port, kiam, kiam_through};
use crate::support::stack::BASE_ARN;

/// Where the image keeps a copy of its bundle, outside `/etc/ssl/certs` (see the Dockerfile).
const IMAGE_BUNDLE: &str = "cert.pem";

/// A TLS front on 127.0.0.1 for moto, with the test server certificate `tls` (SAN 127.0.0.1).
async fn tls_front(tls: &CertFiles, moto: SocketAddr) -> (SocketAddr, DropGuard) {
    use rustls_pki_types::pem::PemObject;
    let chain = rustls_pki_types::CertificateDer::pem_file_iter(&tls.cert)
        .expect("cert")
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&tls.key).expect("key");
    let config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => match accepted { Ok((tcp, _)) => tcp, Err(_) => return },
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let (Ok(mut tls), Ok(mut upstream)) =
                    (acceptor.accept(tcp).await, TcpStream::connect(moto).await)
                else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
            });
        }
    });
    (addr, stop.drop_guard())
}

/// What the server's `/etc/ssl` looks like under kiam's chart: `certs/` is the node's
/// `/usr/share/ca-certificates` (only `mozilla/`, here holding the test CA, which must not be
/// read from there), and `cert.pem` the image's copy when `image_copy`.
fn etc_ssl(pki: &TestPki, image_copy: bool) -> std::path::PathBuf {
    let root = pki.dir().join(if image_copy { "etc-ssl-copy" } else { "etc-ssl-mount-only" });
    let ca = std::fs::read_to_string(pki.server().ca).expect("test CA");
    std::fs::create_dir_all(root.join("certs/mozilla")).expect("mkdir");
    std::fs::write(root.join("certs/mozilla/Kiam_Test_CA.crt"), &ca).expect("write");
    if image_copy {
        std::fs::write(root.join(IMAGE_BUNDLE), &ca).expect("write");
    }
    root
}

/// `kiam server` in a mount namespace with `etc_ssl` over `/etc/ssl`, STS at `sts`, with `env`.
fn server_in(
    etc_ssl: &Path,
    (pki, kubeconfig): (&TestPki, &Path),
    addr: &str,
    sts: &str,
    log: &Path,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/ssl && shift && exec "$@""#)
        .arg("sh")
        .arg(etc_ssl)
        .arg(KIAM);
    let kubeconfig = kubeconfig.to_str().expect("utf-8");
    let args = ["server", "--bind", addr, "--kubeconfig", kubeconfig, "--role-base-arn", BASE_ARN];
    let mut cmd = kiam_through(cmd, &args, &pki.server(), log);
    cmd.args(["--sts-endpoint", sts]).envs(env.iter().copied()).spawn().expect("server starts")
}

/// The roots line of the server's log, once it is there.
async fn roots_line(log: &Path) -> String {
    let found = || async {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines().find(|l| l.contains("roots of trust for HTTPS to AWS")).map(plain)
    };
    crate::support::wait::eventually("the server logs its roots", Duration::from_secs(20), found).await
}

/// `line` without terminal colour codes (`ESC [ ... m`).
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

/// The pod's credentials through an agent binary in front of `server`.
async fn pod_credentials(pki: &TestPki, server: &str) -> (u16, String) {
    let imds = FakeImds::start().await;
    let (port, imds_addr) = (free_port().to_string(), imds.addr().to_string());
    let args = ["agent", "--port", &port, "--host", "127.0.0.1", "--server-address", server];
    let agent_log = pki.dir().join("agent.log");
    let mut cmd = kiam(&args, &pki.agent(), &agent_log);
    let _agent =
        cmd.args(["--metadata-addr", &imds_addr, "--pod-wait-timeout", "5s"]).spawn().expect("agent");
    let base = format!("http://127.0.0.1:{port}");
    let ping = format!("{base}/ping");
    let up = || async { request("GET", &ping, &[], "", None).await.is_ok_and(|r| r.body == "pong") };
    crate::support::wait::until("the agent answers /ping", Duration::from_secs(15), up).await;
    let pod_ip: IpAddr = "127.0.0.51".parse().expect("ip");
    let url = format!("{base}/latest/meta-data/iam/security-credentials/app");
    match request("GET", &url, &[], "", Some(pod_ip)).await {
        Ok(answer) => (answer.status, answer.body),
        Err(error) => (0, error),
    }
}

#[tokio::test]
async fn the_server_trusts_the_images_bundle_under_kiams_chart_mount_or_falls_back_to_mozillas() {
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("RUN cp /etc/ssl/certs/ca-certificates.crt /etc/ssl/cert.pem")),
        "the image keeps a copy of its bundle outside /etc/ssl/certs"
    );
    let pki = TestPki::new();
    let (kube, moto) = (FakeKube::start().await, Moto::start().await);
    kube.apply(namespace("team-a").permitted(".*").build());
    kube.apply(pod("team-a", "web").ip("127.0.0.51").role("app").build());
    let kubeconfig = kube.write_kubeconfig(pki.dir());
    let (front, _front) = tls_front(&pki.server(), moto.addr()).await;
    let sts = format!("https://127.0.0.1:{}", front.port());
    moto.start_recording().await;

    // The image's copy outside the mount: the test CA is trusted from there, and only from there.
    let addr = format!("127.0.0.1:{}", free_port());
    let log = pki.dir().join("server-copy.log");
    let mut server = server_in(&etc_ssl(&pki, true), (&pki, &kubeconfig), &addr, &sts, &log, &[]);
    let line = roots_line(&log).await;
    assert!(line.contains("/etc/ssl/cert.pem") && line.contains("count=1"), "{line}");
    let (status, body) = pod_credentials(&pki, &addr).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status, 200, "{body}\n{text}");
    assert!(!moto.recorded_assume_roles().await.is_empty(), "the call reached STS over TLS");
    let _ = server.start_kill();
    let _ = server.wait().await;

    // Only the mount: nothing usable; Mozilla's roots, which the test CA is not among.
    moto.start_recording().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let log = pki.dir().join("server-mount-only.log");
    let mut server = server_in(&etc_ssl(&pki, false), (&pki, &kubeconfig), &addr, &sts, &log, &[]);
    let line = roots_line(&log).await;
    let count: usize = line
        .split("count=")
        .nth(1)
        .and_then(|c| c.split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    assert!(
        line.contains("bundled Mozilla roots") && line.contains("/etc/ssl/certs/") && count > 100,
        "{line}"
    );
    let (status, body) = pod_credentials(&pki, &addr).await;
    assert_ne!(status, 200, "the test CA is not trusted from a mozilla/ subfolder nor by Mozilla: {body}");
    assert!(moto.recorded_assume_roles().await.is_empty(), "no call reached STS");
    let _ = server.start_kill();
    let _ = server.wait().await;

    // A store the operator names is used as it is: empty stays empty, with no fallback (the
    // image's copy, with the test CA, is there but not named).
    let addr = format!("127.0.0.1:{}", free_port());
    let log = pki.dir().join("server-explicit.log");
    let env = [("SSL_CERT_DIR", "/etc/ssl/certs")];
    let mut server = server_in(&etc_ssl(&pki, true), (&pki, &kubeconfig), &addr, &sts, &log, &env);
    let line = roots_line(&log).await;
    assert!(line.contains("SSL_CERT_DIR=/etc/ssl/certs") && line.contains("count=0"), "{line}");
    assert!(line.contains("ERROR") && !line.contains("Mozilla"), "{line}");
    let _ = server.start_kill();
    let _ = server.wait().await;
}
