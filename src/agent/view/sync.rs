//! Keeping the node view current: the stream from the servers (snapshot, changes, fences
//! acknowledged at once), and the fetcher that gets each allowed pod's credentials ahead of need
//! and renews them at half-life.
//!
//! A server without the `NodeView` service (a kiam server, or ours with `--disable-node-view`),
//! or one that cannot tell which node this agent is on, answers the stream with an error: the
//! agent then uses kiam's unary calls for every request, and asks for the stream again later.
//! When the stream breaks, the agent reconnects (to another server behind `--server-address`)
//! and resynchronises from a fresh snapshot, serving what it holds meanwhile.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{NodeView, ViewEntry};
use crate::client::GrpcClient;
use crate::creds::ImdsDocument;
use crate::pb::node::{self as pb, agent_message, view_message};

/// How long the agent uses unary calls before asking a server for the stream again.
const FALLBACK_RETRY: Duration = Duration::from_secs(30);
/// The first pause after a broken stream; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// How often the fetcher looks for credentials to get or renew.
const FETCH_TICK: Duration = Duration::from_millis(500);
/// Fetches in flight at once.
const FETCHERS: usize = 4;

/// How a stream ended.
enum Ended {
    /// The server has no node view for this agent: use unary calls for a while.
    Unsupported(String),
    /// It broke: reconnect.
    Broken(String),
}

/// Runs the stream and the fetcher until `shutdown`.
pub fn spawn(view: Arc<NodeView>, client: GrpcClient, node: Option<String>, shutdown: &CancellationToken) {
    let (v, c, stop) = (Arc::clone(&view), client.clone(), shutdown.clone());
    crate::task::spawn_until(shutdown, async move { follow(v, c, node, stop).await });
    crate::task::spawn_until(shutdown, fetch_ahead(view, client));
}

async fn follow(view: Arc<NodeView>, client: GrpcClient, node: Option<String>, shutdown: CancellationToken) {
    let mut pause = FIRST_PAUSE;
    loop {
        let wait = match stream(&view, &client, node.as_deref()).await {
            Ended::Unsupported(why) => {
                view.refused();
                tracing::info!(%why, "no node view from the servers; answering with unary calls");
                FALLBACK_RETRY
            }
            Ended::Broken(why) => {
                tracing::info!(%why, "node view stream ended; reconnecting");
                pause = (pause * 2).min(MAX_PAUSE);
                pause
            }
        };
        view.set_down();
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
        if view.health().live {
            pause = FIRST_PAUSE;
        }
    }
}

/// One stream, from Subscribe to its end.
async fn stream(view: &NodeView, client: &GrpcClient, node: Option<&str>) -> Ended {
    let (acks, outgoing) = mpsc::channel::<pb::AgentMessage>(64);
    let subscribe = pb::AgentMessage {
        kind: Some(agent_message::Kind::Subscribe(pb::Subscribe { node: node.unwrap_or_default().into() })),
    };
    let messages = futures::stream::once(async move { subscribe })
        .chain(futures::stream::unfold(outgoing, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }));
    let mut incoming = match client.watch_node(messages).await {
        Ok(incoming) => incoming,
        Err(status) => return ended(status),
    };
    loop {
        let message = match incoming.next().await {
            Some(Ok(message)) => message,
            Some(Err(status)) => return ended(status),
            None => return Ended::Broken("the server closed the stream".into()),
        };
        match message.kind {
            Some(view_message::Kind::Snapshot(snapshot)) => view.replace(snapshot),
            Some(view_message::Kind::Upsert(entry)) => view.upsert(entry),
            Some(view_message::Kind::Remove(remove)) => view.remove(&[remove.ip]),
            Some(view_message::Kind::Fence(fence)) => {
                view.remove(&fence.ips);
                let ack =
                    pb::AgentMessage { kind: Some(agent_message::Kind::Ack(pb::Ack { fence: fence.id })) };
                if acks.send(ack).await.is_err() {
                    return Ended::Broken("cannot acknowledge a fence".into());
                }
            }
            None => {}
        }
    }
}

fn ended(status: tonic::Status) -> Ended {
    match status.code() {
        Code::Unimplemented | Code::Unauthenticated | Code::PermissionDenied => {
            Ended::Unsupported(format!("{}: {}", status.code(), status.message()))
        }
        code => Ended::Broken(format!("{code}: {}", status.message())),
    }
}

/// Gets credentials for every allowed entry that has none (or is due), a few at a time.
async fn fetch_ahead(view: Arc<NodeView>, client: GrpcClient) {
    let permits = Arc::new(Semaphore::new(FETCHERS));
    let mut tick = tokio::time::interval(FETCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = SystemTime::now();
        // One fetch per identity: the entries that share one share its credentials.
        let due: Vec<_> = {
            let mut slots = std::collections::HashSet::new();
            view.entries()
                .into_iter()
                .filter(|(_, e)| e.due(now) && slots.insert(Arc::as_ptr(e.slot())))
                .collect()
        };
        for (ip, entry) in due {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
            let client = client.clone();
            tokio::spawn(async move {
                let _ = fetch(&client, ip, &entry).await;
                drop(permit);
            });
        }
    }
}

/// Fetches `entry`'s credentials now (one fetch at a time per identity), and stores them in it
/// (and so in the entries of the same identity).
pub async fn fetch(
    client: &GrpcClient,
    ip: std::net::IpAddr,
    entry: &ViewEntry,
) -> Result<ImdsDocument, tonic::Status> {
    let _one = entry.fetching().lock().await;
    let now = SystemTime::now();
    if let Some(document) = entry.credentials(now).filter(|_| !entry.due(now)) {
        return Ok(document);
    }
    match client.node_credentials(ip, &entry.pod.uid, &entry.pod.role, entry.pod.affinity).await {
        Ok(reply) => {
            let document = ImdsDocument::from(reply);
            entry.store(document.clone(), SystemTime::now());
            Ok(document)
        }
        Err(status) => {
            entry.backoff(SystemTime::now(), Duration::from_secs(5));
            Err(status)
        }
    }
}
