//! `kiamrs.token.PodTokens`: credentials for the pod a projected ServiceAccount token is bound
//! to, for the agent's `GET /v1/credentials`. The agent proves its node ([`Identities`]); the
//! token is checked with TokenReview ([`PodTokens`](super::pod_token::PodTokens)); the core then
//! applies node binding and the same policy as kiam's IP-based calls. Refusals are logged with
//! the reason and the claimed pod, never the token.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::identity::Identities;
use super::pod_token::TokenRefusal;
use super::service::{Rpc, pod_wait, status};
use crate::core::{Core, TokenAsk};
use crate::creds::AssumeRole;
use crate::creds::wire::token_reply;
use crate::pb::token as pb;
use crate::policy::Caller;

/// The service over a server's core.
pub struct PodTokenService<A> {
    core: Arc<Core<A>>,
    identities: Arc<Identities>,
}

impl<A> PodTokenService<A> {
    /// Answers from `core` for agents proven by `identities`.
    pub fn new(core: Arc<Core<A>>, identities: Arc<Identities>) -> Self {
        PodTokenService { core, identities }
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
        let node = self.identities.node(&request).await.map_err(Status::unauthenticated)?;
        let wait = pod_wait(&request);
        let token = request.into_inner().token;
        let verifier = self.identities.pod_tokens().ok_or_else(|| refusal(&TokenRefusal::Unsupported))?;
        let claims = match verifier.verify(&node, &token).await {
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
