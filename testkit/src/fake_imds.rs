//! A fake *upstream* EC2 instance-metadata service: the node's real IMDS that the agent forwards
//! allowed paths to, and whose node-role credentials must never reach a pod.
//!
//! It meets the contract of the real metadata service that botocore, awscli, aws-config and the node SDK
//! were checked against: `PUT /latest/api/token` echoes the TTL header (400 on a bad TTL, 403 when
//! `X-Forwarded-For` is present), tokens are checked when sent (401 if unknown or expired) and,
//! in v2-only mode, required. Every request is recorded with its peer address so tests can
//! assert what the agent forwarded and from where.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use tokio::task::JoinHandle;

/// Access key id of the node's own role; assert that a pod never sees it.
pub const NODE_ACCESS_KEY_ID: &str = "ASIANODECREDENTIALS0";
/// Secret key of the node's role.
pub const NODE_SECRET_ACCESS_KEY: &str = "node/secret/access/key/never/for/pods00";
/// Session token of the node's role.
pub const NODE_SESSION_TOKEN: &str = "node-session-token-never-for-pods";
/// The node's instance profile role name.
pub const NODE_ROLE: &str = "node-role";
/// `/latest/meta-data/instance-id`.
pub const INSTANCE_ID: &str = "i-0fake0node";
/// `/latest/meta-data/placement/region`.
pub const REGION: &str = "us-east-1";
/// `/latest/user-data`.
pub const USER_DATA: &str = "#!/bin/sh\necho node user-data\n";

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// `GET`, `PUT`, ...
    pub method: String,
    /// Path and query, e.g. `/latest/meta-data/instance-id`.
    pub path: String,
    /// Headers in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The TCP peer (the agent, or a pod when a test talks to the fake directly).
    pub peer: SocketAddr,
}

