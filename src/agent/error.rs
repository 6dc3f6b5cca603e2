//! The agent's one error type, and the one place its failures become HTTP statuses: [`answer`]
//! turns a backend's failure (either mode, either endpoint) into what the pod sees, and the
//! upstream's errors become the agent's here too.
//!
//! Failures of the agent's peers (the kiam server, STS behind it, the node's metadata service)
//! reach the pod as a short fixed text and a request ID; the full text, which can name the
//! server's own role, account or addresses, goes to the agent's log under that ID.

use std::net::IpAddr;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::backend::BackendError;
use super::proxy::UpstreamError;

/// Why a request failed, mapped to a status and a plain-text message.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Unknown pod, no role, another role, or a path that is not served: 404, which also makes
    /// SDKs rediscover the role name or fall back from the extended path.
    #[error("{0}")]
    NotFound(String),
    /// The server's policy denies the pod its role, or a token request came through a proxy.
    #[error("{0}")]
    Forbidden(String),
    /// A malformed path, TTL or `?ip=`.
    #[error("{0}")]
    BadRequest(String),
    /// A missing (under `--require-imdsv2`), wrong or expired IMDSv2 token.
    #[error("{0}")]
    Unauthorized(String),
    /// Anything but GET and HEAD (PUT for the token path).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The node's metadata service failed while forwarding.
    #[error("metadata service: {0}")]
    Upstream(String),
    /// No server answered, or a health check failed.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else (an STS failure on the server, say).
    #[error("{0}")]
    Internal(String),
}

/// The header carrying a failed request's ID, also given in the body.
pub const REQUEST_ID_HEADER: &str = "x-kiam-request-id";

impl AgentError {
    /// What the pod is told of a peer's failure, or `None` when the full text is the pod's own
    /// business (its request was wrong, or the policy refused it).
    fn short(&self) -> Option<&'static str> {
        match self {
            AgentError::Upstream(_) => Some("metadata service error"),
            AgentError::Unavailable(_) => Some("service unavailable"),
            AgentError::Internal(_) => Some("error fetching credentials"),
            _ => None,
        }
    }
}

/// A fresh request ID: 16 hex digits, random, so that IDs from different agents do not collide.
fn request_id() -> String {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // Only the correlation suffers: the time still tells requests apart.
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        bytes = (nanos.as_nanos() as u64).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = match &self {
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AgentError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            AgentError::Upstream(_) => StatusCode::BAD_GATEWAY,
            AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let (body, id) = match self.short() {
            Some(short) => {
                let id = request_id();
                tracing::warn!(request_id = %id, status = status.as_u16(), error = %self, "request failed");
                (format!("{short} (request id {id})\n"), Some(id))
            }
            None => (format!("{self}\n"), None),
        };
        let mut response =
            (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
        if let Some(value) = id.and_then(|id| HeaderValue::from_str(&id).ok()) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}

/// Where a pod asked: the metadata paths, which know the pod by its address, or
/// `GET /v1/credentials`, which knows it by its token.
#[derive(Clone, Copy, Debug)]
pub enum Endpoint {
    /// The metadata paths, for the pod at this address.
    Metadata(IpAddr),
    /// `GET /v1/credentials`.
    Container,
}

/// The one place a failure to answer for a pod becomes what the pod sees (with
/// [`AgentError`]'s status and body), for both modes and both endpoints. Both modes report in
/// [`BackendError`]'s kinds: kiam's agent reads them from the server's gRPC status
/// (`agent/remote.rs`), kube2iam mode from the core's error (`kube2iam/backend.rs`), so an STS
/// that throttles is 503 in both, and every SDK retries it.
pub fn answer(err: BackendError, endpoint: Endpoint) -> AgentError {
    match (err, endpoint) {
        (BackendError::PodNotFound, Endpoint::Metadata(ip)) => {
            AgentError::NotFound(format!("no pod found for IP {ip}"))
        }
        // A token names its pod: one that is not running is the token's failure, not a lookup's.
        (BackendError::PodNotFound, Endpoint::Container) => {
            AgentError::Unauthorized("the token's pod is not running".into())
        }
        (BackendError::Forbidden, _) => AgentError::Forbidden("forbidden by policy".into()),
        (BackendError::Unavailable(m), _) => AgentError::Unavailable(format!("credentials unavailable: {m}")),
        (BackendError::Unauthenticated(m), _) => AgentError::Unauthorized(m),
        (BackendError::NotServed(m), _) => AgentError::NotFound(m),
        (BackendError::Failed(m), _) => AgentError::Internal(format!("error fetching credentials: {m}")),
    }
}

impl From<UpstreamError> for AgentError {
    fn from(err: UpstreamError) -> AgentError {
        match err {
            UpstreamError::Method => AgentError::MethodNotAllowed,
            UpstreamError::Failed(m) => AgentError::Upstream(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body(response: Response) -> String {
        let bytes = response.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8(bytes.to_vec()).expect("utf-8")
    }

    #[tokio::test]
    async fn peers_failures_reach_the_pod_as_a_short_text_and_an_id() {
        let secret = "AccessDenied: User arn:aws:iam::999988887777:role/kiam-server is not authorized";
        for err in [
            answer(BackendError::Failed(secret.into()), Endpoint::Metadata("10.0.0.1".parse().expect("ip"))),
            answer(BackendError::Unavailable(secret.into()), Endpoint::Container),
            AgentError::Upstream(secret.into()),
        ] {
            let response = err.into_response();
            let id = response.headers().get(REQUEST_ID_HEADER).expect("an id").to_str().expect("ascii");
            let id = id.to_string();
            assert_eq!(id.len(), 16);
            let text = body(response).await;
            assert!(!text.contains("999988887777") && !text.contains("kiam-server"), "leaked: {text}");
            assert!(text.contains(&format!("(request id {id})")), "{text}");
        }
        let own = AgentError::Forbidden("forbidden by policy".into()).into_response();
        assert!(own.headers().get(REQUEST_ID_HEADER).is_none());
        assert_eq!(body(own).await, "forbidden by policy\n");
    }
}
