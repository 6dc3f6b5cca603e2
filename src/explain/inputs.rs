//! The pods and namespaces explain reads: from the Kubernetes API only what one answer needs
//! (the pod, every pod sharing its IP, their namespaces), or everything in the manifests given
//! with `-f` (parsed as the server's `--manifest` is).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::ListParams;
use kube::{Api, Client};

use super::chain::{self, Explanation};
use super::find::{self, Located};
use super::{Settings, Target};
use crate::cluster::kube::KubeSource;
use crate::cluster::{SourceError, file, project};
use crate::model::{NamespaceFacts, PodFacts, ServiceAccountFacts};

/// Where the pods and namespaces come from.
#[derive(Clone, Debug)]
pub enum Inventory {
    /// The Kubernetes API: a kubeconfig file, or the usual discovery when `None`.
    Kube(Option<PathBuf>),
    /// Manifests (`-f`), offline.
    Files(Vec<PathBuf>),
}

/// Why the pods and namespaces could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// No client could be built from the kubeconfig.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The API server refused or failed a read.
    #[error("reading {what}: {source}")]
    Kube {
        what: String,
        #[source]
        source: kube::Error,
    },
    /// The API server did not answer in time.
    #[error("the cluster did not answer within {0:?}")]
    Timeout(Duration),
    /// A manifest could not be read or parsed.
    #[error("{path}: {message}")]
    File { path: String, message: String },
    /// Every pod of a cluster was asked for.
    #[error("name a pod (namespace/pod) or --ip; explaining every pod needs manifests (-f)")]
    NoTarget,
}

/// The pods and namespaces read.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub pods: Vec<PodFacts>,
    pub namespaces: Vec<NamespaceFacts>,
    /// ServiceAccounts, for `--service-account-roles`.
    pub service_accounts: Vec<ServiceAccountFacts>,
}

impl Snapshot {
    fn namespace(&self, name: &str) -> Option<&NamespaceFacts> {
        self.namespaces.iter().rev().find(|n| n.name == name)
    }

    fn explain_one(
        &self,
        settings: &Settings,
        query: String,
        located: &Located,
        requested: Option<&str>,
    ) -> Explanation {
        let namespace = match located {
            Located::Pod { pod, .. } => self.namespace(&pod.namespace),
            _ => None,
        };
        // With --service-account-roles, a pod without the annotation takes its account's role,
        // as the server resolves it.
        let account = match located {
            Located::Pod { pod, .. } if settings.policy.service_account_roles && pod.role.is_none() => {
                let name = pod.service_account.clone().unwrap_or_else(|| "default".into());
                let found = self
                    .service_accounts
                    .iter()
                    .rev()
                    .find(|a| *a.namespace == *pod.namespace && *a.name == *name);
                found.and_then(|a| a.role.clone()).map(|role| (name, role))
            }
            _ => None,
        };
        let Some((name, role)) = account else {
            return chain::explain(settings, query, located, namespace, requested);
        };
        let resolved = match located {
            Located::Pod { pod, owner } => Located::Pod {
                pod: Box::new(PodFacts { role: Some(role.into()), ..(**pod).clone() }),
                owner: owner.clone(),
            },
            other => other.clone(),
        };
        let mut explanation = chain::explain(settings, query, &resolved, namespace, requested);
        if let Some(role) = explanation.role.as_mut() {
            role.source = format!("service account {name}");
        }
        explanation
    }

    /// The explanations for `target`: one, or one per pod for [`Target::Every`].
    pub fn explain(&self, settings: &Settings, target: &Target, requested: Option<&str>) -> Vec<Explanation> {
        match target {
            Target::Pod { namespace, name } => {
                let located = find::by_name(&self.pods, namespace, name);
                vec![self.explain_one(settings, format!("{namespace}/{name}"), &located, requested)]
            }
            Target::Ip(ip) => {
                let located = find::by_ip(&self.pods, *ip);
                vec![self.explain_one(settings, format!("ip {ip}"), &located, requested)]
            }
            Target::Every => self
                .pods
                .iter()
                .map(|p| {
                    let located = find::by_name(&self.pods, &p.namespace, &p.name);
                    self.explain_one(settings, p.qualified_name(), &located, requested)
                })
                .collect(),
        }
    }
}

