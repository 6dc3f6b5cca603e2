//! The Kubernetes source: one watcher pipeline for Pods and one for Namespaces, projected to
//! facts and applied to the [`Cluster`]. kube's watcher handles resourceVersions, bookmarks and
//! 410 Gone (by relisting); its default backoff retries a broken watch while the last known
//! state keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use super::project::{Projection, service_account_facts};
use super::{Change, Cluster, Source, SourceError};

/// Pods and namespaces from the Kubernetes API.
pub struct KubeSource {
    client: Client,
    /// Which annotations the projections read.
    projection: Projection,
    /// Only pods on this node (`spec.nodeName`), as kube2iam's `--node` does.
    node: Option<String>,
    /// Also watch ServiceAccounts (`--service-account-roles`).
    service_accounts: bool,
    /// The server-side timeout of each watch.
    watch_timeout: Duration,
}

/// How to reach the API server.
#[derive(Clone, Debug)]
pub enum KubeAccess {
    /// A kubeconfig file, or in-cluster configuration (then the usual discovery) when `None`.
    Kubeconfig(Option<PathBuf>),
    /// A URL and a bearer token (kube2iam's `--api-server` and `--api-token`).
    Server { url: String, token: String },
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
        Ok(KubeSource::from_client(client(config)?))
    }

    /// The client, for writing Events with the same credentials.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Wraps an existing client.
    pub fn from_client(client: Client) -> KubeSource {
        KubeSource {
            client,
            projection: Projection::default(),
            node: None,
            service_accounts: false,
            watch_timeout: WATCH_TIMEOUT,
        }
    }

    /// Connects as `access` says; `insecure` skips verifying the API server's certificate.
    pub async fn connect_with(access: &KubeAccess, insecure: bool) -> Result<KubeSource, SourceError> {
        let mut config = match access {
            KubeAccess::Kubeconfig(path) => {
                return KubeSource::connect_insecure(path.clone(), insecure).await;
            }
            KubeAccess::Server { url, token } => {
                let url =
                    url.parse().map_err(|e| SourceError::Kubeconfig(format!("--api-server {url:?}: {e}")))?;
                let mut config = kube::Config::new(url);
                config.auth_info.token = Some(token.clone().into());
                config
            }
        };
        config.accept_invalid_certs = insecure;
        Ok(KubeSource::from_client(client(config)?))
    }

    async fn connect_insecure(path: Option<PathBuf>, insecure: bool) -> Result<KubeSource, SourceError> {
        let source = KubeSource::connect(path.clone()).await?;
        if !insecure {
            return Ok(source);
        }
        let mut config = match path {
            Some(path) => {
                let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| SourceError::Kubeconfig(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                    .await
                    .map_err(|e| SourceError::Kubeconfig(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::infer().await.map_err(|e| SourceError::Kubeconfig(e.to_string()))?,
        };
        config.accept_invalid_certs = true;
        Ok(KubeSource::from_client(client(config)?))
    }

    /// Reads annotations with `projection`'s keys.
    pub fn with_projection(mut self, projection: Projection) -> KubeSource {
        self.projection = projection;
        self
    }

    /// Also watches ServiceAccounts, whose annotations can name their pods' role.
    pub fn with_service_accounts(mut self, on: bool) -> KubeSource {
        self.service_accounts = on;
        self
    }

    /// Watches only the pods on `node`.
    pub fn on_node(mut self, node: Option<String>) -> KubeSource {
        self.node = node.filter(|n| !n.is_empty());
        self
    }

    /// Renews each watch after `timeout` (whole seconds, at least one).
    pub fn watching_for(mut self, timeout: Duration) -> KubeSource {
        self.watch_timeout = timeout;
        self
    }
}

/// A client for `config` without kube's own retries. kube retries a 429, 503 or 504 up to 15
/// times with a backoff that grows to minutes, inside the request, so that during an outage the
/// watchers saw no error for minutes: `kiam_k8s_watch_restarts_total` stayed flat, and the
/// watchers' own backoff (which serves the last known state meanwhile) never ran. A TokenReview
/// in a pod's request also waited through those retries instead of failing fast with a 503 that
/// the pod's SDK retries. Events are best effort either way.
fn client(mut config: kube::Config) -> Result<Client, SourceError> {
    config.default_retry = false;
    Client::try_from(config).map_err(SourceError::Kube)
}

impl Source for KubeSource {
    async fn run(self, cluster: Arc<Cluster>, shutdown: CancellationToken) -> Result<(), SourceError> {
        let seconds = u32::try_from(self.watch_timeout.as_secs()).unwrap_or(u32::MAX).max(1);
        let config = watcher::Config::default().timeout(seconds);
        let mut selector = config.clone();
        if let Some(node) = &self.node {
            selector = selector.fields(&format!("spec.nodeName={node}"));
        }
        let pods = watcher(Api::<Pod>::all(self.client.clone()), selector);
        if self.service_accounts {
            cluster.expect_service_accounts();
        }
        let accounts = watcher(Api::<ServiceAccount>::all(self.client.clone()), config.clone());
        let namespaces = watcher(Api::<Namespace>::all(self.client), config);
        let projection = &self.projection;
        let pods = drive(
            pods,
            "pods",
            |p| projection.pod(p),
            |c| cluster.change_pod(c),
            || cluster.note_watch_error(false),
        );
        let namespaces = drive(
            namespaces,
            "namespaces",
            |n| projection.namespace(n),
            |c| cluster.change_namespace(c),
            || cluster.note_watch_error(true),
        );
        let accounts = async {
            if !self.service_accounts {
                return std::future::pending().await;
            }
            drive(
                accounts,
                "serviceaccounts",
                service_account_facts,
                |c| cluster.change_service_account(c),
                || {},
            )
            .await
        };
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = pods => {}
            () = namespaces => {}
            () = accounts => {}
        }
        Ok(())
    }
}

/// Feeds one watcher stream, projected by `project`, into `apply` until the stream ends.
async fn drive<'a, K, T, F>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    kind: &'static str,
    project: impl Fn(&K) -> Option<T>,
    apply: impl Fn(Change<T>) -> F,
    failed: impl Fn(),
) where
    F: std::future::Future<Output = ()> + 'a,
{
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
            apply(change).await;
        }
    }
}
