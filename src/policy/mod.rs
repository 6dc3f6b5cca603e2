//! The credential policy, as pure functions over facts: no I/O, no async, no Kubernetes or AWS
//! types. The server looks the pod and its namespace up first, then asks [`Policy::decide`].
//!
//! kiam v4's rules: the requested role must be the pod's annotated role once both are resolved to
//! ARNs, and the namespace's `iam.amazonaws.com/permitted` expression must match that ARN. A
//! namespace without the annotation permits nothing.

pub mod access;
pub mod kube2iam;
pub mod node;
pub mod paths;
pub mod pitfall;
pub mod rendezvous;
pub mod role;
pub mod session;

pub use node::{Caller, NodeDenial, check_node};

use crate::model::{BaseArn, NamespaceFacts, Permitted, PodFacts, RoleArn, RoleError};

/// Session tags (sorted by key) and an inline session policy (minified JSON).
pub type SessionExtras = (Vec<(String, String)>, Option<String>);

/// The server's policy settings.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Completes short role names (`--role-base-arn`).
    pub base_arn: Option<BaseArn>,
    /// Anchor the namespace expression as `^(?:expr)$` (kiam v4's default). With
    /// `--disable-strict-namespace-regexp` it is matched anywhere in the ARN, as in kiam v3.
    pub strict_namespace_regexp: bool,
    /// kube2iam mode's rules instead of kiam's (default role, allowed-roles restrictions).
    pub kube2iam: Option<kube2iam::Rules>,
    /// `--session-tags`: which STS session tags sessions carry.
    pub session_tags: Option<session::SessionTags>,
    /// `--service-account-roles`: a pod without the role annotation takes its ServiceAccount's.
    pub service_account_roles: bool,
    /// `--source-identity`: every session carries the pod's STS `SourceIdentity`
    /// ([`role::source_identity`]), so every pod is its own identity.
    pub source_identity: bool,
}

/// Why a pod may not have the role it asked for. The display text is the explanation logged
/// and recorded in Events; callers see only `forbidden by policy`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    /// The pod has no `iam.amazonaws.com/role` annotation.
    #[error("pod has no iam.amazonaws.com/role annotation")]
    NoRoleAnnotation,
    /// The pod asked for a role other than its annotated one.
    #[error("requested '{requested}' but annotated with '{annotated}', forbidden")]
    RoleMismatch { requested: String, annotated: String },
    /// The requested or annotated role could not be resolved to an ARN.
    #[error("{0}")]
    Unresolvable(RoleError),
    /// The pod's namespace is not known (yet).
    #[error("namespace {0} not found")]
    NamespaceUnknown(String),
    /// The namespace has no (or an empty) `iam.amazonaws.com/permitted` annotation.
    #[error("namespace policy expression '(empty)' forbids role '{0}'")]
    NamespaceUnset(String),
    /// The expression does not compile.
    #[error("namespace policy expression '{expr}' is invalid: {error}")]
    NamespaceInvalid { expr: String, error: String },
    /// The expression does not match the role's ARN. `hint` is the ARN form to write when the
    /// expression could only ever match role names ([`pitfall::name_only`]).
    #[error("namespace policy expression '{expr}' forbids role '{arn}'{}", name_only_note(.hint.as_deref()))]
    NamespaceForbids { expr: String, arn: String, hint: Option<String> },
    /// STS would refuse the pod's session tags (too long, odd characters, too many).
    #[error("session tags: {0}")]
    SessionTags(String),
    /// The pod's (or its namespace's) session policy annotation is invalid.
    #[error("session policy: {0}")]
    SessionPolicy(String),
    /// The pod has its own session policy, in a namespace whose session policy is a ceiling for
    /// every pod in it ([`session::policy_for`] says why the two cannot be combined).
    #[error(
        "session policy: the pod has its own iam.amazonaws.com/session-policy, but namespace {namespace} \
         sets one, a ceiling for every pod in it that no pod may replace or widen (STS would allow the \
         union of the two): remove the pod's annotation"
    )]
    SessionPolicyCeiling { namespace: String },
}

/// What a denial adds when the expression can only match role names.
fn name_only_note(hint: Option<&str>) -> String {
    hint.map(|h| format!("; {}", name_only_advice(h))).unwrap_or_default()
}

