//! Figure 4: STS efficiency. AssumeRole calls for a burst of 1,000 pods on 10 roles, and over two
//! refresh periods, counted by moto's recorder and by the cache's own counter.
//!
//! The release server refuses sessions under 15 minutes and refreshes at half-life (30 minutes
//! by default), so waiting for two real refresh periods is out of the question. This figure
//! therefore runs the server's library in this process, assembled as `server::start` does, with
//! one change: the cache reads an injected clock, and AssumeRole answers are shifted by the same
//! amount, so that "31 minutes later" is a number. A refresh period is then one pass of the
//! refresher's tick (`prefetch::due`, then `refresh` for each identity due), the same calls its
//! timer makes. The release binary's counts for real bursts come from figures 2 and 3.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use kiam::aws::Sts;
use kiam::cluster::events::NoEvents;
use kiam::cluster::kube::KubeSource;
use kiam::cluster::{Cluster, Source};
use kiam::core::{Ask, Core, prefetch};
use kiam::creds::{AssumeRole, Clock, CredentialCache, Credentials, Identity, Lifetimes, StsError};
use kiam::model::BaseArn;
use kiam::policy::{Caller, Policy};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::deploy::{self, BASE_ARN, Env};
use crate::report::{Report, Row, Verdict};
use crate::stats;
use kiam_testkit::fake_kube::FakeKube;

const PODS: u32 = 1000;
const ROLES: u32 = 10;
/// The server's defaults: 1 h sessions, refreshed at half-life.
const SESSION: Duration = Duration::from_secs(3600);
/// How far the clock moves for one refresh period: just past half-life.
const PERIOD: Duration = Duration::from_secs(31 * 60);

/// moto, with its answers' times shifted by the injected clock's offset.
struct ShiftedSts {
    sts: Sts,
    offset: Arc<AtomicU64>,
}

impl AssumeRole for ShiftedSts {
    async fn assume_role(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        let mut credentials = self.sts.assume_role(identity, duration).await?;
        let shift = Duration::from_secs(self.offset.load(Ordering::SeqCst));
        credentials.expiration += shift;
        credentials.issued += shift;
        Ok(credentials)
    }
}

