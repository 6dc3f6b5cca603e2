//! What the server knows of a pod and of a namespace: only what lookup and policy need, so that
//! memory stays small in large clusters (kiam kept whole objects, #260). The Kubernetes
//! projections into these types live beside the watcher, in `cluster::project`.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use super::Permitted;

/// The pod annotation naming its role.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The pod annotation naming its STS session.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The pod annotation carrying the STS external ID.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
/// IRSA's ServiceAccount annotation naming the role of its pods (read with `--service-account-roles`).
pub const IRSA_ROLE_ANNOTATION: &str = "eks.amazonaws.com/role-arn";

/// What the server knows of one ServiceAccount (with `--service-account-roles`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccountFacts {
    pub namespace: String,
    pub name: String,
    /// `eks.amazonaws.com/role-arn`, else `iam.amazonaws.com/role`.
    pub role: Option<String>,
}

/// The pod or namespace annotation carrying an inline session policy (JSON) that narrows the role.
pub const SESSION_POLICY_ANNOTATION: &str = "iam.amazonaws.com/session-policy";
/// kube2iam's namespace annotation listing the roles its pods may have (a JSON array).
pub const ALLOWED_ROLES_ANNOTATION: &str = "iam.amazonaws.com/allowed-roles";
/// The namespace annotation with the expression of the roles its pods may have.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// A pod's lifecycle phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
}

impl Phase {
    /// Reads `status.phase`; anything unrecognised (or absent) is `Unknown`.
    pub fn parse(s: Option<&str>) -> Phase {
        match s {
            Some("Pending") => Phase::Pending,
            Some("Running") => Phase::Running,
            Some("Succeeded") => Phase::Succeeded,
            Some("Failed") => Phase::Failed,
            _ => Phase::Unknown,
        }
    }

    /// Succeeded and Failed pods have released their IP and never get credentials.
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }
}

/// What the server knows of one pod, laid out for 100,000 of them (BENCHMARKS.md, figure 3):
/// the strings many pods repeat (namespace, node, role, ServiceAccount) are shared `Arc<str>`s,
/// interned by the pod index, and the per-pod strings are boxed, without a `String`'s capacity.
#[derive(Clone, PartialEq)]
pub struct PodFacts {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub uid: Box<str>,
    /// `status.podIP`, once assigned: the primary address, shown in messages.
    pub ip: Option<IpAddr>,
    /// Every address of `status.podIPs` (the primary first): on dual-stack clusters a pod has
    /// one of each family, and may call from either, so each one finds the pod. Empty when the
    /// primary is the only address; read through [`PodFacts::addresses`].
    pub ips: Box<[IpAddr]>,
    pub phase: Phase,
    /// hostNetwork pods share the node's IP, so they can never be told apart by address.
    pub host_network: bool,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub node_name: Option<Arc<str>>,
    pub role: Option<Arc<str>>,
    pub session_name: Option<Box<str>>,
    /// Secret-ish: never printed by `Debug`.
    pub external_id: Option<Box<str>>,
    /// `spec.serviceAccountName`.
    pub service_account: Option<Arc<str>>,
    /// The pod's inline session policy annotation, minified, or why it is invalid (boxed: few
    /// pods have one).
    pub session_policy: Option<Box<Result<String, String>>>,
}

impl PodFacts {
    /// `namespace/name`, for logs and messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Every address the pod may call from: [`PodFacts::ips`], or the primary alone when the
    /// list is empty (facts made by hand).
    pub fn addresses(&self) -> Vec<IpAddr> {
        if self.ips.is_empty() { self.ip.into_iter().collect() } else { self.ips.to_vec() }
    }

    /// A running pod for unit tests.
    #[cfg(test)]
    pub fn test(namespace: &str, name: &str, ip: &str, role: Option<&str>) -> PodFacts {
        PodFacts {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}").into(),
            ip: ip.parse().ok(),
            ips: ip.parse().into_iter().collect(),
            phase: Phase::Running,
            host_network: false,
            node_name: Some("node-1".into()),
            terminating: false,
            role: role.map(Into::into),
            session_name: None,
            external_id: None,
            service_account: None,
            session_policy: None,
        }
    }
}

impl fmt::Debug for PodFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodFacts")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip)
            .field("ips", &self.ips)
            .field("phase", &self.phase)
            .field("host_network", &self.host_network)
            .field("terminating", &self.terminating)
            .field("role", &self.role)
            .field("session_name", &self.session_name)
            .field("external_id", &self.external_id.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// What the server knows of one namespace.
#[derive(Clone, Debug, Default)]
pub struct NamespaceFacts {
    pub name: String,
    /// The compiled `iam.amazonaws.com/permitted` expression, if annotated.
    pub permitted: Option<Permitted>,
    /// kube2iam mode: the namespace's allowed-roles annotation, parsed (or why it does not parse).
    pub allowed_roles: Option<Result<Vec<String>, String>>,
    /// The namespace's inline session policy annotation, minified, or why it is invalid.
    pub session_policy: Option<Result<String, String>>,
}
