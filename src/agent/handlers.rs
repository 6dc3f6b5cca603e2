//! The agent's HTTP handler: identify the pod by the connection's source address, classify the
//! path, and answer it, ask the backend, forward it, or refuse it. Failures become HTTP statuses
//! in one place, [`AgentError`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::AgentError;
use super::token::{LastToken, TOKEN_HEADER, TTL_HEADER, parse_ttl};
use super::{Agent, Backend};
use super::{answers, container};
use crate::metrics::Handler;
use crate::policy::paths::{Route, classify};

/// The agent's answer to the request head `parts` from `peer`, on the connection that
/// remembers `last_token`: every request comes through here ([`Direct`]).
pub async fn respond<B: Backend>(
    agent: &Agent<B>,
    peer: SocketAddr,
    last_token: &LastToken,
    parts: &Parts,
) -> Response {
    let started = Instant::now();
    let ip = match caller(agent, peer, parts.uri.query()) {
        Ok(ip) => ip,
        Err(err) => return err.into_response(),
    };
    let path = parts.uri.path();
    // Classified once: the answer and the metrics' labels follow the same route.
    let route = classify(path);
    let response = match dispatch(agent, ip, last_token, parts, &route).await {
        Ok(response) => response,
        Err(err) => err.into_response(),
    };
    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
    if let Some(handler) = handler_of(&route) {
        record(&agent.metrics.agent, handler, status, elapsed);
    }
    let method = &parts.method;
    agent.metrics.http_answered(status, method.as_str(), || kube2iam_handler(&route), elapsed);
    let duration_ms = elapsed.as_millis() as u64;
    if status < 400 {
        tracing::debug!(pod.ip = %ip, %method, %path, status, duration_ms, "request");
    } else {
        tracing::info!(pod.ip = %ip, %method, %path, status, duration_ms, "request");
    }
    response
}

/// The service for one connection: every request straight to [`respond`], with the caller's
/// address from the connection. The agent has a single handler, so it needs no router, nor a
/// per-request extension to carry the address (figure 1's hit path).
pub struct Direct<B>(Arc<Connection<B>>);

/// What every request on one connection shares. Each request's future holds the connection's
/// own `Arc`, not the agent's: the agent's reference count is shared by every connection on
/// every core, and touching it twice per request moved its cache line between cores (figure 1).
struct Connection<B> {
    agent: Arc<Agent<B>>,
    peer: SocketAddr,
    /// The last IMDSv2 token that passed on this connection.
    last_token: LastToken,
}

impl<B> Direct<B> {
    /// The service for a connection from `peer`.
    pub fn new(agent: Arc<Agent<B>>, peer: SocketAddr) -> Direct<B> {
        Direct(Arc::new(Connection { agent, peer, last_token: LastToken::default() }))
    }
}

impl<B: Backend> hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Direct<B> {
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let conn = Arc::clone(&self.0);
        Box::pin(async move {
            let (parts, _body) = request.into_parts();
            Ok(respond(&conn.agent, conn.peer, &conn.last_token, &parts).await)
        })
    }
}

/// kiam's `handler` label for a route, as kiam counts the same request: `/ping` and the
/// trailing-slash redirect are not counted (kiam serves them outside its metered handlers), and
/// what kiam proxied is `proxy` even where kiam-rs answers it itself (IMDSv2 token PUTs,
/// `iam/info`), so that dashboards built on kiam's series see the same counts.
fn handler_of(route: &Route<'_>) -> Option<&'static str> {
    Some(match route {
        Route::Credentials(_) | Route::ExtendedCredentials(_) => "credentials",
        Route::RoleList | Route::ExtendedRoleList => "roleName",
        Route::Health => "health",
        Route::ContainerCredentials => "containerCredentials",
        Route::Ping | Route::CredentialsRedirect => return None,
        _ => "proxy",
    })
}

/// kube2iam's `handler` label for a route (its handler function names).
fn kube2iam_handler(route: &Route<'_>) -> &'static str {
    match route {
        Route::RoleList | Route::CredentialsRedirect | Route::ExtendedRoleList => {
            "securityCredentialsHandler"
        }
        Route::Credentials(_) | Route::ExtendedCredentials(_) => "roleHandler",
        Route::Healthz | Route::Health => "healthHandler",
        _ => "reverseProxyHandler",
    }
}

/// kiam's per-response counters: every response by handler and code, latency for the handlers
/// kiam timed, and successes.
fn record(m: &crate::metrics::AgentMetrics, handler: &'static str, status: u16, elapsed: Duration) {
    if handler == "credentials" && status == 200 {
        // Every hit: the same three series as below, without looking them up.
        let hit = m.credentials_ok();
        hit.responses.inc();
        hit.latency.observe(elapsed.as_secs_f64());
        hit.success.inc();
        return;
    }
    let label = Handler { handler };
    m.responses.get_or_create(&crate::metrics::Response { handler, code: status }).inc();
    if matches!(handler, "credentials" | "containerCredentials" | "roleName" | "health") {
        m.handler_latency.get_or_create(&label).observe(elapsed.as_secs_f64());
    }
    if status == 200 && matches!(handler, "credentials" | "containerCredentials" | "roleName" | "proxy") {
        m.success.get_or_create(&label).inc();
    }
}

/// The caller: the connection's source address, or `?ip=` under `--allow-ip-query`.
fn caller<B>(agent: &Agent<B>, peer: SocketAddr, query: Option<&str>) -> Result<IpAddr, AgentError> {
    let from_query = query
        .filter(|_| agent.allow_ip_query)
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("ip=")));
    match from_query {
        Some(ip) => ip.parse().map_err(|_| AgentError::BadRequest(format!("invalid ?ip= {ip:?}"))),
        None => Ok(peer.ip().to_canonical()),
    }
}

