//! The agent's HTTP handler: identify the pod by the connection's source address, classify the
//! path, and answer it, ask the backend, forward it, or refuse it. [`AgentError`] is the one
//! place failures become HTTP statuses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::proxy::TOKEN_HEADER;
use super::token::parse_ttl;
use super::{Agent, Backend, BackendError};
use crate::policy::paths::{Route, classify};
use crate::policy::role::listed_name;

const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Why a request failed, mapped to a status and a plain-text message.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("metadata service: {0}")]
    Upstream(String),
    #[error("{0}")]
    Unavailable(String),
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
        (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], format!("{self}\n")).into_response()
    }
}

fn from_backend(err: BackendError, ip: IpAddr) -> AgentError {
    match err {
        BackendError::PodNotFound => AgentError::NotFound(format!("no pod found for IP {ip}")),
        BackendError::Forbidden => AgentError::Forbidden("forbidden by policy".into()),
        BackendError::Unavailable(m) => AgentError::Unavailable(format!("kiam server unavailable: {m}")),
        BackendError::Failed(m) => AgentError::Internal(format!("error fetching credentials: {m}")),
    }
}

/// Every request comes through here.
pub async fn handle<B: Backend>(
    State(agent): State<Arc<Agent<B>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let ip = peer.ip().to_canonical();
    // Only the head is needed; the parts are Sync, which the body is not.
    let (parts, _body) = request.into_parts();
    let (method, path) = (parts.method.clone(), parts.uri.path().to_string());
    let response = match dispatch(&agent, ip, &parts).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    let status = response.status().as_u16();
    let duration_ms = started.elapsed().as_millis() as u64;
    if status < 400 {
        tracing::debug!(pod.ip = %ip, %method, %path, status, duration_ms, "request");
    } else {
        tracing::info!(pod.ip = %ip, %method, %path, status, duration_ms, "request");
    }
    response
}

async fn dispatch<B: Backend>(agent: &Agent<B>, ip: IpAddr, request: &Parts) -> Result<Response, AgentError> {
    let (method, headers, path) = (&request.method, &request.headers, request.uri.path());
    let route = classify(path);
    match route {
        Route::Ping => return Ok("pong".into_response()),
        Route::Health => return health(agent, request.uri.query()).await,
        Route::Token => return token(agent, ip, method, headers),
        Route::Malformed => return Err(AgentError::BadRequest(format!("malformed metadata path: {path}"))),
        _ => {}
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(AgentError::MethodNotAllowed);
    }
    check_token(agent, ip, headers)?;
    match route {
        Route::CredentialsRedirect => {
            let location = format!("{path}/");
            Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, location)]).into_response())
        }
        Route::RoleList => {
            let role = pod_role(agent, ip).await?;
            Ok(([(header::CONTENT_TYPE, "text/plain")], listed_name(&role).to_string()).into_response())
        }
        Route::Credentials(requested) => credentials(agent, ip, requested).await,
        Route::Guarded => Err(AgentError::NotFound(format!("{path} is not served by kiam"))),
        _ => {
            if !agent.allow_routes.allows(path) {
                return Err(AgentError::NotFound(format!(
                    "request blocked by allow-route-regexp {:?}: {path}",
                    agent.allow_routes.as_str()
                )));
            }
            let pq = request.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(path);
            agent.upstream.forward(method, pq, headers).await
        }
    }
}

/// `PUT /{version}/api/token`: an IMDSv2 token bound to the caller's IP.
fn token<B>(
    agent: &Agent<B>,
    ip: IpAddr,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, AgentError> {
    if method != Method::PUT {
        return Err(AgentError::MethodNotAllowed);
    }
    // The real metadata service refuses tokens to requests that went through a proxy.
    if headers.contains_key("x-forwarded-for") {
        return Err(AgentError::Forbidden("token requests may not carry X-Forwarded-For".into()));
    }
    let ttl = parse_ttl(headers.get(TTL_HEADER).and_then(|v| v.to_str().ok()))
        .map_err(|m| AgentError::BadRequest(m.to_string()))?;
    let token = agent.tokens.mint(ip, Duration::from_secs(ttl), SystemTime::now());
    let mut response = token.into_response();
    response.headers_mut().insert(TTL_HEADER, HeaderValue::from(ttl));
    Ok(response)
}

/// A token, when present, must be one of ours, for this caller, unexpired. Without one the
/// request is IMDSv1, which kiam users rely on.
fn check_token<B>(agent: &Agent<B>, ip: IpAddr, headers: &HeaderMap) -> Result<(), AgentError> {
    let Some(value) = headers.get(TOKEN_HEADER) else { return Ok(()) };
    let token = value.to_str().map_err(|_| AgentError::Unauthorized("invalid token".into()))?;
    agent.tokens.verify(token, ip, SystemTime::now()).map_err(|e| AgentError::Unauthorized(e.to_string()))
}

/// Calls `f` until it succeeds, fails for good, or `budget` runs out: a pod the server has not
/// seen yet, or a server that is briefly unreachable, is waited for instead of failing at once.
async fn with_budget<T, F, Fut>(budget: Duration, mut f: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let mut delay = Duration::from_millis(5);
    loop {
        match f().await {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                tokio::time::sleep(delay).await;
                delay = (delay * 3 / 2).min(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

async fn pod_role<B: Backend>(agent: &Agent<B>, ip: IpAddr) -> Result<String, AgentError> {
    with_budget(agent.pod_wait, || agent.backend.pod_role(ip))
        .await
        .map_err(|e| from_backend(e, ip))?
        .ok_or_else(|| AgentError::NotFound("no role annotated for this pod".into()))
}

async fn credentials<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    requested: &str,
) -> Result<Response, AgentError> {
    let role = pod_role(agent, ip).await?;
    // SDKs list the role, then ask for that name; any other name is not this pod's (404, so
    // that SDKs which pin a profile name rediscover it).
    if requested != listed_name(&role) && requested != role.trim().trim_start_matches('/') {
        return Err(AgentError::NotFound(format!("role {requested:?} is not this pod's role")));
    }
    let document = with_budget(agent.pod_wait, || agent.backend.pod_credentials(ip, &role))
        .await
        .map_err(|e| from_backend(e, ip))?;
    let body = serde_json::to_vec(&document).map_err(|e| AgentError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response())
}

/// `/health`: the node's metadata service answers, and with `?deep` a server does too.
async fn health<B: Backend>(agent: &Agent<B>, query: Option<&str>) -> Result<Response, AgentError> {
    let upstream =
        agent.upstream.forward(&Method::GET, "/latest/meta-data/instance-id", &HeaderMap::new()).await?;
    if !upstream.status().is_success() {
        return Err(AgentError::Upstream(format!("instance-id answered {}", upstream.status())));
    }
    let deep = query.is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("deep")));
    if deep {
        let message = agent.backend.health().await.map_err(|e| AgentError::Unavailable(e.to_string()))?;
        return Ok(format!("metadata: ok, server: {message}").into_response());
    }
    Ok("metadata: ok".into_response())
}
