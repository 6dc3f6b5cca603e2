//! The credentials cache in front of STS: one entry per [`Identity`], shared by every pod with
//! that identity.
//!
//! - **Single-flight.** Each entry has a fetch lock: however many requests miss (or find stale
//!   credentials) at once, one AssumeRole call is made and the others read its result.
//! - **Static stability.** When a fetch fails, credentials that are still usable keep being
//!   served, and the identity is not retried before a back-off (with jitter) has passed.
//! - **Ahead of time.** [`CredentialCache::refresh`] renews an identity at half-life, for the
//!   background refresher; requests then never wait for STS.
//!
//! Every decision takes `now` from an injected clock, so it is tested without waiting.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::gate::{Gate, jitter};
use super::pace::{Pace, Reason, Urgency};
use super::{Credentials, Identity, Lifetimes};
use crate::metrics::{ErrorCode, Metrics, ServerMetrics};

/// STS AssumeRole, behind a trait so that the cache can be tested without a network.
pub trait AssumeRole: Send + Sync + 'static {
    /// Assumes `identity` for `duration`.
    fn assume_role(
        &self,
        identity: &Identity,
        duration: Duration,
    ) -> impl Future<Output = Result<Credentials, StsError>> + Send;
}

/// What kind of STS failure happened, so that callers can branch without parsing codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StsErrorKind {
    /// `Throttling` and friends: slow down and retry.
    Throttled,
    /// `AccessDenied`: the server's identity may not assume the role (or the trust is missing).
    Denied,
    /// The request was invalid (`ValidationError`, `MalformedPolicyDocument`, ...).
    Invalid,
    /// STS could not be reached or timed out.
    Unavailable,
    /// Anything else.
    Other,
}

/// An STS failure, with AWS's error code and message when there is one.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}: {message}", code.as_deref().unwrap_or("STSError"))]
pub struct StsError {
    pub kind: StsErrorKind,
    pub code: Option<String>,
    pub message: String,
}

/// A wall clock, injectable for tests.
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// The first pause before an identity whose fetch failed is tried again; it doubles per failure.
const RETRY_START: Duration = Duration::from_secs(1);
/// The longest such pause.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// The cache's counters: the process's registered metrics themselves (clones share the value),
/// so tests and scrapes read the same numbers and nothing is copied at scrape time.
#[derive(Clone, Debug)]
pub struct CacheStats {
    /// `kiam_sts_cache_hit_total`.
    pub hits: Counter,
    /// `kiam_sts_cache_miss_total`.
    pub misses: Counter,
    /// `kiam_sts_assumerole_calls_total`: AssumeRole calls made.
    pub sts_calls: Counter,
    /// `kiam_sts_issuing_errors_total`.
    pub sts_errors: Counter,
    /// `kiam_sts_stale_served_total`: requests answered with still-valid credentials because
    /// STS failed.
    pub stale_served: Counter,
    /// `kiam_sts_cacheSize`: identities held.
    size: Gauge,
}

impl CacheStats {
    fn of(m: &ServerMetrics) -> CacheStats {
        CacheStats {
            hits: m.cache_hits.clone(),
            misses: m.cache_misses.clone(),
            sts_calls: m.assumerole_calls.clone(),
            sts_errors: m.issuing_errors.clone(),
            stale_served: m.stale_served.clone(),
            size: m.cache_size.clone(),
        }
    }
}

#[derive(Default)]
struct Entry {
    current: RwLock<Option<Arc<Credentials>>>,
    fetch: tokio::sync::Mutex<Failures>,
    /// How urgent the fetch waiting for the STS budget is.
    urgency: Urgency,
}

/// An identity's fetch failures since its last success. Read-only outside this module.
#[derive(Clone, Debug, Default)]
pub struct Failures {
    count: u32,
    retry_at: Option<SystemTime>,
    last: Option<StsError>,
}

impl Failures {
    /// Failed fetches since the last success.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Until when the identity is not tried again, if it is backing off.
    pub fn retry_at(&self) -> Option<SystemTime> {
        self.retry_at
    }

    /// The last error since the last success.
    pub fn last(&self) -> Option<&StsError> {
        self.last.as_ref()
    }
}

