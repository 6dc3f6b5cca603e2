//! The request path, free of any protocol. One function answers each request, top to bottom,
//! on one lookup of the pod: lookup → node check → namespace → policy decision → cache. kiam's
//! gRPC service and kube2iam mode's in-process backend are thin wrappers over it; a check and
//! the action it guards are never made on two reads of the cluster.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cluster::events::{self, EventSink};
use crate::cluster::{Cluster, Lookup};
use crate::creds::{AssumeRole, CredentialCache, Credentials, Identity, StsError};
use crate::metrics::Metrics;
use crate::model::PodFacts;
use crate::policy::{Caller, Denial, NodeDenial, Policy, check_node, role};

/// How long a request for an IP whose only pod is terminating waits for another pod to claim
/// it. The IP may already be released (the sandbox torn down, the node lost) and handed to a new
/// pod the watch has not delivered yet; answering at once would give the new pod the old pod's
/// credentials. Pods in their shutdown grace pay this once per request, and SDKs cache what
/// they get.
pub const TERMINATING_GRACE: Duration = Duration::from_millis(500);

/// Why a request failed; mapped to a gRPC status in one place (`server/service.rs`) and to what a
/// pod sees in one place (`agent/error.rs`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's IP is not an IP address.
    #[error("invalid pod IP {0:?}")]
    InvalidIp(String),
    /// No live pod has the IP.
    #[error("no pod found for IP {0}")]
    PodNotFound(IpAddr),
    /// No live pod is the one a token is bound to (deleted, replaced by a namesake, finished).
    #[error("pod {0} named by the token is not running")]
    PodGone(String),
    /// Several live pods claim the IP.
    #[error("multiple running pods found for IP {ip} ({count})")]
    AmbiguousIp { ip: IpAddr, count: usize },
    /// Node binding refuses the caller this pod.
    #[error(transparent)]
    Node(#[from] NodeDenial),
    /// The policy denied the request.
    #[error("pod {pod} is forbidden: {denial}")]
    Forbidden { pod: String, denial: Denial },
    /// The pod at the IP is not the one the caller named (its view is behind).
    #[error("the pod at {0} is no longer the one asked about")]
    PodChanged(IpAddr),
    /// STS failed.
    #[error("error fetching credentials: {0}")]
    Sts(#[from] StsError),
    /// The caller's certificate has the debug role, which may not ask about pods.
    #[error(
        "a certificate with the debug role ({}) may not ask for pods' roles or credentials",
        crate::tls::x509::DEBUG_ROLE_URI
    )]
    DebugCertificate,
}

/// One request: who asks, about which IP, and how long it may wait for a pod not seen yet.
#[derive(Clone, Debug)]
pub struct Ask {
    pub ip: IpAddr,
    pub caller: Caller,
    pub wait: Duration,
    /// The pod UID the caller believes owns the IP (an agent's node view); `None` for kiam's calls.
    pub uid: Option<String>,
}

impl Ask {
    /// A request about `ip` from `caller`, for whichever pod owns it.
    pub fn new(ip: IpAddr, caller: Caller, wait: Duration) -> Ask {
        Ask { ip, caller, wait, uid: None }
    }
}

/// A request by token: the pod a verified token is bound to, asked about by `caller`.
#[derive(Clone, Debug)]
pub struct TokenAsk {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub caller: Caller,
    /// How long to wait for a pod the watch has not delivered yet.
    pub wait: Duration,
    /// The address the pod's request came from, as its agent saw it.
    pub source: std::net::IpAddr,
}

/// Lookup, policy and credentials.
pub struct Core<A> {
    cluster: Arc<Cluster>,
    policy: Policy,
    cache: CredentialCache<A>,
    /// `--session`: the session-name suffix for pods without the annotation.
    default_session: String,
    events: Arc<dyn EventSink>,
    metrics: Arc<Metrics>,
    /// The identities this process keeps warm (`None`: all).
    ownership: Option<Arc<dyn super::Ownership>>,
    /// Wakes the refresher at once (a peer left: take its identities over now).
    rescan: tokio::sync::Notify,
}

