//! `kiamrs.debug.Debug`: what the credentials cache holds for one identity, for `kiam explain`.
//!
//! It lives on the server's listener, behind the same mutual TLS as `KiamService`, and answers
//! only certificates with the debug role, a `urn:kiam:role:debug` URI SAN
//! ([`crate::tls::x509::DEBUG_ROLE_URI`]), which `KiamService` refuses in turn: an agent's
//! certificate cannot probe the cache (confirming guesses of an external ID, say), and an
//! operator's cannot fetch credentials. With node binding on, a debug certificate must also name
//! a node (`urn:kiam:node:<name>`), and is answered only about identities that a live pod on that
//! node uses. The answer is times, flags and the last STS error for an identity the caller names
//! in full (role ARN, session name, external ID, session tags and session policy, as the cache
//! keys it); it never carries credentials, and the external ID is neither logged nor returned.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tonic::{Request, Response, Status};

use super::access::{Grant, authorize};
use crate::core::Core;
use crate::creds::cache::EntryState;
use crate::creds::{Identity, time};
use crate::model::RoleArn;
use crate::pb::debug::{CacheStateReply, CacheStateRequest, debug_server};
use crate::policy::access::{Refusal, Rpc};

/// The `Debug` service over a server's [`Core`].
pub struct DebugService<A> {
    core: Arc<Core<A>>,
    node_binding: bool,
}

impl<A> DebugService<A> {
    /// Answers from `core`'s credentials cache; with `node_binding`, only about identities used
    /// on the node the caller's certificate names.
    pub fn new(core: Arc<Core<A>>, node_binding: bool) -> Self {
        DebugService { core, node_binding }
    }
}

impl<A: crate::creds::AssumeRole> DebugService<A> {
    /// Whether a caller granted cache state on `node` (any node: `None`) may ask about
    /// `identity`.
    fn authorise(&self, node: Option<&str>, identity: &Identity) -> Result<(), Status> {
        let Some(node) = node else {
            return Ok(());
        };
        let mut used_on_node = false;
        self.core.cluster().for_each_live_pod(|pod| {
            used_on_node |= pod.node_name.as_deref() == Some(node)
                && pod.role.as_deref().and_then(|role| self.core.identity_for(pod, role).ok()).as_ref()
                    == Some(identity);
        });
        if used_on_node {
            Ok(())
        } else {
            Err(Status::permission_denied(format!("no pod on node {node} uses this identity")))
        }
    }
}

/// The identity a request names. The role must be a full ARN: the caller resolves short names
/// with its own base ARN, so that both sides agree on the key.
fn identity(request: CacheStateRequest) -> Result<Identity, Status> {
    let role = request.role_arn.trim();
    if !role.starts_with("arn:") {
        return Err(Status::invalid_argument(format!("role_arn {role:?} is not an ARN")));
    }
    let role = RoleArn::resolve(role, None).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let mut identity = Identity::plain(role, request.session_name, request.external_id);
    identity.tags = request.tags.into_iter().map(|tag| (tag.key, tag.value)).collect();
    identity.policy = request.session_policy;
    Ok(identity)
}

/// The reply for an entry's state, or for no entry.
fn reply(state: Option<EntryState>, now: SystemTime) -> CacheStateReply {
    let stamp = |t: Option<SystemTime>| t.map(time::format).unwrap_or_default();
    let Some(state) = state else {
        return CacheStateReply { now: time::format(now), ..CacheStateReply::default() };
    };
    let remaining = state.expiration.and_then(|e| e.duration_since(state.now).ok()).unwrap_or(Duration::ZERO);
    let failures = state.failures.as_ref();
    let last = failures.and_then(|f| f.last());
    CacheStateReply {
        known: true,
        has_credentials: state.expiration.is_some(),
        issued: stamp(state.issued),
        expiration: stamp(state.expiration),
        remaining_seconds: i64::try_from(remaining.as_secs()).unwrap_or(i64::MAX),
        fresh: state.fresh,
        refresh_due: state.refresh_due,
        usable: state.usable,
        fetching: failures.is_none(),
        failures: failures.map_or(0, |f| f.count()),
        last_error_code: last.and_then(|e| e.code.clone()).unwrap_or_default(),
        last_error_message: last.map(|e| e.message.clone()).unwrap_or_default(),
        retry_at: stamp(failures.and_then(|f| f.retry_at()).filter(|at| *at > state.now)),
        now: time::format(state.now),
    }
}

#[tonic::async_trait]
impl<A: crate::creds::AssumeRole> debug_server::Debug for DebugService<A> {
    async fn cache_state(
        &self,
        request: Request<CacheStateRequest>,
    ) -> Result<Response<CacheStateReply>, Status> {
        let grant = authorize(&request, Rpc::CacheState, self.node_binding, None).await;
        let node = match grant.map_err(|denied| Status::permission_denied(denied.detail))? {
            Grant::CacheState(node) => node,
            _ => return Err(Status::permission_denied(Refusal::NotDebug.text())),
        };
        let identity = identity(request.get_ref().clone())?;
        self.authorise(node.as_deref(), &identity)?;
        let state = self.core.cache().state(&identity);
        tracing::debug!(
            role = %identity.role,
            session_name = %identity.session_name,
            external_id_set = identity.external_id.is_some(),
            known = state.is_some(),
            "CacheState"
        );
        Ok(Response::new(reply(state, SystemTime::now())))
    }
}

/// The tonic service to add to the server.
pub fn server<A: crate::creds::AssumeRole>(
    service: DebugService<A>,
) -> debug_server::DebugServer<DebugService<A>> {
    debug_server::DebugServer::new(service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::creds::cache::Failures;

    #[test]
    fn requests_need_a_full_arn() {
        let ok = CacheStateRequest {
            role_arn: "arn:aws:iam::1:role/app".into(),
            session_name: "kiam-kiam".into(),
            external_id: Some("x".into()),
            tags: vec![crate::pb::debug::SessionTag {
                key: "kubernetes-namespace".into(),
                value: "a".into(),
            }],
            session_policy: None,
        };
        let id = identity(ok.clone()).expect("an ARN");
        assert_eq!(id.role.as_str(), "arn:aws:iam::1:role/app");
        assert_eq!(id.tags, vec![("kubernetes-namespace".to_string(), "a".to_string())]);
        assert_eq!(id.external_id.as_deref(), Some("x"));
        let short = CacheStateRequest { role_arn: "app".into(), ..ok };
        assert_eq!(identity(short).map_err(|s| s.code()).err(), Some(tonic::Code::InvalidArgument));
    }

    #[test]
    fn replies_carry_times_and_flags() {
        let r = reply(None, SystemTime::UNIX_EPOCH);
        assert!(!r.known && !r.has_credentials && r.issued.is_empty());
        assert_eq!(r.now, "1970-01-01T00:00:00Z");
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(600);
        let state = EntryState {
            issued: Some(now - Duration::from_secs(60)),
            expiration: Some(now + Duration::from_secs(3540)),
            fresh: true,
            refresh_due: false,
            usable: true,
            failures: Some(Failures::default()),
            now,
        };
        let r = reply(Some(state.clone()), now);
        assert!(r.known && r.has_credentials && r.fresh && !r.fetching);
        assert_eq!((r.issued.as_str(), r.remaining_seconds), ("1970-01-01T00:09:00Z", 3540));
        assert!(r.retry_at.is_empty() && r.last_error_message.is_empty());
        let r = reply(Some(EntryState { failures: None, ..state }), now);
        assert!(r.fetching, "a held fetch lock means a fetch in flight");
    }
}
