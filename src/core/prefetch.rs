//! Credentials ready before the pod asks: `--fetchers` workers warm the cache for pods the
//! cluster announces (new, or with a changed identity), and a refresher renews, at half-life,
//! every identity that some live pod still uses. Identities no pod uses are left to lapse.
//!
//! Announcements wait in the cluster's channel, bounded by `--prefetch-buffer-size`; when it is
//! full they are dropped and counted, and those pods are served on their first request.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Core;
use crate::creds::{AssumeRole, Identity};
use crate::model::PodFacts;

/// How long an announced pod's prefetch waits for its namespace to arrive.
const NAMESPACE_WAIT: Duration = Duration::from_secs(10);

/// How often the refresher looks for identities due for renewal.
pub fn refresh_interval(session: Duration) -> Duration {
    (session / 20).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// Runs the workers and the refresher until `shutdown`; every fetch they start stops with it.
pub fn spawn<A: AssumeRole>(
    core: Arc<Core<A>>,
    mut announcements: mpsc::Receiver<Arc<PodFacts>>,
    fetchers: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(fetchers.max(1)));
    let warming = Arc::new(Warming::default());
    // The first tick fires at once: the pass right after the caches sync.
    let mut tick = tokio::time::interval(refresh_interval(core.cache().lifetimes().session));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::spawn(async move {
        // Announcements made while the caches fill wait in the channel; once synced, one pass
        // fetches every identity in use, whatever was announced or dropped.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = core.cluster().wait_synced() => {}
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                pod = announcements.recv() => {
                    let Some(pod) = pod else { return };
                    let (core, permits) = (Arc::clone(&core), Arc::clone(&permits));
                    if core.cluster().namespace(&pod.namespace).is_some() {
                        // A pod whose identity is held or on its way (the replicas of one
                        // Deployment arrive together) takes no worker: waiting on another's
                        // fetch, it would keep the next identity's prefetch waiting.
                        let Some(identity) = to_warm(&core, &pod, &warming) else { continue };
                        let Ok(permit) = permits.acquire_owned().await else { return };
                        crate::task::spawn_until(&shutdown, async move { warm(&core, identity).await; drop(permit) });
                    } else {
                        // The pod's namespace is still on its way (a separate watch): wait for it
                        // without holding a worker.
                        let warming = Arc::clone(&warming);
                        crate::task::spawn_until(&shutdown, async move {
                            core.wait_namespace(&pod.namespace, Instant::now() + NAMESPACE_WAIT).await;
                            let Some(identity) = to_warm(&core, &pod, &warming) else { return };
                            let Ok(permit) = permits.acquire_owned().await else { return };
                            warm(&core, identity).await;
                            drop(permit);
                        });
                    }
                }
                _ = tick.tick() => refresh(&core, &permits, &shutdown).await,
                () = core.rescan_requested() => refresh(&core, &permits, &shutdown).await,
            }
        }
    });
}

/// Renews (or fetches) every identity due now, a worker each.
async fn refresh<A: AssumeRole>(core: &Arc<Core<A>>, permits: &Arc<Semaphore>, shutdown: &CancellationToken) {
    for identity in due(core) {
        let Ok(permit) = Arc::clone(permits).acquire_owned().await else { return };
        let core = Arc::clone(core);
        crate::task::spawn_until(shutdown, async move {
            // Nothing held (a new pod whose announcement was dropped, or an identity taken over
            // from a peer that left): that is a prefetch, ahead of renewals in the STS budget.
            let held = core.cache().state(&identity).is_some_and(|s| s.issued.is_some());
            let result = if held {
                core.cache().refresh(&identity).await.map(drop)
            } else {
                core.cache().prefetch(&identity).await.map(drop)
            };
            if let Err(error) = result {
                tracing::info!(role = %identity.role, %error, "refresh failed; cached credentials stay in use");
            }
            drop(permit);
        });
    }
}

/// The identities being prefetched (from the announcement until the fetch ends).
#[derive(Default)]
struct Warming(Mutex<HashSet<Identity>>);

/// An identity of [`Warming`]: it leaves the set when this is dropped.
struct Warm {
    identity: Identity,
    set: Arc<Warming>,
}

impl Drop for Warm {
    fn drop(&mut self) {
        self.set.0.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.identity);
    }
}

/// The identity whose credentials `pod` will ask for, if the policy allows them (never
/// AssumeRole what will not be served), this process owns it, and it is neither held fresh nor
/// being prefetched already (the replicas of one Deployment arrive together: each would take a
/// worker to wait on the same fetch, and keep the next identity's prefetch waiting).
fn to_warm<A: AssumeRole>(core: &Core<A>, pod: &Arc<PodFacts>, warming: &Arc<Warming>) -> Option<Warm> {
    let pod = &core.with_account_role(Arc::clone(pod));
    let role = core.policy().effective_role(pod)?;
    let identity = core.identity_for(pod, role).ok()?;
    if !core.owns(&identity) || core.cache().state(&identity).is_some_and(|state| state.fresh) {
        return None;
    }
    let first = warming.0.lock().unwrap_or_else(PoisonError::into_inner).insert(identity.clone());
    first.then(|| Warm { identity, set: Arc::clone(warming) })
}

/// Fetches the identity's credentials ahead of the first request.
async fn warm<A: AssumeRole>(core: &Core<A>, warm: Warm) {
    if let Err(error) = core.cache().prefetch(&warm.identity).await {
        tracing::info!(role = %warm.identity.role, %error, "prefetch failed; the first request will retry");
    }
}

/// The identities this process owns that are due for refresh now (or have nothing cached, as
/// when taken over from a peer that left); idle ones are dropped from the cache on the way.
pub fn due<A: AssumeRole>(core: &Core<A>) -> Vec<Identity> {
    let mut due = core.cache().sweep(&core.active_identities());
    due.retain(|identity| core.owns(identity));
    due
}