impl<A: AssumeRole> Core<A> {
    /// Assembles the core; it counts into `metrics`, the process's one set.
    pub fn new(
        cluster: Arc<Cluster>,
        policy: Policy,
        cache: CredentialCache<A>,
        default_session: String,
        events: Arc<dyn EventSink>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (ownership, rescan) = (None, tokio::sync::Notify::new());
        Core { cluster, policy, cache, default_session, events, metrics, ownership, rescan }
    }

    /// Keeps only the identities `ownership` owns warm (`None`: every identity).
    pub fn with_ownership(self, ownership: Option<Arc<dyn super::Ownership>>) -> Self {
        Core { ownership, ..self }
    }

    /// Whether this process prefetches and refreshes `identity`.
    pub fn owns(&self, identity: &Identity) -> bool {
        self.ownership.as_ref().is_none_or(|o| o.owns(identity))
    }

    /// `identity`'s key for agents to find its owner by, when this process shares identities
    /// with peers; 0 (balance over every server) otherwise.
    pub fn affinity(&self, identity: &Identity) -> u64 {
        if self.ownership.is_some() { identity.affinity_key() } else { 0 }
    }

    /// The [`affinity`](Self::affinity) of the identity `pod` would get for `role` (kiam's
    /// `GetPodRole` tells the agent); 0 without ownership, or when policy refuses (for now).
    pub fn role_affinity(&self, pod: &PodFacts, role: &str) -> u64 {
        match self.ownership {
            Some(_) => self.identity_for(pod, role).map_or(0, |identity| identity.affinity_key()),
            None => 0,
        }
    }

    /// Asks the refresher for a pass now: what this process newly owns is fetched at once.
    pub fn rescan(&self) {
        self.rescan.notify_one();
    }

    /// Completes when [`rescan`](Self::rescan) is called (or was, since the last wait).
    pub async fn rescan_requested(&self) {
        self.rescan.notified().await;
    }

