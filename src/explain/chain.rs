//! The decision chain, as pure functions: from where the pod was found, its namespace and the
//! server's settings to every step of the decision and the verdict. The steps call what the
//! server calls ([`Policy::decide`], [`RoleArn::resolve`], [`role::session_name`]), in the
//! server's order (lookup, node, policy), so the first failing step is the server's answer.

use serde::Serialize;

use super::find::{Located, Owner};
use super::{NodeBinding, Settings};
use crate::creds::Identity;
use crate::model::{NamespaceFacts, Phase, PodFacts, RoleArn};
use crate::policy::{Caller, Denial, check_node, role};

/// Everything explain says about one pod.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// What was asked: `namespace/name` or `ip <address>`.
    pub query: String,
    pub lookup: LookupView,
    pub pod: Option<PodView>,
    pub role: Option<RoleView>,
    pub namespace: Option<NamespaceView>,
    pub session: Option<SessionView>,
    pub node_binding: NodeView,
    /// What the server's cache holds for the identity (`--server-address`).
    pub server: Option<super::remote::ServerView>,
    pub verdict: Verdict,
    /// The identity the server would fetch for, for the server query; never serialised, since
    /// it holds the external ID.
    #[serde(skip)]
    pub identity: Option<Identity>,
}

/// How the server finds the pod by its IP.
#[derive(Clone, Debug, Serialize)]
pub struct LookupView {
    /// `found`, `no-ip`, `not-found`, `skipped`, `reused` or `ambiguous`.
    pub outcome: &'static str,
    pub detail: String,
    /// Other pods involved: the IP's owner, the pods sharing it, or the pods the server skips.
    pub pods: Vec<String>,
}

/// The pod's facts.
#[derive(Clone, Debug, Serialize)]
pub struct PodView {
    pub namespace: String,
    pub name: String,
    pub phase: String,
    pub ip: Option<String>,
    pub node: Option<String>,
    pub host_network: bool,
    pub terminating: bool,
}

/// The role annotation and the request.
#[derive(Clone, Debug, Serialize)]
pub struct RoleView {
    /// `iam.amazonaws.com/role`, as written.
    pub annotation: Option<String>,
    /// The annotation resolved with the base ARN.
    pub arn: Option<String>,
    /// Why it does not resolve.
    pub error: Option<String>,
    /// The role the pod asks for (`--role`, or the annotation).
    pub requested: String,
    /// Whether the request names the annotated role; `None` when there is nothing to compare.
    pub requested_matches: Option<bool>,
    /// Where the role comes from: `annotation`, `--default-role` (kube2iam mode), `service
    /// account <name>` (`--service-account-roles`), or `none`.
    pub source: String,
}

/// The namespace's `iam.amazonaws.com/permitted` expression and what it says of the role.
#[derive(Clone, Debug, Serialize)]
pub struct NamespaceView {
    pub name: String,
    pub found: bool,
    pub permitted: Option<String>,
    /// Matched as `^(?:expr)$` (the default) rather than anywhere in the ARN.
    pub anchored: bool,
    /// Whether it permits the annotated role's ARN; `None` when not evaluated.
    pub matches: Option<bool>,
    pub detail: String,
    /// The ARN form to write when the expression could only ever match role names, never an
    /// ARN (the kiam v4 migration pitfall); `None` otherwise.
    pub arn_form: Option<String>,
}

/// The STS session the role would be assumed with.
#[derive(Clone, Debug, Serialize)]
pub struct SessionView {
    pub name: String,
    /// `annotation` (iam.amazonaws.com/session-name) or `--session`.
    pub source: &'static str,
    /// Whether `iam.amazonaws.com/external-id` is set. The ID itself is never shown.
    pub external_id_set: bool,
    /// STS session tags (`--session-tags`), as sent.
    pub tags: Vec<(String, String)>,
    /// The inline session policy (minified JSON) from the pod's or namespace's annotation.
    pub policy: Option<String>,
}

/// Node binding (`--agent-node-binding`).
#[derive(Clone, Debug, Serialize)]
pub struct NodeView {
    pub enabled: bool,
    /// The asking agent's node (`--node`); `None` means the pod's own node.
    pub agent_node: Option<String>,
    pub allowed: Option<bool>,
    pub detail: String,
}

/// The answer.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    pub allowed: bool,
    /// A stable word for scripts: `allowed`, or why not.
    pub code: &'static str,
    pub reason: String,
}

fn denied(code: &'static str, reason: String) -> Verdict {
    Verdict { allowed: false, code, reason }
}

/// The stable code of a policy denial.
pub fn denial_code(denial: &Denial) -> &'static str {
    match denial {
        Denial::NoRoleAnnotation => "no-role-annotation",
        Denial::RoleMismatch { .. } => "role-mismatch",
        Denial::Unresolvable(_) => "role-unresolvable",
        Denial::NamespaceUnknown(_) => "namespace-unknown",
        Denial::NamespaceUnset(_) => "namespace-unset",
        Denial::NamespaceInvalid { .. } => "namespace-invalid",
        Denial::NamespaceForbids { .. } => "namespace-forbids",
        Denial::SessionTags(_) => "session-tags-invalid",
        Denial::SessionPolicy(_) => "session-policy-invalid",
        Denial::SessionPolicyCeiling { .. } => "session-policy-ceiling",
    }
}

