//! The pod-by-IP and namespace-by-name indexes, updated by plain synchronous functions from
//! list/watch changes, like kube's `reflector::Writer`: changes between `Init` and `InitDone`
//! are buffered and swapped in whole, so a relist never leaves a half-empty index behind.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use super::Change;
use crate::model::{IpOwner, NamespaceFacts, PodFacts, ServiceAccountFacts, ip_owner};

/// The pods found at one IP.
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// Exactly one pod can own the IP.
    Found(Arc<PodFacts>),
    /// No live pod has the IP.
    NotFound,
    /// Several live pods claim the IP: refuse rather than guess.
    Ambiguous(Vec<Arc<PodFacts>>),
}

type PodKey = (String, String);

/// A pod in the IP and node indexes: the very `Arc` the index holds by name (8 bytes, where a
/// key would copy the namespace and name again), equal and hashed by identity.
#[derive(Clone)]
struct Slot(Arc<PodFacts>);

impl PartialEq for Slot {
    fn eq(&self, other: &Slot) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Slot {}

impl std::hash::Hash for Slot {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::ptr::hash(Arc::as_ptr(&self.0), state)
    }
}

/// What an index must do with one change, once relists are accounted for.
enum Step<T> {
    Upsert(T),
    Delete(T),
    /// A relist finished: this is the whole new state.
    Replace(Vec<T>),
    /// Held until the relist finishes.
    Buffered,
}

/// Buffers the objects of a relist between `Init` and `InitDone`, as kube's `Writer` does.
struct Relist<T>(Option<Vec<T>>);

impl<T> Default for Relist<T> {
    fn default() -> Self {
        Relist(None)
    }
}

impl<T> Relist<T> {
    fn feed(&mut self, change: Change<T>) -> Step<T> {
        match change {
            Change::Init => {
                self.0 = Some(Vec::new());
                Step::Buffered
            }
            Change::InitApply(o) => match self.0.as_mut() {
                Some(buffer) => {
                    buffer.push(o);
                    Step::Buffered
                }
                None => Step::Upsert(o),
            },
            Change::InitDone => Step::Replace(self.0.take().unwrap_or_default()),
            Change::Apply(o) => Step::Upsert(o),
            Change::Delete(o) => Step::Delete(o),
        }
    }
}

/// Pods by `(namespace, name)`, by IP and by node.
#[derive(Default)]
pub struct PodIndex {
    pods: HashMap<PodKey, Arc<PodFacts>>,
    by_ip: HashMap<IpAddr, Vec<Slot>>,
    by_node: HashMap<String, HashSet<Slot>>,
    relist: Relist<PodFacts>,
}

impl PodIndex {
    /// Applies one change. Returns the pods worth announcing to the prefetcher: live pods with a
    /// role that are new, or whose role, session name or external ID changed.
    pub fn apply(&mut self, change: Change<PodFacts>) -> Vec<Arc<PodFacts>> {
        let mut announce = Vec::new();
        match self.relist.feed(change) {
            Step::Upsert(pod) => announce.extend(self.upsert(pod, None)),
            Step::Delete(pod) => {
                self.remove(&(pod.namespace, pod.name));
            }
            Step::Replace(pods) => {
                let old = std::mem::take(&mut self.pods);
                self.by_ip.clear();
                self.by_node.clear();
                for pod in pods {
                    let before = old.get(&(pod.namespace.clone(), pod.name.clone())).cloned();
                    announce.extend(self.upsert(pod, before));
                }
            }
            Step::Buffered => {}
        }
        announce
    }

    fn upsert(&mut self, pod: PodFacts, before: Option<Arc<PodFacts>>) -> Option<Arc<PodFacts>> {
        let key = (pod.namespace.clone(), pod.name.clone());
        let before = before.or_else(|| self.remove(&key));
        let pod = Arc::new(pod);
        for ip in pod.addresses() {
            self.by_ip.entry(ip).or_default().push(Slot(Arc::clone(&pod)));
        }
        if let Some(node) = &pod.node_name {
            self.by_node.entry(node.clone()).or_default().insert(Slot(Arc::clone(&pod)));
        }
        self.pods.insert(key, Arc::clone(&pod));
        worth_announcing(before.as_deref(), &pod).then_some(pod)
    }

