//! Node readiness (`--node-readiness-taint`): nodes register with a startup taint that keeps
//! workload pods off them; the server removes it once the node's agent is ready: subscribed to
//! the node view, which an agent does only after its interception rules are installed, and sent
//! its snapshot. With `--node-readiness-reapply`, the taint goes back on a node whose agent has
//! been gone for a minute. Off by default; then the server writes nothing to nodes.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Taint};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a node's agent may be gone before the taint is put back (with reapply on).
pub const REAPPLY_AFTER: Duration = Duration::from_secs(60);

/// What the hub reports about a node's agents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    /// An agent of the node has its view: it is ready.
    Ready(String),
    /// The node's last agent went away.
    Gone(String),
}

/// `--node-readiness-taint` and `--node-readiness-reapply`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub taint: String,
    pub reapply: bool,
}

/// Runs the readiness controller until `shutdown`: removes the taint on Ready, and (with
/// reapply) puts it back on a node that stays Gone.
pub fn spawn(
    client: kube::Client,
    settings: Settings,
    mut signals: mpsc::Receiver<Signal>,
    shutdown: &CancellationToken,
) {
    let stop = shutdown.clone();
    crate::task::spawn_until(shutdown, async move {
        let api = Api::<Node>::all(client);
        let pending: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, CancellationToken>>> =
            Default::default();
        while let Some(signal) = signals.recv().await {
            match signal {
                Signal::Ready(node) => {
                    if let Some(timer) =
                        pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&node)
                    {
                        timer.cancel();
                    }
                    if let Err(error) = set_taint(&api, &node, &settings.taint, false).await {
                        tracing::warn!(%node, %error, "cannot remove the readiness taint");
                    }
                }
                Signal::Gone(node) if settings.reapply => {
                    let timer = stop.child_token();
                    pending
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(node.clone(), timer.clone());
                    let (api, taint) = (api.clone(), settings.taint.clone());
                    crate::task::spawn_until(&timer, async move {
                        tokio::time::sleep(REAPPLY_AFTER).await;
                        if let Err(error) = set_taint(&api, &node, &taint, true).await {
                            tracing::warn!(%node, %error, "cannot put the readiness taint back");
                        }
                    });
                }
                Signal::Gone(_) => {}
            }
        }
    });
}

/// Adds (`present`) or removes the `NoSchedule` taint `key` on `node`, writing only when it
/// changes anything.
async fn set_taint(api: &Api<Node>, node: &str, key: &str, present: bool) -> Result<(), kube::Error> {
    let current = api.get(node).await?;
    let taints = current.spec.and_then(|s| s.taints).unwrap_or_default();
    let has = taints.iter().any(|t| t.key == key);
    if has == present {
        return Ok(());
    }
    let mut taints: Vec<Taint> = taints.into_iter().filter(|t| t.key != key).collect();
    if present {
        taints.push(Taint { key: key.to_string(), effect: "NoSchedule".into(), ..Taint::default() });
    }
    let patch = serde_json::json!({"spec": {"taints": taints}});
    api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    tracing::info!(%node, taint = key, present, "node readiness taint updated");
    Ok(())
}
