//! The agent's client of the node's real metadata service: allow-listed paths and the health
//! check go through it. Only GET and HEAD are sent, only a short list of end-to-end request
//! headers is passed on (no `X-Forwarded-For`, no hop-by-hop headers, not the caller's IMDSv2
//! token, which is the agent's and not the node's), and hop-by-hop headers are dropped from the
//! answer.
//!
//! The agent speaks IMDSv2 itself: it asks the node for a session token, keeps it until shortly
//! before it expires, and asks again once if the node answers 401. A node that refuses tokens
//! (IMDSv1 only, or an emulator without them) is asked without one, and asked again for a token
//! a minute later. The health checks' `instance-id` is cached briefly and asked once for all
//! concurrent callers ([`super::instance_check`]).

use std::time::Duration;

use axum::body::Body;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::instance_check::InstanceCheck;
use super::token::{TOKEN_HEADER, TTL_HEADER};

/// How long the upstream gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest upstream body passed through.
const MAX_BODY: usize = 1 << 20;
/// The TTL asked for the agent's own upstream token, the most the metadata service grants.
const TOKEN_TTL_SECONDS: u64 = 21_600;
/// A token is replaced this long before it expires.
const TOKEN_REFRESH_LEAD: Duration = Duration::from_secs(120);
/// After the node refuses a token, how long the agent goes without before asking again.
const NO_TOKEN_RETRY: Duration = Duration::from_secs(60);

/// Why forwarding to the node's metadata service failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Only GET and HEAD are forwarded.
    #[error("method not allowed")]
    Method,
    /// The node's metadata service failed or did not answer in time.
    #[error("{0}")]
    Failed(String),
}

/// Request headers passed on to the node: content negotiation and caching, nothing that names
/// the caller or the connection.
const FORWARDED_HEADERS: [&str; 8] = [
    "accept",
    "accept-encoding",
    "accept-language",
    "user-agent",
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
];

/// The agent's upstream token, as far as it knows.
enum TokenState {
    /// Not asked yet, or dropped after a 401.
    Unknown,
    /// A token to send until `refresh_at`.
    Held { value: HeaderValue, refresh_at: Instant },
    /// The node gave none; go without until `retry_at`.
    Refused { retry_at: Instant },
}

/// A client for the node's metadata service.
pub struct Upstream {
    client: Client<HttpConnector, Empty<Bytes>>,
    authority: String,
    token: Mutex<TokenState>,
    /// The health checks' `instance-id`, cached and single-flight.
    instance: InstanceCheck,
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Headers of an upstream answer worth passing back: not hop-by-hop, not named in its
/// `Connection` header, and not the length (the body is re-framed).
fn response_headers(from: &HeaderMap) -> HeaderMap {
    let listed: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .collect();
    let mut to = HeaderMap::new();
    for (name, value) in from {
        if !is_hop_by_hop(name)
            && name != header::CONTENT_LENGTH
            && !listed.iter().any(|l| l == name.as_str())
        {
            to.append(name.clone(), value.clone());
        }
    }
    to
}

impl Upstream {
    /// A client for `authority` (`host[:port]`; port 80 when absent).
    pub fn new(authority: &str) -> Upstream {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Upstream {
            client,
            authority: authority.to_string(),
            token: Mutex::new(TokenState::Unknown),
            instance: InstanceCheck::default(),
        }
    }

    /// The instance ID, for the health checks: asked of the node at most once per
    /// [`instance_check::TTL`](super::instance_check::TTL), concurrent callers sharing the call.
    pub async fn instance_id(&self) -> Result<String, String> {
        self.instance
            .get(|| async {
                let path = "/latest/meta-data/instance-id";
                let answer =
                    self.forward(&Method::GET, path, &HeaderMap::new()).await.map_err(|e| e.to_string())?;
                if !answer.status().is_success() {
                    return Err(format!("instance-id answered {}", answer.status()));
                }
                let body = axum::body::to_bytes(answer.into_body(), 4096).await.map_err(|e| e.to_string())?;
                let id =
                    String::from_utf8(body.to_vec()).map_err(|_| "instance-id is not UTF-8".to_string())?;
                // kube2iam reports an empty answer as a failure; kiam-rs does in both modes.
                match id.trim() {
                    "" => Err("instance-id is empty".to_string()),
                    id => Ok(id.to_string()),
                }
            })
            .await
    }

