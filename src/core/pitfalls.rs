//! The server's warning about the kiam v4 migration pitfall: a namespace whose `permitted`
//! expression could only ever match role names (`k8s-production-.*`) denies every role, because
//! kiam v4 (and kiam-rs) match it against the full ARN. Logged once per namespace and expression,
//! when the namespace is first listed or changes its expression; the detection itself is the
//! pure [`Policy::name_only`].

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use crate::model::NamespaceFacts;
use crate::policy::Policy;

/// The most (namespace, expression) pairs remembered; past it the memory starts over, so a
/// namespace whose expression flaps warns again rather than memory growing without bound.
const REMEMBERED: usize = 10_000;

/// Warns about each (namespace, expression) pair once.
pub struct NameOnlyWarnings {
    policy: Policy,
    /// Pairs already looked at, warned about or not, so each is decided once.
    seen: Mutex<HashSet<(String, String)>>,
}

impl NameOnlyWarnings {
    /// Warnings under `policy` (its base ARN completes the suggestion; unanchored matching has
    /// no pitfall).
    pub fn new(policy: Policy) -> NameOnlyWarnings {
        NameOnlyWarnings { policy, seen: Mutex::default() }
    }

    /// Looks at `namespace`; logs a warning and returns the ARN form to write the first time
    /// its expression is seen to match role names only, else `None`.
    pub fn check(&self, namespace: &NamespaceFacts) -> Option<String> {
        let permitted = namespace.permitted.as_ref()?;
        let key = (namespace.name.clone(), permitted.expr.clone());
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= REMEMBERED {
                seen.clear();
            }
            if !seen.insert(key) {
                return None;
            }
        }
        let form = self.policy.name_only(permitted)?;
        tracing::warn!(
            namespace = %namespace.name,
            permitted = %permitted.expr,
            arn_form = %form,
            "iam.amazonaws.com/permitted can only match role names, but kiam v4 matches the role's full \
             ARN, so this namespace denies every role: write arn_form instead"
        );
        Some(form)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Permitted;

    fn ns(name: &str, permitted: &str) -> NamespaceFacts {
        NamespaceFacts {
            name: name.into(),
            permitted: Some(Permitted::new(permitted)),
            allowed_roles: None,
            session_policy: None,
        }
    }

    #[test]
    fn once_per_namespace_and_expression() {
        let warnings = NameOnlyWarnings::new(Policy::test());
        let form = "arn:aws:iam::123456789012:role/k8s-production-.*";
        assert_eq!(warnings.check(&ns("production", "k8s-production-.*")).as_deref(), Some(form));
        assert_eq!(warnings.check(&ns("production", "k8s-production-.*")), None, "said once");
        assert!(warnings.check(&ns("staging", "k8s-production-.*")).is_some(), "another namespace");
        assert!(warnings.check(&ns("production", "k8s-prod-.*")).is_some(), "another expression");
        assert_eq!(warnings.check(&ns("fixed", form)), None, "the ARN form is fine");
        assert_eq!(
            warnings.check(&NamespaceFacts {
                name: "none".into(),
                permitted: None,
                allowed_roles: None,
                session_policy: None
            }),
            None
        );
    }

    #[test]
    fn nothing_to_say_when_matching_anywhere() {
        let warnings = NameOnlyWarnings::new(Policy {
            base_arn: None,
            strict_namespace_regexp: false,
            kube2iam: None,
            session_tags: None,
            source_identity: false,
            service_account_roles: false,
        });
        assert_eq!(warnings.check(&ns("production", "k8s-production-.*")), None);
    }
}
