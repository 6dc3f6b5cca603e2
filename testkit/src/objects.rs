//! JSON builders for the Pods and Namespaces the integration tests feed to the fake API server.
//!
//! They return `serde_json::Value` rather than k8s-openapi types so that a test can hand the result
//! straight to [`FakeKube::apply`](crate::fake_kube::FakeKube::apply), or tweak a field the builder
//! does not know about. Every object is valid enough for k8s-openapi to deserialize (a Pod always
//! has one container), which is what kube's watcher does with it.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use serde_json::{Map, Value, json};

/// The annotation that names the IAM role a pod wants.
pub const ROLE_ANNOTATION: &str = "iam.amazonaws.com/role";
/// The namespace annotation holding the regex of roles its pods may assume.
pub const PERMITTED_ANNOTATION: &str = "iam.amazonaws.com/permitted";

/// Starts a Namespace called `name`, with status phase `Active`.
pub fn namespace(name: &str) -> NsBuilder {
    NsBuilder { name: name.to_owned(), annotations: BTreeMap::new() }
}

/// Starts a Running Pod `namespace/name` with one container and no IP.
pub fn pod(namespace: &str, name: &str) -> PodBuilder {
    PodBuilder {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        ip: None,
        annotations: BTreeMap::new(),
        labels: BTreeMap::new(),
        node: None,
        service_account: None,
        phase: "Running".to_owned(),
        host_network: false,
        terminating: false,
        more_ips: Vec::new(),
        uid: None,
    }
}

/// A Namespace under construction; see [`namespace`].
#[derive(Clone, Debug)]
pub struct NsBuilder {
    name: String,
    annotations: BTreeMap<String, String>,
}

impl NsBuilder {
    /// Sets `iam.amazonaws.com/permitted`, the regex of roles the namespace allows.
    pub fn permitted(self, regex: &str) -> Self {
        self.annotation(PERMITTED_ANNOTATION, regex)
    }

    /// Sets any other annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The Namespace as the API server would store it (minus what the fake stamps on write).
    pub fn build(self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": self.name, "annotations": self.annotations},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        })
    }
}

/// A Pod under construction; see [`pod`].
#[derive(Clone, Debug)]
pub struct PodBuilder {
    namespace: String,
    name: String,
    ip: Option<String>,
    annotations: BTreeMap<String, String>,
    labels: BTreeMap<String, String>,
    node: Option<String>,
    service_account: Option<String>,
    phase: String,
    host_network: bool,
    terminating: bool,
    /// Further `status.podIPs` entries (a dual-stack pod's other family).
    more_ips: Vec<String>,
    uid: Option<String>,
}

impl PodBuilder {
    /// Adds an entry to `status.podIPs` after the one [`PodBuilder::ip`] set.
    pub fn also_ip(mut self, ip: &str) -> Self {
        self.more_ips.push(ip.to_owned());
        self
    }

    /// Sets `status.podIP` and the single entry of `status.podIPs`.
    pub fn ip(mut self, ip: &str) -> Self {
        self.ip = Some(ip.to_owned());
        self
    }

    /// Sets the `iam.amazonaws.com/role` annotation.
    pub fn role(self, role: &str) -> Self {
        self.annotation(ROLE_ANNOTATION, role)
    }

    /// Sets any other annotation.
    pub fn annotation(mut self, key: &str, value: &str) -> Self {
        self.annotations.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets a label (for `labelSelector` tests).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// Sets `spec.serviceAccountName`.
    pub fn service_account(mut self, name: &str) -> Self {
        self.service_account = Some(name.to_owned());
        self
    }

    /// Sets `spec.nodeName`, which agents select their own pods by.
    pub fn node(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Sets `status.phase` (the default is `Running`).
    pub fn phase(mut self, phase: &str) -> Self {
        self.phase = phase.to_owned();
        self
    }

    /// Sets `spec.hostNetwork`; such pods share the node's IP.
    pub fn host_network(mut self, host_network: bool) -> Self {
        self.host_network = host_network;
        self
    }

    /// Sets `metadata.uid` (the fake stamps a fresh one otherwise).
    pub fn uid(mut self, uid: &str) -> Self {
        self.uid = Some(uid.to_owned());
        self
    }

    /// Marks the pod as being deleted (`metadata.deletionTimestamp` set to now).
    pub fn terminating(mut self) -> Self {
        self.terminating = true;
        self
    }

    /// The Pod as the API server would store it (minus what the fake stamps on write).
    pub fn build(self) -> Value {
        let mut metadata = Map::new();
        metadata.insert("name".into(), json!(self.name));
        metadata.insert("namespace".into(), json!(self.namespace));
        metadata.insert("annotations".into(), json!(self.annotations));
        metadata.insert("labels".into(), json!(self.labels));
        if let Some(uid) = self.uid {
            metadata.insert("uid".into(), json!(uid));
        }
        if self.terminating {
            metadata.insert("deletionTimestamp".into(), json!(now()));
            metadata.insert("deletionGracePeriodSeconds".into(), json!(30));
        }
        let mut spec = Map::new();
        spec.insert("containers".into(), json!([{"name": "app", "image": "app"}]));
        if let Some(node) = self.node {
            spec.insert("nodeName".into(), json!(node));
        }
        if let Some(account) = self.service_account {
            spec.insert("serviceAccountName".into(), json!(account));
        }
        if self.host_network {
            spec.insert("hostNetwork".into(), json!(true));
        }
        let mut status = Map::new();
        status.insert("phase".into(), json!(self.phase));
        if let Some(ip) = self.ip {
            status.insert("podIP".into(), json!(ip));
            let all: Vec<_> =
                std::iter::once(ip).chain(self.more_ips).map(|ip| json!({ "ip": ip })).collect();
            status.insert("podIPs".into(), json!(all));
        }
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": spec,
            "status": status,
        })
    }
}

/// The current time in the API server's format (RFC 3339, whole seconds, UTC).
pub fn now() -> String {
    format!("{:.0}", Timestamp::now())
}