/// The advice for an expression that can only match role names, with the ARN form `suggestion`.
pub fn name_only_advice(suggestion: &str) -> String {
    format!(
        "it can only match role names, but kiam v4 matches the role's full ARN, so it denies every role: \
         write '{suggestion}'"
    )
}

impl Policy {
    /// kiam's defaults with the base ARN `arn:aws:iam::123456789012:role/`, for tests.
    #[cfg(test)]
    pub fn test() -> Policy {
        Policy {
            base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").expect("base")),
            strict_namespace_regexp: true,
            kube2iam: None,
            session_tags: None,
            source_identity: false,
            service_account_roles: false,
        }
    }

    /// The role `pod` uses: its annotation (kiam), or in kube2iam mode its annotation or the
    /// default role.
    pub fn effective_role<'a>(&'a self, pod: &'a PodFacts) -> Option<&'a str> {
        match &self.kube2iam {
            Some(rules) => rules.effective_role(pod).map(|(role, _)| role),
            None => pod.role.as_deref().filter(|r| !r.trim().is_empty()),
        }
    }

    /// The ARN form to write when `permitted`, anchored as this policy anchors it, could only
    /// ever match role names, never an ARN (the kiam v4 migration pitfall). Unanchored
    /// (`--disable-strict-namespace-regexp`) a role name matches inside the ARN, so then `None`.
    pub fn name_only(&self, permitted: &Permitted) -> Option<String> {
        if !self.strict_namespace_regexp {
            return None;
        }
        pitfall::name_only(&permitted.expr, self.base_arn.as_ref())
    }

    /// The session tags and the inline session policy `pod` gets, or why STS would refuse them.
    pub fn session_extras(
        &self,
        pod: &PodFacts,
        namespace: Option<&NamespaceFacts>,
    ) -> Result<SessionExtras, Denial> {
        let tags = match &self.session_tags {
            Some(settings) => settings.for_pod(pod).map_err(Denial::SessionTags)?,
            None => Vec::new(),
        };
        let policy = session::policy_for(pod, namespace).map_err(|error| match error {
            session::PolicyError::Invalid(error) => Denial::SessionPolicy(error),
            session::PolicyError::Ceiling => {
                Denial::SessionPolicyCeiling { namespace: pod.namespace.to_string() }
            }
        })?;
        Ok((tags, policy))
    }

