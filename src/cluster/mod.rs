//! What the server knows of the cluster: pods by IP and namespaces by name, kept current by a
//! [`Source`]. The Kubernetes list/watch ([`kube::KubeSource`]) and a manifest file
//! ([`file::FileSource`], for local development and the demo) are the two sources; both feed the
//! same [`Change`] events into [`Cluster`], which applies them with the pure functions in
//! [`index`].

pub mod events;
pub mod file;
pub mod index;
pub mod kube;
mod node_signal;
pub mod project;

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub use index::Lookup;
use index::{NamespaceIndex, PodIndex, ServiceAccountIndex};

use crate::metrics::{Kind, Metrics};
use crate::model::{NamespaceFacts, PodFacts, ServiceAccountFacts};

/// One list/watch event, in the shape kube's watcher produces: a relist is `Init`, then
/// `InitApply` for every object, then `InitDone`.
#[derive(Debug, Clone)]
pub enum Change<T> {
    Init,
    InitApply(T),
    InitDone,
    Apply(T),
    Delete(T),
}

/// A source of pods and namespaces. It runs until `shutdown` fires, applying what it sees to
/// `cluster` and marking each kind synced after its first complete listing.
pub trait Source: Send + 'static {
    /// Runs the source.
    fn run(
        self,
        cluster: Arc<Cluster>,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;
}

/// Why a source stopped or could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The Kubernetes client could not be built.
    #[error("kubernetes client: {0}")]
    Kube(#[source] ::kube::Error),
    /// The kubeconfig could not be read.
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    /// The manifest file could not be read or parsed.
    #[error("manifest file {path}: {message}")]
    File { path: String, message: String },
}

/// Whatever must stop answering from a pod slot before the cluster view changes it: the
/// node-view hub, which fences the agents that hold the slot.
pub trait Fence: Send + Sync + 'static {
    /// Called with the `(node, IP)` slots a change is about to alter; resolves once every agent
    /// holding one has stopped answering from it (or a bound has passed). The returned guard is
    /// held until the change is applied.
    fn fence(&self, slots: Vec<(String, IpAddr)>) -> Pin<Box<dyn Future<Output = FenceGuard> + Send + '_>>;
}

/// Shown each namespace as it is applied (the server's warning about `permitted` expressions
/// that can only match role names).
pub type NamespaceCheck = Arc<dyn Fn(&NamespaceFacts) + Send + Sync>;

/// Held while a fenced change is applied; dropping it lets the fenced views catch up.
pub struct FenceGuard(#[allow(dead_code)] Vec<Box<dyn Send>>);

impl FenceGuard {
    /// A guard holding `parts` (lock guards, typically) until the change is applied.
    pub fn holding(parts: Vec<Box<dyn Send>>) -> FenceGuard {
        FenceGuard(parts)
    }
}

/// Which kinds have completed their first listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    pub pods: bool,
    pub namespaces: bool,
    /// With `--service-account-roles`.
    pub service_accounts: bool,
}

/// The shared, always-consistent view of pods and namespaces.
pub struct Cluster {
    pods: RwLock<PodIndex>,
    namespaces: RwLock<NamespaceIndex>,
    synced: watch::Sender<Synced>,
    /// Bumped on every pod change, so that requests for a pod not seen yet can wait for it.
    /// Node views wait on their node's signal instead ([`Cluster::node_changes`]).
    generation: watch::Sender<u64>,
    /// Bumped on every namespace change, likewise.
    ns_generation: watch::Sender<u64>,
    /// Where new or changed pods with a role are announced for prefetching.
    announce: Option<mpsc::Sender<Arc<PodFacts>>>,
    /// Dropped announcements, relists, watch failures and sync state are counted here directly.
    metrics: Arc<Metrics>,
    /// ServiceAccounts' roles, with `--service-account-roles`.
    service_accounts: RwLock<ServiceAccountIndex>,
    /// Whether a source watches ServiceAccounts (then they must sync too).
    watches_service_accounts: std::sync::atomic::AtomicBool,
    /// Told before a change alters a slot some agent may be answering from.
    fence: OnceLock<Arc<dyn Fence>>,
    /// Shown every namespace applied or listed.
    namespace_check: OnceLock<NamespaceCheck>,
    /// A signal per watched node, sent on every pod change that may alter its entries, so that
    /// each node's view wakes only for its own changes.
    node_signals: node_signal::NodeSignals,
}

/// The `kind` label of the list/watch metrics.
const PODS: Kind = Kind { kind: "pods" };
const NAMESPACES: Kind = Kind { kind: "namespaces" };

/// Counters of the list/watch machinery, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WatchStats {
    pub pod_relists: u64,
    pub namespace_relists: u64,
    pub pod_watch_errors: u64,
    pub namespace_watch_errors: u64,
}

