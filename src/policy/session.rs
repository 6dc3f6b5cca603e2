//! What a session carries besides its role: STS session tags (`--session-tags`, compatible with
//! EKS Pod Identity's keys, marked transitive as EKS marks them) and an inline session policy from
//! a pod or namespace annotation, which can only narrow the role. Both are part of the cache key,
//! and both are checked against STS's limits here, so a pod whose request STS would refuse is
//! denied with a reason (and an Event) instead of failing at STS.

use std::str::FromStr;

use crate::model::{NamespaceFacts, PodFacts};

/// The longest inline session policy STS accepts, in characters.
pub const MAX_POLICY: usize = 2048;
/// STS's limits on session tags: count, key and value length; and a conservative bound on their
/// packed size (STS packs tags and the policy together and states no exact figure).
pub const MAX_TAGS: usize = 50;
pub const MAX_KEY: usize = 128;
pub const MAX_VALUE: usize = 256;
pub const MAX_TAG_CHARS: usize = 1800;

/// A session tag kiam-rs can set, by EKS Pod Identity's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TagKey {
    ClusterArn,
    ClusterName,
    Namespace,
    ServiceAccount,
    PodName,
    PodUid,
}

impl TagKey {
    /// Every tag kiam-rs can set.
    pub const ALL: [TagKey; 6] = [
        TagKey::ClusterArn,
        TagKey::ClusterName,
        TagKey::Namespace,
        TagKey::ServiceAccount,
        TagKey::PodName,
        TagKey::PodUid,
    ];

    /// The tag key as STS receives it.
    pub fn name(self) -> &'static str {
        match self {
            TagKey::ClusterArn => "eks-cluster-arn",
            TagKey::ClusterName => "eks-cluster-name",
            TagKey::Namespace => "kubernetes-namespace",
            TagKey::ServiceAccount => "kubernetes-service-account",
            TagKey::PodName => "kubernetes-pod-name",
            TagKey::PodUid => "kubernetes-pod-uid",
        }
    }

    /// Whether the tag differs per pod, making every pod its own identity (one STS call each).
    pub fn per_pod(self) -> bool {
        matches!(self, TagKey::PodName | TagKey::PodUid)
    }
}

impl FromStr for TagKey {
    type Err = String;
    fn from_str(s: &str) -> Result<TagKey, String> {
        TagKey::ALL.into_iter().find(|k| k.name() == s.trim()).ok_or_else(|| {
            let names: Vec<&str> = TagKey::ALL.iter().map(|k| k.name()).collect();
            format!("unknown session tag {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// `--session-tags`, `--cluster-name` and `--cluster-arn`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionTags {
    pub keys: Vec<TagKey>,
    pub cluster_name: String,
    pub cluster_arn: String,
}

impl SessionTags {
    /// The tags for `pod`, sorted by key, or why STS would refuse them.
    pub fn for_pod(&self, pod: &PodFacts) -> Result<Vec<(String, String)>, String> {
        let mut tags: Vec<(String, String)> = self
            .keys
            .iter()
            .map(|key| {
                let value = match key {
                    TagKey::ClusterArn => self.cluster_arn.clone(),
                    TagKey::ClusterName => self.cluster_name.clone(),
                    TagKey::Namespace => pod.namespace.to_string(),
                    TagKey::ServiceAccount => pod.service_account.as_deref().unwrap_or("default").to_string(),
                    TagKey::PodName => pod.name.to_string(),
                    TagKey::PodUid => pod.uid.to_string(),
                };
                (key.name().to_string(), value)
            })
            .collect();
        tags.sort();
        tags.dedup();
        check_tags(&tags)?;
        Ok(tags)
    }
}

/// STS's rules for tags: count, lengths, characters, and the packed-size bound.
pub fn check_tags(tags: &[(String, String)]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("{} session tags, over STS's {MAX_TAGS}", tags.len()));
    }
    let allowed = |c: char| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c);
    let mut total = 0;
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > MAX_KEY || value.chars().count() > MAX_VALUE {
            return Err(format!("session tag {key:?} is longer than STS allows ({MAX_KEY}/{MAX_VALUE})"));
        }
        if !key.chars().chain(value.chars()).all(allowed) {
            return Err(format!("session tag {key:?} has characters STS refuses"));
        }
        total += key.len() + value.len();
    }
    if total > MAX_TAG_CHARS {
        return Err(format!(
            "session tags total {total} characters, over the {MAX_TAG_CHARS} kept under STS's packed size"
        ));
    }
    Ok(())
}

/// Parses an inline session policy annotation: a JSON object of at most [`MAX_POLICY`]
/// characters, returned minified (as STS receives it).
pub fn parse_policy(text: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("session policy is not JSON: {e}"))?;
    if !value.is_object() {
        return Err("session policy is not a JSON object".into());
    }
    let minified = value.to_string();
    if minified.chars().count() > MAX_POLICY {
        return Err(format!(
            "session policy has {} characters, over STS's {MAX_POLICY}",
            minified.chars().count()
        ));
    }
    Ok(minified)
}

/// Why a pod's session may carry no policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyError {
    /// The pod's or the namespace's annotation is not a policy STS would take.
    Invalid(String),
    /// The pod brings its own policy into a namespace that sets one (a ceiling).
    Ceiling,
}