impl Entry {
    fn current(&self) -> Option<Arc<Credentials>> {
        self.current.read().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Why the cache fetches.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// A request: anything fresh will do.
    Serve,
    /// The refresher: renew once the refresh window is reached.
    Refresh,
}

/// The single-flight cache.
pub struct CredentialCache<A> {
    sts: A,
    lifetimes: Lifetimes,
    gate: Gate,
    /// `--sts-rate`; `None` leaves calls unpaced (only the gate bounds them).
    pace: Option<Pace>,
    entries: Mutex<HashMap<Identity, Arc<Entry>>>,
    clock: Clock,
    stats: CacheStats,
    metrics: Arc<Metrics>,
}

impl<A: AssumeRole> CredentialCache<A> {
    /// A cache with the wall clock and at most `concurrency` STS calls in flight, counting into
    /// `metrics`.
    pub fn new(sts: A, lifetimes: Lifetimes, concurrency: usize, metrics: Arc<Metrics>) -> Self {
        Self::with_clock(sts, lifetimes, concurrency, metrics, Arc::new(SystemTime::now))
    }

    /// As [`new`](Self::new), with the clock injected.
    pub fn with_clock(
        sts: A,
        lifetimes: Lifetimes,
        concurrency: usize,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        CredentialCache {
            sts,
            lifetimes,
            gate: Gate::new(concurrency),
            pace: None,
            entries: Mutex::default(),
            clock,
            stats: CacheStats::of(&metrics.server),
            metrics,
        }
    }

    /// Paces STS calls to at most `per_second` a second (`--sts-rate`), the most urgent first.
    pub fn with_rate(mut self, per_second: u32) -> Self {
        self.pace = Some(Pace::new(per_second));
        self
    }

    /// One STS call within the budget and through the gate, timed and counted.
    async fn assume(
        &self,
        identity: &Identity,
        entry: &Entry,
        reason: Reason,
    ) -> Result<Credentials, StsError> {
        if let Some(pace) = &self.pace {
            pace.take(&entry.urgency).await;
        }
        entry.urgency.reset();
        let started = std::time::Instant::now();
        let m = &self.metrics.server;
        self.stats.sts_calls.inc();
        self.metrics.scale.sts_call(reason.label());
        m.assumerole_current.inc();
        let result = self.gate.run(self.sts.assume_role(identity, self.lifetimes.session)).await;
        m.assumerole_current.dec();
        m.assumerole_timing.observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            if e.kind == StsErrorKind::Throttled {
                self.metrics.scale.sts_throttled.inc();
            }
            let code = e.code.clone().unwrap_or_else(|| format!("{:?}", e.kind));
            m.sts_errors.get_or_create(&ErrorCode { code }).inc();
        }
        let error_code = result.as_ref().err().map(|e| e.code.as_deref().unwrap_or("UnknownError"));
        self.metrics.sts_call(identity.role.as_str(), error_code, started.elapsed());
        result
    }

