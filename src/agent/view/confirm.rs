//! Confirming an entry while no server answers. The view's copy goes stale during an outage: a
//! pod deleted meanwhile keeps its entry, and a new pod given its IP would be answered with the
//! deleted pod's role and credentials. So while the view is not live, an entry is served only
//! if the kubelet's PodResources API (a node-local source, see `agent::pod_resources`) still
//! lists its pod by namespace and name. Without that source (no socket configured, or the
//! kubelet does not answer), an entry is served for at most [`UNCONFIRMED_BOUND`] after the view
//! was last live; past it, the request goes to the servers, which fail closed (503) while they
//! are unreachable. While the view is live nothing here runs: a hit makes no call.
//!
//! PodResources names pods, it gives no UID: a pod deleted during the outage and re-created with
//! the same namespace and name on this node (a StatefulSet's pod can be) confirms the old entry.
//! Its IP is then usually another one; the residual is a third pod given the old IP while that
//! happens, which is then answered with the same-named pod's role.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ViewEntry;
use crate::agent::pod_resources::{self, Running};

/// How long after the view was last live an entry is served without a confirming source.
pub const UNCONFIRMED_BOUND: Duration = Duration::from_secs(30);
/// How long one List answers for every request (concurrent requests share one List).
const FRESH: Duration = Duration::from_secs(1);

/// What one List gave: the running pods, or why it failed.
type Listed = Result<Arc<Running>, String>;

/// The node-local source entries are confirmed from, with its last answer.
pub struct Confirm {
    socket: Option<PathBuf>,
    /// How long an entry is served unconfirmed ([`UNCONFIRMED_BOUND`] outside tests).
    bound: Duration,
    /// The last List: when, and the pods it gave (or why it failed). Held across a List, so
    /// concurrent requests wait for the one in flight instead of each making their own.
    last: tokio::sync::Mutex<Option<(Instant, Listed)>>,
}

impl Confirm {
    /// Confirms from the kubelet at `socket`; `None` confirms from nothing (`bound` alone).
    pub fn new(socket: Option<PathBuf>, bound: Duration) -> Confirm {
        Confirm { socket, bound, last: tokio::sync::Mutex::default() }
    }

    /// Whether `entry` may be served with the view not live for `down_for`.
    pub async fn serves(&self, entry: &ViewEntry, down_for: Duration) -> bool {
        if let Some(running) = self.running().await {
            return running.contains(&(entry.pod.namespace.to_string(), entry.pod.name.to_string()));
        }
        down_for < self.bound
    }

    /// The pods the kubelet runs, at most [`FRESH`] old; `None` without a source or an answer.
    async fn running(&self) -> Option<Arc<Running>> {
        let socket = self.socket.as_ref()?;
        let mut last = self.last.lock().await;
        if let Some((at, result)) = last.as_ref()
            && at.elapsed() < FRESH
        {
            return result.as_ref().ok().cloned();
        }
        let result = pod_resources::list(socket.clone()).await.map(Arc::new);
        if let Err(why) = &result {
            tracing::warn!(%why, socket = %socket.display(), "cannot confirm the node view from PodResources");
        }
        *last = Some((Instant::now(), result.clone()));
        result.ok()
    }
}
