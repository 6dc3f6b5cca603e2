//! The agent's [`Backend`] in-process: kube2iam mode answers from the server's core in its own
//! process, with no gRPC and no certificates. Core errors become the agent's error kinds here,
//! counted under kube2iam's metric names.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Backend, BackendError, PodRole};
use crate::core::{Ask, Core, Error};
use crate::creds::{AssumeRole, ImdsDocument, StsErrorKind};
use crate::metrics::Metrics;
use crate::policy::Caller;

/// The core, asked directly.
pub struct InProcess<A> {
    core: Arc<Core<A>>,
    metrics: Arc<Metrics>,
    /// How long a request waits for a pod the watch has not delivered yet.
    wait: Duration,
}

impl<A> InProcess<A> {
    /// Answers from `core`, waiting at most `wait` for a pod not seen yet.
    pub fn new(core: Arc<Core<A>>, metrics: Arc<Metrics>, wait: Duration) -> InProcess<A> {
        InProcess { core, metrics, wait }
    }

    /// The agent's error kind for `error`, counted under kube2iam's names.
    fn error(&self, error: Error) -> BackendError {
        match error {
            Error::PodNotFound(_) | Error::PodChanged(_) => self.metrics.pod_not_found(),
            Error::AmbiguousIp { .. } => self.metrics.ambiguous_ip(),
            _ => {}
        }
        backend_error(&error)
    }
}

/// The agent's error kind for a core error: the kind kiam's agent reads from the server's gRPC
/// status for the same error (`agent/remote.rs`), so that a pod sees the same answer in both
/// modes (`agent::error::answer`). A throttled STS is worth retrying: unavailable, 503.
pub fn backend_error(error: &Error) -> BackendError {
    match error {
        Error::PodNotFound(_) | Error::PodChanged(_) => BackendError::PodNotFound,
        Error::Forbidden { .. } | Error::Node(_) | Error::DebugCertificate => BackendError::Forbidden,
        Error::PodGone(_) => BackendError::Unauthenticated(error.to_string()),
        Error::Sts(sts) if sts.kind == StsErrorKind::Throttled => {
            BackendError::Unavailable(error.to_string())
        }
        Error::AmbiguousIp { .. } | Error::InvalidIp(_) | Error::Sts(_) => {
            BackendError::Failed(error.to_string())
        }
    }
}

impl<A: AssumeRole> Backend for InProcess<A> {
    async fn pod_role(&self, ip: IpAddr) -> Result<Option<PodRole>, BackendError> {
        let ask = Ask::new(ip, Caller::Any, self.wait);
        let (_, role) = self.core.pod_role(&ask).await.map_err(|e| self.error(e))?;
        Ok(role.map(PodRole::named))
    }

    /// The core is in this process: there is no owner to route to, so `affinity` is unused.
    async fn pod_credentials(&self, ip: IpAddr, role: &str, _: u64) -> Result<ImdsDocument, BackendError> {
        let ask = Ask::new(ip, Caller::Any, self.wait);
        let (_, creds) = self.core.pod_credentials(&ask, role).await.map_err(|e| self.error(e))?;
        Ok(creds.to_document())
    }

    async fn health(&self) -> Result<String, BackendError> {
        Ok("ok".into())
    }
}
