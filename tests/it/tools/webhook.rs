//! `kiam webhook`: AdmissionReview v1 requests built from real Kubernetes types (k8s-openapi's
//! `Pod`) get the JSON patch EKS Pod Identity's webhook would apply, for a plain pod, a pod that
//! already sets the variables, a pod that did not opt in, and a pod in a namespace that opted in;
//! and the same answers come back over HTTPS from the served webhook.

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kiam::webhook::{self, Injection, OPT_IN};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::support::certs::TestPki;

const FULL_URI: &str = "http://169.254.170.23/v1/credentials";
const TOKEN_FILE: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount/eks-pod-identity-token";

fn pod(labels: &[(&str, &str)], containers: Vec<Container>) -> Pod {
    let labels: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Pod {
        metadata: ObjectMeta {
            name: Some("web".into()),
            namespace: Some("team-a".into()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec { containers, ..PodSpec::default() }),
        ..Pod::default()
    }
}

fn container(name: &str, env: Option<Vec<EnvVar>>) -> Container {
    Container { name: name.into(), image: Some("app".into()), env, ..Container::default() }
}

/// An AdmissionReview v1 request for creating `pod`, as the API server sends it.
fn admission_review(pod: &Pod) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "team-a",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": serde_json::to_value(pod).expect("a Pod serialises"),
            "dryRun": false,
        },
    })
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in text.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | u32::from(value(c));
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The response's patch, decoded (`None` when it has none); asserts the response's envelope.
fn patch_of(answer: &Value) -> Option<Value> {
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(answer["response"]["allowed"], true);
    let patch = answer["response"]["patch"].as_str()?;
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    Some(serde_json::from_slice(&base64_decode(patch)).expect("the patch is JSON"))
}