    /// Forwards a GET or HEAD for `path_and_query` with the caller's end-to-end headers.
    pub async fn forward(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(UpstreamError::Method);
        }
        let mut passed = HeaderMap::new();
        for name in FORWARDED_HEADERS {
            for value in headers.get_all(name) {
                passed.append(HeaderName::from_static(name), value.clone());
            }
        }
        let token = self.token(false).await?;
        let mut response = self.send(method, path_and_query, &passed, token.as_ref()).await?;
        if response.status() == StatusCode::UNAUTHORIZED {
            // The token expired early, the node restarted, or it started requiring tokens.
            if let Some(fresh) = self.token(true).await? {
                response = self.send(method, path_and_query, &passed, Some(&fresh)).await?;
            }
        }
        Ok(response)
    }

    /// The token to send, asking the node for one when none is held (or `renew`).
    async fn token(&self, renew: bool) -> Result<Option<HeaderValue>, UpstreamError> {
        let mut state = self.token.lock().await;
        let now = Instant::now();
        match &*state {
            TokenState::Held { value, refresh_at } if !renew && now < *refresh_at => {
                return Ok(Some(value.clone()));
            }
            TokenState::Refused { retry_at } if !renew && now < *retry_at => return Ok(None),
            _ => {}
        }
        *state = TokenState::Unknown;
        let request = Request::builder()
            .method(Method::PUT)
            .uri(format!("http://{}/latest/api/token", self.authority))
            .header(TTL_HEADER, TOKEN_TTL_SECONDS)
            .body(Empty::new())
            .map_err(|e| UpstreamError::Failed(e.to_string()))?;
        let (status, headers, body) = self.exchange(request).await?;
        let value = std::str::from_utf8(&body)
            .ok()
            .map(str::trim)
            .filter(|t| status == StatusCode::OK && !t.is_empty())
            .and_then(|t| HeaderValue::from_str(t).ok());
        let Some(value) = value else {
            tracing::debug!(%status, "the metadata service gave no token; continuing without");
            *state = TokenState::Refused { retry_at: now + NO_TOKEN_RETRY };
            return Ok(None);
        };
        let ttl = headers
            .get(TTL_HEADER)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
            .unwrap_or(TOKEN_TTL_SECONDS);
        let ttl = Duration::from_secs(ttl);
        let lead = if ttl > TOKEN_REFRESH_LEAD * 2 { TOKEN_REFRESH_LEAD } else { ttl / 2 };
        *state = TokenState::Held { value: value.clone(), refresh_at: now + ttl - lead };
        Ok(Some(value))
    }

    async fn send(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        token: Option<&HeaderValue>,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{}", self.authority, path_and_query))
            .body(Empty::new())
            .map_err(|e| UpstreamError::Failed(e.to_string()))?;
        *request.headers_mut() = headers.clone();
        if let Some(token) = token {
            request.headers_mut().insert(TOKEN_HEADER, token.clone());
        }
        let (status, headers, body) = self.exchange(request).await?;
        let mut out = Response::new(Body::from(body));
        *out.status_mut() = status;
        *out.headers_mut() = response_headers(&headers);
        Ok(out)
    }

    async fn exchange(
        &self,
        request: Request<Empty<Bytes>>,
    ) -> Result<(StatusCode, HeaderMap, Bytes), UpstreamError> {
        let timed_out = |_| UpstreamError::Failed("metadata service timed out".into());
        let response = tokio::time::timeout(UPSTREAM_TIMEOUT, self.client.request(request))
            .await
            .map_err(timed_out)?
            .map_err(|e| UpstreamError::Failed(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, MAX_BODY);
        let bytes = tokio::time::timeout(UPSTREAM_TIMEOUT, body.collect())
            .await
            .map_err(timed_out)?
            .map_err(|e| UpstreamError::Failed(e.to_string()))?
            .to_bytes();
        Ok((parts.status, parts.headers, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert("content-type", HeaderValue::from_static("text/plain"));
        from.insert("content-length", HeaderValue::from_static("3"));
        from.insert("connection", HeaderValue::from_static("close, X-Secret"));
        from.insert("x-secret", HeaderValue::from_static("1"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        from.insert("etag", HeaderValue::from_static("\"a\""));
        let to = response_headers(&from);
        let names: Vec<&str> = to.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, vec!["content-type", "etag"]);
    }
}
