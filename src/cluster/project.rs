//! The Kubernetes projections: a Pod or Namespace object to the lean facts of [`crate::model`].
//! This and the watcher are the only places that read Kubernetes object types.

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::model::{
    EXTERNAL_ID_ANNOTATION, NamespaceFacts, PERMITTED_ANNOTATION, Permitted, Phase, PodFacts,
    ROLE_ANNOTATION, SESSION_NAME_ANNOTATION,
};

/// Projects a Kubernetes Pod. Returns `None` for an object without a name.
pub fn pod_facts(pod: &Pod) -> Option<PodFacts> {
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

/// Projects a Kubernetes Namespace. Returns `None` for an object without a name.
pub fn namespace_facts(ns: &Namespace) -> Option<NamespaceFacts> {
    let permitted = ns.metadata.annotations.as_ref().and_then(|a| a.get(PERMITTED_ANNOTATION));
    Some(NamespaceFacts {
        name: ns.metadata.name.clone()?,
        permitted: permitted.map(|expr| Permitted::new(expr)),
    })
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
        let facts = pod_facts(&pod).expect("named");
        assert_eq!(facts.ip, Some("10.1.2.3".parse().expect("ip")));
        assert_eq!(facts.role.as_deref(), Some("r"));
        assert!(facts.terminating && facts.host_network);
        assert_eq!(facts.phase, Phase::Running);
        assert!(!format!("{facts:?}").contains("s3cret"));
    }
}