    fn remove(&mut self, key: &PodKey) -> Option<Arc<PodFacts>> {
        let old = Slot(self.pods.remove(key)?);
        // Only this pod's own slots are touched: a change costs the same at 100 pods and at
        // 100,000 (the whole map was once swept on every removal).
        for ip in old.0.addresses() {
            if let Some(slots) = self.by_ip.get_mut(&ip) {
                slots.retain(|s| *s != old);
                if slots.is_empty() {
                    self.by_ip.remove(&ip);
                }
            }
        }
        if let Some(node) = &old.0.node_name
            && let Some(slots) = self.by_node.get_mut(node)
        {
            slots.remove(&old);
            if slots.is_empty() {
                self.by_node.remove(node);
            }
        }
        Some(old.0)
    }

    /// Calls `f` with every pod that can still get credentials (not finished, not hostNetwork).
    pub fn for_each_live(&self, mut f: impl FnMut(&PodFacts)) {
        self.pods.values().filter(|p| p.can_own_ip()).for_each(|p| f(p));
    }

    /// The pod called `name` in `namespace`, whatever its state.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodFacts>> {
        self.pods.get(&(namespace.to_string(), name.to_string())).cloned()
    }

    /// The pod that owns `ip`, by the one rule ([`ip_owner`]): finished and hostNetwork pods never
    /// match, a terminating pod keeps its IP until another live pod has it, and two live
    /// non-terminating pods are an error.
    pub fn lookup(&self, ip: IpAddr) -> Lookup {
        match ip_owner(self.by_ip.get(&ip).into_iter().flatten().map(|slot| &slot.0)) {
            IpOwner::One(pod) => Lookup::Found(Arc::clone(pod)),
            IpOwner::Several(pods) => Lookup::Ambiguous(pods.into_iter().cloned().collect()),
            IpOwner::Nobody => Lookup::NotFound,
        }
    }

    /// The IPs of pods on `node`, each with the pod [`lookup`](Self::lookup) finds there (which
    /// may be none, or on another node, when pods disagree about an IP).
    pub fn node_ips(&self, node: &str) -> Vec<(IpAddr, Lookup)> {
        let ips: HashSet<IpAddr> =
            self.by_node.get(node).into_iter().flatten().flat_map(|slot| slot.0.addresses()).collect();
        ips.into_iter().map(|ip| (ip, self.lookup(ip))).collect()
    }

    /// The `(node, IP)` slots whose answer `change` may alter, computed before it is applied: the
    /// changed pod's old IP, and the current owners of the IP it moves to. Unchanged pods alter
    /// nothing.
    pub fn invalidated_by(&self, change: &Change<PodFacts>) -> Vec<(String, IpAddr)> {
        let mut out = Vec::new();
        let mut slot = |pod: &PodFacts| {
            if let Some(node) = &pod.node_name {
                out.extend(pod.addresses().into_iter().map(|ip| (node.clone(), ip)));
            }
        };
        match change {
            Change::Apply(pod) | Change::InitApply(pod) if self.relist.0.is_none() => {
                let key = (pod.namespace.clone(), pod.name.clone());
                let old = self.pods.get(&key);
                if old.is_some_and(|old| **old == *pod) {
                    return out;
                }
                old.inspect(|old| slot(old));
                let owners = pod.addresses().into_iter().filter_map(|ip| self.by_ip.get(&ip)).flatten();
                owners
                    .map(|s| &s.0)
                    .filter(|p| p.namespace != key.0 || p.name != key.1)
                    .for_each(|p| slot(p));
            }
            Change::Delete(pod) => {
                self.pods.get(&(pod.namespace.clone(), pod.name.clone())).inspect(|old| slot(old));
            }
            Change::InitDone => {
                let fresh: HashMap<PodKey, &PodFacts> = self
                    .relist
                    .0
                    .iter()
                    .flatten()
                    .map(|p| ((p.namespace.clone(), p.name.clone()), p))
                    .collect();
                for (key, old) in &self.pods {
                    if fresh.get(key).is_none_or(|new| **new != **old) {
                        slot(old);
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// The nodes whose pods `change` touches: the pod's old and new node, or every node for a
    /// relist.
    pub fn nodes_touched(&self, change: &Change<PodFacts>) -> Vec<String> {
        match change {
            Change::Apply(pod) | Change::Delete(pod) | Change::InitApply(pod) => {
                let old = self.pods.get(&(pod.namespace.clone(), pod.name.clone()));
                let old = old.and_then(|p| p.node_name.clone());
                [pod.node_name.clone(), old].into_iter().flatten().collect()
            }
            Change::InitDone => self
                .by_node
                .keys()
                .cloned()
                .chain(self.relist.0.iter().flatten().filter_map(|p| p.node_name.clone()))
                .collect(),
            Change::Init => Vec::new(),
        }
    }

    /// Every live pod of `namespace` that is on a node: what a namespace change may alter.
    pub fn in_namespace(&self, namespace: &str) -> Vec<(String, IpAddr)> {
        let pods = self.pods.values().filter(|p| p.namespace == namespace || namespace.is_empty());
        pods.filter_map(|p| Some((p.node_name.clone()?, p.addresses())))
            .flat_map(|(node, ips)| ips.into_iter().map(move |ip| (node.clone(), ip)))
            .collect()
    }

    /// How many pods are indexed.
    pub fn len(&self) -> usize {
        self.pods.len()
    }

    /// Whether no pod is indexed.
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }
}

/// Whether a pod's credentials should be fetched ahead of its first request.
fn worth_announcing(before: Option<&PodFacts>, now: &PodFacts) -> bool {
    let live = |p: &PodFacts| p.can_own_ip() && p.role.is_some();
    live(now)
        && before.is_none_or(|b| {
            !live(b)
                || b.role != now.role
                || b.session_name != now.session_name
                || b.external_id != now.external_id
        })
}

/// Namespaces by name.
#[derive(Default)]
pub struct NamespaceIndex {
    namespaces: HashMap<String, Arc<NamespaceFacts>>,
    relist: Relist<NamespaceFacts>,
}

impl NamespaceIndex {
    /// Applies one change.
    pub fn apply(&mut self, change: Change<NamespaceFacts>) {
        match self.relist.feed(change) {
            Step::Upsert(ns) => {
                self.namespaces.insert(ns.name.clone(), Arc::new(ns));
            }
            Step::Delete(ns) => {
                self.namespaces.remove(&ns.name);
            }
            Step::Replace(all) => {
                self.namespaces = all.into_iter().map(|n| (n.name.clone(), Arc::new(n))).collect();
            }
            Step::Buffered => {}
        }
    }

    /// The namespace called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<NamespaceFacts>> {
        self.namespaces.get(name).cloned()
    }

    /// Every namespace.
    pub fn all(&self) -> Vec<Arc<NamespaceFacts>> {
        self.namespaces.values().cloned().collect()
    }
}

/// ServiceAccounts' roles by `(namespace, name)` (with `--service-account-roles`).
#[derive(Default)]
pub struct ServiceAccountIndex {
    roles: HashMap<PodKey, String>,
    relist: Relist<ServiceAccountFacts>,
}

impl ServiceAccountIndex {
    /// Applies one change.
    pub fn apply(&mut self, change: Change<ServiceAccountFacts>) {
        let key = |sa: &ServiceAccountFacts| (sa.namespace.clone(), sa.name.clone());
        match self.relist.feed(change) {
            Step::Upsert(sa) => match sa.role.clone() {
                Some(role) => drop(self.roles.insert(key(&sa), role)),
                None => drop(self.roles.remove(&key(&sa))),
            },
            Step::Delete(sa) => drop(self.roles.remove(&key(&sa))),
            Step::Replace(all) => {
                self.roles = all.into_iter().filter_map(|sa| Some((key(&sa), sa.role?))).collect();
            }
            Step::Buffered => {}
        }
    }

    /// The role the ServiceAccount names, if any.
    pub fn role(&self, namespace: &str, name: &str) -> Option<String> {
        self.roles.get(&(namespace.to_string(), name.to_string())).cloned()
    }
}

#[cfg(test)]
mod tests {
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
            Lookup::Found(p) => p.name.clone(),
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
        dual.ips.push(ip("10.0.0.7"));
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
        let names = |v: Vec<Arc<PodFacts>>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
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
}