impl RecordedRequest {
    /// The first header with this (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A running fake IMDS; its server task is aborted when this is dropped.
pub struct FakeImds {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    v2_only: bool,
    requests: Mutex<Vec<RecordedRequest>>,
    /// Issued token → when it stops being valid.
    tokens: Mutex<HashMap<String, Instant>>,
    /// Tokens issued so far, so that every token is new even after [`FakeImds::forget_tokens`].
    issued: std::sync::atomic::AtomicU64,
    /// What `instance-id` answers ([`INSTANCE_ID`] unless a test sets another).
    instance_id: Mutex<String>,
}

impl FakeImds {
    /// Listens on 127.0.0.1:0; tokens are optional.
    pub async fn start() -> FakeImds {
        FakeImds::start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), false).await
    }

    /// Listens on 127.0.0.1:0; a GET without a token gets 401 (IMDSv2 "required").
    pub async fn start_v2_only() -> FakeImds {
        FakeImds::start_with(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), true).await
    }

    /// Listens on `addr` (e.g. a [`crate::netns::PodNet`]'s `host_ip` with port 0, so a pod can
    /// reach it); tokens are optional.
    pub async fn start_on(addr: SocketAddr) -> FakeImds {
        FakeImds::start_with(addr, false).await
    }

    /// Listens on `addr`; `v2_only` makes token-less GETs 401.
    pub async fn start_with(addr: SocketAddr, v2_only: bool) -> FakeImds {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .unwrap_or_else(|e| panic!("fake IMDS: bind {addr}: {e}"));
        FakeImds::serve(listener, v2_only)
    }

    /// Serves on an already bound (non-blocking) listener, e.g. one made inside a node's network
    /// namespace at 169.254.169.254:80 to stand for the node's real metadata service.
    pub fn start_on_listener(listener: std::net::TcpListener, v2_only: bool) -> FakeImds {
        let listener = tokio::net::TcpListener::from_std(listener).expect("fake IMDS: adopt listener");
        FakeImds::serve(listener, v2_only)
    }

    fn serve(listener: tokio::net::TcpListener, v2_only: bool) -> FakeImds {
        let addr = listener.local_addr().expect("fake IMDS local_addr");
        let shared = Arc::new(Shared {
            v2_only,
            requests: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            issued: std::sync::atomic::AtomicU64::new(0),
            instance_id: Mutex::new(INSTANCE_ID.to_string()),
        });
        let app = Router::new().fallback(handle).with_state(Arc::clone(&shared));
        // Small responses in one segment: no Nagle/delayed-ACK stalls.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).await {
                eprintln!("fake IMDS on {addr} stopped: {e}");
            }
        });
        FakeImds { addr, shared, task }
    }

    /// The address it listens on (already bound, so connecting right away works).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`, for `AWS_EC2_METADATA_SERVICE_ENDPOINT` or the agent's upstream flag.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Invalidates every token issued so far, as a restarted metadata service would: GETs that
    /// carry one get 401 from now on.
    pub fn forget_tokens(&self) {
        self.shared.tokens.lock().expect("fake IMDS tokens poisoned").clear();
    }

    /// Makes `instance-id` answer `id` (an empty one, say, as a broken node's service might).
    pub fn set_instance_id(&self, id: &str) {
        *self.shared.instance_id.lock().expect("fake IMDS instance id poisoned") = id.to_string();
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().expect("fake IMDS request log poisoned").clone()
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request<Body>,
) -> Response {
    let method = req.method().clone();
    let path = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| req.uri().path().to_string());
    shared.requests.lock().expect("fake IMDS request log poisoned").push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect(),
        peer,
    });
    let headers = req.headers();
    if req.uri().path() == "/latest/api/token" {
        return if method == Method::PUT {
            issue_token(&shared, headers)
        } else {
            StatusCode::METHOD_NOT_ALLOWED.into_response()
        };
    }
    if method != Method::GET && method != Method::HEAD {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    if let Some(refusal) = check_token(&shared, headers) {
        return refusal;
    }
    let instance_id = shared.instance_id.lock().expect("fake IMDS instance id poisoned").clone();
    match content(req.uri().path(), instance_id) {
        Some((content_type, body)) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn issue_token(shared: &Shared, headers: &HeaderMap) -> Response {
    if headers.contains_key("x-forwarded-for") {
        return StatusCode::FORBIDDEN.into_response();
    }
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|ttl| (1..=21600).contains(ttl));
    let Some(ttl) = ttl else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut tokens = shared.tokens.lock().expect("fake IMDS tokens poisoned");
    let n = shared.issued.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let token = format!("fake-imds-token-{n:04}");
    tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
    (
        [
            ("x-aws-ec2-metadata-token-ttl-seconds", ttl.to_string()),
            (header::CONTENT_TYPE.as_str(), "text/plain".to_string()),
        ],
        token,
    )
        .into_response()
}

/// `None` when the request may proceed, else the 401 to send.
fn check_token(shared: &Shared, headers: &HeaderMap) -> Option<Response> {
    match headers.get("x-aws-ec2-metadata-token").and_then(|v| v.to_str().ok()) {
        Some(token) => {
            let tokens = shared.tokens.lock().expect("fake IMDS tokens poisoned");
            match tokens.get(token) {
                Some(expiry) if Instant::now() < *expiry => None,
                _ => Some(StatusCode::UNAUTHORIZED.into_response()),
            }
        }
        None if shared.v2_only => Some(StatusCode::UNAUTHORIZED.into_response()),
        None => None,
    }
}

/// The metadata tree: (content type, body) for a path, `None` for 404.
fn content(path: &str, instance_id: String) -> Option<(&'static str, String)> {
    const TEXT: &str = "text/plain";
    const JSON: &str = "application/json";
    let now = SystemTime::now();
    let body = match path {
        "/latest/meta-data/instance-id" => (TEXT, instance_id),
        "/latest/meta-data/placement/region" => (TEXT, REGION.to_string()),
        "/latest/meta-data/iam/security-credentials/" => (TEXT, NODE_ROLE.to_string()),
        "/latest/user-data" => (TEXT, USER_DATA.to_string()),
        "/latest/meta-data/iam/info" => (
            TEXT,
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": iso8601(now),
                "InstanceProfileArn": format!("arn:aws:iam::123456789012:instance-profile/{NODE_ROLE}"),
                "InstanceProfileId": "AIPAFAKENODEPROFILE0",
            })
            .to_string(),
        ),
        "/latest/dynamic/instance-identity/document" => (
            JSON,
            serde_json::json!({
                "accountId": "123456789012",
                "architecture": "x86_64",
                "availabilityZone": "us-east-1a",
                "imageId": "ami-0fake0image",
                "instanceId": INSTANCE_ID,
                "instanceType": "m5.large",
                "pendingTime": "2026-01-01T00:00:00Z",
                "privateIp": "10.0.0.10",
                "region": REGION,
                "version": "2017-09-30",
            })
            .to_string(),
        ),
        p if p == format!("/latest/meta-data/iam/security-credentials/{NODE_ROLE}") => (
            TEXT,
            serde_json::json!({
                "Code": "Success",
                "LastUpdated": iso8601(now),
                "Type": "AWS-HMAC",
                "AccessKeyId": NODE_ACCESS_KEY_ID,
                "SecretAccessKey": NODE_SECRET_ACCESS_KEY,
                "Token": NODE_SESSION_TOKEN,
                "Expiration": iso8601(now + Duration::from_secs(6 * 3600)),
            })
            .to_string(),
        ),
        _ => return None,
    };
    Some(body)
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC), the format real IMDS uses.
pub fn iso8601(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("test clock is after 1970").as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for every date after 1970.
    let z = days as i64 + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}
