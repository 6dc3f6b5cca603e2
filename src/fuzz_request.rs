//! The `request` fuzz target: one request head, built from arbitrary bytes, through the agent's
//! whole handler ([`crate::agent::handlers::respond`], as the listener calls it for each request
//! of a connection: the caller's identity, path classification, methods,
//! IMDSv2 tokens, `?ip=`, the container endpoint, forwarding) against a backend that knows two
//! pods. Whatever the request: no panic, no 500, never another pod's credentials, credentials
//! only with a token under `--require-imdsv2`, and nothing forwarded that the allow-list and the
//! guards do not let through.
//!
//! The first byte chooses the set-up: bits 0–1 the caller (pod `alpha`, pod `beta`, an unknown
//! address, `alpha` as an IPv4-mapped IPv6 address), bit 2 `--require-imdsv2`, bit 3 an IMDSv2
//! token fetched first and sent, bit 4 a wide `--allow-route-regexp`, bit 5 an earlier request on
//! the same connection that passed with a token of `alpha`'s (so the connection remembers it). The
//! rest is the head: `METHOD TARGET` on the first line, then `name: value` lines.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::agent::handlers::respond;
use crate::agent::token::LastToken;
use crate::agent::{Agent, Backend, BackendError, Config, ContainerCredentials, Limits, PodRole};
use crate::creds::ImdsDocument;
use crate::metrics::Metrics;
use crate::policy::paths::{AllowRoutes, Route, classify};

/// The node's metadata service: a loopback port nothing listens on, so that whatever is
/// forwarded fails fast with 502 and shows as such.
const UPSTREAM: &str = "127.0.0.1:9";
const ALPHA: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const BETA: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

/// Two pods: `alpha` at 10.0.0.1 and `beta` at 10.0.0.2, each with the role of its name,
/// credentials whose key names the pod, and a projected token `token-<pod>`.
struct TwoPods;

fn pod_of(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(ip) if ip == ALPHA => Some("alpha"),
        IpAddr::V4(ip) if ip == BETA => Some("beta"),
        _ => None,
    }
}

fn key_of(pod: &str) -> String {
    format!("AKIDFUZZ{}", pod.to_ascii_uppercase())
}

impl Backend for TwoPods {
    async fn pod_role(&self, ip: IpAddr) -> Result<Option<PodRole>, BackendError> {
        pod_of(ip).map(|pod| Some(PodRole::named(pod))).ok_or(BackendError::PodNotFound)
    }

    async fn pod_credentials(&self, ip: IpAddr, role: &str, _: u64) -> Result<ImdsDocument, BackendError> {
        let pod = pod_of(ip).ok_or(BackendError::PodNotFound)?;
        if role != pod {
            return Err(BackendError::Forbidden);
        }
        Ok(ImdsDocument {
            code: "Success".into(),
            last_updated: "2026-11-27T12:00:00Z".into(),
            kind: "AWS-HMAC".into(),
            access_key_id: key_of(pod),
            secret_access_key: "secret".into(),
            token: "session".into(),
            expiration: "2026-11-27T13:00:00Z".into(),
        })
    }

    async fn health(&self) -> Result<String, BackendError> {
        Ok("ok".into())
    }

    fn serves_pod_tokens(&self) -> bool {
        true
    }

    async fn token_credentials(&self, token: &str, _: IpAddr) -> Result<ContainerCredentials, BackendError> {
        let pod = token.strip_prefix("token-").filter(|p| ["alpha", "beta"].contains(p));
        let pod = pod.ok_or_else(|| BackendError::Unauthenticated("the token is not valid".into()))?;
        Ok(ContainerCredentials {
            access_key_id: key_of(pod),
            secret_access_key: "secret".into(),
            token: "session".into(),
            expiration: "2026-11-27T13:00:00Z".into(),
            role_arn: format!("arn:aws:iam::123456789012:role/{pod}"),
        })
    }
}

fn config(require_imdsv2: bool, allow: &AllowRoutes) -> Config {
    Config {
        port: 8181,
        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
        host6: None,
        allow_routes: allow.clone(),
        metadata_addr: UPSTREAM.into(),
        pod_wait: Duration::ZERO,
        require_imdsv2,
        allow_ip_query: false,
        iptables: None,
        client: None,
        transport: crate::client::Transport::default(),
        prometheus_listen_addr: None,
        limits: Limits::default(),
        node_view: false,
        node_name: None,
        healthz_host: None,
        pod_resources_socket: None,
        unconfirmed_bound: crate::agent::view::confirm::UNCONFIRMED_BOUND,
    }
}

