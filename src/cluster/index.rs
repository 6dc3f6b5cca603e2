//! The pod-by-IP and namespace-by-name indexes, updated by plain synchronous functions from
//! list/watch changes, like kube's `reflector::Writer`: changes between `Init` and `InitDone`
//! are buffered and swapped in whole, so a relist never leaves a half-empty index behind.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::Arc;

use hashbrown::HashTable;
use smallvec::SmallVec;

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

/// The pods at one IP: almost always one, held inline (no allocation per address).
type Slots = SmallVec<[Slot; 1]>;

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
///
/// Laid out for 100,000 pods (figure 3): the name table holds only the pod's `Arc` (hashed by its
/// namespace and name, which the pod already carries), an IP's slots hold one pod inline, and the
/// strings that pods repeat are interned, so that each is stored once.
#[derive(Default)]
pub struct PodIndex {
    pods: HashTable<Arc<PodFacts>>,
    hasher: RandomState,
    by_ip: HashMap<IpAddr, Slots>,
    by_node: HashMap<Arc<str>, HashSet<Slot>>,
    strings: Interner,
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
                self.remove(&pod.namespace, &pod.name);
            }
            Step::Replace(pods) => {
                let old = std::mem::take(&mut self.pods);
                self.by_ip.clear();
                self.by_node.clear();
                for pod in pods {
                    let hash = self.hash(&pod.namespace, &pod.name);
                    let before = old.find(hash, |p| same_name(p, &pod.namespace, &pod.name)).cloned();
                    announce.extend(self.upsert(pod, before));
                }
            }
            Step::Buffered => {}
        }
        self.strings.prune();
        announce
    }

    fn hash(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    fn find(&self, namespace: &str, name: &str) -> Option<&Arc<PodFacts>> {
        self.pods.find(self.hash(namespace, name), |p| same_name(p, namespace, name))
    }

    fn upsert(&mut self, mut pod: PodFacts, before: Option<Arc<PodFacts>>) -> Option<Arc<PodFacts>> {
        let before = before.or_else(|| self.remove(&pod.namespace, &pod.name));
        self.strings.share(&mut pod);
        let pod = Arc::new(pod);
        for ip in pod.addresses() {
            self.by_ip.entry(ip).or_default().push(Slot(Arc::clone(&pod)));
        }
        if let Some(node) = &pod.node_name {
            self.by_node.entry(Arc::clone(node)).or_default().insert(Slot(Arc::clone(&pod)));
        }
        let hasher = self.hasher.clone();
        let rehash = move |p: &Arc<PodFacts>| hasher.hash_one((&*p.namespace, &*p.name));
        self.pods.insert_unique(self.hash(&pod.namespace, &pod.name), Arc::clone(&pod), rehash);
        worth_announcing(before.as_deref(), &pod).then_some(pod)
    }

    fn remove(&mut self, namespace: &str, name: &str) -> Option<Arc<PodFacts>> {
        let hash = self.hash(namespace, name);
        let entry = self.pods.find_entry(hash, |p| same_name(p, namespace, name)).ok()?;
        let old = Slot(entry.remove().0);
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
        self.pods.iter().filter(|p| p.can_own_ip()).for_each(|p| f(p));
    }

    /// The pod called `name` in `namespace`, whatever its state.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<PodFacts>> {
        self.find(namespace, name).cloned()
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
                out.extend(pod.addresses().into_iter().map(|ip| (node.to_string(), ip)));
            }
        };
        match change {
            Change::Apply(pod) | Change::InitApply(pod) if self.relist.0.is_none() => {
                let old = self.find(&pod.namespace, &pod.name);
                if old.is_some_and(|old| **old == *pod) {
                    return out;
                }
                old.inspect(|old| slot(old));
                let owners = pod.addresses().into_iter().filter_map(|ip| self.by_ip.get(&ip)).flatten();
                owners
                    .map(|s| &s.0)
                    .filter(|p| !same_name(p, &pod.namespace, &pod.name))
                    .for_each(|p| slot(p));
            }
            Change::Delete(pod) => {
                self.find(&pod.namespace, &pod.name).inspect(|old| slot(old));
            }
            Change::InitDone => {
                let fresh: HashMap<(&str, &str), &PodFacts> =
                    self.relist.0.iter().flatten().map(|p| ((&*p.namespace, &*p.name), p)).collect();
                for old in &self.pods {
                    if fresh.get(&(&*old.namespace, &*old.name)).is_none_or(|new| **new != **old) {
                        slot(old);
                    }
                }
            }
            _ => {}
        }
        out
    }

    /// The nodes whose view entries `change` may alter, computed before it is applied: the pod's
    /// old and new node, and the nodes of every other pod claiming one of its old or new IPs
    /// (their entry for it may change owner). `None` for a relist's end: every node. A buffered
    /// relist item and an unchanged pod touch none.
    pub fn nodes_touched(&self, change: &Change<PodFacts>) -> Option<Vec<String>> {
        let pod = match change {
            Change::InitApply(_) if self.relist.0.is_some() => return Some(Vec::new()),
            Change::Apply(pod) | Change::InitApply(pod) | Change::Delete(pod) => pod,
            Change::InitDone => return None,
            Change::Init => return Some(Vec::new()),
        };
        let old = self.find(&pod.namespace, &pod.name);
        if !matches!(change, Change::Delete(_)) && old.is_some_and(|old| **old == *pod) {
            return Some(Vec::new());
        }
        let ips = pod.addresses().into_iter().chain(old.into_iter().flat_map(|old| old.addresses()));
        let claimants = ips.filter_map(|ip| self.by_ip.get(&ip)).flatten().map(|slot| &*slot.0);
        let mut nodes: Vec<String> = std::iter::once(pod)
            .chain(old.map(|old| &**old))
            .chain(claimants)
            .filter_map(|p| p.node_name.as_deref().map(String::from))
            .collect();
        nodes.sort_unstable();
        nodes.dedup();
        Some(nodes)
    }

    /// Every live pod of `namespace` that is on a node: what a namespace change may alter.
    pub fn in_namespace(&self, namespace: &str) -> Vec<(String, IpAddr)> {
        let pods = self.pods.iter().filter(|p| &*p.namespace == namespace || namespace.is_empty());
        pods.filter_map(|p| Some((p.node_name.as_deref()?.to_string(), p.addresses())))
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
                || b.session_name() != now.session_name()
                || b.external_id() != now.external_id()
        })
}