fn expected_plain_patch() -> Value {
    json!([
        {"op": "add", "path": "/spec/containers/0/env", "value": [
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": FULL_URI},
            {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": TOKEN_FILE},
        ]},
        {"op": "add", "path": "/spec/containers/0/volumeMounts", "value": [
            {"name": "eks-pod-identity-token", "mountPath": "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount", "readOnly": true},
        ]},
        {"op": "add", "path": "/spec/containers/1/env/-", "value":
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI", "value": FULL_URI}},
        {"op": "add", "path": "/spec/containers/1/env/-", "value":
            {"name": "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "value": TOKEN_FILE}},
        {"op": "add", "path": "/spec/containers/1/volumeMounts", "value": [
            {"name": "eks-pod-identity-token", "mountPath": "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount", "readOnly": true},
        ]},
        {"op": "add", "path": "/spec/volumes", "value": [
            {"name": "eks-pod-identity-token", "projected": {"sources": [{"serviceAccountToken":
                {"audience": "pods.eks.amazonaws.com", "expirationSeconds": 86400, "path": "eks-pod-identity-token"}}]}},
        ]},
    ])
}

fn plain_pod() -> Pod {
    let other = EnvVar { name: "LOG".into(), value: Some("debug".into()), ..EnvVar::default() };
    pod(&[(OPT_IN, "true")], vec![container("app", None), container("sidecar", Some(vec![other]))])
}

#[test]
fn an_opted_in_pod_gets_the_variables_and_the_token_volume() {
    let answer =
        webhook::review(&admission_review(&plain_pod()), false, &Injection::default()).expect("review");
    assert_eq!(patch_of(&answer), Some(expected_plain_patch()));
}

#[test]
fn containers_that_already_set_the_variables_are_left_alone() {
    let own = EnvVar {
        name: "AWS_CONTAINER_CREDENTIALS_FULL_URI".into(),
        value: Some("http://127.0.0.1/x".into()),
        ..EnvVar::default()
    };
    let all_set = pod(&[(OPT_IN, "true")], vec![container("app", Some(vec![own.clone()]))]);
    let answer = webhook::review(&admission_review(&all_set), false, &Injection::default()).expect("review");
    assert_eq!(patch_of(&answer), None, "nothing to do: no patch, not even the volume");

    let mixed = pod(&[(OPT_IN, "true")], vec![container("app", Some(vec![own])), container("other", None)]);
    let answer = webhook::review(&admission_review(&mixed), false, &Injection::default()).expect("review");
    let patch = patch_of(&answer).expect("a patch");
    let paths: Vec<&str> =
        patch.as_array().expect("ops").iter().filter_map(|op| op["path"].as_str()).collect();
    assert_eq!(paths, ["/spec/containers/1/env", "/spec/containers/1/volumeMounts", "/spec/volumes"]);
}

#[test]
fn pods_that_did_not_opt_in_are_allowed_unchanged() {
    let quiet = pod(&[], vec![container("app", None)]);
    let answer = webhook::review(&admission_review(&quiet), false, &Injection::default()).expect("review");
    assert_eq!(patch_of(&answer), None);
    // Its namespace opted in: patched, unless the pod opts out.
    let answer = webhook::review(&admission_review(&quiet), true, &Injection::default()).expect("review");
    assert!(patch_of(&answer).is_some());
    let out = pod(&[(OPT_IN, "false")], vec![container("app", None)]);
    let answer = webhook::review(&admission_review(&out), true, &Injection::default()).expect("review");
    assert_eq!(patch_of(&answer), None);
    assert!(webhook::review(&json!({"kind": "AdmissionReview"}), false, &Injection::default()).is_err());
}

/// POSTs `body` to `path` on the webhook at `port` over TLS, trusting `ca`.
async fn post(port: u16, ca: &std::path::Path, path: &str, body: &Value) -> (u16, Value) {
    post_from("127.0.0.1", port, ca, path, body).await
}

/// [`post`] from the loopback address `source`.
async fn post_from(source: &str, port: u16, ca: &std::path::Path, path: &str, body: &Value) -> (u16, Value) {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind(std::net::SocketAddr::new(source.parse().expect("source"), 0)).expect("bind");
    let tcp = socket.connect(([127, 0, 0, 1], port).into()).await.expect("connect");
    let tls = connector.connect(ServerName::try_from("localhost").expect("name"), tcp).await.expect("TLS");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("HTTP");
    tokio::spawn(connection);
    let request = hyper::Request::post(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_served_webhook_answers_over_https() {
    kiam::install_crypto_provider();
    let pki = TestPki::default();
    let files = pki.server();
    let tls = webhook::serve::tls_config(&files.cert, &files.key).expect("TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let shutdown = CancellationToken::new();
    tokio::spawn(webhook::serve::serve(listener, tls, Injection::default(), shutdown.clone()));

    let (status, answer) = post(port, &files.ca, webhook::POD_PATH, &admission_review(&plain_pod())).await;
    assert_eq!(status, 200);
    assert_eq!(patch_of(&answer), Some(expected_plain_patch()));
    let quiet = pod(&[], vec![container("app", None)]);
    let (_, answer) = post(port, &files.ca, webhook::NAMESPACE_PATH, &admission_review(&quiet)).await;
    assert!(patch_of(&answer).is_some(), "the namespace's entry patches pods that said nothing");
    shutdown.cancel();
}

/// The webhook is on the hardened listener: one source cannot hold every connection (the
/// per-source cap closes its next one at once, before any handshake, while those it holds wait
/// for their handshake deadline), and another source is answered meanwhile.
#[tokio::test]
async fn one_source_cannot_hold_every_webhook_connection() {
    use tokio::io::AsyncReadExt;
    kiam::install_crypto_provider();
    let pki = TestPki::default();
    let files = pki.server();
    let tls = webhook::serve::tls_config(&files.cert, &files.key).expect("TLS config");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    tokio::spawn(webhook::serve::serve(listener, tls, Injection::default(), shutdown.clone()));

    let cap = webhook::serve::limits().max_connections_per_source;
    assert!(cap < webhook::serve::limits().max_connections, "a source gets less than the whole");
    let mut held = Vec::with_capacity(cap);
    for _ in 0..cap {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut over = TcpStream::connect(addr).await.expect("connect");
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), over.read(&mut byte)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the connection over the source's cap is closed at once, not left to its handshake deadline: {closed:?}"
    );
    let review = admission_review(&plain_pod());
    let (status, _) = post_from("127.0.0.2", addr.port(), &files.ca, webhook::POD_PATH, &review).await;
    assert_eq!(status, 200, "another source is served meanwhile");
    drop(held);
    shutdown.cancel();
}
