//! The agent's one seam to whatever decides: roles and credentials for a pod IP. The gRPC client
//! ([`super::remote`]) is the one implementation today; the seam exists so that a process that
//! holds the server's core (the planned kube2iam mode) can answer in-process.

use std::future::Future;
use std::net::IpAddr;

use crate::creds::ImdsDocument;

/// What the agent asks of a server.
pub trait Backend: Send + Sync + 'static {
    /// The pod's role annotation, `None` when it has none.
    fn pod_role(&self, ip: IpAddr) -> impl Future<Output = Result<Option<PodRole>, BackendError>> + Send;
    /// Credentials for `role` (the pod's own annotation), if policy allows; `affinity` is what
    /// [`Backend::pod_role`] gave with the role (0 when unknown), and only routes the call.
    fn pod_credentials(
        &self,
        ip: IpAddr,
        role: &str,
        affinity: u64,
    ) -> impl Future<Output = Result<ImdsDocument, BackendError>> + Send;
    /// The server's health message (`ok`).
    fn health(&self) -> impl Future<Output = Result<String, BackendError>> + Send;
    /// Whether [`Backend::token_credentials`] is offered: `GET /v1/credentials` is 404 otherwise.
    fn serves_pod_tokens(&self) -> bool {
        false
    }
    /// Credentials for the pod a projected ServiceAccount token is bound to
    /// (`GET /v1/credentials`), asked from `source`. Only a backend that can check tokens offers it.
    fn token_credentials(
        &self,
        token: &str,
        source: IpAddr,
    ) -> impl Future<Output = Result<ContainerCredentials, BackendError>> + Send {
        let _ = (token, source);
        async { Err(BackendError::Failed("this agent's backend cannot check pod tokens".into())) }
    }
}

/// A pod's role, as a backend reports it.
///
/// The agent asks for the role before every credentials request (to check that the pod asks
/// for its own), so the key travels from the one call to the next inside the request: no state
/// is kept between a pod's requests, nothing for a pod to fill, nothing to go stale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRole {
    /// The role annotation as written (never empty).
    pub name: String,
    /// The key of the identity the pod would get for it among servers that share identities
    /// (`kiam server --peers`), by which the credentials call finds the identity's owner; 0 when
    /// the servers do not share identities or do not say (kiam's own, an in-process core). A
    /// wrong key costs an STS call, never a wrong answer: the server still decides.
    pub affinity: u64,
}

impl PodRole {
    /// `name` with no key.
    pub fn named(name: impl Into<String>) -> PodRole {
        PodRole { name: name.into(), affinity: 0 }
    }
}

/// What the server answers for a pod's token: the credentials and the role they are for.
#[derive(Clone, PartialEq, Eq)]
pub struct ContainerCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    /// RFC 3339.
    pub expiration: String,
    /// The role's full ARN.
    pub role_arn: String,
}

impl std::fmt::Debug for ContainerCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .field("role_arn", &self.role_arn)
            .finish_non_exhaustive()
    }
}

/// Why a backend call failed, in the kinds the agent treats differently.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// No pod has the caller's IP (yet): worth waiting for, within the request's budget.
    #[error("no pod found")]
    PodNotFound,
    /// The policy denies: final, never retried.
    #[error("forbidden by policy")]
    Forbidden,
    /// No server could be reached: worth retrying within the budget.
    #[error("server unavailable: {0}")]
    Unavailable(String),
    /// The server does not offer what was asked: identity by token, from a kiam server that
    /// predates it or a server with no API access.
    #[error("{0}")]
    NotServed(String),
    /// The pod's token proves no live pod (invalid, expired, wrong audience, deleted pod).
    #[error("{0}")]
    Unauthenticated(String),
    /// Any other failure (STS errors among them).
    #[error("{0}")]
    Failed(String),
}

impl BackendError {
    /// Whether waiting and asking again may help.
    pub fn is_transient(&self) -> bool {
        matches!(self, BackendError::PodNotFound | BackendError::Unavailable(_))
    }
}
