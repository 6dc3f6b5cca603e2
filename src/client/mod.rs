//! The gRPC client the agent and `kiam health` use to reach a server: mutual TLS, a lazy
//! connection (the agent serves HTTP even before any server is reachable), and per-call
//! deadlines. It implements the agent's [`Backend`] seam.

use std::net::IpAddr;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::agent::{Backend, BackendError};
use crate::creds::ImdsDocument;
use crate::pb;
use crate::pb::kiam_service_client::KiamServiceClient;
use crate::server::service::{FORBIDDEN, NO_POD_FOUND, POD_NOT_FOUND};
use crate::tls::{self, TlsFiles};

/// How the client reaches a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `--server-address`: `host:port`, optionally prefixed `dns:///` as grpc-go targets are.
    pub server_address: String,
    pub tls: TlsFiles,
    /// Deadline of one call.
    pub call_timeout: Duration,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("invalid --server-address {0:?}: expected host:port")]
    Address(String),
    #[error("gRPC channel: {0}")]
    Channel(#[from] tonic::transport::Error),
}

/// A client of `kiam.KiamService`.
#[derive(Clone, Debug)]
pub struct GrpcClient {
    inner: KiamServiceClient<Channel>,
    call_timeout: Duration,
}

/// Splits `host:port` (or `[v6]:port`), accepting grpc-go's `dns:///` prefix.
fn split_address(address: &str) -> Option<(String, u16)> {
    let address = address.strip_prefix("dns:///").unwrap_or(address);
    let (host, port) = address.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_string(), port.parse().ok()?))
}

impl GrpcClient {
    /// Builds the client without connecting; the first call connects.
    pub fn connect_lazy(config: &ClientConfig) -> Result<GrpcClient, ClientError> {
        let (host, port) = split_address(&config.server_address)
            .ok_or_else(|| ClientError::Address(config.server_address.clone()))?;
        let tls = tls::client_config(&config.tls, &host)?;
        let uri = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        let channel = Endpoint::from_shared(uri)
            .map_err(|_| ClientError::Address(config.server_address.clone()))?
            .tls_config(tls)?
            .connect_timeout(config.call_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(GrpcClient { inner: KiamServiceClient::new(channel), call_timeout: config.call_timeout })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.call_timeout);
        request
    }

    /// The generated client, for callers that need raw statuses (tests, tools).
    pub fn service(&self) -> KiamServiceClient<Channel> {
        self.inner.clone()
    }

    /// `GetHealth`.
    pub async fn get_health(&self) -> Result<String, Status> {
        let mut client = self.inner.clone();
        Ok(client.get_health(self.request(pb::GetHealthRequest {})).await?.into_inner().message)
    }
}

/// Maps a status to the agent's error kinds: by kiam's message text first (what kiam servers
/// send, all as Unknown), then by code.
fn backend_error(status: Status) -> BackendError {
    match status.message() {
        FORBIDDEN => return BackendError::Forbidden,
        NO_POD_FOUND | POD_NOT_FOUND => return BackendError::PodNotFound,
        _ => {}
    }
    match status.code() {
        Code::PermissionDenied => BackendError::Forbidden,
        Code::NotFound => BackendError::PodNotFound,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
            BackendError::Unavailable(status.message().to_string())
        }
        _ => BackendError::Failed(status.message().to_string()),
    }
}

impl Backend for GrpcClient {
    async fn pod_role(&self, ip: IpAddr) -> Result<Option<String>, BackendError> {
        let mut client = self.inner.clone();
        let role = client
            .get_pod_role(self.request(pb::GetPodRoleRequest { ip: ip.to_string() }))
            .await
            .map_err(backend_error)?
            .into_inner()
            .name;
        Ok(Some(role).filter(|r| !r.is_empty()))
    }

    async fn pod_credentials(&self, ip: IpAddr, role: &str) -> Result<ImdsDocument, BackendError> {
        let mut client = self.inner.clone();
        let request = pb::GetPodCredentialsRequest { ip: ip.to_string(), role: role.to_string() };
        let c = client.get_pod_credentials(self.request(request)).await.map_err(backend_error)?.into_inner();
        Ok(ImdsDocument {
            code: c.code,
            last_updated: c.last_updated,
            kind: c.r#type,
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            token: c.token,
            expiration: c.expiration,
        })
    }

    async fn health(&self) -> Result<String, BackendError> {
        self.get_health().await.map_err(backend_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(split_address("kiam-server:443"), Some(("kiam-server".into(), 443)));
        assert_eq!(split_address("dns:///kiam-server:443"), Some(("kiam-server".into(), 443)));
        assert_eq!(split_address("[::1]:9610"), Some(("::1".into(), 9610)));
        assert_eq!(split_address("kiam-server"), None);
        assert_eq!(split_address(":443"), None);
    }

    #[test]
    fn kiam_messages_win_over_codes() {
        assert_eq!(backend_error(Status::unknown("forbidden by policy")), BackendError::Forbidden);
        assert_eq!(backend_error(Status::unknown("no pod found")), BackendError::PodNotFound);
        assert_eq!(backend_error(Status::unknown("pod not found")), BackendError::PodNotFound);
        assert!(matches!(backend_error(Status::unavailable("down")), BackendError::Unavailable(_)));
        assert!(matches!(backend_error(Status::internal("x")), BackendError::Failed(_)));
    }
}