impl Cluster {
    /// A cluster view that announces new or changed pods with a role on `announce`. The send
    /// never blocks: when the channel is full the announcement is dropped and counted, and the
    /// pod's credentials are fetched on its first request instead.
    pub fn new(announce: Option<mpsc::Sender<Arc<PodFacts>>>, metrics: Arc<Metrics>) -> Cluster {
        for kind in [&PODS, &NAMESPACES] {
            metrics.server.cache_synced.get_or_create(kind).set(0);
        }
        Cluster {
            pods: RwLock::default(),
            namespaces: RwLock::default(),
            synced: watch::Sender::new(Synced::default()),
            generation: watch::Sender::new(0),
            ns_generation: watch::Sender::new(0),
            announce,
            metrics,
            fence: OnceLock::new(),
            service_accounts: RwLock::default(),
            watches_service_accounts: std::sync::atomic::AtomicBool::new(false),
            namespace_check: OnceLock::new(),
            node_signals: node_signal::NodeSignals::default(),
        }
    }

    /// Installs the fence (once; later calls are ignored).
    pub fn set_fence(&self, fence: Arc<dyn Fence>) {
        let _ = self.fence.set(fence);
    }

    /// Installs the namespace check (once; later calls are ignored).
    pub fn set_namespace_check(&self, check: NamespaceCheck) {
        let _ = self.namespace_check.set(check);
    }

    /// Applies a pod change as sources do: agents holding a slot the change alters are fenced
    /// first, so none answers from it after the server would answer differently.
    pub async fn change_pod(&self, change: Change<PodFacts>) {
        let _guard = match self.fence.get() {
            Some(fence) => {
                let slots = self.pods.read().unwrap_or_else(PoisonError::into_inner).invalidated_by(&change);
                if slots.is_empty() { None } else { Some(fence.fence(slots).await) }
            }
            None => None,
        };
        self.apply_pod(change);
    }

    /// Applies a namespace change as sources do, fencing the slots of the namespace's pods when
    /// its policy changes.
    pub async fn change_namespace(&self, change: Change<NamespaceFacts>) {
        let _guard = match self.fence.get() {
            Some(fence) => {
                let altered = match &change {
                    Change::Apply(ns) | Change::Delete(ns) => {
                        let now = self.namespace(&ns.name);
                        let same = matches!(&change, Change::Apply(_))
                            && now.is_some_and(|n| {
                                n.permitted.as_ref().map(|p| &p.expr)
                                    == ns.permitted.as_ref().map(|p| &p.expr)
                            });
                        (!same).then(|| ns.name.clone())
                    }
                    Change::InitDone => Some(String::new()),
                    _ => None,
                };
                let slots = altered
                    .map(|name| self.pods.read().unwrap_or_else(PoisonError::into_inner).in_namespace(&name));
                match slots {
                    Some(slots) if !slots.is_empty() => Some(fence.fence(slots).await),
                    _ => None,
                }
            }
            None => None,
        };
        self.apply_namespace(change);
    }

    /// A receiver that changes whenever a pod change that may alter `node`'s view entries is
    /// applied: one of its pods changes, moves in or out, or an IP of one of them moves to or
    /// from another pod, or a relist ends. Namespace and ServiceAccount changes are on
    /// [`namespace_changes`](Self::namespace_changes).
    pub fn node_changes(&self, node: &str) -> watch::Receiver<()> {
        self.node_signals.subscribe(node)
    }

