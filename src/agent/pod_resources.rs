//! The kubelet's PodResources API (`v1.PodResourcesLister/List` on a unix socket, read-only):
//! the pods running on this node, by namespace and name. The node view asks it, while no
//! server answers, whether the pod behind an entry still runs (see `view::confirm`).

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Endpoint, Uri};

use crate::pb::podresources::ListPodResourcesRequest;
use crate::pb::podresources::pod_resources_lister_client::PodResourcesListerClient;

/// The kubelet's socket, `--pod-resources-socket`'s default.
pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

/// How long one List may take, connection included.
const TIMEOUT: Duration = Duration::from_secs(1);

/// The running pods, as `(namespace, name)`.
pub type Running = HashSet<(String, String)>;

/// Lists the pods the kubelet at `socket` runs. Connects afresh each time: it is asked at most
/// about once a second, and only while no server answers, so a kubelet restart needs no care.
pub async fn list(socket: PathBuf) -> Result<Running, String> {
    let work = async move {
        // The URI is required but unused: the connector dials the socket.
        let endpoint = Endpoint::try_from("http://kubelet.pod-resources").map_err(|e| e.to_string())?;
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move { tokio::net::UnixStream::connect(socket).await.map(TokioIo::new) }
            }))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let reply = PodResourcesListerClient::new(channel)
            .list(ListPodResourcesRequest {})
            .await
            .map_err(|s| format!("List: {}: {}", s.code(), s.message()))?;
        Ok(reply.into_inner().pod_resources.into_iter().map(|p| (p.namespace, p.name)).collect())
    };
    tokio::time::timeout(TIMEOUT, work).await.map_err(|_| "List timed out".to_string())?
}
