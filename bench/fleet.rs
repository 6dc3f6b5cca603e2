//! Many node-view subscribers in this one process, each posing as the agent of its own node, for
//! figure 11's fan-out. Every subscriber is what an agent's view is on the wire: its own mutual
//! TLS connection with a certificate naming its node (`urn:kiam:node:<name>`, as figure 8's one
//! subscriber has), one `NodeView.Watch` stream on it, a Subscribe first and an Ack for every
//! Fence. The server proves a node from the connection's certificate, so a connection carries
//! one node's stream: 2,000 nodes are 2,000 connections, as 2,000 agents would open.
//!
//! Each connection leaves from its own 127.x.y.z source address, as agents on different nodes
//! do: the server caps TLS handshakes in progress per source address (16), and 2,000 from one
//! address would be refused by that cap, not measured.
//!
//! All subscribers run on the bench's one tokio runtime. Each records when its snapshot came,
//! and every Upsert's arrival by (IP, role), for update latencies.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use kiam::pb::node::node_view_client::NodeViewClient;
use kiam::pb::node::{self as pb, agent_message, view_message};
use kiam::tls::{ClientTls, TlsFiles};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Endpoint, Uri};

use kiam_testkit::certs::TestPki;

/// Tries one subscriber makes to connect and subscribe before it gives up.
const ATTEMPTS: u32 = 10;
/// The bound on one connection (TCP and TLS) and on the Watch call's answer.
const CONNECT_LIMIT: Duration = Duration::from_secs(20);

/// What [`Arrivals`] files fences under, in place of a role.
pub const FENCE: &str = "(fence)";

/// When each Upsert arrived, by (IP, role), and each Fence, by (IP, [`FENCE`]).
pub type Arrivals = Arc<Mutex<HashMap<(String, String), Vec<Instant>>>>;

/// What one subscriber reports once its snapshot is in (or why it never came).
pub struct Subscribed {
    /// From the fleet's start to the snapshot's arrival.
    pub after: Duration,
    pub entries: usize,
    /// Failed tries before the one that worked.
    pub retries: u32,
}

/// One subscriber per node, and what they received.
pub struct Fleet {
    pub arrivals: Arrivals,
    pending: Vec<oneshot::Receiver<Result<Subscribed, String>>>,
    stop: CancellationToken,
    started: Instant,
}

/// One subscriber's material, minted ahead so that the clock covers only connecting.
pub struct Identity {
    node: String,
    tls: ClientTls,
    source: IpAddr,
}

/// Mints a certificate for each of `nodes` and loads it as a client would; the `n`-th gets the
/// source address `source(n)`.
pub fn identities(pki: &TestPki, nodes: &[String], source: impl Fn(usize) -> IpAddr) -> Vec<Identity> {
    nodes
        .iter()
        .enumerate()
        .map(|(n, node)| {
            let files = pki.agent_for_node(&format!("fleet-{node}"), node);
            let files = TlsFiles { cert: files.cert, key: files.key, ca: files.ca };
            let tls = kiam::tls::client_config(&files, "127.0.0.1").expect("load a subscriber's certificate");
            Identity { node: node.clone(), tls, source: source(n) }
        })
        .collect()
}

impl Fleet {
    /// Starts every subscriber at once against the server at `server`.
    pub fn start(server: SocketAddr, identities: Vec<Identity>) -> Fleet {
        let (arrivals, stop, started) = (Arrivals::default(), CancellationToken::new(), Instant::now());
        let pending = identities
            .into_iter()
            .map(|identity| {
                let (tx, rx) = oneshot::channel();
                let (arrivals, stop) = (Arc::clone(&arrivals), stop.clone());
                tokio::spawn(subscriber(server, identity, started, tx, arrivals, stop));
                rx
            })
            .collect();
        Fleet { arrivals, pending, stop, started }
    }

    /// Waits (at most `limit` from the start) for every subscriber's snapshot; a subscriber with
    /// none by then, or that gave up, is an `Err`.
    pub async fn snapshots(&mut self, limit: Duration) -> Vec<Result<Subscribed, String>> {
        let deadline = tokio::time::Instant::from_std(self.started + limit);
        let mut out = Vec::with_capacity(self.pending.len());
        for rx in self.pending.drain(..) {
            out.push(match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the subscriber task ended".into()),
                Err(_) => Err(format!("no snapshot within {limit:?}")),
            });
        }
        out
    }

    /// The first Upsert of (`ip`, `role`) at or after `since`.
    pub fn arrival(&self, ip: &str, role: &str, since: Instant) -> Option<Instant> {
        let arrivals = self.arrivals.lock().unwrap_or_else(PoisonError::into_inner);
        let times = arrivals.get(&(ip.to_owned(), role.to_owned()))?;
        times.iter().copied().filter(|&t| t >= since).min()
    }
}

