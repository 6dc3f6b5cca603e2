//! The feed over a real core: each change reaches the feeds of the nodes it alters (both nodes
//! when a pod or an IP moves between them, every node for a namespace change), and an entry that
//! did not change is not sent again.

use std::time::Duration;

use super::*;
use crate::cluster::Change;
use crate::cluster::events::NoEvents;
use crate::creds::{CredentialCache, Credentials, Identity, Lifetimes, StsError, StsErrorKind};
use crate::metrics::Metrics;
use crate::model::{NamespaceFacts, Permitted, PodFacts};
use crate::policy::Policy;

/// The view never fetches credentials; a call would be a bug.
struct NoSts;

impl AssumeRole for NoSts {
    async fn assume_role(&self, _: &Identity, _: Duration) -> Result<Credentials, StsError> {
        Err(StsError { kind: StsErrorKind::Other, code: None, message: "not in view tests".into() })
    }
}

fn namespace(permitted: &str) -> Change<NamespaceFacts> {
    let ns = NamespaceFacts {
        name: "ns".into(),
        permitted: Some(Permitted::new(permitted)),
        allowed_roles: None,
        session_policy: None,
    };
    Change::Apply(ns)
}

fn pod(name: &str, ip: &str, node: &str) -> PodFacts {
    let mut pod = PodFacts::test("ns", name, ip, Some("app"));
    pod.node_name = Some(node.into());
    pod
}

fn core() -> Arc<Core<NoSts>> {
    let metrics = Arc::new(Metrics::default());
    let cluster = Arc::new(crate::cluster::Cluster::new(None, Arc::clone(&metrics)));
    cluster.apply_namespace(namespace(".*"));
    let policy = Policy::test();
    let lifetimes = Lifetimes { session: Duration::from_secs(3600), refresh_lead: Duration::from_secs(300) };
    let cache = CredentialCache::new(NoSts, lifetimes, 1, Arc::clone(&metrics));
    Arc::new(Core::new(cluster, policy, cache, "kiam".into(), Arc::new(NoEvents), metrics))
}

/// One subscribed agent's end of the stream.
struct Agent(mpsc::Receiver<Outgoing>, Arc<Subscriber>);

impl Agent {
    fn subscribe(core: &Arc<Core<NoSts>>, hub: &Arc<Hub>, node: &str) -> Agent {
        let (tx, rx) = mpsc::channel(64);
        let subscriber = hub.subscribe(node, tx, &CancellationToken::new()).expect("subscribed");
        tokio::spawn(feed(Arc::clone(core), Arc::clone(hub), Arc::clone(&subscriber)));
        Agent(rx, subscriber)
    }

    async fn next(&mut self) -> Kind {
        let message = tokio::time::timeout(Duration::from_secs(5), self.0.recv()).await;
        message.expect("a message within 5 s").expect("stream open").kind.expect("a kind")
    }

