//! A manifest file as the source of pods and namespaces, for local development and the demo:
//! YAML or JSON, one or more documents, each a Pod, a Namespace or a `List` of them (other kinds
//! are skipped). The file is re-read when its contents change; each read is applied as a relist.
//! A broken edit keeps the last good state and is logged.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::project::{namespace_facts, pod_facts, service_account_facts};
use super::{Change, Cluster, Source, SourceError};
use crate::model::{NamespaceFacts, PodFacts, ServiceAccountFacts};

/// Pods and namespaces read from a manifest file.
pub struct FileSource {
    path: PathBuf,
    poll: Duration,
    contents: String,
}

/// The objects a manifest holds.
#[derive(Debug, Default)]
pub struct Manifest {
    pub pods: Vec<PodFacts>,
    pub namespaces: Vec<NamespaceFacts>,
    /// ServiceAccounts (read by `kiam explain`; the file source itself does not map their roles).
    pub service_accounts: Vec<ServiceAccountFacts>,
}

impl FileSource {
    /// Reads and checks the file now, so that a bad path or manifest fails at start-up.
    pub fn open(path: &Path, poll: Duration) -> Result<FileSource, SourceError> {
        let contents = read(path)?;
        parse(&contents).map_err(|message| file_error(path, message))?;
        Ok(FileSource { path: path.to_path_buf(), poll, contents })
    }
}

impl Source for FileSource {
    async fn run(self, cluster: Arc<Cluster>, shutdown: CancellationToken) -> Result<(), SourceError> {
        let FileSource { path, poll, mut contents } = self;
        apply(&cluster, parse(&contents).map_err(|m| file_error(&path, m))?).await;
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let latest = match tokio::fs::read_to_string(&path).await {
                Ok(s) => s,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot re-read manifest; keeping the last state");
                    continue;
                }
            };
            if latest == contents {
                continue;
            }
            match parse(&latest) {
                Ok(manifest) => {
                    tracing::info!(path = %path.display(), pods = manifest.pods.len(), namespaces = manifest.namespaces.len(), "manifest reloaded");
                    apply(&cluster, manifest).await;
                }
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "manifest is invalid; keeping the last state");
                }
            }
            contents = latest;
        }
    }
}

async fn apply(cluster: &Cluster, manifest: Manifest) {
    cluster.change_namespace(Change::Init).await;
    for ns in manifest.namespaces {
        cluster.change_namespace(Change::InitApply(ns)).await;
    }
    cluster.change_namespace(Change::InitDone).await;
    cluster.change_pod(Change::Init).await;
    for pod in manifest.pods {
        cluster.change_pod(Change::InitApply(pod)).await;
    }
    cluster.change_pod(Change::InitDone).await;
}

fn read(path: &Path) -> Result<String, SourceError> {
    std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))
}

fn file_error(path: &Path, message: String) -> SourceError {
    SourceError::File { path: path.display().to_string(), message }
}

/// Parses manifest text (YAML, which includes JSON).
pub fn parse(text: &str) -> Result<Manifest, String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| e.to_string())?;
    let mut manifest = Manifest::default();
    for doc in docs {
        collect(doc, &mut manifest)?;
    }
    Ok(manifest)
}

fn collect(doc: Value, into: &mut Manifest) -> Result<(), String> {
    match doc.get("kind").and_then(Value::as_str) {
        Some("List") | Some("PodList") | Some("NamespaceList") => {
            let items = doc.get("items").and_then(Value::as_array).cloned().unwrap_or_default();
            for item in items {
                collect(item, into)?;
            }
        }
        Some("Pod") => {
            let pod: Pod = serde_json::from_value(doc).map_err(|e| format!("invalid Pod: {e}"))?;
            let facts = pod_facts(&pod).ok_or("a Pod has no metadata.name")?;
            into.pods.push(facts);
        }
        Some("Namespace") => {
            let ns: Namespace = serde_json::from_value(doc).map_err(|e| format!("invalid Namespace: {e}"))?;
            let facts = namespace_facts(&ns).ok_or("a Namespace has no metadata.name")?;
            into.namespaces.push(facts);
        }
        Some("ServiceAccount") => {
            let sa: ServiceAccount =
                serde_json::from_value(doc).map_err(|e| format!("invalid ServiceAccount: {e}"))?;
            into.service_accounts.extend(service_account_facts(&sa));
        }
        Some(_) | None if doc.is_null() => {}
        Some(other) => {
            tracing::debug!(kind = other, "manifest: skipping a kind that is neither Pod nor Namespace")
        }
        None => return Err("a document has no kind".into()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_yaml_documents_and_lists() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
  annotations:
    iam.amazonaws.com/permitted: ".*"
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: team-a, annotations: {iam.amazonaws.com/role: app}}
  spec: {containers: [{name: c, image: i}]}
  status: {podIP: 127.0.0.2, phase: Running}
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: skipped}
"#;
        let m = parse(text).expect("parses");
        assert_eq!(m.namespaces.len(), 1);
        assert_eq!(m.namespaces[0].permitted.as_ref().map(|p| p.expr.as_str()), Some(".*"));
        assert_eq!(m.pods.len(), 1);
        assert_eq!(m.pods[0].role.as_deref(), Some("app"));
        assert_eq!(m.pods[0].ip, Some("127.0.0.2".parse().expect("ip")));
    }

    fn pod_doc(name: &str, ip: &str) -> String {
        format!(
            "---\nkind: Pod\nmetadata: {{name: {name}, namespace: a, annotations: {{iam.amazonaws.com/role: r}}}}\n\
             spec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}, phase: Running}}\n"
        )
    }

    #[tokio::test]
    async fn rereads_the_file_when_it_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cluster.yaml");
        let namespace = "kind: Namespace\nmetadata: {name: a}\n";
        std::fs::write(&path, format!("{namespace}{}", pod_doc("one", "10.0.0.1"))).expect("write");
        let source = FileSource::open(&path, Duration::from_millis(20)).expect("opens");
        let cluster = Arc::new(Cluster::new(None, Arc::new(crate::metrics::Metrics::default())));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(source.run(Arc::clone(&cluster), shutdown.clone()));
        let found =
            |ip: &str| matches!(cluster.pod_by_ip(ip.parse().expect("ip")), super::super::Lookup::Found(_));
        let wait = |ip: &'static str, want: bool| {
            let found = &found;
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while found(ip) != want {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                })
                .await
                .expect("the change is seen within 10 s")
            }
        };
        wait("10.0.0.1", true).await;
        assert!(cluster.is_synced());

        std::fs::write(&path, format!("{namespace}{}", pod_doc("two", "10.0.0.2"))).expect("rewrite");
        wait("10.0.0.2", true).await;
        wait("10.0.0.1", false).await;

        std::fs::write(
            &path,
            format!("{namespace}{}{}", pod_doc("two", "10.0.0.2"), pod_doc("three", "10.0.0.3")),
        )
        .expect("fix");
        wait("10.0.0.3", true).await;
        assert!(found("10.0.0.2"));
        shutdown.cancel();
        task.await.expect("joins").expect("stops cleanly");
    }

    #[test]
    fn rejects_broken_manifests() {
        assert!(parse("kind: Pod\nmetadata: {namespace: a}\nspec: {containers: []}").is_err());
        assert!(parse("metadata: {name: x}").is_err());
        assert!(parse("{{{").is_err());
    }
}