fn phase(p: Phase) -> &'static str {
    match p {
        Phase::Pending => "Pending",
        Phase::Running => "Running",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
        Phase::Unknown => "Unknown",
    }
}

fn names(pods: &[PodFacts]) -> Vec<String> {
    pods.iter().map(PodFacts::qualified_name).collect()
}

/// Why the server skips `pod`, as a verdict.
fn skipped_verdict(pod: &PodFacts) -> Verdict {
    if pod.host_network {
        denied(
            "host-network",
            format!(
                "pod {} uses hostNetwork: it shares its node's IP, which the server never matches to a pod, \
                 so it gets no role from kiam",
                pod.qualified_name()
            ),
        )
    } else {
        denied("pod-finished", format!("pod {} has finished ({})", pod.qualified_name(), phase(pod.phase)))
    }
}

/// The lookup step, and its verdict when it fails.
fn lookup(query: &str, located: &Located) -> (LookupView, Option<Verdict>) {
    let view = |outcome, detail: String, pods| LookupView { outcome, detail, pods };
    match located {
        Located::Missing { ip: None, .. } => {
            let reason = format!("pod {query} not found");
            (view("not-found", reason.clone(), vec![]), Some(denied("pod-not-found", reason)))
        }
        Located::Missing { ip: Some(ip), skipped } => {
            let reason = format!("no pod found for IP {ip}");
            let verdict = match skipped.first() {
                Some(first) if skipped.iter().all(|p| p.host_network == first.host_network) => {
                    let why = skipped_verdict(first);
                    denied(why.code, format!("{reason}: {}", why.reason))
                }
                _ => denied("pod-not-found", reason.clone()),
            };
            (view("not-found", reason, names(skipped)), Some(verdict))
        }
        Located::Ambiguous { ip, pods } => {
            let reason = format!("multiple running pods found for IP {ip} ({})", pods.len());
            (view("ambiguous", reason.clone(), names(pods)), Some(denied("ambiguous-ip", reason)))
        }
        Located::Pod { pod, owner } => match owner {
            Owner::Itself => (view("found", "the server finds this pod at its IP".into(), vec![]), None),
            Owner::NoIp => {
                (view("no-ip", "no IP yet: the server finds the pod once it has one".into(), vec![]), None)
            }
            Owner::Skipped => {
                let verdict = skipped_verdict(pod);
                (view("skipped", verdict.reason.clone(), vec![]), Some(verdict))
            }
            Owner::Other(other) => {
                let reason = format!(
                    "pod {} is terminating and its IP now belongs to {other}: requests from the IP are {other}'s",
                    pod.qualified_name()
                );
                (view("reused", reason.clone(), vec![other.clone()]), Some(denied("ip-reused", reason)))
            }
            Owner::Ambiguous(all) => {
                let ip = pod.ip.map(|ip| ip.to_string()).unwrap_or_default();
                let reason = format!("multiple running pods found for IP {ip} ({})", all.len());
                (view("ambiguous", reason.clone(), all.clone()), Some(denied("ambiguous-ip", reason)))
            }
        },
    }
}

/// The node-binding step, decided by the server's own [`check_node`].
fn node(binding: &NodeBinding, pod: &PodFacts) -> (NodeView, Option<Verdict>) {
    let NodeBinding::On { agent_node } = binding else {
        let detail = "off: any agent may ask about any pod".to_string();
        return (NodeView { enabled: false, agent_node: None, allowed: None, detail }, None);
    };
    let asking = agent_node.as_deref().or(pod.node_name.as_deref());
    let verdict = match asking {
        None => Some(denied("other-node", format!("pod {} is on no node", pod.qualified_name()))),
        Some(a) => check_node(pod, &Caller::Node(a.to_string()))
            .err()
            .map(|denial| denied("other-node", denial.to_string())),
    };
    let allowed = verdict.is_none();
    let detail = match (&pod.node_name, asking) {
        (None, _) => "the pod is on no node, so no agent may ask about it".to_string(),
        (Some(n), Some(a)) if allowed => format!("the agent on {a} may ask about a pod on {n}"),
        (Some(n), a) => format!("the agent on {} may not ask about a pod on {n}", a.unwrap_or("?")),
    };
    (NodeView { enabled: true, agent_node: agent_node.clone(), allowed: Some(allowed), detail }, verdict)
}