impl Drop for Fleet {
    /// Ends every stream and closes every connection.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects, subscribes, reports the snapshot, then follows the stream until `stop`.
async fn subscriber(
    server: SocketAddr,
    identity: Identity,
    started: Instant,
    snapshot: oneshot::Sender<Result<Subscribed, String>>,
    arrivals: Arrivals,
    stop: CancellationToken,
) {
    let mut last = String::new();
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200) * attempt).await;
        }
        let stream = tokio::select! {
            () = stop.cancelled() => return,
            stream = watch(server, &identity) => stream,
        };
        let (mut incoming, acks) = match stream {
            Ok(stream) => stream,
            Err(error) => {
                last = error;
                continue;
            }
        };
        let first = tokio::select! {
            () = stop.cancelled() => return,
            first = tokio::time::timeout(CONNECT_LIMIT, incoming.next()) => first,
        };
        let entries = match first {
            Ok(Some(Ok(pb::ViewMessage { kind: Some(view_message::Kind::Snapshot(s)) }))) => s.entries.len(),
            other => {
                last = format!("the first message was not a snapshot: {other:?}");
                continue;
            }
        };
        let _ = snapshot.send(Ok(Subscribed { after: started.elapsed(), entries, retries: attempt }));
        follow(incoming, acks, arrivals, stop).await;
        return;
    }
    let _ = snapshot.send(Err(format!("{} gave up after {ATTEMPTS} tries: {last}", identity.node)));
}

type Incoming = tonic::Streaming<pb::ViewMessage>;

/// One connection and its Watch stream, with the sender of the agent's messages.
async fn watch(
    server: SocketAddr,
    identity: &Identity,
) -> Result<(Incoming, mpsc::Sender<pb::AgentMessage>), String> {
    let endpoint = Endpoint::from_shared(format!("https://{server}")).map_err(|e| e.to_string())?;
    let endpoint = identity.tls.apply(endpoint).map_err(|e| e.to_string())?;
    let endpoint = endpoint.connect_timeout(CONNECT_LIMIT).tcp_nodelay(true);
    let connector = FromSource { source: identity.source, server };
    let channel = tokio::time::timeout(CONNECT_LIMIT, endpoint.connect_with_connector(connector))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| format!("connect: {e:?}"))?;
    let (acks, outgoing) = mpsc::channel::<pb::AgentMessage>(64);
    let subscribe = pb::AgentMessage {
        kind: Some(agent_message::Kind::Subscribe(pb::Subscribe { node: identity.node.clone() })),
    };
    let messages = futures::stream::once(async move { subscribe })
        .chain(futures::stream::unfold(outgoing, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) }));
    let mut client = NodeViewClient::new(channel);
    let response = tokio::time::timeout(CONNECT_LIMIT, client.watch(tonic::Request::new(messages)))
        .await
        .map_err(|_| "Watch timed out".to_string())?
        .map_err(|status| format!("Watch: {status}"))?;
    Ok((response.into_inner(), acks))
}

/// Records Upserts and Fences, and acknowledges Fences, until the stream ends or `stop`.
async fn follow(
    mut incoming: Incoming,
    acks: mpsc::Sender<pb::AgentMessage>,
    arrivals: Arrivals,
    stop: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = stop.cancelled() => return,
            message = incoming.next() => message,
        };
        let Some(Ok(message)) = message else { return };
        if !record(message.kind, Instant::now(), &arrivals, &acks).await {
            return;
        }
    }
}

/// Files when an Upsert or a Fence arrived (`at`) in `arrivals`, and acknowledges a Fence on
/// `acks`, as an agent does. False once the acknowledgement cannot be sent (the stream is gone).
pub async fn record(
    kind: Option<view_message::Kind>,
    at: Instant,
    arrivals: &Arrivals,
    acks: &mpsc::Sender<pb::AgentMessage>,
) -> bool {
    match kind {
        Some(view_message::Kind::Upsert(entry)) => {
            let mut arrivals = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
            arrivals.entry((entry.ip, entry.role)).or_default().push(at);
            true
        }
        Some(view_message::Kind::Fence(fence)) => {
            {
                let mut arrivals = arrivals.lock().unwrap_or_else(PoisonError::into_inner);
                for ip in &fence.ips {
                    arrivals.entry((ip.clone(), FENCE.into())).or_default().push(at);
                }
            }
            let ack = agent_message::Kind::Ack(pb::Ack { fence: fence.id });
            acks.send(pb::AgentMessage { kind: Some(ack) }).await.is_ok()
        }
        _ => true,
    }
}

/// A connector that dials the server from a chosen local address (tonic adds TLS on top).
#[derive(Clone)]
struct FromSource {
    source: IpAddr,
    server: SocketAddr,
}

impl tower::Service<Uri> for FromSource {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (source, server) = (self.source, self.server);
        Box::pin(async move {
            let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            socket.bind(SocketAddr::new(source, 0))?;
            let stream = socket.connect(server).await?;
            stream.set_nodelay(true)?;
            Ok(TokioIo::new(stream))
        })
    }
}
