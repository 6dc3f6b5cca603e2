//! Tests of the credentials cache with a scripted STS and an injected clock.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, UNIX_EPOCH};

use super::*;
use crate::model::{BaseArn, RoleArn};

const MIN: u64 = 60;

/// Issues credentials valid for one session from the clock's `now`; fails while `down`.
struct FakeSts {
    calls: AtomicUsize,
    /// Callers that reached STS, answered or not.
    entered: AtomicUsize,
    down: AtomicBool,
    clock: Arc<AtomicU64>,
    gate: tokio::sync::Semaphore,
}

impl AssumeRole for Arc<FakeSts> {
    async fn assume_role(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        let _permit = self.gate.acquire().await.map_err(|_| unavailable())?;
        if self.down.load(Ordering::SeqCst) {
            return Err(unavailable());
        }
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let issued = UNIX_EPOCH + Duration::from_secs(self.clock.load(Ordering::SeqCst));
        Ok(Credentials {
            access_key_id: format!("ASIA{n}-{}", identity.role.name()),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration: issued + duration,
            issued,
        })
    }
}

fn unavailable() -> StsError {
    StsError { kind: StsErrorKind::Unavailable, code: None, message: "STS unreachable".into() }
}

struct Fixture {
    sts: Arc<FakeSts>,
    clock: Arc<AtomicU64>,
    cache: Arc<CredentialCache<Arc<FakeSts>>>,
}

impl Fixture {
    fn new(permits: usize) -> Fixture {
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let sts = Arc::new(FakeSts {
            calls: AtomicUsize::new(0),
            entered: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            clock: Arc::clone(&clock),
            gate: tokio::sync::Semaphore::new(permits),
        });
        let lifetimes =
            Lifetimes { session: Duration::from_secs(60 * MIN), refresh_lead: Duration::from_secs(5 * MIN) };
        let c = Arc::clone(&clock);
        let now: Clock = Arc::new(move || UNIX_EPOCH + Duration::from_secs(c.load(Ordering::SeqCst)));
        let metrics = Arc::new(crate::metrics::Metrics::default());
        let cache = Arc::new(CredentialCache::with_clock(Arc::clone(&sts), lifetimes, 8, metrics, now));
        Fixture { sts, clock, cache }
    }

    fn advance(&self, minutes: u64) {
        self.clock.fetch_add(minutes * MIN, Ordering::SeqCst);
    }

    fn calls(&self) -> usize {
        self.sts.calls.load(Ordering::SeqCst)
    }
}

fn identity(role: &str) -> Identity {
    let base = BaseArn::parse("arn:aws:iam::1:role/").expect("base");
    Identity::plain(RoleArn::resolve(role, Some(&base)).expect("role"), "kiam-kiam".into(), None)
}

