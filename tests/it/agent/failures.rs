//! One mapping from a failure to what a pod sees. Every error of the request core, in both modes
//! (kiam: the server's gRPC status, read back by the agent; kube2iam: the core in-process), on
//! both endpoints (the metadata paths and `GET /v1/credentials`), reaches the pod through the
//! one function `agent::error::answer`, with the status and body of the table below.

use std::net::IpAddr;

use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use kiam::agent::BackendError;
use kiam::agent::container::NOT_SERVED;
use kiam::agent::error::{Endpoint, answer};
use kiam::agent::remote::{backend_error, token_error};
use kiam::core::Error;
use kiam::creds::{StsError, StsErrorKind};
use kiam::kube2iam::backend::backend_error as in_process;
use kiam::policy::{Denial, NodeDenial};
use kiam::server::service::{Rpc, status};

fn ip() -> IpAddr {
    "10.0.0.7".parse().expect("ip")
}

fn sts(kind: StsErrorKind, code: &str) -> Error {
    Error::Sts(StsError { kind, code: Some(code.into()), message: "arn:aws:iam::999988887777:role/x".into() })
}

/// Every kind of core error, with what a pod sees for it on the metadata paths and on
/// `/v1/credentials` (kiam mode; kube2iam mode does not serve that endpoint).
fn table() -> Vec<(Error, u16, u16)> {
    let forbidden = Error::Forbidden { pod: "ns/p".into(), denial: Denial::NoRoleAnnotation };
    let other_node = NodeDenial::OtherNode { pod: "ns/p".into(), node: "n2".into() };
    vec![
        (Error::InvalidIp("x".into()), 500, 500),
        (Error::PodNotFound(ip()), 404, 401),
        (Error::PodGone("ns/p".into()), 401, 401),
        (Error::AmbiguousIp { ip: ip(), count: 2 }, 500, 500),
        (Error::Node(NodeDenial::Unnamed), 403, 403),
        (Error::Node(other_node), 403, 403),
        (forbidden, 403, 403),
        (Error::PodChanged(ip()), 404, 401),
        (Error::DebugCertificate, 403, 403),
        (sts(StsErrorKind::Throttled, "Throttling"), 503, 503),
        (sts(StsErrorKind::Denied, "AccessDenied"), 500, 500),
        (sts(StsErrorKind::Invalid, "ValidationError"), 500, 500),
        (sts(StsErrorKind::Unavailable, "Timeout"), 500, 500),
        (sts(StsErrorKind::Other, "InternalFailure"), 500, 500),
    ]
}

async fn seen(failure: BackendError, endpoint: Endpoint) -> (u16, String) {
    let response: Response = answer(failure, endpoint).into_response();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

/// The body a pod sees for `status`: its own business in full, a peer's failure as a short text
/// and a request ID (never the text, which can name the server's role and account).
fn assert_body(case: &str, status: u16, body: &str) {
    assert!(!body.contains("999988887777"), "{case}: the STS text reached the pod: {body}");
    match status {
        500 => assert!(body.starts_with("error fetching credentials (request id "), "{case}: {body}"),
        503 => assert!(body.starts_with("service unavailable (request id "), "{case}: {body}"),
        403 => assert_eq!(body, "forbidden by policy\n", "{case}"),
        _ => assert!(!body.contains("request id"), "{case}: {body}"),
    }
}

#[tokio::test]
async fn every_failure_reaches_the_pod_the_same_way_in_both_modes() {
    for (error, metadata, container) in table() {
        let case = format!("{error:?}");
        for rpc in [Rpc::Role, Rpc::Credentials] {
            let kiam = seen(backend_error(status(&error, rpc)), Endpoint::Metadata(ip())).await;
            assert_eq!(kiam.0, metadata, "kiam mode, metadata paths: {case}");
            assert_body(&case, kiam.0, &kiam.1);
        }
        let kube2iam = seen(in_process(&error), Endpoint::Metadata(ip())).await;
        assert_eq!(kube2iam.0, metadata, "kube2iam mode, metadata paths: {case}");
        assert_body(&case, kube2iam.0, &kube2iam.1);

        let kiam = seen(token_error(status(&error, Rpc::Credentials)), Endpoint::Container).await;
        assert_eq!(kiam.0, container, "kiam mode, /v1/credentials: {case}");
        assert_body(&case, kiam.0, &kiam.1);
        // kube2iam mode answers /v1/credentials before any backend call: not served.
        let kube2iam = seen(BackendError::NotServed(NOT_SERVED.into()), Endpoint::Container).await;
        assert_eq!(kube2iam, (404, format!("{NOT_SERVED}\n")), "kube2iam mode, /v1/credentials");
    }
}

#[tokio::test]
async fn sts_throttling_is_503_in_both_modes() {
    let throttled = sts(StsErrorKind::Throttled, "Throttling");
    let kiam = backend_error(status(&throttled, Rpc::Credentials));
    let kube2iam = in_process(&throttled);
    assert!(kiam.is_transient() && kube2iam.is_transient(), "{kiam:?} {kube2iam:?}");
    assert_eq!(seen(kiam, Endpoint::Metadata(ip())).await.0, 503);
    assert_eq!(seen(kube2iam, Endpoint::Metadata(ip())).await.0, 503);
}
