//! Unit tests of the cluster view: announcements, the namespace check, the watch counts and
//! which nodes' signals a change wakes.

use super::*;

#[test]
fn announcements_never_block_and_drops_are_counted() {
    let (tx, mut rx) = mpsc::channel(1);
    let cluster = Cluster::new(Some(tx), Arc::new(Metrics::default()));
    for (name, ip) in [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")] {
        cluster.apply_pod(Change::Apply(PodFacts::test("ns", name, ip, Some("role"))));
    }
    assert_eq!(rx.try_recv().map(|p| p.name.clone()).ok().as_deref(), Some("a"));
    assert!(rx.try_recv().is_err());
    assert_eq!(cluster.dropped_announcements(), 2);
    // A pod without a role is never announced, so never dropped either.
    cluster.apply_pod(Change::Apply(PodFacts::test("ns", "d", "10.0.0.4", None)));
    assert_eq!(cluster.dropped_announcements(), 2);
}

#[test]
fn watch_stats_read_counts_that_never_moved_without_creating_them() {
    // Before any failure no series exists. Reading used to create them, holding one guard
    // while the same family took its write lock for the next: the thread hung here.
    let metrics = Arc::new(Metrics::default());
    let cluster = Cluster::new(None, Arc::clone(&metrics));
    assert_eq!(cluster.watch_stats(), WatchStats::default());
    assert!(metrics.server.watch_restarts.get(&PODS).is_none(), "reading created a series");
    cluster.note_watch_error(true);
    let stats = cluster.watch_stats();
    assert_eq!((stats.pod_watch_errors, stats.namespace_watch_errors), (0, 1));
}

#[test]
fn the_namespace_check_sees_every_namespace_listed_or_changed() {
    let cluster = Cluster::new(None, Arc::new(Metrics::default()));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    cluster.set_namespace_check(Arc::new(move |ns: &NamespaceFacts| {
        record.lock().unwrap_or_else(PoisonError::into_inner).push(ns.name.clone());
    }));
    let ns = |name: &str| NamespaceFacts {
        name: name.into(),
        permitted: None,
        allowed_roles: None,
        session_policy: None,
    };
    cluster.apply_namespace(Change::Init);
    cluster.apply_namespace(Change::InitApply(ns("a")));
    cluster.apply_namespace(Change::InitDone);
    cluster.apply_namespace(Change::Apply(ns("b")));
    cluster.apply_namespace(Change::Delete(ns("a")));
    assert_eq!(*seen.lock().unwrap_or_else(PoisonError::into_inner), ["a", "b"]);
}

fn on(node: &str, name: &str, ip: &str) -> PodFacts {
    let mut pod = PodFacts::test("ns", name, ip, Some("role"));
    pod.node_name = Some(node.into());
    pod
}

/// Which of `nodes`' receivers changed since the last call, marking them seen.
fn woken(receivers: &mut [(&str, watch::Receiver<()>)]) -> Vec<String> {
    let changed = receivers.iter_mut().filter(|(_, rx)| rx.has_changed().unwrap_or(false));
    changed.map(|(node, rx)| (node.to_string(), rx.borrow_and_update()).0).collect()
}

#[test]
fn a_pod_change_wakes_only_the_nodes_it_can_alter() {
    let cluster = Cluster::new(None, Arc::new(Metrics::default()));
    let mut nodes: Vec<_> = ["a", "b", "c"].into_iter().map(|n| (n, cluster.node_changes(n))).collect();
    cluster.apply_pod(Change::Apply(on("a", "web", "10.0.0.1")));
    assert_eq!(woken(&mut nodes), ["a"]);
    // Applied again unchanged (a resync): nothing to recompute.
    cluster.apply_pod(Change::Apply(on("a", "web", "10.0.0.1")));
    assert_eq!(woken(&mut nodes), Vec::<String>::new());
    // The pod moves: the node it left and the one it joined.
    cluster.apply_pod(Change::Apply(on("b", "web", "10.0.0.1")));
    assert_eq!(woken(&mut nodes), ["a", "b"]);
    // A new pod on c takes the IP while web terminates on b: b's entry changes owner too.
    let mut web = on("b", "web", "10.0.0.1");
    web.terminating = true;
    cluster.apply_pod(Change::Apply(web));
    assert_eq!(woken(&mut nodes), ["b"]);
    cluster.apply_pod(Change::Apply(on("c", "new", "10.0.0.1")));
    assert_eq!(woken(&mut nodes), ["b", "c"]);
    cluster.apply_pod(Change::Delete(on("c", "new", "10.0.0.1")));
    assert_eq!(woken(&mut nodes), ["b", "c"]);
    // A relist's items are buffered and wake nobody; its end wakes every node.
    cluster.apply_pod(Change::Init);
    cluster.apply_pod(Change::InitApply(on("a", "other", "10.0.0.2")));
    assert_eq!(woken(&mut nodes), Vec::<String>::new());
    cluster.apply_pod(Change::InitDone);
    assert_eq!(woken(&mut nodes), ["a", "b", "c"]);
}

#[test]
fn a_node_signal_nobody_watches_does_not_outlive_its_next_change() {
    let cluster = Cluster::new(None, Arc::new(Metrics::default()));
    cluster.apply_pod(Change::Apply(on("a", "web", "10.0.0.1")));
    assert_eq!(cluster.node_signals.len(), 0, "a change made a signal nobody asked for");
    let watched = cluster.node_changes("a");
    assert_eq!(cluster.node_signals.len(), 1);
    drop(watched);
    cluster.apply_pod(Change::Delete(on("a", "web", "10.0.0.1")));
    assert_eq!(cluster.node_signals.len(), 0);
}
