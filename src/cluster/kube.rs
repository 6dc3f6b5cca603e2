//! The Kubernetes source: one watcher pipeline for Pods and one for Namespaces, projected to
//! facts and applied to the [`Cluster`]. kube's watcher handles resourceVersions, bookmarks and
//! 410 Gone (by relisting); its default backoff retries a broken watch while the last known
//! state keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::project::{namespace_facts, pod_facts};
use super::{Change, Cluster, Source, SourceError};

/// Pods and namespaces from the Kubernetes API.
pub struct KubeSource {
    client: Client,
    /// The server-side timeout of each watch.
    watch_timeout: Duration,
}

/// The default [`KubeSource`] watch timeout. kube's watcher treats a watch that sends nothing for
/// this long plus 5 s as dead and reconnects, so this bounds how long a watch that stalls without
/// closing leaves the server blind to new pods (the API server's default, 290 s, is five minutes
/// of "pod not found"). Renewing a watch is cheap: it resumes from its resourceVersion.
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(55);

impl KubeSource {
    /// Connects with the kubeconfig at `path`, or in-cluster configuration (then the usual
    /// kubeconfig discovery) when `path` is `None`.
    pub async fn connect(path: Option<PathBuf>) -> Result<KubeSource, SourceError> {
        let config = match path {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| SourceError::Kubeconfig(format!("{}: {e}", path.display())))?;
                let options = kube::config::KubeConfigOptions::default();
                kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| SourceError::Kubeconfig(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| SourceError::Kubeconfig(e.to_string()))?,
        };
        let client = Client::try_from(config).map_err(SourceError::Kube)?;
        Ok(KubeSource { client, watch_timeout: WATCH_TIMEOUT })
    }

    /// The client, for writing Events with the same credentials.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Wraps an existing client.
    pub fn from_client(client: Client) -> KubeSource {
        KubeSource { client, watch_timeout: WATCH_TIMEOUT }
    }

    /// Renews each watch after `timeout` (whole seconds, at least one).
    pub fn watching_for(mut self, timeout: Duration) -> KubeSource {
        self.watch_timeout = timeout;
        self
    }
}

impl Source for KubeSource {
    async fn run(self, cluster: Arc<Cluster>, shutdown: CancellationToken) -> Result<(), SourceError> {
        let seconds = u32::try_from(self.watch_timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let config = watcher::Config::default().timeout(seconds);
        let pods = watcher(Api::<Pod>::all(self.client.clone()), config.clone());
        let namespaces = watcher(Api::<Namespace>::all(self.client), config);
        let pods =
            drive(pods, "pods", pod_facts, |c| cluster.apply_pod(c), || cluster.note_watch_error(false));
        let namespaces = drive(
            namespaces,
            "namespaces",
            namespace_facts,
            |c| cluster.apply_namespace(c),
            || cluster.note_watch_error(true),
        );
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = pods => {}
            () = namespaces => {}
        }
        Ok(())
    }
}

/// Feeds one watcher stream, projected by `project`, into `apply` until the stream ends.
async fn drive<K, T>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    kind: &'static str,
    project: fn(&K) -> Option<T>,
    apply: impl Fn(Change<T>),
    failed: impl Fn(),
) {
    let mut stream = std::pin::pin!(stream.default_backoff());
    while let Some(event) = stream.next().await {
        let change = match event {
            Ok(watcher::Event::Init) => Some(Change::Init),
            Ok(watcher::Event::InitDone) => Some(Change::InitDone),
            Ok(watcher::Event::InitApply(o)) => project(&o).map(Change::InitApply),
            Ok(watcher::Event::Apply(o)) => project(&o).map(Change::Apply),
            Ok(watcher::Event::Delete(o)) => project(&o).map(Change::Delete),
            Err(error) => {
                failed();
                tracing::warn!(kind, %error, "watch failed; serving the last known state while it recovers");
                None
            }
        };
        if let Some(change) = change {
            apply(change);
        }
    }
}