/// The whole chain for one pod.
pub fn explain(
    settings: &Settings,
    query: String,
    located: &Located,
    namespace: Option<&NamespaceFacts>,
    requested: Option<&str>,
) -> Explanation {
    let (lookup_view, lookup_verdict) = lookup(&query, located);
    let node_off = NodeView {
        enabled: matches!(settings.node_binding, NodeBinding::On { .. }),
        agent_node: None,
        allowed: None,
        detail: "not evaluated".into(),
    };
    let Located::Pod { pod, .. } = located else {
        let verdict = lookup_verdict.unwrap_or_else(|| denied("pod-not-found", "pod not found".into()));
        return Explanation {
            query,
            lookup: lookup_view,
            pod: None,
            role: None,
            namespace: None,
            session: None,
            node_binding: node_off,
            server: None,
            verdict,
            identity: None,
        };
    };
    let policy = &settings.policy;
    // kube2iam mode: the default role stands in for a missing annotation.
    let annotation = policy.effective_role(pod);
    let requested = requested.or(annotation).unwrap_or("").to_string();
    let resolved = annotation.map(|a| RoleArn::resolve(a, policy.base_arn.as_ref()));
    let decision = policy.decide(pod, namespace, &requested);
    // The namespace step on its own: the same decision for the annotated role itself.
    let for_annotation = annotation.map(|a| policy.decide(pod, namespace, a));

    let source = match (&pod.role, annotation) {
        (Some(_), _) => "annotation",
        (None, Some(_)) => "--default-role",
        (None, None) => "none",
    };
    let role_view = RoleView {
        source: source.to_string(),
        annotation: pod.role.as_deref().map(String::from),
        arn: resolved.as_ref().and_then(|r| r.as_ref().ok()).map(ToString::to_string),
        error: resolved.as_ref().and_then(|r| r.as_ref().err()).map(ToString::to_string),
        requested: requested.clone(),
        requested_matches: match &decision {
            Err(Denial::RoleMismatch { .. }) => Some(false),
            Err(Denial::NoRoleAnnotation | Denial::Unresolvable(_)) => None,
            _ => Some(true),
        },
    };
    let permitted_facts = namespace.and_then(|n| n.permitted.as_ref());
    let (permitted, arn_form) = match &policy.kube2iam {
        None => (permitted_facts.map(|p| p.expr.clone()), permitted_facts.and_then(|p| policy.name_only(p))),
        Some(_) => (
            namespace.and_then(|n| n.allowed_roles.as_ref()).map(|roles| match roles {
                Ok(list) => format!("allowed-roles {list:?}"),
                Err(e) => format!("allowed-roles (invalid: {e})"),
            }),
            None,
        ),
    };
    let (matches, detail) = match &for_annotation {
        None => (None, "not evaluated: the pod has no role".to_string()),
        Some(Ok(arn)) => (Some(true), format!("permits {arn}")),
        Some(Err(Denial::Unresolvable(e))) => (None, format!("not evaluated: {e}")),
        Some(Err(d)) => (Some(false), d.to_string()),
    };
    let namespace_view = NamespaceView {
        name: pod.namespace.to_string(),
        found: namespace.is_some(),
        permitted,
        anchored: policy.strict_namespace_regexp,
        matches: if namespace.is_some() { matches } else { None },
        detail,
        arn_form,
    };
    let session_name = role::session_name(pod.session_name(), &settings.default_session);
    let from_annotation = pod.session_name().is_some_and(|s| !s.trim().is_empty());
    // The server refuses a pod whose session extras STS would refuse (or that would lift its
    // namespace's session policy), after the role decision: so does the verdict.
    let extras_verdict = policy.session_extras(pod, namespace);
    let extras = extras_verdict.clone().unwrap_or_default();
    let session_view = SessionView {
        name: session_name.clone(),
        source: if from_annotation { "annotation" } else { "--session" },
        external_id_set: pod.external_id().is_some(),
        tags: extras.0.clone(),
        policy: extras.1.clone(),
    };
    let (node_view, node_verdict) = node(&settings.node_binding, pod);
    let policy_verdict = match (&decision, &extras_verdict) {
        (Ok(arn), Ok(_)) => Verdict {
            allowed: true,
            code: "allowed",
            reason: format!("pod {} may assume {arn}", pod.qualified_name()),
        },
        (Err(d), _) | (Ok(_), Err(d)) => {
            denied(denial_code(d), format!("pod {} is forbidden: {d}", pod.qualified_name()))
        }
    };
    let identity = resolved.and_then(Result::ok).map(|arn| Identity {
        role: arn,
        session_name,
        external_id: pod.external_id().map(String::from),
        tags: extras.0,
        policy: extras.1,
        source_identity: policy.source_identity.then(|| role::source_identity(&pod.namespace, &pod.name)),
    });
    Explanation {
        query,
        lookup: lookup_view,
        pod: Some(PodView {
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            phase: phase(pod.phase).into(),
            ip: pod.ip.map(|ip| ip.to_string()),
            node: pod.node_name.as_deref().map(String::from),
            host_network: pod.host_network,
            terminating: pod.terminating,
        }),
        role: Some(role_view),
        namespace: Some(namespace_view),
        session: Some(session_view),
        node_binding: node_view,
        server: None,
        verdict: lookup_verdict.or(node_verdict).unwrap_or(policy_verdict),
        identity,
    }
}