/// A credentials GET (the hit path) is answered here; every other request by [`others`], boxed.
/// The future of a hit, allocated for every request ([`Direct`]), then stays a few hundred
/// bytes instead of the kilobytes of the gRPC and proxy calls' futures, and malloc serves it
/// from its fast per-thread cache (figure 1).
async fn dispatch<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    last_token: &LastToken,
    request: &Parts,
    route: &Route<'_>,
) -> Result<Response, AgentError> {
    let credentials = match *route {
        Route::Credentials(requested) => Some((requested, false)),
        Route::ExtendedCredentials(requested) => Some((requested, true)),
        _ => None,
    };
    match credentials {
        Some((requested, extended)) if request.method == Method::GET || request.method == Method::HEAD => {
            check_token(agent, ip, last_token, &request.headers)?;
            answers::credentials(agent, ip, requested, extended).await
        }
        _ => Box::pin(others(agent, ip, last_token, request, route)).await,
    }
}

/// Every request but a credentials GET, by route.
async fn others<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    last_token: &LastToken,
    request: &Parts,
    route: &Route<'_>,
) -> Result<Response, AgentError> {
    let (method, headers, path) = (&request.method, &request.headers, request.uri.path());
    match *route {
        Route::Token => return token(agent, ip, method, headers),
        Route::Malformed => return Err(AgentError::BadRequest(format!("malformed metadata path: {path}"))),
        _ => {}
    }
    if method != Method::GET && method != Method::HEAD {
        return Err(AgentError::MethodNotAllowed);
    }
    match route {
        Route::Ping => return Ok("pong".into_response()),
        Route::Health => return answers::health(agent, request.uri.query()).await,
        Route::Healthz => return answers::healthz(agent).await,
        // Identified by the token it carries, not by its address or an IMDSv2 token.
        Route::ContainerCredentials => return container::credentials(agent, ip, headers).await,
        _ => {}
    }
    check_token(agent, ip, last_token, headers)?;
    match route {
        Route::CredentialsRedirect => {
            let location = format!("{path}/");
            Ok((StatusCode::MOVED_PERMANENTLY, [(header::LOCATION, location)]).into_response())
        }
        Route::RoleList => answers::role_list(agent, ip, false).await,
        Route::ExtendedRoleList => answers::role_list(agent, ip, true).await,
        // [`dispatch`] answers these itself; kept so that no route here falls to the proxy.
        Route::Credentials(requested) => answers::credentials(agent, ip, requested, false).await,
        Route::ExtendedCredentials(requested) => answers::credentials(agent, ip, requested, true).await,
        Route::IamInfo => answers::iam_info(agent, ip).await,
        Route::Guarded => Err(AgentError::NotFound(format!("{path} is not served by kiam"))),
        _ => {
            if !agent.allow_routes.allows(path) {
                agent.metrics.agent.proxy_requests_blocked.inc();
                return Err(AgentError::NotFound(format!(
                    "request blocked by allow-route-regexp {:?}: {path}",
                    agent.allow_routes.as_str()
                )));
            }
            let pq = request.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or(path);
            Ok(agent.upstream.forward(method, pq, headers).await?)
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
/// request is IMDSv1, which kiam users rely on, unless `--require-imdsv2`.
fn check_token<B>(
    agent: &Agent<B>,
    ip: IpAddr,
    last_token: &LastToken,
    headers: &HeaderMap,
) -> Result<(), AgentError> {
    let Some(value) = headers.get(TOKEN_HEADER) else {
        if agent.require_imdsv2 {
            return Err(AgentError::Unauthorized("an IMDSv2 token is required".into()));
        }
        return Ok(());
    };
    let token = value.to_str().map_err(|_| AgentError::Unauthorized("invalid token".into()))?;
    agent
        .tokens
        .verify_again(last_token, token, ip, SystemTime::now())
        .map_err(|e| AgentError::Unauthorized(e.to_string()))
}