    /// The IPs of pods on `node`, each with the pod a lookup finds there.
    pub fn node_ips(&self, node: &str) -> Vec<(IpAddr, Lookup)> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).node_ips(node)
    }

    /// Applies a pod change; `InitDone` marks pods synced.
    pub fn apply_pod(&self, change: Change<PodFacts>) {
        let done = matches!(change, Change::InitDone);
        if done {
            self.metrics.server.relists.get_or_create(&PODS).inc();
            self.metrics.server.cache_synced.get_or_create(&PODS).set(1);
        }
        let (announce, touched) = {
            let mut pods = self.pods.write().unwrap_or_else(PoisonError::into_inner);
            let touched = pods.nodes_touched(&change);
            (pods.apply(change), touched)
        };
        // After the write: a view woken here, or subscribed since, reads the change.
        match touched {
            Some(nodes) => self.node_signals.wake(&nodes),
            None => self.node_signals.wake_all(),
        }
        self.generation.send_modify(|g| *g += 1);
        if done {
            self.synced.send_if_modified(|s| !std::mem::replace(&mut s.pods, true));
        }
        if let Some(tx) = &self.announce {
            for pod in announce {
                if tx.try_send(pod).is_err() {
                    self.metrics.server.dropped_pods.inc();
                }
            }
        }
    }

    /// Records a failed watch of pods (`namespaces == false`) or namespaces; the source
    /// restarts it.
    pub fn note_watch_error(&self, namespaces: bool) {
        let kind = if namespaces { &NAMESPACES } else { &PODS };
        self.metrics.server.watch_restarts.get_or_create(kind).inc();
    }

    /// Relists and watch failures so far.
    ///
    /// Each count is read, and its lock released, before the next: a series' guard held while
    /// the same family creates another (a write lock) would deadlock the thread. Reading does not
    /// create series either, so `/metrics` shows none that never moved.
    pub fn watch_stats(&self) -> WatchStats {
        let m = &self.metrics.server;
        let count = |family: &Family<Kind, Counter>, kind: &Kind| family.get(kind).map_or(0, |c| c.get());
        WatchStats {
            pod_relists: count(&m.relists, &PODS),
            namespace_relists: count(&m.relists, &NAMESPACES),
            pod_watch_errors: count(&m.watch_restarts, &PODS),
            namespace_watch_errors: count(&m.watch_restarts, &NAMESPACES),
        }
    }

    /// Which kinds have completed a first listing.
    pub fn synced(&self) -> Synced {
        *self.synced.borrow()
    }

    /// Prefetch announcements dropped because the buffer was full (`kiam_k8s_dropped_pods_total`).
    pub fn dropped_announcements(&self) -> u64 {
        self.metrics.server.dropped_pods.get()
    }

    /// A receiver that changes whenever a pod does.
    pub fn pod_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// A receiver that changes whenever a namespace or a ServiceAccount does.
    pub fn namespace_changes(&self) -> watch::Receiver<u64> {
        self.ns_generation.subscribe()
    }

    /// Calls `f` with every pod that can still get credentials.
    pub fn for_each_live_pod(&self, f: impl FnMut(&PodFacts)) {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).for_each_live(f);
    }

    /// Called by a source that watches ServiceAccounts, before it starts: they must sync too.
    pub fn expect_service_accounts(&self) {
        self.watches_service_accounts.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies a ServiceAccount change as sources do, fencing the slots of its namespace's pods
    /// (their role may come from it); `InitDone` marks ServiceAccounts synced.
    pub async fn change_service_account(&self, change: Change<ServiceAccountFacts>) {
        let namespace = match &change {
            Change::Apply(sa) | Change::Delete(sa) => Some(sa.namespace.clone()),
            Change::InitDone => Some(String::new()),
            _ => None,
        };
        let _guard = match (self.fence.get(), namespace) {
            (Some(fence), Some(namespace)) => {
                let slots = self.pods.read().unwrap_or_else(PoisonError::into_inner).in_namespace(&namespace);
                if slots.is_empty() { None } else { Some(fence.fence(slots).await) }
            }
            _ => None,
        };
        let done = matches!(change, Change::InitDone);
        self.service_accounts.write().unwrap_or_else(PoisonError::into_inner).apply(change);
        // Views and waiters recompute as for a namespace change.
        self.ns_generation.send_modify(|g| *g += 1);
        if done {
            self.synced.send_if_modified(|s| !std::mem::replace(&mut s.service_accounts, true));
        }
    }

    /// The role the ServiceAccount `namespace/name` names, if any.
    pub fn service_account_role(&self, namespace: &str, name: &str) -> Option<String> {
        self.service_accounts.read().unwrap_or_else(PoisonError::into_inner).role(namespace, name)
    }

    /// Every namespace.
    pub fn namespaces(&self) -> Vec<Arc<NamespaceFacts>> {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).all()
    }

    /// Applies a namespace change; `InitDone` marks namespaces synced.
    pub fn apply_namespace(&self, change: Change<NamespaceFacts>) {
        let done = matches!(change, Change::InitDone);
        if let (Change::Apply(ns) | Change::InitApply(ns), Some(check)) =
            (&change, self.namespace_check.get())
        {
            check(ns);
        }
        if done {
            self.metrics.server.relists.get_or_create(&NAMESPACES).inc();
            self.metrics.server.cache_synced.get_or_create(&NAMESPACES).set(1);
        }
        self.namespaces.write().unwrap_or_else(PoisonError::into_inner).apply(change);
        self.ns_generation.send_modify(|g| *g += 1);
        if done {
            self.synced.send_if_modified(|s| !std::mem::replace(&mut s.namespaces, true));
        }
    }

    /// The pod that owns `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Lookup {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).lookup(ip)
    }

    /// The pod called `name` in `namespace` (hostNetwork and finished pods included).
    pub fn pod_by_name(&self, namespace: &str, name: &str) -> Option<Arc<PodFacts>> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).get(namespace, name)
    }

    /// The namespace called `name`.
    pub fn namespace(&self, name: &str) -> Option<Arc<NamespaceFacts>> {
        self.namespaces.read().unwrap_or_else(PoisonError::into_inner).get(name)
    }

    /// How many pods are indexed.
    pub fn pod_count(&self) -> usize {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether both kinds have completed a first listing.
    pub fn is_synced(&self) -> bool {
        let s = *self.synced.borrow();
        s.pods && s.namespaces
    }

    /// Resolves once both kinds have completed a first listing.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let sa = || !self.watches_service_accounts.load(std::sync::atomic::Ordering::SeqCst);
        let _ = rx.wait_for(|s| s.pods && s.namespaces && (s.service_accounts || sa())).await;
    }
}

#[cfg(test)]
mod tests;
