//! The gRPC face of the server: kiam's `KiamService`, translating proto messages to [`Core`]
//! calls and [`Error`]s to statuses. The status messages are the exact strings kiam v4 agents
//! compare against (`forbidden by policy`, `no pod found`, `pod not found`), and the codes are
//! real ones (kiam sent every error as Unknown).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Code, Request, Response, Status};

use super::access::{Denied, Grant, authorize};
use super::identity::Identities;
use crate::core::{Ask, Core, Error, parse_ip};
use crate::creds::{AssumeRole, StsErrorKind};
use crate::pb;
use crate::pb::status::{FORBIDDEN, NO_POD_FOUND, POD_NOT_FOUND};
use crate::policy::{NodeDenial, access};

/// Which RPC an error came from: kiam spelled "pod not found" differently in each.
#[derive(Clone, Copy)]
pub enum Rpc {
    Role,
    Credentials,
}

/// The one place server errors become gRPC statuses.
pub fn status(err: &Error, rpc: Rpc) -> Status {
    match err {
        Error::InvalidIp(_) => Status::invalid_argument(err.to_string()),
        Error::PodNotFound(_) => Status::not_found(match rpc {
            Rpc::Role => POD_NOT_FOUND,
            Rpc::Credentials => NO_POD_FOUND,
        }),
        Error::AmbiguousIp { .. } => Status::failed_precondition("multiple running pods found"),
        Error::Forbidden { .. } => Status::permission_denied(FORBIDDEN),
        Error::PodChanged(_) => Status::failed_precondition(err.to_string()),
        Error::PodGone(_) => Status::unauthenticated(err.to_string()),
        Error::Node(_) | Error::DebugCertificate => Status::permission_denied(err.to_string()),
        Error::Sts(sts) => {
            // Never Unavailable: clients read that as "this server is unreachable" and retry
            // elsewhere, while every server shares the same STS.
            let code = match sts.kind {
                StsErrorKind::Throttled => Code::ResourceExhausted,
                StsErrorKind::Denied | StsErrorKind::Invalid => Code::FailedPrecondition,
                StsErrorKind::Unavailable | StsErrorKind::Other => Code::Internal,
            };
            Status::new(code, err.to_string())
        }
    }
}

/// How long a request may wait for a pod the watch has not delivered yet, when the caller set no
/// deadline.
const DEFAULT_POD_WAIT: Duration = Duration::from_secs(1);
/// The longest wait, whatever the deadline.
const MAX_POD_WAIT: Duration = Duration::from_secs(10);
/// How long to wait for an unknown pod: the caller's `grpc-timeout` less a margin (a tenth of
/// it, between 50 and 500 ms) to send the answer back before the caller gives up.
pub fn pod_wait<T>(request: &Request<T>) -> Duration {
    let header = request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok());
    let margin = |t: Duration| (t / 10).clamp(Duration::from_millis(50), Duration::from_millis(500));
    header
        .and_then(parse_grpc_timeout)
        .map(|t| t.saturating_sub(margin(t)))
        .unwrap_or(DEFAULT_POD_WAIT)
        .min(MAX_POD_WAIT)
}

/// Parses a `grpc-timeout` value: digits and a unit (H, M, S, m, u, n). The protocol allows at
/// most 8 digits; longer values are accepted too, and the wait is capped by [`MAX_POD_WAIT`].
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `kiam.KiamService` over a [`Core`].
pub struct KiamService<A> {
    core: Arc<Core<A>>,
    node_binding: bool,
    identities: Arc<Identities>,
}

impl<A> KiamService<A> {
    /// Serves `core`; with `node_binding`, an agent may ask only about pods on the node it
    /// proves (its certificate's `urn:kiam:node:<name>` URI SAN, or its token).
    pub fn new(core: Arc<Core<A>>, node_binding: bool, identities: Arc<Identities>) -> Self {
        KiamService { core, node_binding, identities }
    }

    /// The request's IP, caller and wait, as the authorization table grants `rpc` to the
    /// caller; or the status that refuses it.
    async fn ask<T>(
        &self,
        request: &Request<T>,
        ip: &str,
        rpc: access::Rpc,
        kind: Rpc,
    ) -> Result<Ask, Status> {
        let caller = match authorize(request, rpc, self.node_binding, Some(&self.identities)).await {
            Ok(Grant::Pods(caller)) => caller,
            Ok(_) => return Err(Status::permission_denied(access::Refusal::Debug.text())),
            // kiam's texts and codes for the refusals KiamService always had.
            Err(Denied { refusal: access::Refusal::Debug, .. }) => {
                return Err(status(&Error::DebugCertificate, kind));
            }
            Err(Denied { refusal: access::Refusal::NoNode, .. }) => {
                return Err(status(&Error::Node(NodeDenial::Unnamed), kind));
            }
            Err(denied) => return Err(Status::permission_denied(denied.detail)),
        };
        let ip = parse_ip(ip).map_err(|err| status(&err, kind))?;
        Ok(Ask::new(ip, caller, pod_wait(request)))
    }
}