/// The session policy for `pod`, or why it may have none.
///
/// A namespace's policy is a ceiling for every pod in it, so it always applies. STS intersects
/// the role's permissions with the session policies, but its session policies (the one inline
/// `Policy` and the managed `PolicyArns`) are not intersected with one another: an `Allow` in any
/// of them counts. Sending the pod's policy beside the namespace's would therefore widen the
/// ceiling to their union, and STS offers no way to intersect two documents. So a pod that
/// brings its own policy into a namespace that sets one is refused ([`PolicyError::Ceiling`]:
/// an Event and a 403), never served with one of the two silently dropped. A pod alone, or a
/// namespace alone, sends its own; an invalid namespace policy refuses every pod of the
/// namespace, whatever the pod says.
pub fn policy_for(pod: &PodFacts, namespace: Option<&NamespaceFacts>) -> Result<Option<String>, PolicyError> {
    match (pod.session_policy(), namespace.and_then(|n| n.session_policy.as_ref())) {
        (None, None) => Ok(None),
        (_, Some(Err(error))) => Err(PolicyError::Invalid(format!("the namespace's {error}"))),
        (Some(_), Some(Ok(_))) => Err(PolicyError::Ceiling),
        (None, Some(Ok(policy))) | (Some(Ok(policy)), None) => Ok(Some(policy.clone())),
        (Some(Err(error)), None) => Err(PolicyError::Invalid(error.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(keys: &[TagKey]) -> SessionTags {
        SessionTags {
            keys: keys.to_vec(),
            cluster_name: "prod".into(),
            cluster_arn: "arn:aws:eks:eu-west-1:123456789012:cluster/prod".into(),
        }
    }

    #[test]
    fn tags_follow_eks_keys_and_sts_limits() {
        let pod = PodFacts {
            service_account: Some("web-sa".into()),
            ..PodFacts::test("team-a", "web", "10.0.0.5", Some("r"))
        };
        let all = tags(&TagKey::ALL);
        let got = all.for_pod(&pod).expect("valid");
        assert_eq!(got.len(), 6);
        assert!(got.contains(&("kubernetes-service-account".into(), "web-sa".into())));
        assert!(
            got.contains(&(
                "eks-cluster-arn".into(),
                "arn:aws:eks:eu-west-1:123456789012:cluster/prod".into()
            ))
        );
        let long = PodFacts { name: "x".repeat(300).into(), ..pod.clone() };
        assert!(tags(&[TagKey::PodName]).for_pod(&long).is_err(), "value over 256");
        let odd = PodFacts { namespace: "ns#1".into(), ..pod };
        assert!(tags(&[TagKey::Namespace]).for_pod(&odd).is_err(), "a character STS refuses");
        assert!("kubernetes-pod-name".parse::<TagKey>().is_ok() && "nope".parse::<TagKey>().is_err());
    }

    #[test]
    fn session_policies_are_json_objects_within_the_limit() {
        assert_eq!(parse_policy(r#"{ "Version": "2012-10-17" }"#), Ok(r#"{"Version":"2012-10-17"}"#.into()));
        assert!(parse_policy("[1]").is_err());
        assert!(parse_policy("{").is_err());
        let big = format!(r#"{{"Sid":"{}"}}"#, "x".repeat(MAX_POLICY));
        assert!(parse_policy(&big).is_err());
    }

    #[test]
    fn the_namespace_policy_is_a_ceiling_a_pod_cannot_replace() {
        let narrow = r#"{"Statement":[{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}]}"#;
        let wide = r#"{"Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
        let ns = |policy: Option<Result<String, String>>| NamespaceFacts {
            name: "team-a".into(),
            session_policy: policy,
            ..NamespaceFacts::default()
        };
        let pod = |policy: Option<Result<String, String>>| {
            PodFacts::test("team-a", "web", "10.0.0.5", Some("r")).with_extras(|e| e.session_policy = policy)
        };
        let ok = |p: &str| Some(Ok(p.to_string()));
        let bad = Some(Err("session policy is not JSON".to_string()));
        assert_eq!(policy_for(&pod(None), Some(&ns(None))), Ok(None));
        assert_eq!(policy_for(&pod(None), None), Ok(None));
        assert_eq!(policy_for(&pod(ok(narrow)), Some(&ns(None))), Ok(Some(narrow.into())));
        assert_eq!(policy_for(&pod(None), Some(&ns(ok(narrow)))), Ok(Some(narrow.into())));
        // The attack: a pod's own policy must not replace (or widen) the namespace's.
        assert_eq!(policy_for(&pod(ok(wide)), Some(&ns(ok(narrow)))), Err(PolicyError::Ceiling));
        assert_eq!(
            policy_for(&pod(ok(narrow)), Some(&ns(ok(narrow)))),
            Err(PolicyError::Ceiling),
            "even an equal one"
        );
        assert_eq!(policy_for(&pod(bad.clone()), Some(&ns(ok(narrow)))), Err(PolicyError::Ceiling));
        // An invalid namespace policy refuses every pod, a pod's valid policy included.
        assert!(policy_for(&pod(ok(wide)), Some(&ns(bad.clone()))).is_err());
        assert!(policy_for(&pod(None), Some(&ns(bad.clone()))).is_err());
        assert!(policy_for(&pod(bad), Some(&ns(None))).is_err());
    }
}
