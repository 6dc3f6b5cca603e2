//! The agent's [`Backend`] over gRPC: the kiam servers behind `--server-address`, reached with
//! [`GrpcClient`]. Statuses become the agent's error kinds here, by kiam's message texts first
//! (kiam servers send every error as Unknown), then by code.

use std::net::IpAddr;

use tonic::{Code, Status};

use super::backend::{Backend, BackendError, ContainerCredentials, PodRole};
use crate::client::GrpcClient;
use crate::creds::ImdsDocument;
use crate::pb::status::{FORBIDDEN, NO_POD_FOUND, POD_NOT_FOUND};

/// Maps a status to the agent's error kinds (a pod that changed under the view is not found).
pub fn backend_error(status: Status) -> BackendError {
    match status.message() {
        FORBIDDEN => return BackendError::Forbidden,
        NO_POD_FOUND | POD_NOT_FOUND => return BackendError::PodNotFound,
        _ => {}
    }
    match status.code() {
        Code::PermissionDenied => BackendError::Forbidden,
        Code::Unauthenticated => BackendError::Unauthenticated(status.message().to_string()),
        Code::NotFound | Code::FailedPrecondition if status.message().contains("no longer") => {
            BackendError::PodNotFound
        }
        Code::NotFound => BackendError::PodNotFound,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted => {
            BackendError::Unavailable(status.message().to_string())
        }
        _ => BackendError::Failed(status.message().to_string()),
    }
}

/// Maps a status of `PodTokens.Credentials`: there a denial is final whatever its text, and
/// node binding's refusal (the pod is on another node) is a denial too.
pub fn token_error(status: Status) -> BackendError {
    match status.code() {
        Code::PermissionDenied => BackendError::Forbidden,
        Code::Unauthenticated => BackendError::Unauthenticated(status.message().to_string()),
        Code::Unimplemented => BackendError::NotServed(format!(
            "the kiam server does not serve identity by token (a kiam server without it, or one with no API access): {}",
            status.message()
        )),
        _ => backend_error(status),
    }
}

impl Backend for GrpcClient {
    async fn pod_role(&self, ip: IpAddr) -> Result<Option<PodRole>, BackendError> {
        let role = self.get_pod_role(ip).await.map_err(backend_error)?;
        Ok(Some(PodRole { name: role.name, affinity: role.affinity }).filter(|r| !r.name.is_empty()))
    }

    async fn pod_credentials(
        &self,
        ip: IpAddr,
        role: &str,
        affinity: u64,
    ) -> Result<ImdsDocument, BackendError> {
        let credentials = self.get_pod_credentials(ip, role, affinity).await;
        credentials.map(ImdsDocument::from).map_err(backend_error)
    }

    async fn health(&self) -> Result<String, BackendError> {
        self.get_health().await.map_err(backend_error)
    }

    fn serves_pod_tokens(&self) -> bool {
        true
    }

    async fn token_credentials(
        &self,
        token: &str,
        source: IpAddr,
    ) -> Result<ContainerCredentials, BackendError> {
        let reply = GrpcClient::token_credentials(self, token, source).await.map_err(token_error)?;
        Ok(ContainerCredentials {
            access_key_id: reply.access_key_id,
            secret_access_key: reply.secret_access_key,
            token: reply.token,
            expiration: reply.expiration,
            role_arn: reply.role_arn,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kiam_messages_win_over_codes() {
        assert_eq!(backend_error(Status::unknown("forbidden by policy")), BackendError::Forbidden);
        assert_eq!(backend_error(Status::unknown("no pod found")), BackendError::PodNotFound);
        assert_eq!(backend_error(Status::unknown("pod not found")), BackendError::PodNotFound);
        assert!(matches!(backend_error(Status::unavailable("down")), BackendError::Unavailable(_)));
        assert!(matches!(backend_error(Status::internal("x")), BackendError::Failed(_)));
    }

    #[test]
    fn a_pod_over_its_review_budget_is_told_to_retry() {
        // The server's per-pod TokenReview limit: the agent answers 503, which every SDK retries.
        let over = token_error(Status::resource_exhausted("too many token reviews"));
        assert!(matches!(over, BackendError::Unavailable(_)), "{over:?}");
        assert!(matches!(token_error(Status::not_found("no")), BackendError::PodNotFound));
        assert_eq!(token_error(Status::permission_denied("other node")), BackendError::Forbidden);
        assert!(matches!(token_error(Status::unimplemented("")), BackendError::NotServed(_)));
    }
}