    /// The IPs of the next message's entries (a snapshot's, an Upsert's, a Remove's), with what
    /// it was.
    async fn next_ips(&mut self) -> (&'static str, Vec<String>) {
        match self.next().await {
            Kind::Snapshot(s) => ("snapshot", s.entries.into_iter().map(|e| e.ip).collect()),
            Kind::Upsert(e) => ("upsert", vec![e.ip]),
            Kind::Remove(r) => ("remove", vec![r.ip]),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn ips(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn a_pod_moving_between_nodes_reaches_both_feeds_and_no_other() {
    let (core, hub) = (core(), Arc::new(Hub::new(Duration::from_secs(1), 4)));
    let cluster = Arc::clone(core.cluster());
    cluster.apply_pod(Change::Apply(pod("web", "10.0.0.1", "a")));
    let (mut a, mut b, mut c) = (
        Agent::subscribe(&core, &hub, "a"),
        Agent::subscribe(&core, &hub, "b"),
        Agent::subscribe(&core, &hub, "c"),
    );
    assert_eq!(a.next_ips().await, ("snapshot", ips(&["10.0.0.1"])));
    assert_eq!(b.next_ips().await, ("snapshot", ips(&[])));
    assert_eq!(c.next_ips().await, ("snapshot", ips(&[])));
    // Node c's feed waits on the very signal this receiver reads.
    let c_signal = cluster.node_changes("c");
    cluster.apply_pod(Change::Apply(pod("web", "10.0.0.1", "b")));
    assert_eq!(a.next_ips().await, ("remove", ips(&["10.0.0.1"])));
    assert_eq!(b.next_ips().await, ("upsert", ips(&["10.0.0.1"])));
    assert!(!c_signal.has_changed().expect("open"), "node c's feed was woken by a change on a and b");
    // Node c's next message is its own change: nothing came before it.
    cluster.apply_pod(Change::Apply(pod("db", "10.0.0.3", "c")));
    assert!(c_signal.has_changed().expect("open"));
    assert_eq!(c.next_ips().await, ("upsert", ips(&["10.0.0.3"])));
}

#[tokio::test]
async fn an_ip_moving_between_pods_on_two_nodes_reaches_both_feeds() {
    let (core, hub) = (core(), Arc::new(Hub::new(Duration::from_secs(1), 4)));
    let cluster = Arc::clone(core.cluster());
    let mut old = pod("old", "10.0.0.9", "a");
    old.terminating = true;
    cluster.apply_pod(Change::Apply(old));
    cluster.apply_pod(Change::Apply(pod("new", "10.0.0.9", "b")));
    let (mut a, mut b) = (Agent::subscribe(&core, &hub, "a"), Agent::subscribe(&core, &hub, "b"));
    // The new pod owns the IP, so node a's view leaves it out.
    assert_eq!(a.next_ips().await, ("snapshot", ips(&[])));
    assert_eq!(b.next_ips().await, ("snapshot", ips(&["10.0.0.9"])));
    // The new pod goes: the terminating one on node a owns the IP again, though nothing of
    // node a's changed.
    cluster.apply_pod(Change::Delete(pod("new", "10.0.0.9", "b")));
    assert_eq!(b.next_ips().await, ("remove", ips(&["10.0.0.9"])));
    match a.next().await {
        Kind::Upsert(entry) => assert_eq!((&*entry.name, entry.terminating), ("old", true)),
        other => panic!("node a's feed sent {other:?}"),
    }
}

#[tokio::test]
async fn a_namespace_change_reaches_every_feed() {
    let (core, hub) = (core(), Arc::new(Hub::new(Duration::from_secs(1), 4)));
    let cluster = Arc::clone(core.cluster());
    cluster.apply_pod(Change::Apply(pod("web", "10.0.0.1", "a")));
    cluster.apply_pod(Change::Apply(pod("db", "10.0.0.2", "b")));
    let (mut a, mut b) = (Agent::subscribe(&core, &hub, "a"), Agent::subscribe(&core, &hub, "b"));
    for agent in [&mut a, &mut b] {
        assert_eq!(agent.next_ips().await.0, "snapshot");
    }
    cluster.apply_namespace(namespace("nothing"));
    for agent in [&mut a, &mut b] {
        match agent.next().await {
            Kind::Upsert(entry) => assert!(!entry.allowed, "{entry:?} is still allowed"),
            other => panic!("expected an Upsert, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_fence_reaches_the_agent_of_a_waiting_feed() {
    let (core, hub) = (core(), Arc::new(Hub::new(Duration::from_secs(5), 4)));
    core.cluster().apply_pod(Change::Apply(pod("web", "10.0.0.1", "a")));
    let mut a = Agent::subscribe(&core, &hub, "a");
    assert_eq!(a.next_ips().await.0, "snapshot");
    // The feed now waits for a change; a fence must still get its state (it once waited
    // holding it, so every fence timed out and dropped the stream).
    let fencing = {
        let hub = Arc::clone(&hub);
        tokio::spawn(
            async move { hub.fence_slots(vec![("a".into(), "10.0.0.1".parse().expect("ip"))]).await },
        )
    };
    let Kind::Fence(fence) = a.next().await else { panic!("expected a Fence") };
    assert_eq!(fence.ips, ["10.0.0.1"]);
    a.1.ack(fence.id);
    drop(tokio::time::timeout(Duration::from_secs(5), fencing).await.expect("fenced").expect("task"));
    assert!(!a.1.cancel.is_cancelled(), "the fence dropped the stream");
    assert_eq!(hub.subscribers(), 1);
}

#[tokio::test]
async fn a_difference_sends_only_what_changed_by_digest() {
    let hub = Hub::new(Duration::from_secs(1), 4);
    let (tx, mut rx) = mpsc::channel(64);
    let subscriber = hub.subscribe("a", tx, &CancellationToken::new()).expect("subscribed");
    let entry = |ip: &str, role: &str| {
        let ip: IpAddr = ip.parse().expect("ip");
        (ip, pb::Entry { ip: ip.to_string(), role: role.into(), ..pb::Entry::default() })
    };
    let before: HashMap<IpAddr, pb::Entry> =
        [entry("10.0.0.1", "same"), entry("10.0.0.2", "old"), entry("10.0.0.3", "gone")].into();
    let current: HashMap<IpAddr, pb::Entry> =
        [entry("10.0.0.1", "same"), entry("10.0.0.2", "new"), entry("10.0.0.4", "added")].into();
    let digest = |map: &HashMap<IpAddr, pb::Entry>| Sent::of(map.iter().map(|(ip, e)| (*ip, hub.digest(e))));
    let (before, after) = (digest(&before), digest(&current));
    assert!(send_difference(&subscriber, &before, &after, current).await);
    drop(subscriber);
    let mut seen = Vec::new();
    while let Ok(message) = rx.try_recv() {
        seen.push(match message.kind.expect("a kind") {
            Kind::Remove(r) => format!("remove {}", r.ip),
            Kind::Upsert(e) => format!("upsert {} {}", e.ip, e.role),
            other => panic!("unexpected {other:?}"),
        });
    }
    seen.sort();
    assert_eq!(seen, ["remove 10.0.0.3", "upsert 10.0.0.2 new", "upsert 10.0.0.4 added"]);
}

#[test]
fn every_field_of_an_entry_is_in_its_digest() {
    let hub = Hub::new(Duration::from_secs(1), 4);
    let base = pb::Entry { ip: "10.0.0.1".into(), ..pb::Entry::default() };
    let d = hub.digest(&base);
    assert_eq!(d, hub.digest(&base.clone()));
    let variants = [
        pb::Entry { uid: "u".into(), ..base.clone() },
        pb::Entry { namespace: "n".into(), ..base.clone() },
        pb::Entry { name: "n".into(), ..base.clone() },
        pb::Entry { role: "r".into(), ..base.clone() },
        pb::Entry { allowed: true, ..base.clone() },
        pb::Entry { denial: "d".into(), ..base.clone() },
        pb::Entry { role_arn: "a".into(), ..base.clone() },
        pb::Entry { terminating: true, ..base.clone() },
        pb::Entry { affinity: 1, ..base.clone() },
        pb::Entry { identity_high: 1, ..base.clone() },
        pb::Entry { identity_low: 1, ..base.clone() },
        // A string's end is part of it: moving a character between fields changes the digest.
        pb::Entry { namespace: "ab".into(), name: String::new(), ..base.clone() },
    ];
    for variant in &variants {
        assert_ne!(hub.digest(variant), d, "{variant:?} digests like {base:?}");
    }
    let moved = pb::Entry { namespace: "a".into(), name: "b".into(), ..base.clone() };
    assert_ne!(hub.digest(&moved), hub.digest(&variants[variants.len() - 1]));
}

#[test]
fn a_waiting_message_costs_a_pointer() {
    // The stream's buffer holds 32 of these per block, allocated for every subscriber: 256
    // bytes, where an unboxed message (184 bytes, an Entry's size) made it 5.8 KiB.
    assert_eq!(std::mem::size_of::<Outgoing>(), std::mem::size_of::<usize>());
}

#[test]
fn the_sent_digests_are_found_by_ip_and_forgotten_by_a_fence() {
    let ips: Vec<IpAddr> =
        ["10.0.0.3", "10.0.0.1", "fd00::2", "10.0.0.2"].map(|ip| ip.parse().expect("ip")).into();
    let mut sent = Sent::of(ips.iter().enumerate().map(|(i, ip)| (*ip, i as u64)));
    for (i, ip) in ips.iter().enumerate() {
        assert_eq!(sent.get(ip), Some(i as u64));
    }
    assert_eq!(sent.get(&"10.0.0.9".parse().expect("ip")), None);
    sent.remove(&ips[0]);
    assert_eq!(sent.get(&ips[0]), None);
    assert_eq!(sent.ips().count(), 3);
    assert_eq!(sent.get(&ips[2]), Some(2), "the rest stay");
}
