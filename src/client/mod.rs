//! The gRPC client the agent and `kiam health` use to reach the servers: mutual TLS that follows
//! certificate rotation, every server behind `--server-address` kept in a balanced pool
//! ([`pool`]), connections made on demand (the agent serves HTTP before any server is
//! reachable), per-call deadlines, and a failed call retried on another server within its
//! deadline. It knows nothing of the agent: the agent adapts it to its `Backend` seam.

pub mod pool;

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::{Code, Status};

use pool::Pool;
pub use pool::{Dns, Link, Resolve};

use crate::metrics::{GrpcMetrics, TlsGauges, code_name};
use crate::tls::reload::{Reloading, Side};

use crate::pb;
use crate::pb::kiam_service_client::KiamServiceClient;
use crate::pb::node::node_view_client::NodeViewClient;
use crate::pb::token::pod_tokens_client::PodTokensClient;
use crate::tls::{self, TlsFiles};

/// How the client reaches a server.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// `--server-address`: `host:port`, optionally prefixed `dns:///` as grpc-go targets are.
    pub server_address: String,
    pub tls: TlsFiles,
    /// Deadline of one call.
    pub call_timeout: Duration,
    /// `--token-file`: the agent's projected ServiceAccount token, which proves its node.
    pub token_file: Option<std::path::PathBuf>,
}

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("invalid --server-address {0:?}: expected host:port")]
    Address(String),
}

/// How the client keeps its connections: keepalive, re-resolution, certificate polling.
#[derive(Clone, Debug)]
pub struct Transport {
    pub link: Link,
    /// How often the server name is resolved again, and the certificate files checked for
    /// rotation.
    pub resolve_every: Duration,
    pub tls_gauges: TlsGauges,
    /// `grpc_client_*` counters.
    pub grpc_metrics: GrpcMetrics,
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            link: Link {
                keepalive_time: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(2),
                permit_without_stream: false,
                connect_timeout: Duration::from_secs(1),
            },
            resolve_every: Duration::from_secs(5),
            tls_gauges: TlsGauges::default(),
            grpc_metrics: GrpcMetrics::default(),
        }
    }
}

/// The most attempts of one call (each on whichever server the pool picks).
const MAX_ATTEMPTS: usize = 20;

/// Whether the call never reached a server's handler: a connection refused, reset or closed
/// under it. Such calls are safe to send again, since every RPC here only reads.
fn is_transport_failure(status: &Status) -> bool {
    status.code() == Code::Unavailable
        || (status.code() == Code::Unknown && status.message().starts_with("transport error"))
        // hyper gave up on a request because its connection closed before it went out (a server
        // closing an idle connection just then); a Cancelled sent by a server has no source.
        || (status.code() == Code::Cancelled && std::error::Error::source(status).is_some())
}

/// A projected ServiceAccount token, re-read from its file at most every [`TOKEN_REREAD`]
/// (kubelet rotates it well before it expires).
pub struct TokenFile {
    path: std::path::PathBuf,
    current: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

/// How long a token read from its file is reused.
const TOKEN_REREAD: Duration = Duration::from_secs(30);

impl TokenFile {
    /// The token at `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> TokenFile {
        TokenFile { path: path.into(), current: std::sync::Mutex::default() }
    }

    /// The token, or `None` when the file cannot be read (logged).
    pub fn token(&self) -> Option<String> {
        let mut current = self.current.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, token)) = current.as_ref()
            && at.elapsed() < TOKEN_REREAD
        {
            return Some(token.clone());
        }
        match std::fs::read_to_string(&self.path) {
            Ok(token) => {
                let token = token.trim().to_string();
                *current = Some((std::time::Instant::now(), token.clone()));
                Some(token)
            }
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot read the agent's token");
                None
            }
        }
    }
}

/// A client of `kiam.KiamService` (and of kiam-rs's `NodeView`).
#[derive(Clone)]
pub struct GrpcClient {
    pool: Arc<Pool>,
    call_timeout: Duration,
    grpc_metrics: GrpcMetrics,
    /// Sent as `authorization: Bearer` so that the server can bind the agent to its node.
    token: Option<Arc<TokenFile>>,
}

