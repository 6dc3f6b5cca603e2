//! The lean projections of Pods and Namespaces that the server keeps: only what lookup and
//! policy need, so that memory stays small in large clusters (kiam kept whole objects, #260).

use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::policy::Permitted;

/// The pod annotation naming its role.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The pod annotation naming its STS session.
pub const SESSION_NAME_ANNOTATION: &str = "iam.amazonaws.com/session-name";
/// The pod annotation carrying the STS external ID.
pub const EXTERNAL_ID_ANNOTATION: &str = "iam.amazonaws.com/external-id";
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
    fn parse(s: Option<&str>) -> Phase {
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

/// What the server knows of one pod.
#[derive(Clone, PartialEq)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// `status.podIP`, once assigned.
    pub ip: Option<IpAddr>,
    pub phase: Phase,
    /// hostNetwork pods share the node's IP, so they can never be told apart by address.
    pub host_network: bool,
    pub node_name: Option<String>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    pub role: Option<String>,
    pub session_name: Option<String>,
    /// Secret-ish: never printed by `Debug`.
    pub external_id: Option<String>,
}

impl PodFacts {
    /// Projects a Kubernetes Pod. Returns `None` for an object without a name.
    pub fn from_pod(pod: &Pod) -> Option<PodFacts> {
        let meta = &pod.metadata;
        let annotation = |key: &str| meta.annotations.as_ref()?.get(key).cloned();
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        Some(PodFacts {
            namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
            name: meta.name.clone()?,
            uid: meta.uid.clone().unwrap_or_default(),
            ip: status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok()),
            phase: Phase::parse(status.and_then(|s| s.phase.as_deref())),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            node_name: spec.and_then(|s| s.node_name.clone()),
            terminating: meta.deletion_timestamp.is_some(),
            role: annotation(ROLE_ANNOTATION),
            session_name: annotation(SESSION_NAME_ANNOTATION),
            external_id: annotation(EXTERNAL_ID_ANNOTATION),
        })
    }

    /// `namespace/name`, for logs and messages.
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// A running pod for unit tests.
    #[cfg(test)]
    pub fn test(namespace: &str, name: &str, ip: &str, role: Option<&str>) -> PodFacts {
        PodFacts {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            ip: ip.parse().ok(),
            phase: Phase::Running,
            host_network: false,
            node_name: Some("node-1".into()),
            terminating: false,
            role: role.map(Into::into),
            session_name: None,
            external_id: None,
        }
    }
}

impl fmt::Debug for PodFacts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PodFacts")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("ip", &self.ip)
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
#[derive(Clone, Debug)]
pub struct NamespaceFacts {
    pub name: String,
    /// The compiled `iam.amazonaws.com/permitted` expression, if annotated.
    pub permitted: Option<Permitted>,
}

impl NamespaceFacts {
    /// Projects a Kubernetes Namespace. Returns `None` for an object without a name.
    pub fn from_namespace(ns: &Namespace) -> Option<NamespaceFacts> {
        let permitted = ns.metadata.annotations.as_ref().and_then(|a| a.get(PERMITTED_ANNOTATION));
        Some(NamespaceFacts {
            name: ns.metadata.name.clone()?,
            permitted: permitted.map(|expr| Permitted::new(expr)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn projects_a_pod() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "a", "name": "p", "uid": "u1",
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "annotations": {ROLE_ANNOTATION: "r", EXTERNAL_ID_ANNOTATION: "s3cret"}},
            "spec": {"containers": [{"name": "c"}], "nodeName": "n1", "hostNetwork": true},
            "status": {"podIP": "10.1.2.3", "phase": "Running"}
        }))
        .expect("valid pod");
        let facts = PodFacts::from_pod(&pod).expect("named");
        assert_eq!(facts.ip, Some("10.1.2.3".parse().expect("ip")));
        assert_eq!(facts.role.as_deref(), Some("r"));
        assert!(facts.terminating && facts.host_network);
        assert_eq!(facts.phase, Phase::Running);
        assert!(!format!("{facts:?}").contains("s3cret"));
    }
}
