//! The agent's one error type, and the one place its failures become HTTP statuses (and where
//! the backend's and the upstream's errors become the agent's).

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
        let mut response =
            (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{self}\n"))
                .into_response();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            response.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        response
    }
}

/// The error for a backend failure on behalf of the pod at `ip`.
pub fn from_backend(err: BackendError, ip: IpAddr) -> AgentError {
    match err {
        BackendError::PodNotFound => AgentError::NotFound(format!("no pod found for IP {ip}")),
        BackendError::Forbidden => AgentError::Forbidden("forbidden by policy".into()),
        BackendError::Unavailable(m) => AgentError::Unavailable(format!("kiam server unavailable: {m}")),
        BackendError::Unauthenticated(m) => AgentError::Unauthorized(m),
        BackendError::Failed(m) => AgentError::Internal(format!("error fetching credentials: {m}")),
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
