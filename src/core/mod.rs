//! The request core, which belongs to neither mode: the cluster view, the policy, the
//! credentials cache and the one request path over them ([`Core`]), its settings, its errors,
//! and the prefetcher that warms the cache ahead of requests. kiam's server (`server/`, over
//! gRPC) and kube2iam mode (`kube2iam/`, in-process) both sit on it.

pub mod pitfalls;
pub mod prefetch;
pub mod request;

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use self::request::{Ask, Core, Error, TERMINATING_GRACE, TokenAsk, parse_ip};
use crate::cluster::events::EventSink;
use crate::cluster::{Cluster, Fence, Source};
use crate::creds::{AssumeRole, CredentialCache, Identity, Lifetimes};
use crate::metrics::Metrics;
use crate::policy::Policy;

/// `--sts-rate`'s default: AssumeRole calls a second per process. STS's default quota is 600 a
/// second per account and region, shared by everything in the account; 50 leaves room for a
/// dozen servers (or nodes in kube2iam mode) in a burst, and single-flight plus the cache make a
/// steady state need far fewer (one call per identity per refresh period).
pub const DEFAULT_STS_RATE: u32 = 50;

/// How the core decides and caches; the same in both modes.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    pub lifetimes: Lifetimes,
    /// `--session`: the session-name suffix for pods without the annotation.
    pub session: String,
    /// `--fetchers`: prefetch workers, and the bound on STS calls in flight.
    pub fetchers: usize,
    /// `--prefetch-buffer-size`: announcements waiting for a worker.
    pub prefetch_buffer: usize,
    /// `--sts-rate`: AssumeRole calls a second at most (requests first, then prefetch, then
    /// refreshes).
    pub sts_rate: u32,
}

/// Which identities this process prefetches and refreshes: all of them, unless it shares them
/// with peers (`kiam server --peers`). Requests are answered whoever owns the identity.
pub trait Ownership: Send + Sync + 'static {
    /// Whether this process keeps `identity` warm.
    fn owns(&self, identity: &Identity) -> bool;
}

/// What the mode plugs into the core: the node view's hub (kiam's server only), and the
/// identities it owns among its peers (`--peers`; `None`: all of them).
#[derive(Default)]
pub struct Hooks {
    pub fence: Option<Arc<dyn Fence>>,
    pub ownership: Option<Arc<dyn Ownership>>,
}

/// Builds the core (cluster view, cache, policy) and starts what feeds it: the source of pods
/// and namespaces and the prefetcher. kiam's server and kube2iam mode (one per node) both start
/// their core here; the caller serves it once its cluster has synced.
pub fn start<A: AssumeRole, S: Source>(
    settings: &Settings,
    sts: A,
    source: S,
    events: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    hooks: Hooks,
    shutdown: &CancellationToken,
) -> Arc<Core<A>> {
    let (announce, announcements) = mpsc::channel(settings.prefetch_buffer.max(1));
    let cluster = Arc::new(Cluster::new(Some(announce), Arc::clone(&metrics)));
    if let Some(fence) = hooks.fence {
        cluster.set_fence(fence);
    }
    if settings.policy.kube2iam.is_none() {
        let warnings = pitfalls::NameOnlyWarnings::new(settings.policy.clone());
        cluster.set_namespace_check(Arc::new(move |ns| {
            warnings.check(ns);
        }));
    }
    let cache = CredentialCache::new(sts, settings.lifetimes, settings.fetchers, Arc::clone(&metrics))
        .with_rate(settings.sts_rate);
    let policy = settings.policy.clone();
    let core = Core::new(Arc::clone(&cluster), policy, cache, settings.session.clone(), events, metrics);
    let core = Arc::new(core.with_ownership(hooks.ownership));
    let source_stop = shutdown.clone();
    crate::task::spawn_until(shutdown, async move {
        if let Err(error) = source.run(cluster, source_stop).await {
            tracing::error!(%error, "pod/namespace source stopped");
        }
    });
    prefetch::spawn(Arc::clone(&core), announcements, settings.fetchers, shutdown.clone());
    core
}
