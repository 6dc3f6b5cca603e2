//! The server side of [`crate::policy::access`]: which kind of caller a request comes from (its
//! client certificate, then its token where the table says a token matters), and the table's
//! answer for it, with the node it proves. Every service calls [`authorize`] first.

use tonic::{Request, Status};

use super::identity::Identities;
use crate::policy::Caller;
use crate::policy::access::{self, Access, Refusal, Rpc, Scope, Who};
use crate::tls::x509;

/// What the table grants a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Pods' roles, views or credentials, for this caller as node binding sees it
    /// ([`Caller::Any`] or [`Caller::Node`]).
    Pods(Caller),
    /// The health answer.
    Health,
    /// Cache state of identities used anywhere (`None`) or on this node.
    CacheState(Option<String>),
}

impl Grant {
    /// The node a pod grant is bound to, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Grant::Pods(Caller::Node(node)) => Some(node),
            Grant::CacheState(node) => node.as_deref(),
            _ => None,
        }
    }
}

/// Why the table refuses a call, with the detail worth telling the caller (a token's refusal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denied {
    pub refusal: Refusal,
    pub detail: String,
}

impl Denied {
    /// The status for services that need a proven node: `Unauthenticated` when none is proven
    /// (the agent then shows the reason), `PermissionDenied` otherwise.
    pub fn status(&self) -> Status {
        match self.refusal {
            Refusal::NoNode => Status::unauthenticated(self.detail.clone()),
            _ => Status::permission_denied(self.detail.clone()),
        }
    }
}

/// The kind of caller `request` comes from and the node it proves, checking its token only
/// when that changes the answer for `rpc`.
async fn who<T>(
    request: &Request<T>,
    rpc: Rpc,
    binding: bool,
    identities: Option<&Identities>,
) -> (Who, Option<String>, Option<String>) {
    let certs = request.peer_certs();
    let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
    let node = leaf.and_then(x509::node_name);
    let kind = access::certificate_kind(
        leaf.is_some(),
        leaf.is_some_and(x509::has_unknown_role),
        leaf.is_some_and(x509::is_debug),
        node.is_some(),
    );
    if kind != Who::Agent || !access::token_matters(rpc, binding) {
        return (kind, node, None);
    }
    let proven = match identities {
        Some(identities) => identities.token_node(request).await,
        None => Err("this service does not check tokens".into()),
    };
    match proven {
        Ok(node) => (Who::TokenNode, Some(node), None),
        Err(error) => (Who::Agent, None, Some(error)),
    }
}

/// The table's answer for `request` on `rpc`.
pub async fn authorize<T>(
    request: &Request<T>,
    rpc: Rpc,
    binding: bool,
    identities: Option<&Identities>,
) -> Result<Grant, Denied> {
    let (kind, node, token_error) = who(request, rpc, binding, identities).await;
    let bound = |node: Option<String>| {
        node.ok_or(Denied { refusal: Refusal::NoNode, detail: Refusal::NoNode.text().into() })
    };
    match access::access(rpc, binding, kind) {
        Access::Pods(Scope::Cluster) => Ok(Grant::Pods(Caller::Any)),
        Access::Pods(Scope::OwnNode) => Ok(Grant::Pods(Caller::Node(bound(node)?))),
        Access::Health => Ok(Grant::Health),
        Access::CacheState(Scope::Cluster) => Ok(Grant::CacheState(None)),
        Access::CacheState(Scope::OwnNode) => Ok(Grant::CacheState(Some(bound(node)?))),
        Access::Refused(refusal) => {
            let detail = match (refusal, token_error) {
                (Refusal::NoNode, Some(error)) => error,
                _ => refusal.text().to_string(),
            };
            if kind == Who::Agent && refusal == Refusal::NoNode {
                tracing::info!(%detail, ?rpc, "the caller proves no node");
            }
            Err(Denied { refusal, detail })
        }
    }
}