    /// The metrics this core counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The cluster view this core answers from.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The credentials cache.
    pub fn cache(&self) -> &CredentialCache<A> {
        &self.cache
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Requests refused because several live pods claimed the caller's IP.
    pub fn ambiguous_lookups(&self) -> u64 {
        self.metrics.server.ambiguous_ips.get()
    }

    /// `GetPodRole`: the role annotation of the pod at `ask.ip`, if the caller may ask about it
    /// (kiam applies no other policy here).
    pub async fn pod_role(&self, ask: &Ask) -> Result<(Arc<PodFacts>, Option<String>), Error> {
        let pod = self.authorised_pod(ask).await?;
        let role = self.policy.effective_role(&pod).map(str::to_string);
        Ok((pod, role))
    }

    /// `GetPodCredentials`: credentials for `requested`, if the pod at `ask.ip` may have them.
    /// The pod is looked up once; the node check, the decision and the credentials all concern
    /// that one pod.
    pub async fn pod_credentials(
        &self,
        ask: &Ask,
        requested: &str,
    ) -> Result<(Arc<PodFacts>, Arc<Credentials>), Error> {
        let deadline = tokio::time::Instant::now() + ask.wait;
        let pod = self.authorised_pod(ask).await?;
        let (creds, _) = self.credentials_for(&pod, requested, deadline).await?;
        Ok((pod, creds))
    }

    /// Credentials for the pod a verified token is bound to: the same checks and policy as
    /// [`pod_credentials`](Self::pod_credentials), on the pod found by name and UID instead of
    /// by IP, so hostNetwork pods are served too. Returns the role's ARN as well.
    pub async fn token_credentials(
        &self,
        ask: &TokenAsk,
    ) -> Result<(Arc<PodFacts>, Arc<Credentials>, String), Error> {
        let deadline = tokio::time::Instant::now() + ask.wait;
        if ask.caller == Caller::Unnamed {
            return Err(NodeDenial::Unnamed.into());
        }
        let pod = self.named_pod(ask, deadline).await?;
        check_node(&pod, &ask.caller)?;
        crate::policy::node::check_source(&pod, ask.source)?;
        let Some(role) = self.policy.effective_role(&pod).map(str::to_string) else {
            let denial = Denial::NoRoleAnnotation;
            return Err(Error::Forbidden { pod: pod.qualified_name(), denial });
        };
        let (creds, arn) = self.credentials_for(&pod, &role, deadline).await?;
        Ok((pod, creds, arn))
    }

    /// The live pod `ask` names, with its UID, waited for (woken by pod changes) until
    /// `deadline`: a token's pod may reach the server's watch just after its first request.
    async fn named_pod(
        &self,
        ask: &TokenAsk,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<PodFacts>, Error> {
        let mut changes = self.cluster.pod_changes();
        loop {
            // A namesake with another UID may be the watch running behind a new pod, or the
            // token outliving its pod: wait for the watch either way, and refuse at the deadline.
            let found = self.cluster.pod_by_name(&ask.namespace, &ask.name);
            if let Some(pod) = found.filter(|p| p.uid == *ask.uid && !p.phase.is_finished()) {
                return Ok(pod);
            }
            if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                return Err(Error::PodGone(format!("{}/{}", ask.namespace, ask.name)));
            }
        }
    }

    /// The policy decision and the credentials for `pod` and `requested`, with the role ARN.
    async fn credentials_for(
        &self,
        pod: &Arc<PodFacts>,
        requested: &str,
        deadline: tokio::time::Instant,
    ) -> Result<(Arc<Credentials>, String), Error> {
        self.wait_namespace(&pod.namespace, deadline).await;
        let identity = match self.identity_for(pod, requested) {
            Ok(identity) => identity,
            Err(denial) => {
                let note = format!("failed assuming role \"{requested}\": {denial}");
                self.events.warn(pod, events::ROLE_FORBIDDEN, note);
                return Err(Error::Forbidden { pod: pod.qualified_name(), denial });
            }
        };
        match self.cache.get(&identity).await {
            Ok(creds) => {
                let left = creds.expiration.duration_since(SystemTime::now()).unwrap_or_default();
                self.metrics.server.served_remaining.observe(left.as_secs_f64());
                Ok((creds, identity.role.as_str().to_string()))
            }
            Err(error) => {
                let note = format!("failed retrieving credentials: {error}");
                self.events.warn(pod, events::CREDENTIAL_ERROR, note);
                Err(Error::Sts(error))
            }
        }
    }

    /// The one lookup of a request, then the node check on the pod it found. A caller that
    /// proved no node is refused before anything is looked up.
    async fn authorised_pod(&self, ask: &Ask) -> Result<Arc<PodFacts>, Error> {
        if ask.caller == Caller::Unnamed {
            return Err(NodeDenial::Unnamed.into());
        }
        let pod = self.with_account_role(self.pod(ask.ip, ask.wait).await?);
        check_node(&pod, &ask.caller)?;
        if ask.uid.as_deref().is_some_and(|uid| pod.uid != *uid) {
            return Err(Error::PodChanged(ask.ip));
        }
        Ok(pod)
    }

    /// The pod that owns `ip`, timed. A pod the watch has not delivered yet is waited for, woken
    /// by pod changes, for at most `wait`: a pod created just before its first request gets an
    /// answer instead of "not found". A terminating pod alone on the IP is waited past for
    /// [`TERMINATING_GRACE`], in case a new pod has the IP already.
    async fn pod(&self, ip: IpAddr, wait: Duration) -> Result<Arc<PodFacts>, Error> {
        let started = std::time::Instant::now();
        let result = self.find_pod(ip, wait).await;
        self.metrics.server.pod_lookup.observe(started.elapsed().as_secs_f64());
        result
    }

    async fn find_pod(&self, ip: IpAddr, wait: Duration) -> Result<Arc<PodFacts>, Error> {
        let mut changes = self.cluster.pod_changes();
        let deadline = tokio::time::Instant::now() + wait;
        // A terminating pod alone on its IP is answered only after a short wait for a new owner.
        let grace = tokio::time::Instant::now() + wait.min(TERMINATING_GRACE);
        let (mut waited, mut watching) = (false, true);
        loop {
            let now = tokio::time::Instant::now();
            let until = match self.cluster.pod_by_ip(ip) {
                Lookup::Found(pod) if !pod.terminating || now >= grace || !watching => return Ok(pod),
                Lookup::Found(_) => grace,
                Lookup::Ambiguous(pods) => {
                    self.metrics.server.ambiguous_ips.inc();
                    for pod in &pods {
                        let note = format!(
                            "{} live pods claim IP {ip}; refusing to guess which one is asking",
                            pods.len()
                        );
                        self.events.warn(pod, events::AMBIGUOUS_IP, note);
                    }
                    return Err(Error::AmbiguousIp { ip, count: pods.len() });
                }
                Lookup::NotFound if now >= deadline || !watching => return Err(Error::PodNotFound(ip)),
                Lookup::NotFound => deadline,
            };
            if !std::mem::replace(&mut waited, true) {
                self.metrics.server.pod_waits.inc();
            }
            // Woken by a change or by the time limit, the lookup is made once more; past the
            // limit (or with no watch left to wake it) its answer stands.
            if let Ok(Err(_)) = tokio::time::timeout_at(until, changes.changed()).await {
                watching = false;
            }
        }
    }

    /// Waits, woken by namespace changes, until `name` is known or `deadline` passes: the
    /// namespace and pod watches are separate streams, so a pod in a new namespace can arrive
    /// first, and must not be denied for that.
    pub async fn wait_namespace(&self, name: &str, deadline: tokio::time::Instant) {
        let mut changes = self.cluster.namespace_changes();
        while self.cluster.namespace(name).is_none() {
            if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
                return;
            }
        }
    }