impl std::fmt::Debug for GrpcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClient").field("call_timeout", &self.call_timeout).finish_non_exhaustive()
    }
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
    /// Builds the client with default transport settings and the system resolver, without
    /// connecting; calls connect on demand.
    pub fn connect_lazy(config: &ClientConfig) -> Result<GrpcClient, ClientError> {
        GrpcClient::connect_with(config, &Transport::default(), Arc::new(Dns))
    }

    /// Builds the client; `resolver` finds the servers behind the address's host.
    pub fn connect_with(
        config: &ClientConfig,
        transport: &Transport,
        resolver: Arc<dyn Resolve>,
    ) -> Result<GrpcClient, ClientError> {
        let (host, port) = split_address(&config.server_address)
            .ok_or_else(|| ClientError::Address(config.server_address.clone()))?;
        let domain = host.clone();
        let tls = Reloading::load(&config.tls, Side::Client, transport.tls_gauges.clone(), move |files| {
            tls::client_config(files, &domain)
        })?;
        let pool = Pool::start(host, port, tls, transport.link.clone(), resolver, transport.resolve_every);
        Ok(GrpcClient {
            pool,
            call_timeout: config.call_timeout,
            grpc_metrics: transport.grpc_metrics.clone(),
            token: config.token_file.clone().map(|path| Arc::new(TokenFile::new(path))),
        })
    }

    /// Runs `call` against the pool, again (on another server) after a transport failure, with a
    /// short back-off, while the call's deadline allows; counts the outcome under `method`.
    async fn call<T, F, Fut>(&self, method: &'static str, call: F) -> Result<T, Status>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_ranked(method, 0, call).await
    }

    /// As [`call`](Self::call), but with an `affinity` (an identity's key among servers that share
    /// identities, 0 for none) the identity's owner is asked first, with half the call's budget,
    /// then the next in rank (the one that inherits the identity if the owner is gone) with half
    /// of what is left; a server that does not answer in time or at all costs only that, and the
    /// rest of the budget goes to the balanced pool. The one routing of every call that concerns
    /// an identity: the node view's fetches and kiam's `GetPodCredentials` alike.
    async fn call_ranked<T, F, Fut>(
        &self,
        method: &'static str,
        affinity: u64,
        mut call: F,
    ) -> Result<T, Status>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.call_timeout;
        let ranked = if affinity == 0 { Vec::new() } else { self.pool.ranked(affinity) };
        let mut result = None;
        for channel in ranked.into_iter().take(2) {
            let budget = deadline.saturating_duration_since(tokio::time::Instant::now()) / 2;
            match tokio::time::timeout(budget, call(channel, budget)).await {
                Ok(Err(status))
                    if is_transport_failure(&status) || status.code() == Code::DeadlineExceeded => {}
                Ok(answer) => {
                    result = Some(answer);
                    break;
                }
                Err(_) => {
                    tracing::info!(method, "an identity's owner did not answer in time; asking the next")
                }
            }
        }
        let result = match result {
            Some(answer) => answer,
            None => self.call_until(deadline, &mut call).await,
        };
        let code = result.as_ref().map_or_else(|s| code_name(s.code()), |_| "OK");
        self.grpc_metrics.unary(false, method, code);
        result
    }

    /// Calls on the balanced channel, again after a transport failure, until `deadline`.
    async fn call_until<T, F, Fut>(&self, deadline: tokio::time::Instant, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel, Duration) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let mut last = Status::unavailable("no server reachable");
        let mut pause = Duration::from_millis(10);
        for _ in 0..MAX_ATTEMPTS {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match tokio::time::timeout(left, call(self.pool.channel(), left)).await {
                Ok(Err(status)) if is_transport_failure(&status) => last = status,
                Ok(result) => return result,
                Err(_) => return Err(Status::deadline_exceeded("no answer within the deadline")),
            }
            if tokio::time::Instant::now() + pause >= deadline {
                break;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
        Err(last)
    }

    /// The generated client on the current channel, for callers that need raw statuses. The
    /// pool of servers lives as long as this `GrpcClient`: keep it alive while using the result.
    pub fn service(&self) -> KiamServiceClient<Channel> {
        self.pool.client()
    }

    /// `GetPodRole`: the role annotation of the pod at `ip` (empty when it has none), and the
    /// key of the identity it names (0 from kiam's servers, or without `--peers`).
    pub async fn get_pod_role(&self, ip: IpAddr) -> Result<pb::Role, Status> {
        let message = pb::GetPodRoleRequest { ip: ip.to_string() };
        let reply = self
            .call("GetPodRole", |channel, left| {
                let request = self.authorised(request(message.clone(), left));
                async move { KiamServiceClient::new(channel).get_pod_role(request).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// `GetPodCredentials`: credentials for `role`, if the pod at `ip` may have them. With the
    /// `affinity` `GetPodRole` gave, the identity's owner is asked first
    /// ([`call_ranked`](Self::call_ranked)): on a miss only the owner calls STS. Any server
    /// answers correctly whatever the key: a wrong one costs only that STS call.
    pub async fn get_pod_credentials(
        &self,
        ip: IpAddr,
        role: &str,
        affinity: u64,
    ) -> Result<pb::Credentials, Status> {
        let message = pb::GetPodCredentialsRequest { ip: ip.to_string(), role: role.to_string() };
        let reply = self
            .call_ranked("GetPodCredentials", affinity, |channel, left| {
                let request = self.authorised(request(message.clone(), left));
                async move { KiamServiceClient::new(channel).get_pod_credentials(request).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// `GetHealth`.
    pub async fn get_health(&self) -> Result<String, Status> {
        self.call("GetHealth", |channel, left| async move {
            KiamServiceClient::new(channel).get_health(request(pb::GetHealthRequest {}, left)).await
        })
        .await
        .map(|r| r.into_inner().message)
    }
}

/// A request with the time left as its deadline (sent as `grpc-timeout`, which the server uses
/// to bound its wait for a pod it has not seen yet).
fn request<T>(message: T, left: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(left);
    request
}

impl GrpcClient {
    /// Adds the agent's token, when it has one, to `request`.
    fn authorised<T>(&self, mut request: tonic::Request<T>) -> tonic::Request<T> {
        let token = self.token.as_ref().and_then(|t| t.token());
        if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
            request.metadata_mut().insert("authorization", value);
        }
        request
    }

    /// Opens the node view stream; `messages` are what the agent sends (Subscribe, then Acks).
    pub async fn watch_node(
        &self,
        messages: impl futures::Stream<Item = pb::node::AgentMessage> + Send + 'static,
    ) -> Result<tonic::Streaming<pb::node::ViewMessage>, Status> {
        let mut client = NodeViewClient::new(self.pool.channel());
        let response = client.watch(self.authorised(tonic::Request::new(messages))).await?;
        Ok(response.into_inner())
    }

    /// `NodeView.Credentials`: the pod at `ip`'s credentials, only while it is pod `uid`; with an
    /// `affinity`, from the identity's owner first ([`call_ranked`](Self::call_ranked)).
    pub async fn node_credentials(
        &self,
        ip: IpAddr,
        uid: &str,
        role: &str,
        affinity: u64,
    ) -> Result<pb::node::CredentialsReply, Status> {
        let message =
            pb::node::CredentialsRequest { ip: ip.to_string(), uid: uid.to_string(), role: role.to_string() };
        let reply = self
            .call_ranked("Credentials", affinity, |channel, left| {
                let request = self.authorised(request(message.clone(), left));
                async move { NodeViewClient::new(channel).credentials(request).await }
            })
            .await?;
        Ok(reply.into_inner())
    }

    /// `PodTokens.Credentials`: credentials for the pod a projected token is bound to.
    pub async fn token_credentials(
        &self,
        token: &str,
        source: IpAddr,
    ) -> Result<pb::token::TokenCredentialsReply, Status> {
        let message =
            pb::token::TokenCredentialsRequest { token: token.to_string(), source: source.to_string() };
        let reply = self
            .call("TokenCredentials", |channel, left| {
                let request = self.authorised(request(message.clone(), left));
                async move { PodTokensClient::new(channel).credentials(request).await }
            })
            .await?;
        Ok(reply.into_inner())
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
}
