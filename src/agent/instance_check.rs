//! The health checks' one question to the node's metadata service (`instance-id`), asked at most
//! once per [`TTL`] whatever the number of callers: every pod can reach `/health` (and kube2iam
//! mode's `/healthz`), and each answer used to cost one call to the node's metadata service, so
//! one pod could push the node into EC2's per-instance throttling, which the CNI and the kubelet
//! share. The answer (success or failure) is reused for [`TTL`]; callers that arrive while it is
//! being asked wait for that one call (single flight) instead of asking again.

use std::future::Future;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long an answer is reused: long enough that a flood of health requests costs the node's
/// metadata service one call a second, short enough that probes (every 10 s by default) see an
/// outage at once.
pub const TTL: Duration = Duration::from_secs(1);

/// The instance ID, or why the metadata service did not give it.
pub type Answer = Result<String, String>;

/// The last answer and when it was had; its lock is the single flight.
pub struct InstanceCheck {
    ttl: Duration,
    last: Mutex<Option<(Instant, Answer)>>,
}

impl Default for InstanceCheck {
    fn default() -> InstanceCheck {
        InstanceCheck::new(TTL)
    }
}

impl InstanceCheck {
    /// Answers reused for `ttl`.
    pub fn new(ttl: Duration) -> InstanceCheck {
        InstanceCheck { ttl, last: Mutex::new(None) }
    }

    /// The answer of the last `ask` if younger than the TTL, else `ask`'s, which concurrent
    /// callers share. `ask` is bounded by its own timeout (the upstream client's).
    pub async fn get<F, Fut>(&self, ask: F) -> Answer
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Answer>,
    {
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = last.as_ref()
            && at.elapsed() < self.ttl
        {
            return answer.clone();
        }
        let answer = ask().await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_call_per_ttl_shared_by_concurrent_callers() {
        let check = Arc::new(InstanceCheck::new(Duration::from_secs(1)));
        let calls = Arc::new(AtomicU32::new(0));
        let ask = |calls: Arc<AtomicU32>| async move {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await; // a slow upstream
            Ok::<_, String>("i-0123".to_string())
        };
        let waiters: Vec<_> = (0..20)
            .map(|_| {
                let (check, calls) = (Arc::clone(&check), Arc::clone(&calls));
                tokio::spawn(async move { check.get(|| ask(calls)).await })
            })
            .collect();
        for waiter in waiters {
            assert_eq!(waiter.await.expect("joined"), Ok("i-0123".into()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "concurrent callers share one call");
        assert_eq!(check.get(|| ask(Arc::clone(&calls))).await, Ok("i-0123".into()));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "within the TTL: reused");
        tokio::time::advance(Duration::from_secs(1)).await;
        check.get(|| ask(Arc::clone(&calls))).await.expect("asked again");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "past the TTL: asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_are_reused_for_the_ttl_too() {
        let check = InstanceCheck::new(Duration::from_secs(1));
        let calls = AtomicU32::new(0);
        for _ in 0..5 {
            let got = check
                .get(|| async {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err::<String, _>("refused".to_string())
                })
                .await;
            assert_eq!(got, Err("refused".into()));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a down metadata service is not hammered");
    }
}