fn same_name(pod: &PodFacts, namespace: &str, name: &str) -> bool {
    &*pod.namespace == namespace && &*pod.name == name
}

/// The strings that many pods repeat (namespace, node, role, ServiceAccount), each kept once.
/// A string no pod holds any more is dropped once the set has doubled since the last sweep, so
/// churning nodes and namespaces leave nothing behind, at an amortised constant cost per change.
#[derive(Default)]
struct Interner {
    strings: HashSet<Arc<str>>,
    swept_at: usize,
}

impl Interner {
    fn one(&mut self, s: &mut Arc<str>) {
        match self.strings.get(&**s) {
            Some(kept) => *s = Arc::clone(kept),
            None => drop(self.strings.insert(Arc::clone(s))),
        }
    }

    /// Replaces the pod's repeated strings with the kept ones.
    fn share(&mut self, pod: &mut PodFacts) {
        self.one(&mut pod.namespace);
        for s in [&mut pod.node_name, &mut pod.role, &mut pod.service_account].into_iter().flatten() {
            self.one(s);
        }
    }

    fn prune(&mut self) {
        if self.strings.len() > 2 * self.swept_at + 1024 {
            self.strings.retain(|s| Arc::strong_count(s) > 1);
            self.swept_at = self.strings.len();
        }
    }
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
#[path = "index_tests.rs"]
mod tests;
