//! The server side of the node view: what each agent's view holds ([`entries`]), and the [`Hub`]
//! of subscribed agents. Each subscriber has a task that recomputes its node's entries when that
//! node's pods (or any namespace) change and sends the difference. The hub is the cluster's
//! [`Fence`]: before a change alters a slot an agent holds, the hub sends that agent a Fence and
//! waits (bounded) for its Ack, holding the subscriber's state until the change is applied, so no
//! stale entry can be re-sent after it.
//!
//! A feed waits on its own node's signal ([`crate::cluster::Cluster::node_changes`]) and on the
//! namespaces', so a pod change wakes only the feeds of the nodes it can alter. What the hub keeps
//! per agent is small (figure 11: 2,000 agents on one server): a digest per IP sent, not the
//! entry, and boxed messages in the stream's buffer.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::cluster::{Fence, FenceGuard, Lookup};
use crate::core::Core;
use crate::creds::AssumeRole;
use crate::pb::node::{self as pb, view_message::Kind};

/// What one subscriber's stream buffer carries: boxed, so that each of its slots (allocated 32
/// at a time, and kept while the stream lives) costs a pointer, not the largest message (an
/// `Entry`, 184 bytes), whatever is waiting.
pub type Outgoing = Box<pb::ViewMessage>;

/// The entries of `node`'s view, by IP: every IP whose lookup finds a pod on that node, with
/// the pod's role and the policy's verdict. A pod whose namespace is not known yet is left out
/// (the agent waits for it, or asks), never sent as denied.
pub fn entries<A: AssumeRole>(core: &Core<A>, node: &str) -> HashMap<IpAddr, pb::Entry> {
    let mut out = HashMap::new();
    for (ip, lookup) in core.cluster().node_ips(node) {
        let Lookup::Found(pod) = lookup else { continue };
        let pod = core.with_account_role(pod);
        if pod.node_name.as_deref() != Some(node) {
            continue;
        }
        let role = core.policy().effective_role(&pod).map(str::to_string);
        if role.is_some() && core.cluster().namespace(&pod.namespace).is_none() {
            continue;
        }
        let (allowed, denial, role_arn, affinity, identity) =
            match role.as_deref().map(|r| core.identity_for(&pod, r)) {
                None => {
                    let why = "pod has no iam.amazonaws.com/role annotation".to_string();
                    (false, why, String::new(), 0, (0, 0))
                }
                Some(Ok(identity)) => {
                    let (arn, affinity) = (identity.role.to_string(), core.affinity(&identity));
                    (true, String::new(), arn, affinity, identity.digest())
                }
                Some(Err(denial)) => (false, denial.to_string(), String::new(), 0, (0, 0)),
            };
        let entry = pb::Entry {
            ip: ip.to_string(),
            uid: pod.uid.to_string(),
            namespace: pod.namespace.to_string(),
            name: pod.name.to_string(),
            role: role.unwrap_or_default(),
            allowed,
            denial,
            role_arn,
            terminating: pod.terminating,
            affinity,
            identity_high: identity.0,
            identity_low: identity.1,
        };
        out.insert(ip, entry);
    }
    out
}

/// One subscribed agent.
pub struct Subscriber {
    id: u64,
    node: String,
    tx: mpsc::Sender<Outgoing>,
    /// A digest ([`Hub::digest`]) of each entry sent so far, by IP: all a diff needs (about
    /// 2.4 KiB for a node of 75 pods, where copies of the entries cost about 48 KiB). Locked
    /// while a diff is sent, and by a fence until its change is applied.
    sent: Arc<tokio::sync::Mutex<Sent>>,
    acks: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    /// Stops the subscriber's tasks (and so ends its stream).
    pub cancel: CancellationToken,
}

impl Subscriber {
    /// Routes an Ack from the agent to the fence waiting for it.
    pub fn ack(&self, fence: u64) {
        if let Some(waiter) = self.acks.lock().unwrap_or_else(PoisonError::into_inner).remove(&fence) {
            let _ = waiter.send(());
        }
    }

    async fn send(&self, message: Kind) -> bool {
        let message = Box::new(pb::ViewMessage { kind: Some(message) });
        tokio::select! {
            () = self.cancel.cancelled() => false,
            sent = self.tx.send(message) => sent.is_ok(),
        }
    }
}

/// The agents subscribed to each node.
pub struct Hub {
    nodes: Mutex<HashMap<String, Vec<Arc<Subscriber>>>>,
    next: AtomicU64,
    /// How long a fence waits for an agent before dropping its stream.
    ack_timeout: Duration,
    /// Most streams one node may hold at once.
    per_node: usize,
    /// Told when a node's agent is ready, and when its last agent goes (node readiness).
    readiness: Option<mpsc::Sender<super::readiness::Signal>>,
    /// Keys the entries' digests: fixed for the process, so digests compare, and secret, so
    /// that a pod's owner, who picks some of its entry's strings, cannot craft an update whose
    /// entry digests like the one an agent holds.
    digests: RandomState,
}

