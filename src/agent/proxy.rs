//! Forwarding of allow-listed paths to the node's real metadata service. Only GET and HEAD are
//! forwarded; hop-by-hop headers, `X-Forwarded-For` and the caller's IMDSv2 token (which is the
//! agent's, not the node's) are dropped on the way.

use std::time::Duration;

use axum::body::Body;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::handlers::AgentError;

/// How long the upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest upstream body passed through.
const MAX_BODY: usize = 1 << 20;

/// The header carrying an IMDSv2 token.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// A client for the node's metadata service.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Empty<Bytes>>,
    authority: String,
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-connection"
    )
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, drop: &[&str]) {
    for (name, value) in from {
        if !is_hop_by_hop(name) && !drop.contains(&name.as_str()) {
            to.append(name.clone(), value.clone());
        }
    }
}

impl Upstream {
    /// A client for `authority` (`host[:port]`; port 80 when absent).
    pub fn new(authority: &str) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Upstream { client, authority: authority.to_string() }
    }

    /// Forwards a GET or HEAD for `path_and_query` with the caller's end-to-end headers.
    pub async fn forward(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, AgentError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(AgentError::MethodNotAllowed);
        }
        let uri = format!("http://{}{}", self.authority, path_and_query);
        let mut request = Request::builder().method(method.clone()).uri(&uri);
        if let Some(h) = request.headers_mut() {
            copy_headers(headers, h, &["host", "x-forwarded-for", "forwarded", "x-real-ip", TOKEN_HEADER]);
        }
        let request = request.body(Empty::new()).map_err(|e| AgentError::Upstream(e.to_string()))?;
        let response = tokio::time::timeout(UPSTREAM_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| AgentError::Upstream("metadata service timed out".into()))?
            .map_err(|e| AgentError::Upstream(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, MAX_BODY);
        let bytes = tokio::time::timeout(UPSTREAM_TIMEOUT, body.collect())
            .await
            .map_err(|_| AgentError::Upstream("metadata service timed out".into()))?
            .map_err(|e| AgentError::Upstream(e.to_string()))?
            .to_bytes();
        let mut out = Response::builder().status(parts.status);
        if let Some(h) = out.headers_mut() {
            copy_headers(&parts.headers, h, &[header::CONTENT_LENGTH.as_str()]);
        }
        out.body(Body::from(bytes)).map_err(|e| AgentError::Upstream(e.to_string()))
    }
}
