//! The webhook's HTTPS service on the hardened listener ([`crate::listener::serve_tls`]): TLS
//! with the certificate the API server trusts (no client certificate asked for: the API server
//! presents none unless configured to), HTTP/1.1, bodies bounded, a connection cap and a
//! per-source cap, and deadlines on every handshake, request head and write. `POST` to
//! [`POD_PATH`](super::POD_PATH) or [`NAMESPACE_PATH`](super::NAMESPACE_PATH) is answered with
//! [`review`](super::review); `GET /healthz` with `ok`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::{Injection, NAMESPACE_PATH, POD_PATH, review};
use crate::listener::{Limits, Tally};

/// The largest AdmissionReview read (the API server's own request limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 256;
/// How long a TLS handshake, and a request's headers, may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// Why the webhook could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("TLS: {0}")]
    Tls(String),
}

/// The TLS configuration for `cert` and `key` (PEM files).
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, WebhookError> {
    let file = |path: &Path, e: &dyn std::fmt::Display| WebhookError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file(cert, &e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file(cert, &e))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file(key, &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| WebhookError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's limits for the webhook: a deadline on every handshake and request head, at
/// most [`MAX_CONNECTIONS`] connections, and the per-source cap of every listener of ours.
pub fn limits() -> Limits {
    Limits { header_read_timeout: DEADLINE, max_connections: MAX_CONNECTIONS, ..Limits::default() }
}

/// Serves the webhook on `listener` until `shutdown`, on the hardened listener
/// ([`crate::listener::serve_tls`]).
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    injection: Injection,
    shutdown: CancellationToken,
) {
    let injection = Arc::new(injection);
    let app = axum::Router::new().fallback(move |request: Request<axum::body::Body>| {
        let injection = Arc::clone(&injection);
        async move { answer(request, injection).await.map(axum::body::Body::new) }
    });
    crate::listener::serve_tls(listener, tls, app, &limits(), Tally::default(), shutdown).await;
}

type Answer = Response<Full<Bytes>>;

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

async fn answer(request: Request<axum::body::Body>, injection: Arc<Injection>) -> Answer {
    let text = |status, body: &str| respond(status, "text/plain", format!("{body}\n").into_bytes());
    let namespace_opted_in = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => return text(StatusCode::OK, "ok"),
        (&Method::POST, POD_PATH) => false,
        (&Method::POST, NAMESPACE_PATH) => true,
        _ => return text(StatusCode::NOT_FOUND, "not found"),
    };
    let body =
        match tokio::time::timeout(DEADLINE, Limited::new(request.into_body(), MAX_BODY).collect()).await {
            Ok(Ok(body)) => body.to_bytes(),
            _ => return text(StatusCode::BAD_REQUEST, "the body could not be read"),
        };
    let reviewed = serde_json::from_slice(&body)
        .map_err(|e| e.to_string())
        .and_then(|request| review(&request, namespace_opted_in, &injection).map_err(|e| e.to_string()));
    match reviewed.and_then(|r| serde_json::to_vec(&r).map_err(|e| e.to_string())) {
        Ok(json) => respond(StatusCode::OK, "application/json", json),
        Err(message) => text(StatusCode::BAD_REQUEST, &message),
    }
}
