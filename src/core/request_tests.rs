//! The request path on a core with a scripted STS: one lookup per request, and the node check
//! made on the pod the credentials are issued for.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use super::*;
use crate::cluster::Change;
use crate::cluster::events::NoEvents;
use crate::creds::Lifetimes;
use crate::metrics::Metrics;
use crate::model::{NamespaceFacts, Permitted};

/// Counts calls and issues credentials named after the role.
#[derive(Default)]
struct CountingSts(AtomicUsize);

impl AssumeRole for Arc<CountingSts> {
    async fn assume_role(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        let issued = SystemTime::now();
        Ok(Credentials {
            access_key_id: format!("ASIA-{}", identity.role.name()),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration: issued + duration,
            issued,
        })
    }
}

fn core(sts: &Arc<CountingSts>, metrics: &Arc<Metrics>) -> Core<Arc<CountingSts>> {
    let cluster = Arc::new(Cluster::new(None, Arc::clone(metrics)));
    cluster.apply_namespace(Change::Apply(NamespaceFacts {
        name: "ns".into(),
        permitted: Some(Permitted::new(".*")),
        allowed_roles: None,
        session_policy: None,
    }));
    cluster.apply_pod(Change::Apply(PodFacts::test("ns", "web", "10.0.0.5", Some("app"))));
    let policy = Policy::test();
    let lifetimes = Lifetimes { session: Duration::from_secs(3600), refresh_lead: Duration::from_secs(300) };
    let cache = CredentialCache::new(Arc::clone(sts), lifetimes, 4, Arc::clone(metrics));
    Core::new(cluster, policy, cache, "kiam".into(), Arc::new(NoEvents), Arc::clone(metrics))
}

/// How many pod lookups the core has timed (`kiam_server_pod_lookup_seconds_count`).
fn lookups(metrics: &Metrics) -> u64 {
    let text = metrics.encode();
    let line = text.lines().find(|l| l.starts_with("kiam_server_pod_lookup_seconds_count"));
    line.and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).expect("lookup count")
}

fn ask(caller: Caller) -> Ask {
    Ask::new("10.0.0.5".parse().expect("ip"), caller, Duration::from_millis(10))
}

#[tokio::test]
async fn one_lookup_decides_the_node_and_the_credentials() {
    let (sts, metrics) = (Arc::default(), Arc::new(Metrics::default()));
    let core = core(&sts, &metrics);
    let (pod, creds) =
        core.pod_credentials(&ask(Caller::Node("node-1".into())), "app").await.expect("allowed");
    assert_eq!((&*pod.name, creds.access_key_id.as_str()), ("web", "ASIA-app"));
    assert_eq!(lookups(&metrics), 1, "the node check and the credentials share one lookup");
    core.pod_role(&ask(Caller::Node("node-1".into()))).await.expect("role");
    assert_eq!(lookups(&metrics), 2);
}

#[tokio::test]
async fn another_nodes_caller_gets_nothing_and_costs_no_sts_call() {
    let (sts, metrics) = (Arc::<CountingSts>::default(), Arc::new(Metrics::default()));
    let core = core(&sts, &metrics);
    let err = core.pod_credentials(&ask(Caller::Node("node-2".into())), "app").await.expect_err("other node");
    assert!(matches!(err, Error::Node(NodeDenial::OtherNode { .. })), "{err}");
    assert_eq!(lookups(&metrics), 1);
    let err = core.pod_credentials(&ask(Caller::Unnamed), "app").await.expect_err("no node");
    assert!(matches!(err, Error::Node(NodeDenial::Unnamed)), "{err}");
    assert_eq!(lookups(&metrics), 1, "a caller that names no node is refused before any lookup");
    assert_eq!(sts.0.load(Ordering::SeqCst), 0);
}

fn terminating(name: &str) -> PodFacts {
    PodFacts { terminating: true, ..PodFacts::test("ns", name, "10.0.0.9", Some("old-role")) }
}

#[tokio::test(start_paused = true)]
async fn a_terminating_pod_alone_on_its_ip_is_answered_after_a_grace() {
    let (sts, metrics) = (Arc::default(), Arc::new(Metrics::default()));
    let core = core(&sts, &metrics);
    core.cluster().apply_pod(Change::Apply(terminating("old")));
    let ask = Ask::new("10.0.0.9".parse().expect("ip"), Caller::Any, Duration::from_secs(5));
    let started = tokio::time::Instant::now();
    let (pod, _) = core.pod_role(&ask).await.expect("the old pod, still");
    assert_eq!(&*pod.name, "old");
    assert_eq!(started.elapsed(), TERMINATING_GRACE, "after the grace, not the whole wait");
    // A caller with less time than the grace is answered within its own deadline.
    let short = Ask { wait: Duration::from_millis(100), ..ask };
    let started = tokio::time::Instant::now();
    core.pod_role(&short).await.expect("the old pod");
    assert_eq!(started.elapsed(), Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn a_new_pod_on_a_terminating_pods_ip_wins_during_the_grace() {
    let (sts, metrics) = (Arc::default(), Arc::new(Metrics::default()));
    let core = Arc::new(core(&sts, &metrics));
    core.cluster().apply_pod(Change::Apply(terminating("old")));
    let ask = Ask::new("10.0.0.9".parse().expect("ip"), Caller::Any, Duration::from_secs(5));
    let asking = tokio::spawn({
        let core = Arc::clone(&core);
        async move { core.pod_role(&ask).await.map(|(pod, role)| (pod.name.clone(), role)) }
    });
    // Bounded: the request registers its wait before paused time moves on.
    for _ in 0..100 {
        if metrics.server.pod_waits.get() > 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(metrics.server.pod_waits.get(), 1, "the request waits");
    let new = PodFacts::test("ns", "new", "10.0.0.9", Some("new-role"));
    core.cluster().apply_pod(Change::Apply(new));
    let (name, role) = asking.await.expect("task").expect("answered");
    assert_eq!((&*name, role.as_deref()), ("new", Some("new-role")));
}
