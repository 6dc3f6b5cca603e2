//! The Kubernetes projections: a Pod or Namespace object to the lean facts of [`crate::model`].
//! This and the watcher are the only places that read Kubernetes object types.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Namespace, Pod, PodIP, ServiceAccount};

use crate::model::{
    ALLOWED_ROLES_ANNOTATION, EXTERNAL_ID_ANNOTATION, IRSA_ROLE_ANNOTATION, NamespaceFacts,
    PERMITTED_ANNOTATION, Permitted, Phase, PodExtras, PodFacts, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION,
    SESSION_POLICY_ANNOTATION, ServiceAccountFacts,
};

/// Which annotations the projections read: kiam's keys by default; kube2iam mode takes its
/// `--iam-role-key`, `--iam-external-id` and `--namespace-key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Projection {
    pub role_key: String,
    pub external_id_key: String,
    pub session_name_key: String,
    pub permitted_key: String,
    pub allowed_roles_key: String,
}

impl Default for Projection {
    fn default() -> Self {
        Projection {
            role_key: ROLE_ANNOTATION.into(),
            external_id_key: EXTERNAL_ID_ANNOTATION.into(),
            session_name_key: SESSION_NAME_ANNOTATION.into(),
            permitted_key: PERMITTED_ANNOTATION.into(),
            allowed_roles_key: ALLOWED_ROLES_ANNOTATION.into(),
        }
    }
}

/// Projects a Kubernetes Pod with kiam's annotation keys.
///
/// An annotation that is empty or only blanks counts as absent, as in kiam and kube2iam: Helm
/// templates often render `external-id: ""`, and sending an empty external ID to STS would fail
/// every request of the pod.
pub fn pod_facts(pod: &Pod) -> Option<PodFacts> {
    Projection::default().pod(pod)
}

/// Projects a Kubernetes Namespace with kiam's annotation keys.
pub fn namespace_facts(ns: &Namespace) -> Option<NamespaceFacts> {
    Projection::default().namespace(ns)
}

/// Projects a ServiceAccount: IRSA's `eks.amazonaws.com/role-arn` names its pods' role, else
/// kiam's `iam.amazonaws.com/role`.
pub fn service_account_facts(sa: &ServiceAccount) -> Option<ServiceAccountFacts> {
    let annotations = sa.metadata.annotations.as_ref();
    let role = [IRSA_ROLE_ANNOTATION, ROLE_ANNOTATION].iter().find_map(|key| {
        annotations.and_then(|a| a.get(*key)).map(|r| r.trim().to_string()).filter(|r| !r.is_empty())
    });
    Some(ServiceAccountFacts {
        namespace: sa.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
        name: sa.metadata.name.clone()?,
        role,
    })
}

impl Projection {
    /// Projects a Kubernetes Pod. Returns `None` for an object without a name.
    pub fn pod(&self, pod: &Pod) -> Option<PodFacts> {
        project_pod(self, pod)
    }

    /// Projects a Kubernetes Namespace. Returns `None` for an object without a name.
    pub fn namespace(&self, ns: &Namespace) -> Option<NamespaceFacts> {
        let annotations = ns.metadata.annotations.as_ref();
        let permitted = annotations.and_then(|a| a.get(&self.permitted_key));
        let allowed = annotations.and_then(|a| a.get(&self.allowed_roles_key));
        Some(NamespaceFacts {
            name: ns.metadata.name.clone()?,
            permitted: permitted.map(|expr| Permitted::new(expr)),
            allowed_roles: allowed.map(|text| crate::policy::kube2iam::parse_allowed_roles(text)),
            session_policy: annotations
                .and_then(|a| a.get(SESSION_POLICY_ANNOTATION))
                .map(|text| crate::policy::session::parse_policy(text)),
        })
    }
}