impl<A: AssumeRole> KiamService<A> {
    /// The metrics the service counts into.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        self.core.metrics()
    }

    async fn pod_role_rpc(
        &self,
        request: Request<pb::GetPodRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let started = Instant::now();
        let ip = request.get_ref().ip.clone();
        let ask = self.ask(&request, &ip, access::Rpc::GetPodRole, Rpc::Role).await;
        let ask =
            ask.inspect_err(|s| tracing::info!(pod.ip = %ip, error = %s.message(), "GetPodRole refused"))?;
        let result = self.core.pod_role(&ask).await;
        match result {
            Ok((pod, role)) => {
                tracing::debug!(pod.ip = %ip, pod.namespace = %pod.namespace, pod.name = %pod.name,
                    pod.iam.role = role.as_deref().unwrap_or(""), duration_ms = started.elapsed().as_millis() as u64,
                    "GetPodRole");
                // The key routes the agent's GetPodCredentials to the identity's owner.
                let affinity = role.as_deref().map_or(0, |role| self.core.role_affinity(&pod, role));
                Ok(Response::new(pb::Role { name: role.unwrap_or_default(), affinity }))
            }
            Err(err) => {
                tracing::info!(pod.ip = %ip, error = %err, duration_ms = started.elapsed().as_millis() as u64, "GetPodRole failed");
                Err(status(&err, Rpc::Role))
            }
        }
    }

    async fn pod_credentials_rpc(
        &self,
        request: Request<pb::GetPodCredentialsRequest>,
    ) -> Result<Response<pb::Credentials>, Status> {
        let started = Instant::now();
        let pb::GetPodCredentialsRequest { ip, role } = request.get_ref().clone();
        let ask = self.ask(&request, &ip, access::Rpc::GetPodCredentials, Rpc::Credentials).await;
        let ask = ask.inspect_err(
            |s| tracing::info!(pod.ip = %ip, error = %s.message(), "GetPodCredentials refused"),
        )?;
        let result = self.core.pod_credentials(&ask, &role).await;
        let duration_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok((pod, creds)) => {
                tracing::debug!(pod.ip = %ip, pod.namespace = %pod.namespace, pod.name = %pod.name,
                    pod.iam.role = %role, duration_ms, "GetPodCredentials");
                Ok(Response::new(creds.to_document().into()))
            }
            Err(err) => {
                if matches!(err, Error::Sts(_) | Error::Forbidden { .. }) {
                    tracing::warn!(pod.ip = %ip, pod.iam.role = %role, error = %err, duration_ms, "GetPodCredentials failed");
                } else {
                    tracing::info!(pod.ip = %ip, pod.iam.role = %role, error = %err, duration_ms, "GetPodCredentials failed");
                }
                Err(status(&err, Rpc::Credentials))
            }
        }
    }

    async fn health_rpc(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::HealthStatus>, Status> {
        let grant = authorize(&request, access::Rpc::GetHealth, self.node_binding, None).await;
        grant.map_err(|denied| denied.status())?;
        Ok(Response::new(pb::HealthStatus { message: "ok".into() }))
    }
}

/// Records go-grpc-prometheus's counters for one call.
fn observe<T>(metrics: &crate::metrics::Metrics, method: &'static str, result: &Result<Response<T>, Status>) {
    let code = result.as_ref().map_or_else(|s| crate::metrics::code_name(s.code()), |_| "OK");
    metrics.grpc_server.unary(true, method, code);
}

#[tonic::async_trait]
impl<A: AssumeRole> pb::kiam_service_server::KiamService for KiamService<A> {
    async fn get_pod_role(
        &self,
        request: Request<pb::GetPodRoleRequest>,
    ) -> Result<Response<pb::Role>, Status> {
        let result = self.pod_role_rpc(request).await;
        observe(self.core.metrics(), "GetPodRole", &result);
        result
    }

    async fn get_pod_credentials(
        &self,
        request: Request<pb::GetPodCredentialsRequest>,
    ) -> Result<Response<pb::Credentials>, Status> {
        let result = self.pod_credentials_rpc(request).await;
        observe(self.core.metrics(), "GetPodCredentials", &result);
        result
    }

    async fn get_health(
        &self,
        request: Request<pb::GetHealthRequest>,
    ) -> Result<Response<pb::HealthStatus>, Status> {
        let result = self.health_rpc(request).await;
        observe(self.core.metrics(), "GetHealth", &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("4999m"), Some(Duration::from_millis(4999)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("x"), None);
        assert_eq!(parse_grpc_timeout(""), None);
        assert_eq!(parse_grpc_timeout("10Q"), None);
    }
}
