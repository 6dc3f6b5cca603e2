//! The server's request path, free of gRPC: find the pod by IP, apply the policy, and get
//! credentials from the cache. The gRPC service is a thin wrapper over this, and kube2iam mode
//! will call it in-process through the agent's [`Backend`](crate::agent::Backend) seam.

use std::net::IpAddr;
use std::sync::Arc;

use crate::cluster::{Cluster, Lookup, PodFacts};
use crate::creds::{AssumeRole, CredentialCache, Credentials, Identity, StsError};
use crate::policy::{Denial, Policy, role};

/// Why a request failed; mapped to a gRPC status in exactly one place (`service.rs`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's IP is not an IP address.
    #[error("invalid pod IP {0:?}")]
    InvalidIp(String),
    /// No live pod has the IP.
    #[error("no pod found for IP {0}")]
    PodNotFound(IpAddr),
    /// Several live pods claim the IP.
    #[error("multiple running pods found for IP {ip} ({count})")]
    AmbiguousIp { ip: IpAddr, count: usize },
    /// The policy denied the request.
    #[error("pod {pod} is forbidden: {denial}")]
    Forbidden { pod: String, denial: Denial },
    /// STS failed.
    #[error("error fetching credentials: {0}")]
    Sts(#[from] StsError),
}

/// Lookup, policy and credentials.
pub struct Core<A> {
    cluster: Arc<Cluster>,
    policy: Policy,
    cache: CredentialCache<A>,
    /// `--session`: the session-name suffix for pods without the annotation.
    default_session: String,
}

impl<A: AssumeRole> Core<A> {
    /// Assembles the core.
    pub fn new(
        cluster: Arc<Cluster>,
        policy: Policy,
        cache: CredentialCache<A>,
        default_session: String,
    ) -> Self {
        Core { cluster, policy, cache, default_session }
    }

    /// The cluster view this core answers from.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The pod that owns `ip`.
    pub fn pod(&self, ip: IpAddr) -> Result<Arc<PodFacts>, Error> {
        match self.cluster.pod_by_ip(ip) {
            Lookup::Found(pod) => Ok(pod),
            Lookup::NotFound => Err(Error::PodNotFound(ip)),
            Lookup::Ambiguous(count) => Err(Error::AmbiguousIp { ip, count }),
        }
    }

    /// The role annotation of the pod at `ip` (kiam applies no policy here).
    pub fn pod_role(&self, ip: IpAddr) -> Result<(Arc<PodFacts>, Option<String>), Error> {
        let pod = self.pod(ip)?;
        let role = pod.role.clone().filter(|r| !r.trim().is_empty());
        Ok((pod, role))
    }

    /// Credentials for `requested`, if the pod at `ip` may have them.
    pub async fn pod_credentials(
        &self,
        ip: IpAddr,
        requested: &str,
    ) -> Result<(Arc<PodFacts>, Arc<Credentials>), Error> {
        let pod = self.pod(ip)?;
        let namespace = self.cluster.namespace(&pod.namespace);
        let arn = self
            .policy
            .decide(&pod, namespace.as_deref(), requested)
            .map_err(|denial| Error::Forbidden { pod: pod.qualified_name(), denial })?;
        let identity = Identity {
            role: arn,
            session_name: role::session_name(pod.session_name.as_deref(), &self.default_session),
            external_id: pod.external_id.clone(),
        };
        let creds = self.cache.get(&identity).await?;
        Ok((pod, creds))
    }
}

/// Parses the IP of a request.
pub fn parse_ip(ip: &str) -> Result<IpAddr, Error> {
    ip.trim().parse().map_err(|_| Error::InvalidIp(ip.to_string()))
}