    /// Decides whether `pod` may have `requested`. On success returns the resolved ARN to assume.
    pub fn decide(
        &self,
        pod: &PodFacts,
        namespace: Option<&NamespaceFacts>,
        requested: &str,
    ) -> Result<RoleArn, Denial> {
        if let Some(rules) = &self.kube2iam {
            return rules.decide(self.base_arn.as_ref(), pod, namespace, requested);
        }
        let annotated = pod.role.as_deref().filter(|r| !r.trim().is_empty());
        let annotated = annotated.ok_or(Denial::NoRoleAnnotation)?;
        let base = self.base_arn.as_ref();
        let annotated_arn = RoleArn::resolve(annotated, base).map_err(Denial::Unresolvable)?;
        let requested_arn = RoleArn::resolve(requested, base).map_err(Denial::Unresolvable)?;
        if requested_arn != annotated_arn {
            return Err(Denial::RoleMismatch {
                requested: requested.to_string(),
                annotated: annotated.to_string(),
            });
        }
        let namespace = namespace.ok_or_else(|| Denial::NamespaceUnknown(pod.namespace.to_string()))?;
        let permitted = namespace.permitted.as_ref().filter(|p| !p.expr.trim().is_empty());
        let permitted = permitted.ok_or_else(|| Denial::NamespaceUnset(annotated_arn.to_string()))?;
        match permitted.regex(self.strict_namespace_regexp) {
            Err(error) => {
                Err(Denial::NamespaceInvalid { expr: permitted.expr.clone(), error: error.to_string() })
            }
            Ok(re) if re.is_match(annotated_arn.as_str()) => Ok(annotated_arn),
            Ok(_) => Err(Denial::NamespaceForbids {
                expr: permitted.expr.clone(),
                arn: annotated_arn.to_string(),
                hint: self.name_only(permitted),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Permitted;

    fn policy(strict: bool) -> Policy {
        Policy {
            base_arn: Some(BaseArn::parse("arn:aws:iam::123456789012:role/").expect("base")),
            strict_namespace_regexp: strict,
            kube2iam: None,
            session_tags: None,
            source_identity: false,
            service_account_roles: false,
        }
    }

    fn pod(role: Option<&str>) -> PodFacts {
        PodFacts::test("team-a", "web", "10.0.0.5", role)
    }

    fn ns(permitted: Option<&str>) -> NamespaceFacts {
        NamespaceFacts {
            name: "team-a".into(),
            permitted: permitted.map(Permitted::new),
            allowed_roles: None,
            session_policy: None,
        }
    }

    #[test]
    fn decisions() {
        let arn = "arn:aws:iam::123456789012:role/app";
        type Case<'a> = (Option<&'a str>, Option<&'a str>, &'a str, bool, Result<&'a str, &'a str>);
        let table: Vec<Case> = vec![
            (Some("app"), Some(".*"), "app", true, Ok(arn)),
            (Some("app"), Some(".*"), arn, true, Ok(arn)),
            (Some(arn), Some(".*/app"), "app", true, Ok(arn)),
            (Some("app"), Some("app"), "app", true, Err("forbids role")),
            (Some("app"), Some("app"), "app", false, Ok(arn)),
            (Some("app"), Some("x|.*app"), "app", true, Ok(arn)),
            (Some("app"), Some("arn:.*|zzz"), "app", true, Ok(arn)),
            (Some("app"), Some("zzz|y"), "app", true, Err("forbids role")),
            (Some("app"), None, "app", true, Err("'(empty)'")),
            (Some("app"), Some(""), "app", true, Err("'(empty)'")),
            (Some("app"), Some("("), "app", true, Err("invalid")),
            (Some("app"), Some(".*"), "other", true, Err("requested 'other'")),
            (None, Some(".*"), "app", true, Err("no iam.amazonaws.com/role")),
            (
                Some("team/app"),
                Some(".*role/team/.*"),
                "team/app",
                true,
                Ok("arn:aws:iam::123456789012:role/team/app"),
            ),
        ];
        for (role, permitted, requested, strict, want) in table {
            let got = policy(strict).decide(&pod(role), Some(&ns(permitted)), requested);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_str(), w),
                (Err(w), Err(g)) => assert!(g.to_string().contains(w), "{g} should contain {w}"),
                (w, g) => panic!("{role:?} {permitted:?} {requested}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn strict_anchoring_groups_alternatives() {
        // kiam's `^` + "a|.*x" + `$` would let any ARN ending in x through the second branch only
        // when anchored at the end; with the group both branches are anchored at both ends.
        let got = policy(true).decide(&pod(Some("app")), Some(&ns(Some("role/app|nothing"))), "app");
        assert!(matches!(got, Err(Denial::NamespaceForbids { .. })), "{got:?}");
    }

    #[test]
    fn a_role_name_expression_is_denied_with_the_arn_form() {
        let got = policy(true).decide(
            &pod(Some("k8s-production-web")),
            Some(&ns(Some("k8s-production-.*"))),
            "k8s-production-web",
        );
        let Err(denial @ Denial::NamespaceForbids { .. }) = got else { panic!("{got:?}") };
        assert_eq!(
            denial.to_string(),
            "namespace policy expression 'k8s-production-.*' forbids role \
             'arn:aws:iam::123456789012:role/k8s-production-web'; it can only match role names, but kiam v4 \
             matches the role's full ARN, so it denies every role: write \
             'arn:aws:iam::123456789012:role/k8s-production-.*'"
        );
        // Unanchored, the same expression matches inside the ARN: no pitfall.
        let loose = policy(false).decide(
            &pod(Some("k8s-production-web")),
            Some(&ns(Some("k8s-production-.*"))),
            "k8s-production-web",
        );
        assert!(loose.is_ok(), "{loose:?}");
        // An ARN-shaped expression that denies says nothing more.
        let other = policy(true).decide(&pod(Some("app")), Some(&ns(Some("arn:.*:role/web"))), "app");
        assert!(matches!(other, Err(Denial::NamespaceForbids { hint: None, .. })), "{other:?}");
    }

    #[test]
    fn unknown_namespace_denies() {
        let got = policy(true).decide(&pod(Some("app")), None, "app");
        assert_eq!(got, Err(Denial::NamespaceUnknown("team-a".into())));
    }
}
