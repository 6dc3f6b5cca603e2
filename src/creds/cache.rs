//! The credentials cache in front of STS: one entry per [`Identity`], shared by every pod with
//! that identity. moka's per-key compute lock makes it single-flight: however many requests miss
//! (or find stale credentials) at once, one AssumeRole call is made and all of them get its result.
//! Whether an entry is still fresh is decided here with an explicit `now`, not by moka's clock.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};

use super::{Credentials, Identity, Lifetimes};

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

/// The single-flight cache.
pub struct CredentialCache<A> {
    sts: A,
    entries: Cache<Identity, Arc<Credentials>>,
    lifetimes: Lifetimes,
}

impl<A: AssumeRole> CredentialCache<A> {
    /// A cache holding at most `capacity` identities.
    pub fn new(sts: A, lifetimes: Lifetimes, capacity: u64) -> Self {
        let entries = Cache::builder().max_capacity(capacity).time_to_live(lifetimes.session).build();
        CredentialCache { sts, entries, lifetimes }
    }

    /// Fresh credentials for `identity`, from the cache or from one STS call.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<Credentials>, StsError> {
        self.get_at(identity, SystemTime::now).await
    }

    /// As [`get`](Self::get), with the clock injected for tests.
    pub async fn get_at(
        &self,
        identity: &Identity,
        now: impl Fn() -> SystemTime + Send + Sync,
    ) -> Result<Arc<Credentials>, StsError> {
        if let Some(hit) = self.entries.get(identity).await
            && self.lifetimes.is_fresh(&hit, now())
        {
            return Ok(hit);
        }
        let lifetimes = self.lifetimes;
        let result = self
            .entries
            .entry_by_ref(identity)
            .and_try_compute_with(|current| async {
                // Waiters queued behind a fetch find its result here and make no call.
                if let Some(entry) = current
                    && lifetimes.is_fresh(entry.value(), now())
                {
                    return Ok(Op::Nop);
                }
                let fresh = self.sts.assume_role(identity, lifetimes.session).await?;
                Ok::<_, StsError>(Op::Put(Arc::new(fresh)))
            })
            .await?;
        match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Ok(e.into_value())
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => Err(StsError {
                kind: StsErrorKind::Other,
                code: None,
                message: "credentials cache lost an entry".into(),
            }),
        }
    }

    /// How many identities are cached.
    pub fn len(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BaseArn, RoleArn};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::UNIX_EPOCH;

    /// Issues credentials valid for `valid` from a fixed issue time, counting calls.
    struct FakeSts {
        calls: AtomicUsize,
        valid: Duration,
        gate: tokio::sync::Semaphore,
    }

    impl AssumeRole for Arc<FakeSts> {
        async fn assume_role(&self, identity: &Identity, _: Duration) -> Result<Credentials, StsError> {
            let _permit = self.gate.acquire().await.map_err(|_| StsError {
                kind: StsErrorKind::Unavailable,
                code: None,
                message: "closed".into(),
            })?;
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let issued = UNIX_EPOCH + Duration::from_secs(1000);
            Ok(Credentials {
                access_key_id: format!("AKIA{n}-{}", identity.session_name),
                secret_access_key: "s".into(),
                session_token: "t".into(),
                expiration: issued + self.valid,
                issued,
            })
        }
    }

    fn identity(role: &str) -> Identity {
        let base = BaseArn::parse("arn:aws:iam::1:role/").expect("base");
        Identity {
            role: RoleArn::resolve(role, Some(&base)).expect("role"),
            session_name: "kiam-kiam".into(),
            external_id: None,
        }
    }

    fn lifetimes() -> Lifetimes {
        Lifetimes { session: Duration::from_secs(3600), refresh_lead: Duration::from_secs(300) }
    }

    #[tokio::test]
    async fn concurrent_misses_make_one_call() {
        let sts = Arc::new(FakeSts {
            calls: AtomicUsize::new(0),
            valid: Duration::from_secs(3600),
            gate: tokio::sync::Semaphore::new(0),
        });
        let cache = Arc::new(CredentialCache::new(Arc::clone(&sts), lifetimes(), 100));
        let now = || UNIX_EPOCH + Duration::from_secs(1000);
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = Arc::clone(&cache);
            tasks.push(tokio::spawn(async move { cache.get_at(&identity("app"), now).await }));
        }
        // Let every task reach the cache before STS answers.
        tokio::task::yield_now().await;
        sts.gate.add_permits(1000);
        for t in tasks {
            let creds = t.await.expect("task").expect("credentials");
            assert_eq!(creds.access_key_id, "AKIA0-kiam-kiam");
        }
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
        cache.get_at(&identity("other"), now).await.expect("other role");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn stale_entries_are_replaced_once() {
        let sts = Arc::new(FakeSts {
            calls: AtomicUsize::new(0),
            valid: Duration::from_secs(3600),
            gate: tokio::sync::Semaphore::new(1000),
        });
        let cache = CredentialCache::new(Arc::clone(&sts), lifetimes(), 100);
        let early = || UNIX_EPOCH + Duration::from_secs(1000);
        let late = || UNIX_EPOCH + Duration::from_secs(1000 + 3600 - 299);
        cache.get_at(&identity("app"), early).await.expect("first");
        cache.get_at(&identity("app"), early).await.expect("hit");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 1);
        let renewed = cache.get_at(&identity("app"), late).await.expect("renewed");
        assert_eq!(renewed.access_key_id, "AKIA1-kiam-kiam");
        assert_eq!(sts.calls.load(Ordering::SeqCst), 2);
    }
}