impl Hub {
    /// A hub whose fences wait at most `ack_timeout` per agent.
    pub fn new(ack_timeout: Duration, per_node: usize) -> Hub {
        let (nodes, next, readiness, digests) =
            (Mutex::default(), AtomicU64::new(1), None, RandomState::new());
        Hub { nodes, next, ack_timeout, per_node, readiness, digests }
    }

    /// `entry`'s digest: equal entries digest alike; different ones collide with odds of 2^-64.
    fn digest(&self, entry: &pb::Entry) -> u64 {
        // Destructured, so that a field added to the message cannot be left out of the digest.
        let pb::Entry {
            ip,
            uid,
            namespace,
            name,
            role,
            allowed,
            denial,
            role_arn,
            terminating,
            affinity,
            identity_high,
            identity_low,
        } = entry;
        self.digests.hash_one((
            ip,
            uid,
            namespace,
            name,
            role,
            allowed,
            denial,
            role_arn,
            terminating,
            affinity,
            identity_high,
            identity_low,
        ))
    }

    /// Also reports agents ready and gone on `signals`.
    pub fn with_readiness(mut self, signals: mpsc::Sender<super::readiness::Signal>) -> Hub {
        self.readiness = Some(signals);
        self
    }

    fn signal(&self, signal: super::readiness::Signal) {
        if let Some(tx) = &self.readiness
            && tx.try_send(signal).is_err()
        {
            tracing::warn!("node readiness: too many signals waiting; one was dropped");
        }
    }

    /// Registers an agent of `node`; `None` when the node already holds its most streams.
    pub fn subscribe(
        &self,
        node: &str,
        tx: mpsc::Sender<Outgoing>,
        shutdown: &CancellationToken,
    ) -> Option<Arc<Subscriber>> {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let list = nodes.entry(node.to_string()).or_default();
        list.retain(|s| !s.cancel.is_cancelled());
        if list.len() >= self.per_node {
            return None;
        }
        let subscriber = Arc::new(Subscriber {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            node: node.to_string(),
            tx,
            sent: Arc::default(),
            acks: Mutex::default(),
            cancel: shutdown.child_token(),
        });
        list.push(Arc::clone(&subscriber));
        Some(subscriber)
    }

    /// Forgets `subscriber` and ends its stream.
    pub fn drop_subscriber(&self, subscriber: &Subscriber) {
        subscriber.cancel.cancel();
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = nodes.get_mut(&subscriber.node) {
            list.retain(|s| s.id != subscriber.id);
            if list.is_empty() {
                nodes.remove(&subscriber.node);
                self.signal(super::readiness::Signal::Gone(subscriber.node.clone()));
            }
        }
    }

    /// How many agents are subscribed.
    pub fn subscribers(&self) -> usize {
        self.nodes.lock().unwrap_or_else(PoisonError::into_inner).values().map(Vec::len).sum()
    }

    async fn fence_slots(&self, slots: Vec<(String, IpAddr)>) -> FenceGuard {
        let mut by_node: HashMap<String, Vec<IpAddr>> = HashMap::new();
        for (node, ip) in slots {
            by_node.entry(node).or_default().push(ip);
        }
        let targets: Vec<(Arc<Subscriber>, Vec<IpAddr>)> = {
            let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
            by_node
                .into_iter()
                .flat_map(|(node, ips)| {
                    nodes.get(&node).into_iter().flatten().map(move |s| (Arc::clone(s), ips.clone()))
                })
                .collect()
        };
        let mut held: Vec<Box<dyn Send>> = Vec::new();
        let mut waits = Vec::new();
        for (subscriber, ips) in targets {
            let Ok(mut sent) =
                tokio::time::timeout(self.ack_timeout, Arc::clone(&subscriber.sent).lock_owned()).await
            else {
                tracing::warn!(node = %subscriber.node, "node view: an agent's stream is stuck; dropping it");
                self.drop_subscriber(&subscriber);
                continue;
            };
            for ip in &ips {
                sent.remove(ip);
            }
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let (ack, acked) = oneshot::channel();
            subscriber.acks.lock().unwrap_or_else(PoisonError::into_inner).insert(id, ack);
            let fence = Kind::Fence(pb::Fence { id, ips: ips.iter().map(IpAddr::to_string).collect() });
            if tokio::time::timeout(self.ack_timeout, subscriber.send(fence)).await.unwrap_or(false) {
                waits.push((subscriber, acked));
            } else {
                self.drop_subscriber(&subscriber);
            }
            held.push(Box::new(sent));
        }
        for (subscriber, acked) in waits {
            if !matches!(tokio::time::timeout(self.ack_timeout, acked).await, Ok(Ok(()))) {
                tracing::warn!(node = %subscriber.node, "node view: an agent did not acknowledge a fence; dropping its stream");
                self.drop_subscriber(&subscriber);
            }
        }
        FenceGuard::holding(held)
    }
}