#[tokio::test]
async fn concurrent_misses_make_one_call() {
    let f = Fixture::new(0);
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cache = Arc::clone(&f.cache);
            tokio::spawn(async move { cache.get(&identity("app")).await })
        })
        .collect();
    // Every task has missed (and so waits on the entry's fetch lock, or is the one caller inside
    // STS) before STS may answer: with single-flight broken, all 50 would be inside STS.
    let all_waiting = async {
        while f.cache.stats().misses.get() < 50 || f.sts.entered.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all_waiting).await.expect("every caller misses");
    assert_eq!(f.sts.entered.load(Ordering::SeqCst), 1, "one caller inside STS, the others wait for it");
    f.sts.gate.add_permits(1000);
    for t in tasks {
        assert_eq!(t.await.expect("task").expect("credentials").access_key_id, "ASIA0-app");
    }
    assert_eq!(f.calls(), 1);
    f.cache.get(&identity("other")).await.expect("other role");
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn served_until_fifteen_minutes_are_left() {
    let f = Fixture::new(1000);
    f.cache.get(&identity("app")).await.expect("first");
    f.advance(44);
    assert_eq!(f.cache.get(&identity("app")).await.expect("hit").access_key_id, "ASIA0-app");
    assert_eq!(f.calls(), 1);
    f.advance(1); // 15 minutes left: no longer served
    assert_eq!(f.cache.get(&identity("app")).await.expect("renewed").access_key_id, "ASIA1-app");
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn refresh_happens_once_at_half_life() {
    let f = Fixture::new(1000);
    let id = identity("app");
    assert!(f.cache.refresh(&id).await.expect("initial fetch"));
    f.advance(29);
    assert!(!f.cache.refresh(&id).await.expect("not due"));
    f.advance(1);
    assert!(f.cache.refresh(&id).await.expect("due"));
    assert!(!f.cache.refresh(&id).await.expect("just renewed"));
    assert_eq!(f.calls(), 2);
    // Requests after the refresh are hits on the new credentials.
    assert_eq!(f.cache.get(&id).await.expect("hit").access_key_id, "ASIA1-app");
    assert_eq!(f.calls(), 2);
}

#[tokio::test]
async fn sts_down_serves_cached_credentials_and_backs_off() {
    let f = Fixture::new(1000);
    let id = identity("app");
    f.cache.get(&id).await.expect("first");
    f.sts.down.store(true, Ordering::SeqCst);
    f.advance(50); // 10 minutes left: below the floor, still valid
    let before = f.cache.stats().sts_calls.get();
    assert_eq!(f.cache.get(&id).await.expect("stale but valid").access_key_id, "ASIA0-app");
    assert_eq!(f.cache.get(&id).await.expect("again").access_key_id, "ASIA0-app");
    let after = f.cache.stats().sts_calls.get();
    assert_eq!(after - before, 1, "the second request waits out the back-off instead of calling STS");
    assert_eq!(f.cache.stats().stale_served.get(), 2);
    // Once the back-off has passed, STS is tried again; when it is back, fresh credentials come.
    f.sts.down.store(false, Ordering::SeqCst);
    f.advance(1);
    assert_eq!(f.cache.get(&id).await.expect("renewed").access_key_id, "ASIA1-app");
    // Expired credentials are never served, whatever STS does.
    f.sts.down.store(true, Ordering::SeqCst);
    f.advance(61);
    assert!(f.cache.get(&id).await.is_err());
}

#[tokio::test]
async fn sweep_forgets_idle_identities_and_lists_due_ones() {
    let f = Fixture::new(1000);
    let (busy, idle) = (identity("busy"), identity("idle"));
    f.cache.get(&busy).await.expect("busy");
    f.cache.get(&idle).await.expect("idle");
    let active: HashSet<Identity> = [busy.clone()].into_iter().collect();
    assert!(f.cache.sweep(&active).is_empty(), "nothing due yet");
    let newcomer = identity("newcomer");
    let with_new: HashSet<Identity> = [busy.clone(), newcomer.clone()].into_iter().collect();
    assert_eq!(
        f.cache.sweep(&with_new),
        vec![newcomer],
        "an active identity with nothing cached needs a fetch"
    );
    f.advance(30);
    assert_eq!(f.cache.sweep(&active), vec![busy.clone()], "only identities in use are refreshed");
    assert_eq!(f.cache.len(), 2, "the idle one lapses but stays while usable");
    f.advance(30);
    f.cache.sweep(&active);
    assert_eq!(f.cache.len(), 1, "expired and unused: forgotten");
}

#[tokio::test]
async fn state_reports_times_flags_and_failures_without_fetching() {
    let f = Fixture::new(1000);
    let id = identity("app");
    assert!(f.cache.state(&id).is_none(), "unknown identities have no entry");
    assert!(f.cache.is_empty(), "reading the state creates nothing");
    f.cache.get(&id).await.expect("first");
    let state = f.cache.state(&id).expect("an entry");
    assert_eq!(
        state.expiration.zip(state.issued).map(|(e, i)| e.duration_since(i).ok()),
        Some(Some(Duration::from_secs(60 * MIN)))
    );
    assert!(state.fresh && state.usable && !state.refresh_due);
    assert_eq!(state.failures.as_ref().map(|f| f.count()), Some(0));
    f.sts.down.store(true, Ordering::SeqCst);
    f.advance(50);
    f.cache.get(&id).await.expect("stale but valid");
    let state = f.cache.state(&id).expect("an entry");
    assert!(!state.fresh && state.usable && state.refresh_due);
    let failures = state.failures.expect("no fetch in flight");
    assert_eq!(failures.count(), 1);
    assert!(failures.retry_at().is_some_and(|at| at > state.now));
    assert_eq!(failures.last().map(|e| e.message.as_str()), Some("STS unreachable"));
    assert_eq!(f.calls(), 1, "reading the state never calls STS");
}
