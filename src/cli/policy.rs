//! The flags that decide who gets which role, shared by `kiam server` and `kiam explain`, so
//! that explain's verdict is the server's when both get the same flags (or environment).

use clap::Args;

use crate::model::BaseArn;
use crate::policy::Policy;
use crate::policy::session::{SessionTags, TagKey};

/// `--role-base-arn[-autodetect]`, `--disable-strict-namespace-regexp`, `--session` and
/// `--agent-node-binding`.
#[derive(Clone, Debug, Args)]
pub struct PolicyArgs {
    /// Prefix that completes role names that are not ARNs, e.g. arn:aws:iam::123456789012:role/.
    #[arg(long, env = "KIAM_ROLE_BASE_ARN")]
    pub role_base_arn: Option<String>,
    /// Take the base ARN from the node's instance profile (over IMDSv2); wins over --role-base-arn.
    #[arg(long, env = "KIAM_ROLE_BASE_ARN_AUTODETECT")]
    pub role_base_arn_autodetect: bool,
    /// Answer an agent only about pods on the node its client certificate names, in a
    /// `urn:kiam:node:<node-name>` URI SAN (off by default, for kiam compatibility).
    #[arg(long, env = "KIAM_AGENT_NODE_BINDING")]
    pub agent_node_binding: bool,
    /// Match the namespace's permitted expression anywhere in the ARN instead of anchoring it.
    #[arg(long, env = "KIAM_DISABLE_STRICT_NAMESPACE_REGEXP")]
    pub disable_strict_namespace_regexp: bool,
    /// Default session-name suffix (sessions are named kiam-<session>).
    #[arg(long, env = "KIAM_SESSION", default_value = "kiam")]
    pub session: String,
    /// STS session tags to set, comma-separated, from EKS Pod Identity's keys: eks-cluster-arn,
    /// eks-cluster-name, kubernetes-namespace, kubernetes-service-account, kubernetes-pod-name,
    /// kubernetes-pod-uid (marked transitive). Off by default. The pod tags make every pod its
    /// own identity: one STS call per pod instead of per role.
    #[arg(long, env = "KIAM_SESSION_TAGS", value_delimiter = ',')]
    pub session_tags: Vec<String>,
    /// A pod without the role annotation takes the role its ServiceAccount names
    /// (`eks.amazonaws.com/role-arn`, IRSA's key, or `iam.amazonaws.com/role`); the pod's own
    /// annotation wins. Watches ServiceAccounts (RBAC: list and watch serviceaccounts).
    #[arg(long, env = "KIAM_SERVICE_ACCOUNT_ROLES")]
    pub service_account_roles: bool,
    /// Every AssumeRole carries the pod's STS SourceIdentity (`<pod>@<namespace>`), which
    /// CloudTrail records on every call made with the credentials and role chaining keeps. Off by
    /// default: the pods' roles must allow sts:SetSourceIdentity (docs/aws.md). Every pod is
    /// then its own identity: one STS session per pod instead of per role.
    #[arg(long, env = "KIAM_SOURCE_IDENTITY")]
    pub source_identity: bool,
    /// The cluster's name, for the eks-cluster-name tag.
    #[arg(long, env = "KIAM_CLUSTER_NAME", default_value = "")]
    pub cluster_name: String,
    /// The cluster's ARN, for the eks-cluster-arn tag.
    #[arg(long, env = "KIAM_CLUSTER_ARN", default_value = "")]
    pub cluster_arn: String,
}

impl PolicyArgs {
    /// The policy the flags describe. The base ARN is `None` when `--role-base-arn` is unset or
    /// empty; with `--role-base-arn-autodetect` the caller fills it in at start-up.
    pub fn policy(&self) -> Result<Policy, String> {
        let base = self.role_base_arn.as_deref().filter(|s| !s.is_empty());
        let base_arn = base.map(BaseArn::parse).transpose().map_err(|e| format!("--role-base-arn: {e}"))?;
        let keys = self
            .session_tags
            .iter()
            .filter(|k| !k.trim().is_empty())
            .map(|k| k.parse::<TagKey>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("--session-tags: {e}"))?;
        let needs = |key: TagKey, value: &str, flag: &str| {
            if keys.contains(&key) && value.trim().is_empty() {
                Err(format!("--session-tags has {} but {flag} is not set", key.name()))
            } else {
                Ok(())
            }
        };
        needs(TagKey::ClusterName, &self.cluster_name, "--cluster-name")?;
        needs(TagKey::ClusterArn, &self.cluster_arn, "--cluster-arn")?;
        let session_tags = (!keys.is_empty()).then(|| SessionTags {
            keys,
            cluster_name: self.cluster_name.trim().to_string(),
            cluster_arn: self.cluster_arn.trim().to_string(),
        });
        Ok(Policy {
            base_arn,
            strict_namespace_regexp: !self.disable_strict_namespace_regexp,
            kube2iam: None,
            session_tags,
            service_account_roles: self.service_account_roles,
            source_identity: self.source_identity,
        })
    }
}