    /// The identity `pod` may assume for `requested`, if the policy allows it.
    pub fn identity_for(&self, pod: &PodFacts, requested: &str) -> Result<Identity, Denial> {
        let namespace = self.cluster.namespace(&pod.namespace);
        let arn = self.policy.decide(pod, namespace.as_deref(), requested)?;
        let (tags, policy) = self.policy.session_extras(pod, namespace.as_deref())?;
        Ok(Identity {
            role: arn,
            session_name: role::session_name(pod.session_name(), &self.default_session),
            external_id: pod.external_id().map(String::from),
            tags,
            policy,
            source_identity: self
                .policy
                .source_identity
                .then(|| role::source_identity(&pod.namespace, &pod.name)),
        })
    }

    /// `pod`, with its ServiceAccount's role when `--service-account-roles` is on and the pod has
    /// no role annotation of its own (the pod's annotation wins).
    pub fn with_account_role(&self, pod: Arc<PodFacts>) -> Arc<PodFacts> {
        if !self.policy.service_account_roles || pod.role.as_deref().is_some_and(|r| !r.trim().is_empty()) {
            return pod;
        }
        let account = pod.service_account.as_deref().unwrap_or("default");
        match self.cluster.service_account_role(&pod.namespace, account) {
            Some(role) => Arc::new(PodFacts { role: Some(role.into()), ..(*pod).clone() }),
            None => pod,
        }
    }

    /// Every identity some live pod may use: what the refresher keeps fresh.
    pub fn active_identities(&self) -> HashSet<Identity> {
        let mut active = HashSet::new();
        self.cluster.for_each_live_pod(|pod| {
            if let Some(Ok(identity)) =
                self.policy.effective_role(pod).map(|role| self.identity_for(pod, role))
            {
                active.insert(identity);
            }
        });
        active
    }
}

/// Parses the IP of a request.
pub fn parse_ip(ip: &str) -> Result<IpAddr, Error> {
    ip.trim().parse().map_err(|_| Error::InvalidIp(ip.to_string()))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