fn project_pod(keys: &Projection, pod: &Pod) -> Option<PodFacts> {
    let meta = &pod.metadata;
    let annotation = |key: &str| {
        let value = meta.annotations.as_ref()?.get(key)?;
        (!value.trim().is_empty()).then(|| value.clone())
    };
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let ip = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.trim().parse().ok());
    Some(PodFacts {
        namespace: meta.namespace.as_deref().unwrap_or("default").into(),
        name: meta.name.as_deref()?.into(),
        uid: meta.uid.as_deref().unwrap_or_default().into(),
        ip,
        ips: beyond_primary(ip, addresses(ip, status.and_then(|s| s.pod_ips.as_deref()).unwrap_or_default())),
        phase: Phase::parse(status.and_then(|s| s.phase.as_deref())),
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        node_name: spec.and_then(|s| s.node_name.as_deref()).map(Into::into),
        terminating: meta.deletion_timestamp.is_some(),
        role: annotation(&keys.role_key).map(Into::into),
        service_account: spec
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|n| !n.is_empty())
            .map(Into::into),
        extras: PodExtras {
            session_name: annotation(&keys.session_name_key).map(Into::into),
            external_id: annotation(&keys.external_id_key).map(Into::into),
            session_policy: annotation(SESSION_POLICY_ANNOTATION)
                .map(|text| crate::policy::session::parse_policy(&text)),
        }
        .boxed(),
    })
}

/// The list to keep in [`PodFacts::ips`]: none when it is the primary address alone (most pods:
/// [`PodFacts::addresses`] then gives the primary), saving an allocation per pod at 100k pods.
fn beyond_primary(primary: Option<IpAddr>, all: Vec<IpAddr>) -> Box<[IpAddr]> {
    if primary.is_some() && all.len() == 1 { Box::default() } else { all.into() }
}

/// `status.podIPs` with `status.podIP` first, each address once. The API server keeps
/// `podIP == podIPs[0]`, but a pod object from a file or an old API server may have only one
/// of them.
fn addresses(primary: Option<IpAddr>, listed: &[PodIP]) -> Vec<IpAddr> {
    let mut all: Vec<IpAddr> = primary.into_iter().collect();
    for ip in listed.iter().filter_map(|p| p.ip.trim().parse().ok()) {
        if !all.contains(&ip) {
            all.push(ip);
        }
    }
    all
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
        // A single-stack pod keeps no list beside its primary address (memory at 100k pods).
        assert!(facts.ips.is_empty());
        assert_eq!(facts.addresses(), vec![facts.ip.expect("ip")]);
        assert_eq!(facts.role.as_deref(), Some("r"));
        assert!(facts.terminating && facts.host_network);
        assert_eq!(facts.phase, Phase::Running);
        assert!(!format!("{facts:?}").contains("s3cret"));
    }

    #[test]
    fn empty_annotations_are_absent() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "annotations": {
                ROLE_ANNOTATION: " ", EXTERNAL_ID_ANNOTATION: "", SESSION_NAME_ANNOTATION: ""}},
        }))
        .expect("valid pod");
        let facts = pod_facts(&pod).expect("named");
        assert_eq!((facts.role.as_deref(), facts.external_id(), facts.session_name()), (None, None, None));
        assert!(facts.extras.is_none(), "no extras: nothing boxed");
    }

    #[test]
    fn every_pod_ip_is_an_address() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {"podIP": "fd00::5", "podIPs": [{"ip": "fd00::5"}, {"ip": "10.0.0.5"}, {"ip": "junk"}]}
        }))
        .expect("valid pod");
        let facts = pod_facts(&pod).expect("named");
        let want: Vec<IpAddr> = vec!["fd00::5".parse().expect("v6"), "10.0.0.5".parse().expect("v4")];
        assert_eq!((facts.ip, facts.addresses()), (Some(want[0]), want.clone()));
        let only_list: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"}, "status": {"podIPs": [{"ip": "10.0.0.5"}]}
        }))
        .expect("valid pod");
        assert_eq!(pod_facts(&only_list).expect("named").addresses(), vec![want[1]]);
    }
}
