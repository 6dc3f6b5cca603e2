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
/// interned by the pod index, the per-pod strings are boxed, without a `String`'s capacity, the
/// UID is its 16 bytes, and what few pods set is boxed apart ([`PodExtras`]).
#[derive(Clone, PartialEq)]
pub struct PodFacts {
    pub namespace: Arc<str>,
    pub name: Box<str>,
    pub uid: Uid,
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
    /// `spec.serviceAccountName`.
    pub service_account: Option<Arc<str>>,
    /// Session name, external ID and session policy, when the pod sets any.
    pub extras: Option<Box<PodExtras>>,
}

/// The annotations few pods set, kept apart so that the others pay one pointer for them.
#[derive(Clone, Default, PartialEq)]
pub struct PodExtras {
    pub session_name: Option<Box<str>>,
    /// Secret-ish: never printed by `Debug`.
    pub external_id: Option<Box<str>>,
    /// The pod's inline session policy annotation, minified, or why it is invalid.
    pub session_policy: Option<Result<String, String>>,
}

impl PodExtras {
    /// `None` when the pod sets none of them.
    pub fn boxed(self) -> Option<Box<PodExtras>> {
        (self != PodExtras::default()).then(|| Box::new(self))
    }
}

/// A pod's UID. The API server's are UUIDs, kept as their 16 bytes (a string would cost a
/// 48-byte allocation per pod); anything else is kept as written. Shown and compared as text.
#[derive(Clone, PartialEq, Eq)]
pub enum Uid {
    Uuid(uuid::Uuid),
    Text(Box<str>),
}

impl Uid {
    /// Whether the UID is empty (a pod object without one, from a file).
    pub fn is_empty(&self) -> bool {
        matches!(self, Uid::Text(t) if t.is_empty())
    }
}

/// `s` as a UUID, if it is one in the canonical form (36 characters, lowercase), which prints
/// back the same.
fn canonical_uuid(s: &str) -> Option<uuid::Uuid> {
    let canonical = s.len() == 36 && !s.bytes().any(|b| b.is_ascii_uppercase());
    canonical.then(|| uuid::Uuid::try_parse(s).ok()).flatten()
}

impl From<&str> for Uid {
    fn from(s: &str) -> Uid {
        canonical_uuid(s).map_or_else(|| Uid::Text(s.into()), Uid::Uuid)
    }
}

impl From<String> for Uid {
    fn from(s: String) -> Uid {
        Uid::from(s.as_str())
    }
}

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uid::Uuid(u) => fmt::Display::fmt(&u.hyphenated(), f),
            Uid::Text(t) => f.write_str(t),
        }
    }
}

impl fmt::Debug for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl PartialEq<str> for Uid {
    fn eq(&self, other: &str) -> bool {
        match self {
            Uid::Uuid(u) => canonical_uuid(other) == Some(*u),
            Uid::Text(t) => **t == *other && canonical_uuid(other).is_none(),
        }
    }
}

impl PodFacts {
    /// The session name annotation.
    pub fn session_name(&self) -> Option<&str> {
        self.extras.as_ref()?.session_name.as_deref()
    }

    /// The external ID annotation.
    pub fn external_id(&self) -> Option<&str> {
        self.extras.as_ref()?.external_id.as_deref()
    }

    /// The inline session policy, or why it is invalid.
    pub fn session_policy(&self) -> Option<&Result<String, String>> {
        self.extras.as_ref()?.session_policy.as_ref()
    }

    /// Changes the extras with `f` (tests and the fuzz harness build pods by hand).
    pub fn with_extras(mut self, f: impl FnOnce(&mut PodExtras)) -> PodFacts {
        let mut extras = self.extras.take().map(|e| *e).unwrap_or_default();
        f(&mut extras);
        self.extras = extras.boxed();
        self
    }

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
            service_account: None,
            extras: None,
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
            .field("session_name", &self.session_name())
            .field("external_id", &self.external_id().map(|_| "<redacted>"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_is_kept_compactly_and_shown_and_compared_as_written() {
        let uuid = "6f1c2d3e-4b5a-4c6d-8e7f-0123456789ab";
        let kept = Uid::from(uuid);
        assert!(matches!(kept, Uid::Uuid(_)));
        assert_eq!((kept.to_string(), format!("{kept:?}")), (uuid.to_string(), uuid.to_string()));
        assert!(kept == *uuid && kept != *"6f1c2d3e-4b5a-4c6d-8e7f-0123456789ac");
        // Other spellings of the same UUID are other strings: kept as written, never equal.
        for other in
            ["6F1C2D3E-4B5A-4C6D-8E7F-0123456789AB", "6f1c2d3e4b5a4c6d8e7f0123456789ab", "uid-web", ""]
        {
            let uid = Uid::from(other);
            assert!(matches!(uid, Uid::Text(_)) && uid.to_string() == other && uid == *other, "{other}");
            assert!(uid != *uuid);
        }
        assert!(Uid::from("").is_empty() && !kept.is_empty());
    }

    #[test]
    fn extras_are_boxed_only_when_a_pod_sets_one() {
        assert!(PodExtras::default().boxed().is_none());
        let pod =
            PodFacts::test("ns", "p", "10.0.0.1", None).with_extras(|e| e.external_id = Some("x".into()));
        assert_eq!((pod.external_id(), pod.session_name()), (Some("x"), None));
        assert!(!format!("{pod:?}").contains("\"x\""), "the external ID is never printed");
        assert!(pod.with_extras(|e| e.external_id = None).extras.is_none());
    }
}
