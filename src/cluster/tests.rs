//! Unit tests of the cluster view: announcements, the namespace check and the watch counts.

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