/// A request head from `text`, or `None` where hyper would not have parsed one either.
fn head(text: &str, token: Option<&str>) -> Option<Request<Body>> {
    let mut lines = text.split('\n');
    let (method, target) = lines.next()?.trim_end_matches('\r').split_once(' ')?;
    let mut request = Request::builder().method(Method::from_bytes(method.as_bytes()).ok()?).uri(target);
    for line in lines {
        let Some((name, value)) = line.trim_end_matches('\r').split_once(':') else { continue };
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value.trim())) {
            request = request.header(name, value);
        }
    }
    if let Some(token) = token {
        request = request.header("x-aws-ec2-metadata-token", token);
    }
    request.body(Body::empty()).ok()
}

/// One request from `caller` through the agent's handler, on the connection that remembers
/// `last`: status and body.
async fn exchange(
    agent: &Agent<TwoPods>,
    last: &LastToken,
    caller: IpAddr,
    request: Request<Body>,
) -> (StatusCode, String) {
    let (parts, _body) = request.into_parts();
    let response = respond(agent, SocketAddr::new(caller, 40_000), last, &parts).await;
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// See the module's documentation.
pub fn request(data: &[u8]) {
    let Some((&setup, rest)) = data.split_first() else { return };
    let caller = match setup & 3 {
        0 => IpAddr::V4(ALPHA),
        1 => IpAddr::V4(BETA),
        2 => IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
        _ => IpAddr::V6(ALPHA.to_ipv6_mapped()),
    };
    let (require_imdsv2, with_token) = (setup & 4 != 0, setup & 8 != 0);
    let Ok(allow) = AllowRoutes::new(if setup & 16 != 0 { ".*" } else { "" }) else { return };
    let text = String::from_utf8_lossy(rest);
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    let metrics = Arc::new(Metrics::default());
    let Ok(agent) = Agent::new(TwoPods, &config(require_imdsv2, &allow), metrics) else { return };
    let agent = Arc::new(agent);
    let last = LastToken::default();
    runtime.block_on(async {
        let put = "PUT /latest/api/token\nx-aws-ec2-metadata-token-ttl-seconds: 60";
        if setup & 32 != 0 {
            // alpha's token passes once on this connection, for alpha's own role.
            let Some(put) = head(put, None) else { return };
            let (_, alphas) = exchange(&agent, &last, IpAddr::V4(ALPHA), put).await;
            let get = "GET /latest/meta-data/iam/security-credentials/alpha";
            let Some(get) = head(get, Some(&alphas)) else { return };
            let (status, body) = exchange(&agent, &last, IpAddr::V4(ALPHA), get).await;
            assert!(status == StatusCode::OK && body.contains(&key_of("alpha")), "{status}: {body}");
        }
        let token = match with_token {
            true => {
                let Some(put) = head(put, None) else { return };
                let (status, token) = exchange(&agent, &last, caller, put).await;
                assert_eq!(status, StatusCode::OK, "{token}");
                Some(token)
            }
            false => None,
        };
        let Some(request) = head(&text, token.as_deref()) else { return };
        let path = request.uri().path().to_string();
        let authorization = request.headers().get("authorization").cloned();
        let (status, body) = exchange(&agent, &last, caller, request).await;
        judge(&path, status, &body, caller, token.is_some(), require_imdsv2, authorization, &allow);
    });
}

/// What must hold of the answer.
#[allow(clippy::too_many_arguments)]
fn judge(
    path: &str,
    status: StatusCode,
    body: &str,
    caller: IpAddr,
    with_token: bool,
    require_imdsv2: bool,
    authorization: Option<HeaderValue>,
    allow: &AllowRoutes,
) {
    assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{path:?}: {body}");
    let route = classify(path);
    if status == StatusCode::BAD_GATEWAY {
        assert!(route == Route::Other && allow.allows(path), "forwarded {path:?}");
    }
    let Some(at) = body.find("AKIDFUZZ") else { return };
    assert_eq!(status, StatusCode::OK, "credentials in a refusal: {path:?}");
    let key = &body[at..];
    let owner = match route {
        Route::ContainerCredentials => {
            let sent = authorization.as_ref().and_then(|v| v.to_str().ok()).unwrap_or_default();
            let token = sent.strip_prefix("Bearer ").unwrap_or(sent).trim();
            token.strip_prefix("token-").unwrap_or_default().to_string()
        }
        _ => {
            assert!(with_token || !require_imdsv2, "credentials without a token: {path:?}");
            pod_of(caller.to_canonical()).unwrap_or_default().to_string()
        }
    };
    assert!(!owner.is_empty() && key.starts_with(&key_of(&owner)), "{path:?} from {caller} got {key:.16}");
}
