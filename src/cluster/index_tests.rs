//! Tests of the pod index: lookups by IP, relists, announcements and the interned strings.

use super::*;
use crate::model::Phase;

fn pod(name: &str, ip: &str) -> PodFacts {
    PodFacts::test("ns", name, ip, Some("role"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn found_name(l: Lookup) -> String {
    match l {
        Lookup::Found(p) => p.name.to_string(),
        other => panic!("expected a pod, got {other:?}"),
    }
}

#[test]
fn apply_and_delete() {
    let mut idx = PodIndex::default();
    idx.apply(Change::Apply(pod("a", "10.0.0.1")));
    assert_eq!(found_name(idx.lookup(ip("10.0.0.1"))), "a");
    // The pod moves to another IP: the old address no longer finds it.
    idx.apply(Change::Apply(pod("a", "10.0.0.2")));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::NotFound);
    assert_eq!(found_name(idx.lookup(ip("10.0.0.2"))), "a");
    idx.apply(Change::Delete(pod("a", "10.0.0.2")));
    assert_eq!(idx.lookup(ip("10.0.0.2")), Lookup::NotFound);
    assert!(idx.is_empty());
}

#[test]
fn every_address_of_a_dual_stack_pod_finds_it() {
    let mut idx = PodIndex::default();
    let mut dual = pod("dual", "fd00::7");
    dual.ips = [ip("fd00::7"), ip("10.0.0.7")].into();
    idx.apply(Change::Apply(dual.clone()));
    assert_eq!(found_name(idx.lookup(ip("fd00::7"))), "dual");
    assert_eq!(found_name(idx.lookup(ip("10.0.0.7"))), "dual");
    idx.apply(Change::Delete(dual));
    assert_eq!(idx.lookup(ip("10.0.0.7")), Lookup::NotFound);
    assert!(idx.by_ip.is_empty());
}

#[test]
fn excluded_and_shared_ips() {
    let mut idx = PodIndex::default();
    let mut done = pod("done", "10.0.0.1");
    done.phase = Phase::Succeeded;
    let mut host = pod("host", "10.0.0.1");
    host.host_network = true;
    idx.apply(Change::Apply(done));
    idx.apply(Change::Apply(host));
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::NotFound);
    idx.apply(Change::Apply(pod("new", "10.0.0.1")));
    assert_eq!(found_name(idx.lookup(ip("10.0.0.1"))), "new");
    idx.apply(Change::Apply(pod("other", "10.0.0.1")));
    match idx.lookup(ip("10.0.0.1")) {
        Lookup::Ambiguous(pods) => assert_eq!(pods.len(), 2),
        other => panic!("two live pods on one IP must be an error, got {other:?}"),
    }
}

#[test]
fn terminating_pod_keeps_ip_until_reused() {
    let mut idx = PodIndex::default();
    let mut old = pod("old", "10.0.0.9");
    old.terminating = true;
    idx.apply(Change::Apply(old));
    assert_eq!(found_name(idx.lookup(ip("10.0.0.9"))), "old");
    idx.apply(Change::Apply(pod("new", "10.0.0.9")));
    assert_eq!(found_name(idx.lookup(ip("10.0.0.9"))), "new");
}

#[test]
fn announces_new_and_changed_identities_only() {
    let mut idx = PodIndex::default();
    let names = |v: Vec<Arc<PodFacts>>| v.iter().map(|p| p.name.to_string()).collect::<Vec<_>>();
    assert_eq!(names(idx.apply(Change::Apply(pod("a", "10.0.0.1")))), ["a"]);
    // A status change that keeps the identity is not announced again.
    let mut moved = pod("a", "10.0.0.2");
    assert!(idx.apply(Change::Apply(moved.clone())).is_empty());
    moved.role = Some("other".into());
    assert_eq!(names(idx.apply(Change::Apply(moved.clone()))), ["a"]);
    let mut done = moved.clone();
    done.phase = Phase::Succeeded;
    assert!(idx.apply(Change::Apply(done)).is_empty());
    // A relist announces only what it did not know.
    idx.apply(Change::Init);
    idx.apply(Change::InitApply(moved));
    idx.apply(Change::InitApply(pod("b", "10.0.0.3")));
    // "a" comes back to life (it had finished), "b" is new.
    assert_eq!(names(idx.apply(Change::InitDone)), ["a", "b"]);
}

#[test]
fn repeated_strings_are_kept_once_and_dropped_when_no_pod_holds_them() {
    let mut idx = PodIndex::default();
    idx.apply(Change::Apply(pod("a", "10.0.0.1")));
    idx.apply(Change::Apply(pod("b", "10.0.0.2")));
    let (a, b) = (idx.get("ns", "a").expect("a"), idx.get("ns", "b").expect("b"));
    assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
    let shared = |f: fn(&PodFacts) -> &Option<Arc<str>>| match (f(&a), f(&b)) {
        (Some(x), Some(y)) => Arc::ptr_eq(x, y),
        _ => false,
    };
    assert!(shared(|p| &p.role) && shared(|p| &p.node_name));
    drop((a, b));
    // Pods on a thousand short-lived nodes come and go: their names do not stay behind.
    for i in 0..1100 {
        let mut p = pod(&format!("p{i}"), "10.0.1.1");
        p.node_name = Some(format!("node-{i}").into());
        idx.apply(Change::Apply(p.clone()));
        idx.apply(Change::Delete(p));
    }
    assert!(idx.strings.strings.len() < 1100, "{} strings kept", idx.strings.strings.len());
    assert!(idx.strings.strings.contains("ns") && idx.strings.strings.contains("role"));
    assert_eq!(idx.len(), 2);
}

#[test]
fn relist_swaps_whole() {
    let mut idx = PodIndex::default();
    idx.apply(Change::Apply(pod("gone", "10.0.0.1")));
    idx.apply(Change::Init);
    idx.apply(Change::InitApply(pod("kept", "10.0.0.2")));
    // Until InitDone the old state still answers.
    assert_eq!(found_name(idx.lookup(ip("10.0.0.1"))), "gone");
    idx.apply(Change::InitDone);
    assert_eq!(idx.lookup(ip("10.0.0.1")), Lookup::NotFound);
    assert_eq!(found_name(idx.lookup(ip("10.0.0.2"))), "kept");
    assert_eq!(idx.len(), 1);
}
