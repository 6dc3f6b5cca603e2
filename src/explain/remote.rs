//! Asking a running server what its credentials cache holds for a pod's identity, over the
//! `kiamrs.debug.Debug` service on the server's mutual-TLS listener. The identity is sent whole
//! (the external ID is part of the cache key) and nothing of it is printed but the role and the
//! session name.

use std::time::Duration;

use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use super::ServerQuery;
use crate::creds::Identity;
use crate::pb::debug::debug_client::DebugClient;
use crate::pb::debug::{CacheStateReply, CacheStateRequest, SessionTag};
use crate::tls;

/// What the server said about the identity, or why it could not be asked.
#[derive(Clone, Debug, Serialize)]
pub struct ServerView {
    pub address: String,
    pub error: Option<String>,
    pub cache: Option<CacheView>,
}

/// The server's cache entry for the identity.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CacheView {
    /// The cache has an entry: some pod used the identity, or it was prefetched.
    pub known: bool,
    pub has_credentials: bool,
    pub issued: Option<String>,
    pub expiration: Option<String>,
    pub remaining_seconds: i64,
    /// Served as they are while STS works.
    pub fresh: bool,
    /// The background refresher renews them now.
    pub refresh_due: bool,
    /// Still served if STS fails.
    pub usable: bool,
    /// An STS call is in flight (the failure fields are then unknown).
    pub fetching: bool,
    /// Failed fetches since the last success.
    pub failures: u32,
    /// The last STS error since the last success.
    pub last_error: Option<String>,
    /// When the identity is tried again after failures.
    pub retry_at: Option<String>,
    /// The server's clock.
    pub server_time: String,
}

/// Why the server could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("invalid --server-address {0:?}: expected host:port")]
    Address(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("{0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

fn some(s: String) -> Option<String> {
    Some(s).filter(|s| !s.is_empty())
}

impl From<CacheStateReply> for CacheView {
    fn from(r: CacheStateReply) -> Self {
        let last_error = match (some(r.last_error_code), some(r.last_error_message)) {
            (Some(code), Some(message)) => Some(format!("{code}: {message}")),
            (code, message) => code.or(message),
        };
        CacheView {
            known: r.known,
            has_credentials: r.has_credentials,
            issued: some(r.issued),
            expiration: some(r.expiration),
            remaining_seconds: r.remaining_seconds,
            fresh: r.fresh,
            refresh_due: r.refresh_due,
            usable: r.usable,
            fetching: r.fetching,
            failures: r.failures,
            last_error,
            retry_at: some(r.retry_at),
            server_time: r.now,
        }
    }
}

/// `host:port` (or `[v6]:port`, or grpc-go's `dns:///host:port`) as an `https://` URI and the
/// name the server's certificate must carry.
fn target(address: &str) -> Option<(String, String)> {
    let address = address.strip_prefix("dns:///").unwrap_or(address);
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.is_empty() {
        return None;
    }
    let uri_host = if bare.contains(':') { format!("[{bare}]") } else { bare.to_string() };
    Some((format!("https://{uri_host}:{port}"), bare.to_string()))
}

/// A client of the server's `Debug` service; it connects at the first call.
fn client(server: &ServerQuery, timeout: Duration) -> Result<DebugClient<Channel>, RemoteError> {
    let (uri, domain) =
        target(&server.address).ok_or_else(|| RemoteError::Address(server.address.clone()))?;
    let tls = tls::client_config(&server.tls, &domain)?;
    let endpoint = tls.apply(Endpoint::from_shared(uri)?)?.connect_timeout(timeout).timeout(timeout);
    Ok(DebugClient::new(endpoint.connect_lazy()))
}

async fn cache_state(
    client: &mut DebugClient<Channel>,
    identity: &Identity,
    timeout: Duration,
) -> Result<CacheView, RemoteError> {
    let request = CacheStateRequest {
        role_arn: identity.role.to_string(),
        session_name: identity.session_name.clone(),
        external_id: identity.external_id.clone(),
        tags: identity
            .tags
            .iter()
            .map(|(key, value)| SessionTag { key: key.clone(), value: value.clone() })
            .collect(),
        session_policy: identity.policy.clone(),
    };
    let call = client.cache_state(request);
    let reply = tokio::time::timeout(timeout, call).await.map_err(|_| RemoteError::Timeout(timeout))??;
    Ok(reply.into_inner().into())
}

/// The server's view of each identity, in order; `None` where there is no identity (a pod whose
/// role does not resolve). Failures are part of the views, not returned: the rest of the answer
/// stands without them.
pub async fn views(
    server: &ServerQuery,
    timeout: Duration,
    identities: &[Option<&Identity>],
) -> Vec<Option<ServerView>> {
    let view = |result: Result<CacheView, String>| {
        let (cache, error) = match result {
            Ok(cache) => (Some(cache), None),
            Err(e) => (None, Some(e)),
        };
        ServerView { address: server.address.clone(), error, cache }
    };
    let mut client = client(server, timeout).map_err(|e| e.to_string());
    let mut out = Vec::with_capacity(identities.len());
    for identity in identities {
        let Some(identity) = identity else {
            out.push(None);
            continue;
        };
        let result = match &mut client {
            Ok(client) => cache_state(client, identity, timeout).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        out.push(Some(view(result)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = |a: &str| target(a).map(|(u, d)| format!("{u} {d}"));
        assert_eq!(t("kiam-server:443").as_deref(), Some("https://kiam-server:443 kiam-server"));
        assert_eq!(t("dns:///kiam-server:443").as_deref(), Some("https://kiam-server:443 kiam-server"));
        assert_eq!(t("[::1]:9610").as_deref(), Some("https://[::1]:9610 ::1"));
        assert_eq!(t("127.0.0.1:9610").as_deref(), Some("https://127.0.0.1:9610 127.0.0.1"));
        assert_eq!(t("kiam-server"), None);
        assert_eq!(t(":443"), None);
        assert_eq!(t("host:port"), None);
    }

    #[test]
    fn replies_become_views() {
        let reply = CacheStateReply {
            known: true,
            last_error_code: "AccessDenied".into(),
            last_error_message: "not authorized".into(),
            ..CacheStateReply::default()
        };
        let view = CacheView::from(reply);
        assert_eq!(view.last_error.as_deref(), Some("AccessDenied: not authorized"));
        assert!(view.issued.is_none() && view.retry_at.is_none());
    }
}
