//! The flags that decide who gets which role, shared by `kiam server` and `kiam explain`, so
//! that explain's verdict is the server's when both get the same flags (or environment).

use clap::Args;

use crate::model::BaseArn;
use crate::policy::Policy;

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
}

impl PolicyArgs {
    /// The policy the flags describe. The base ARN is `None` when `--role-base-arn` is unset or
    /// empty; with `--role-base-arn-autodetect` the caller fills it in at start-up.
    pub fn policy(&self) -> Result<Policy, String> {
        let base = self.role_base_arn.as_deref().filter(|s| !s.is_empty());
        let base_arn = base.map(BaseArn::parse).transpose().map_err(|e| format!("--role-base-arn: {e}"))?;
        Ok(Policy {
            base_arn,
            strict_namespace_regexp: !self.disable_strict_namespace_regexp,
            kube2iam: None,
        })
    }
}