impl Fence for Hub {
    fn fence(&self, slots: Vec<(String, IpAddr)>) -> Pin<Box<dyn Future<Output = FenceGuard> + Send + '_>> {
        Box::pin(self.fence_slots(slots))
    }
}

/// Keeps `subscriber`'s agent current until its stream ends: a snapshot, then the difference
/// each time its node's signal or the namespaces' (namespaces and ServiceAccounts) fire.
pub async fn feed<A: AssumeRole>(core: Arc<Core<A>>, hub: Arc<Hub>, subscriber: Arc<Subscriber>) {
    let cluster = Arc::clone(core.cluster());
    // Subscribed before the first read: whatever is applied after it wakes this feed again.
    let (mut pods, mut namespaces) = (cluster.node_changes(&subscriber.node), cluster.namespace_changes());
    let mut first = true;
    loop {
        pods.borrow_and_update();
        namespaces.borrow_and_update();
        let mut sent = tokio::select! {
            () = subscriber.cancel.cancelled() => break,
            sent = Arc::clone(&subscriber.sent).lock_owned() => sent,
        };
        let current = entries(&core, &subscriber.node);
        let digests = Sent::of(current.iter().map(|(ip, e)| (*ip, hub.digest(e))));
        let ok = if first {
            let snapshot =
                pb::Snapshot { node: subscriber.node.clone(), entries: current.into_values().collect() };
            let sent = subscriber.send(Kind::Snapshot(snapshot)).await;
            if sent {
                hub.signal(super::readiness::Signal::Ready(subscriber.node.clone()));
            }
            sent
        } else {
            send_difference(&subscriber, &sent, &digests, current).await
        };
        if !ok {
            break;
        }
        *sent = digests;
        // Released before waiting: a fence takes it while this feed waits.
        drop(sent);
        first = false;
        // Neither sender is dropped while a receiver lives, so neither wait fails.
        tokio::select! {
            () = subscriber.cancel.cancelled() => break,
            _ = pods.changed() => {}
            _ = namespaces.changed() => {}
        }
    }
    hub.drop_subscriber(&subscriber);
}

/// Sends what changed from the digests `before` to `after`, taking the entries to upsert from
/// `current` (which `after` digests).
async fn send_difference(
    subscriber: &Subscriber,
    before: &Sent,
    after: &Sent,
    current: HashMap<IpAddr, pb::Entry>,
) -> bool {
    for ip in before.ips().filter(|ip| after.get(ip).is_none()) {
        if !subscriber.send(Kind::Remove(pb::Remove { ip: ip.to_string() })).await {
            return false;
        }
    }
    for (ip, entry) in current {
        if before.get(&ip) != after.get(&ip) && !subscriber.send(Kind::Upsert(entry)).await {
            return false;
        }
    }
    true
}

/// The digest of each entry sent, sorted by IP: 32 bytes an entry with nothing spare, where a
/// hash map's slots and control bytes cost 4.2 KiB for 75 entries (figure 11 counts this per
/// agent, 2,000 of them).
#[derive(Default)]
pub struct Sent(Vec<(IpAddr, u64)>);

impl Sent {
    /// The digests of `entries` (one per IP).
    fn of(entries: impl ExactSizeIterator<Item = (IpAddr, u64)>) -> Sent {
        let mut sent = Vec::with_capacity(entries.len());
        sent.extend(entries);
        sent.sort_unstable_by_key(|(ip, _)| *ip);
        Sent(sent)
    }

    /// The digest sent for `ip`.
    fn get(&self, ip: &IpAddr) -> Option<u64> {
        self.0.binary_search_by_key(ip, |(at, _)| *at).ok().map(|i| self.0[i].1)
    }

    /// Forgets `ip` (a fence: whatever comes next for it is sent again).
    fn remove(&mut self, ip: &IpAddr) {
        if let Ok(i) = self.0.binary_search_by_key(ip, |(at, _)| *at) {
            self.0.remove(i);
        }
    }

    /// The IPs sent.
    fn ips(&self) -> impl Iterator<Item = &IpAddr> {
        self.0.iter().map(|(ip, _)| ip)
    }
}

#[cfg(test)]
#[path = "view_tests.rs"]
mod tests;
