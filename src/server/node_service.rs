//! `kiamrs.node.NodeView`: the node view streamed to agents, and the credentials call they fetch
//! ahead of need with. Every call is authorised for the node the agent proves
//! ([`Identities`]), and rate-limited per node.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use super::access::authorize;
use super::identity::Identities;
use super::service::{Rpc, pod_wait, status};
use super::view::{self, Hub};
use crate::core::{Ask, Core, parse_ip};
use crate::creds::AssumeRole;
use crate::pb::node::{self as pb, agent_message};
use crate::policy::Caller;
use crate::policy::access;

/// Messages a slow agent may have waiting before its subscriber task waits for it. Each waits
/// boxed ([`view::Outgoing`]), so the buffer's slots, allocated 32 at a time, cost 8 bytes each.
const STREAM_BUFFER: usize = 64;
/// New streams one node may open per second.
const WATCHES_PER_SECOND: u32 = 5;
/// Credentials calls one node may make per second.
const CREDENTIALS_PER_SECOND: u32 = 1000;

/// Fixed one-second windows of calls per node and kind.
#[derive(Default)]
struct Limiter(Mutex<HashMap<(String, bool), (Instant, u32)>>);

impl Limiter {
    fn allow(&self, node: &str, watch: bool, per_second: u32) -> bool {
        let mut windows = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if windows.len() > 10_000 {
            windows.retain(|_, (start, _)| start.elapsed() < Duration::from_secs(1));
        }
        let window = windows.entry((node.to_string(), watch)).or_insert((Instant::now(), 0));
        if window.0.elapsed() >= Duration::from_secs(1) {
            *window = (Instant::now(), 0);
        }
        window.1 += 1;
        window.1 <= per_second
    }
}

/// The service over a server's core and hub.
pub struct NodeViewService<A> {
    core: Arc<Core<A>>,
    hub: Arc<Hub>,
    identities: Arc<Identities>,
    node_binding: bool,
    limiter: Limiter,
    shutdown: CancellationToken,
}

impl<A> NodeViewService<A> {
    /// Serves `core`'s view through `hub` until `shutdown` (`node_binding` as the server's;
    /// the view is bound to the proven node either way).
    pub fn new(
        core: Arc<Core<A>>,
        hub: Arc<Hub>,
        identities: Arc<Identities>,
        node_binding: bool,
        shutdown: CancellationToken,
    ) -> Self {
        NodeViewService { core, hub, identities, node_binding, limiter: Limiter::default(), shutdown }
    }

    async fn node<T>(&self, request: &Request<T>, watch: bool) -> Result<String, Status> {
        let rpc = if watch { access::Rpc::ViewWatch } else { access::Rpc::ViewCredentials };
        let grant = authorize(request, rpc, self.node_binding, Some(&self.identities)).await;
        let grant = grant.map_err(|denied| denied.status())?;
        // The table grants the node view only bound to a proven node.
        let node = grant.node().ok_or_else(|| Status::permission_denied("no node proven"))?.to_string();
        let per_second = if watch { WATCHES_PER_SECOND } else { CREDENTIALS_PER_SECOND };
        if !self.limiter.allow(&node, watch, per_second) {
            return Err(Status::resource_exhausted(format!("node {node} is over its rate")));
        }
        Ok(node)
    }
}

type ViewStream = Pin<Box<dyn Stream<Item = Result<pb::ViewMessage, Status>> + Send>>;

#[tonic::async_trait]
impl<A: AssumeRole> pb::node_view_server::NodeView for NodeViewService<A> {
    type WatchStream = ViewStream;

    async fn watch(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<ViewStream>, Status> {
        let node = self.node(&request, true).await?;
        let mut incoming = request.into_inner();
        let first = incoming.next().await.ok_or_else(|| Status::invalid_argument("no Subscribe"))??;
        let Some(agent_message::Kind::Subscribe(subscribe)) = first.kind else {
            return Err(Status::invalid_argument("the first message must be Subscribe"));
        };
        if !subscribe.node.is_empty() && subscribe.node != node {
            return Err(Status::permission_denied(format!(
                "the agent claims node {:?} but proves node {node:?}",
                subscribe.node
            )));
        }
        let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
        let subscriber = self
            .hub
            .subscribe(&node, tx, &self.shutdown)
            .ok_or_else(|| Status::resource_exhausted(format!("node {node} holds its most streams")))?;
        tracing::info!(%node, "node view: agent subscribed");
        let (hub, acks) = (Arc::clone(&self.hub), Arc::clone(&subscriber));
        crate::task::spawn_until(&subscriber.cancel, async move {
            while let Some(Ok(message)) = incoming.next().await {
                if let Some(agent_message::Kind::Ack(ack)) = message.kind {
                    acks.ack(ack.fence);
                }
            }
            hub.drop_subscriber(&acks);
        });
        tokio::spawn(view::feed(Arc::clone(&self.core), Arc::clone(&self.hub), subscriber));
        let stream = futures::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|m| m.map(|m| Ok(*m))));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn credentials(
        &self,
        request: Request<pb::CredentialsRequest>,
    ) -> Result<Response<pb::CredentialsReply>, Status> {
        let node = self.node(&request, false).await?;
        let wait = pod_wait(&request);
        let pb::CredentialsRequest { ip, uid, role } = request.into_inner();
        let result = async {
            let mut ask = Ask::new(parse_ip(&ip)?, Caller::Node(node), wait);
            ask.uid = Some(uid);
            self.core.pod_credentials(&ask, &role).await
        };
        match result.await {
            Ok((_, creds)) => Ok(Response::new(creds.to_document().into())),
            Err(err) => {
                tracing::info!(pod.ip = %ip, pod.iam.role = %role, error = %err, "node view credentials refused");
                Err(status(&err, Rpc::Credentials))
            }
        }
    }
}
