//! `kiamrs.token.PodTokens`: credentials for the pod a projected ServiceAccount token is bound
//! to, for the agent's `GET /v1/credentials`. The agent proves its node ([`Identities`]); the
//! token is checked with TokenReview ([`PodTokens`](super::pod_token::PodTokens)); the core then
//! applies node binding and the same policy as kiam's IP-based calls. Refusals are logged with
//! the reason and the claimed pod, never the token.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::access::{Grant, authorize};
use super::identity::Identities;
use super::pod_token::TokenRefusal;
use super::service::{Rpc, pod_wait, status};
use crate::core::{Core, TokenAsk};
use crate::creds::AssumeRole;
use crate::creds::wire::token_reply;
use crate::pb::token as pb;
use crate::policy::Caller;
use crate::policy::access;

/// The service over a server's core.
pub struct PodTokenService<A> {
    core: Arc<Core<A>>,
    identities: Arc<Identities>,
    node_binding: bool,
}

impl<A> PodTokenService<A> {
    /// Answers from `core` for agents proven by `identities` (`node_binding` as the server's; a
    /// token's pod must be on the proven node either way).
    pub fn new(core: Arc<Core<A>>, identities: Arc<Identities>, node_binding: bool) -> Self {
        PodTokenService { core, identities, node_binding }
    }
}

/// The status for a token that proves no pod.
fn refusal(refusal: &TokenRefusal) -> Status {
    match refusal {
        TokenRefusal::RateLimited => Status::resource_exhausted(refusal.to_string()),
        TokenRefusal::Api(_) => Status::internal(refusal.to_string()),
        TokenRefusal::Unsupported => Status::unimplemented(refusal.to_string()),
        _ => Status::unauthenticated(refusal.to_string()),
    }
}

#[tonic::async_trait]
impl<A: AssumeRole> pb::pod_tokens_server::PodTokens for PodTokenService<A> {
    async fn credentials(
        &self,
        request: Request<pb::TokenCredentialsRequest>,
    ) -> Result<Response<pb::TokenCredentialsReply>, Status> {
        let grant =
            authorize(&request, access::Rpc::TokenCredentials, self.node_binding, Some(&self.identities))
                .await;
        // The table grants tokens only bound to a proven node: never to a debug certificate.
        let node = match grant.map_err(|denied| denied.status())? {
            Grant::Pods(Caller::Node(node)) => node,
            _ => return Err(Status::permission_denied("no node proven")),
        };
        let wait = pod_wait(&request);
        let pb::TokenCredentialsRequest { token, source } = request.into_inner();
        // An agent that does not say where the request came from cannot have it checked.
        let Ok(source_ip) = source.parse::<std::net::IpAddr>() else {
            return Err(Status::invalid_argument("no source address: the agent is older than the server"));
        };
        let verifier = self.identities.pod_tokens().ok_or_else(|| refusal(&TokenRefusal::Unsupported))?;
        let claims = match verifier.verify(&node, &source, &token).await {
            Ok(claims) => claims,
            Err(err) => {
                tracing::info!(%node, error = %err, "pod token refused");
                return Err(refusal(&err));
            }
        };
        let ask = TokenAsk {
            namespace: claims.namespace,
            name: claims.pod_name,
            uid: claims.pod_uid,
            caller: Caller::Node(node),
            wait,
            source: source_ip,
        };
        match self.core.token_credentials(&ask).await {
            Ok((_, creds, role_arn)) => Ok(Response::new(token_reply(creds.to_document(), role_arn))),
            Err(err) => {
                let pod = format!("{}/{}", ask.namespace, ask.name);
                tracing::info!(%pod, error = %err, "credentials by pod token refused");
                Err(status(&err, Rpc::Credentials))
            }
        }
    }
}