/// Runs figure 4's in-process part.
pub async fn run(env: &Env, report: &mut Report) {
    let kube = FakeKube::start().await;
    kube.apply(deploy::namespace("sts", "sts-"));
    env.moto.start_recording().await;
    let offset = Arc::new(AtomicU64::new(0));
    let clock: Clock = {
        let offset = Arc::clone(&offset);
        Arc::new(move || SystemTime::now() + Duration::from_secs(offset.load(Ordering::SeqCst)))
    };
    let lifetimes = Lifetimes { session: SESSION, refresh_lead: Duration::from_secs(300) };
    let sts = ShiftedSts { sts: deploy::sts(env), offset: Arc::clone(&offset) };
    let metrics = Arc::new(kiam::metrics::Metrics::default());
    let cache = CredentialCache::with_clock(sts, lifetimes, 8, Arc::clone(&metrics), clock);
    let (announce, announcements) = mpsc::channel(1000);
    let cluster = Arc::new(Cluster::new(Some(announce), Arc::clone(&metrics)));
    let policy = Policy {
        base_arn: Some(BaseArn::parse(BASE_ARN).expect("the base ARN parses")),
        strict_namespace_regexp: true,
        kube2iam: None,
        session_tags: None,
        source_identity: false,
        service_account_roles: false,
    };
    let core =
        Arc::new(Core::new(Arc::clone(&cluster), policy, cache, "kiam".into(), Arc::new(NoEvents), metrics));
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let source = KubeSource::from_client(kube.kube_client());
    let (watched, stop) = (Arc::clone(&cluster), shutdown.clone());
    tokio::spawn(async move { source.run(watched, stop).await });
    prefetch::spawn(Arc::clone(&core), announcements, 8, shutdown.clone());
    tokio::time::timeout(Duration::from_secs(20), cluster.wait_synced()).await.expect("the caches sync");

    let pods: Vec<(IpAddr, String)> = (0..PODS)
        .map(|i| (deploy::nth_ip(Ipv4Addr::new(10, 2, 0, 0), i), format!("sts-{}", i % ROLES)))
        .collect();
    for (i, (ip, role)) in pods.iter().enumerate() {
        kube.apply(deploy::pod("sts", &format!("sts-{i}"), *ip, role, &format!("node-{}", i % 10)));
    }
    settle(&core).await;
    serve_all(&core, &pods).await;
    let burst = env.moto.recorded_assume_roles().await.len();

    let mut periods = Vec::new();
    for _ in 0..2 {
        offset.fetch_add(PERIOD.as_secs(), Ordering::SeqCst);
        let before = env.moto.recorded_assume_roles().await.len();
        // Two ticks in a row: the second must find nothing due.
        tick(&core).await;
        tick(&core).await;
        serve_all(&core, &pods).await;
        periods.push(env.moto.recorded_assume_roles().await.len() - before);
    }
    let total = env.moto.recorded_assume_roles().await.len();
    let counted = core.cache().stats().sts_calls.get();
    let refreshed: usize = periods.iter().sum();
    let ideal = 2 * ROLES as usize;
    report.row(Row::compared(
        4,
        &format!("AssumeRole calls, burst of {PODS} pods on {ROLES} roles, each pod served (library)"),
        burst.to_string(),
        ROLES.to_string(),
        stats::ratio(burst as f64, f64::from(ROLES)),
        "1 per identity",
        Verdict::of(burst == ROLES as usize),
    ));
    report.row(Row::compared(
        4,
        "AssumeRole calls over two refresh periods (library, injected clock)",
        format!("{refreshed} ({})", periods.iter().map(ToString::to_string).collect::<Vec<_>>().join(" + ")),
        ideal.to_string(),
        stats::ratio(refreshed as f64, ideal as f64),
        "1 per identity per refresh",
        Verdict::of(periods.iter().all(|&calls| calls == ROLES as usize) && counted as usize == total),
    ));
    report.note(format!(
        "Figure 4: the server's library in the bench process (the binary refuses sessions under \
         15m, so two real refresh periods would take an hour): watcher on the fake API server, \
         prefetch workers, moto as STS, and an injected clock. {PODS} pods on {ROLES} roles were \
         created, the prefetch settled, and every pod was served once. Then, twice: the clock \
         moved {} min (1 h sessions refresh at half-life), the refresher's tick ran twice in a \
         row, and every pod was served again. moto recorded {total} AssumeRole calls in all; the \
         cache counted {counted}.",
        PERIOD.as_secs() / 60
    ));
}

/// Waits (at most 30 s) until the cluster holds every pod and the prefetch has been quiet for
/// half a second.
async fn settle<A: AssumeRole>(core: &Core<A>) {
    let started = Instant::now();
    let (mut last, mut quiet_since) = (u64::MAX, Instant::now());
    while started.elapsed() < Duration::from_secs(30) {
        let calls = core.cache().stats().sts_calls.get();
        if calls != last {
            (last, quiet_since) = (calls, Instant::now());
        }
        let all_known = core.cluster().pod_count() >= PODS as usize;
        if all_known && calls >= u64::from(ROLES) && quiet_since.elapsed() > Duration::from_millis(500) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the prefetch did not settle within 30 s");
}

/// Asks for every pod's credentials, as its first request would.
async fn serve_all<A: AssumeRole>(core: &Core<A>, pods: &[(IpAddr, String)]) {
    for (ip, role) in pods {
        let ask = Ask::new(*ip, Caller::Any, Duration::from_secs(1));
        core.pod_credentials(&ask, role).await.expect("every pod is served");
    }
}

/// One pass of the refresher's timer.
async fn tick<A: AssumeRole>(core: &Core<A>) {
    for identity in prefetch::due(core) {
        core.cache().refresh(&identity).await.expect("moto renews the identity");
    }
}
