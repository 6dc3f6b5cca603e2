//! A tiny HTTP/1 client for tests that can connect *from* a chosen local address.
//!
//! The agent tells pods apart by the TCP source IP, so a test poses as the pod at 127.0.0.x by
//! binding the client socket to that address (all of 127/8 is local on Linux). Every call opens
//! a fresh connection (no pooling) so the source address always applies, and is bounded by a
//! 10 s timeout so a silent peer fails the test instead of hanging it.

use std::net::IpAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Upper bound on one request, connect to last body byte.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A fully read response.
#[derive(Debug, Clone)]
pub struct Response {
    /// HTTP status code.
    pub status: u16,
    /// Headers in arrival order, names lower-case.
    pub headers: Vec<(String, String)>,
    /// The body, decoded as UTF-8 (lossily).
    pub body: String,
}

impl Response {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends one request and reads the whole response; `from` binds the client socket to that local
/// address first. `Err` carries a description of what failed (bad input, connect, timeout).
pub async fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
    from: Option<IpAddr>,
) -> Result<Response, String> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(from);
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(TIMEOUT));
    let client: Client<_, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(connector);

    let mut builder = hyper::Request::builder()
        .method(hyper::Method::from_bytes(method.as_bytes()).map_err(|e| format!("method: {e}"))?)
        .uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let req = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .map_err(|e| format!("build request {method} {url}: {e}"))?;

    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{method} {url}: {e:?}"))?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| {
                (k.as_str().to_ascii_lowercase(), String::from_utf8_lossy(v.as_bytes()).into_owned())
            })
            .collect();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {url}: reading body: {e}"))?
            .to_bytes();
        Ok(Response { status, headers, body: String::from_utf8_lossy(&bytes).into_owned() })
    };
    tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{method} {url}: no response within {TIMEOUT:?}"))?
}

/// [`request`] with method GET, no extra headers and no body.
pub async fn get(url: &str, from: Option<IpAddr>) -> Result<Response, String> {
    request("GET", url, &[], "", from).await
}