    fn entry(&self, identity: &Identity) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = Arc::clone(entries.entry(identity.clone()).or_default());
        self.stats.size.set(entries.len() as i64);
        entry
    }

    /// Credentials for `identity` fit to serve: cached, or from one STS call, or (when STS fails)
    /// cached ones that are still usable.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Credentials>, StsError> {
        self.get_for(identity, Reason::Request).await
    }

    /// As [`get`](Self::get), for the prefetcher: a miss waits for the STS budget behind requests.
    pub async fn prefetch(&self, identity: &Identity) -> Result<Arc<Credentials>, StsError> {
        self.get_for(identity, Reason::Prefetch).await
    }

    async fn get_for(&self, identity: &Identity, reason: Reason) -> Result<Arc<Credentials>, StsError> {
        let entry = self.entry(identity);
        if let Some(c) = entry.current().filter(|c| self.lifetimes.is_fresh(c, (self.clock)())) {
            self.stats.hits.inc();
            self.metrics.cache_hit(identity.role.as_str());
            return Ok(c);
        }
        self.stats.misses.inc();
        self.fetch(identity, &entry, Want::Serve, reason).await
    }

    /// Renews `identity` if its refresh window has been reached (or it has nothing cached) and
    /// it is not backing off after a failure. Returns whether STS was called.
    pub async fn refresh(&self, identity: &Identity) -> Result<bool, StsError> {
        let entry = self.entry(identity);
        let before = entry.current();
        let after = self.fetch(identity, &entry, Want::Refresh, Reason::Refresh).await?;
        Ok(before.is_none_or(|b| !Arc::ptr_eq(&b, &after)))
    }

    async fn fetch(
        &self,
        identity: &Identity,
        entry: &Entry,
        want: Want,
        reason: Reason,
    ) -> Result<Arc<Credentials>, StsError> {
        // Before queueing for the lock: a fetch already waiting for the budget goes at our rank.
        entry.urgency.raise(reason);
        let mut failures = entry.fetch.lock().await;
        let now = (self.clock)();
        let current = entry.current();
        let satisfied = |c: &Credentials| match want {
            Want::Serve => self.lifetimes.is_fresh(c, now),
            Want::Refresh => !self.lifetimes.refresh_due(c, now),
        };
        // Whoever held the lock before us may have fetched already.
        if let Some(c) = current.as_ref().filter(|c| satisfied(c)) {
            return Ok(Arc::clone(c));
        }
        let backing_off = failures.retry_at.is_some_and(|at| now < at);
        let result = if backing_off {
            Err(failures.last.clone().unwrap_or_else(|| StsError {
                kind: StsErrorKind::Other,
                code: None,
                message: "retrying later".into(),
            }))
        } else {
            entry.urgency.raise(reason);
            self.assume(identity, entry, reason).await
        };
        match result {
            Ok(fresh) => {
                let fresh = Arc::new(fresh);
                *entry.current.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&fresh));
                *failures = Failures::default();
                Ok(fresh)
            }
            Err(error) => {
                if !backing_off {
                    self.stats.sts_errors.inc();
                    failures.count = failures.count.saturating_add(1);
                    let pause = RETRY_START.saturating_mul(1 << failures.count.min(6)).min(RETRY_MAX);
                    // From the end of the failed call, which may have taken a while: a caller
                    // queued behind it must not find the back-off already over.
                    failures.retry_at = Some((self.clock)() + jitter(pause));
                    failures.last = Some(error.clone());
                    tracing::warn!(role = %identity.role, %error, "AssumeRole failed");
                }
                match current.filter(|c| self.lifetimes.is_usable(c, now)) {
                    Some(c) if want == Want::Serve => {
                        self.stats.stale_served.inc();
                        Ok(c)
                    }
                    _ => Err(error),
                }
            }
        }
    }

    /// Housekeeping for the refresher: forgets identities no active pod uses once their
    /// credentials can no longer be served, and returns the active identities that need a fetch:
    /// due for refresh, or with nothing cached (a pod whose announcement was dropped, or whose
    /// namespace arrived after it).
    pub fn sweep(&self, active: &HashSet<Identity>) -> Vec<Identity> {
        let now = (self.clock)();
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.retain(|identity, entry| {
            active.contains(identity) || entry.current().is_some_and(|c| self.lifetimes.is_usable(&c, now))
        });
        self.stats.size.set(entries.len() as i64);
        active
            .iter()
            .filter(|identity| {
                let current = entries.get(*identity).and_then(|e| e.current());
                current.is_none_or(|c| self.lifetimes.refresh_due(&c, now))
            })
            .cloned()
            .collect()
    }

    /// How many identities are cached.
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The counters.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// How long every STS call currently waits because STS throttled (zero normally).
    pub fn throttle_pause(&self) -> Duration {
        self.gate.pause()
    }

    /// The lifetimes in force.
    pub fn lifetimes(&self) -> Lifetimes {
        self.lifetimes
    }
}

/// What the cache holds for one identity, for diagnostics (`kiam explain`): times, flags and
/// failures, never the credentials themselves.
#[derive(Clone, Debug)]
pub struct EntryState {
    /// When the held credentials were issued and expire; `None` when nothing is held.
    pub issued: Option<SystemTime>,
    pub expiration: Option<SystemTime>,
    /// The held credentials are served as they are while STS works.
    pub fresh: bool,
    /// The background refresher would renew them now.
    pub refresh_due: bool,
    /// They are still served when STS fails.
    pub usable: bool,
    /// The failures since the last success; `None` while a fetch is in flight, since its lock
    /// guards them and a diagnostic must not wait for STS.
    pub failures: Option<Failures>,
    /// The cache's clock when this was read.
    pub now: SystemTime,
}

impl<A> CredentialCache<A> {
    /// What the cache holds for `identity`, without fetching or creating anything; `None` when
    /// the cache has no entry for it.
    pub fn state(&self, identity: &Identity) -> Option<EntryState> {
        let entry = self.entries.lock().unwrap_or_else(PoisonError::into_inner).get(identity).cloned()?;
        let now = (self.clock)();
        let current = entry.current();
        let held = |f: fn(&Lifetimes, &Credentials, SystemTime) -> bool| {
            current.as_ref().is_some_and(|c| f(&self.lifetimes, c, now))
        };
        Some(EntryState {
            issued: current.as_ref().map(|c| c.issued),
            expiration: current.as_ref().map(|c| c.expiration),
            fresh: held(Lifetimes::is_fresh),
            refresh_due: held(Lifetimes::refresh_due),
            usable: held(Lifetimes::is_usable),
            failures: entry.fetch.try_lock().ok().map(|f| f.clone()),
            now,
        })
    }
}