/// Reads what `target` needs, each read of the cluster bounded by `timeout`.
pub async fn read(inventory: &Inventory, target: &Target, timeout: Duration) -> Result<Snapshot, InputError> {
    match inventory {
        Inventory::Files(paths) => from_files(paths).await,
        Inventory::Kube(path) => {
            let connect = async {
                let client = KubeSource::connect(path.clone()).await?.client();
                from_kube(client, target).await
            };
            tokio::time::timeout(timeout, connect).await.map_err(|_| InputError::Timeout(timeout))?
        }
    }
}

/// Every pod and namespace in the manifests, in order; `-` is standard input.
pub async fn from_files(paths: &[PathBuf]) -> Result<Snapshot, InputError> {
    let mut snapshot = Snapshot::default();
    for path in paths {
        let error = |message: String| InputError::File { path: path.display().to_string(), message };
        let text = if path.as_os_str() == "-" {
            let read = tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()));
            read.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        } else {
            tokio::fs::read_to_string(path).await
        };
        let text = text.map_err(|e| error(e.to_string()))?;
        let manifest = file::parse(&text).map_err(error)?;
        snapshot.pods.extend(manifest.pods);
        snapshot.namespaces.extend(manifest.namespaces);
        snapshot.service_accounts.extend(manifest.service_accounts);
    }
    Ok(snapshot)
}

fn kube_error(what: impl Into<String>) -> impl FnOnce(kube::Error) -> InputError {
    let what = what.into();
    move |source| InputError::Kube { what, source }
}

/// The live pods with `ip` in every namespace, as the server's index holds them.
async fn pods_at(client: &Client, ip: IpAddr) -> Result<Vec<PodFacts>, InputError> {
    let params = ListParams::default().fields(&format!("status.podIP={ip}"));
    let list =
        Api::<Pod>::all(client.clone()).list(&params).await.map_err(kube_error(format!("pods at {ip}")))?;
    Ok(list.items.iter().filter_map(project::pod_facts).collect())
}

/// The pod, the pods sharing its IP, and the namespaces involved.
pub async fn from_kube(client: Client, target: &Target) -> Result<Snapshot, InputError> {
    let mut snapshot = Snapshot::default();
    match target {
        Target::Every => return Err(InputError::NoTarget),
        Target::Pod { namespace, name } => {
            let api = Api::<Pod>::namespaced(client.clone(), namespace);
            let pod = api.get_opt(name).await.map_err(kube_error(format!("pod {namespace}/{name}")))?;
            let Some(pod) = pod.as_ref().and_then(project::pod_facts) else {
                return Ok(snapshot);
            };
            if let Some(ip) = pod.ip {
                snapshot.pods = pods_at(&client, ip).await?;
                // The list holds the pod too: keep one copy of it, the one just read.
                snapshot.pods.retain(|p| p.namespace != pod.namespace || p.name != pod.name);
            }
            snapshot.pods.push(pod);
        }
        Target::Ip(ip) => snapshot.pods = pods_at(&client, *ip).await?,
    }
    // The ServiceAccounts of pods without a role annotation (for --service-account-roles).
    let accounts: BTreeSet<(String, String)> = snapshot
        .pods
        .iter()
        .filter(|p| p.role.is_none())
        .map(|p| (p.namespace.to_string(), p.service_account.as_deref().unwrap_or("default").to_string()))
        .collect();
    for (namespace, name) in accounts {
        let api = Api::<ServiceAccount>::namespaced(client.clone(), &namespace);
        // Best effort: without read access to ServiceAccounts only the role's source is lost.
        let sa = api.get_opt(&name).await.ok().flatten();
        snapshot.service_accounts.extend(sa.as_ref().and_then(project::service_account_facts));
    }
    let names: BTreeSet<&str> = snapshot.pods.iter().map(|p| &*p.namespace).collect();
    let api = Api::<Namespace>::all(client);
    for name in names {
        let ns = api.get_opt(name).await.map_err(kube_error(format!("namespace {name}")))?;
        snapshot.namespaces.extend(ns.as_ref().and_then(project::namespace_facts));
    }
    Ok(snapshot)
}
