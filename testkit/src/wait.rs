//! The one way tests wait: poll a condition until it holds, bounded in time, never a bare
//! sleep standing in for a condition.

use std::future::Future;
use std::time::Duration;

/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(20);

/// Polls `probe` until it yields `Some`, and returns the value; panics naming `what` after
/// `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let polling = async {
        loop {
            if let Some(value) = probe().await {
                return value;
            }
            tokio::time::sleep(POLL).await;
        }
    };
    tokio::time::timeout(limit, polling).await.unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"))
}

/// Polls `condition` until it holds; panics naming `what` after `limit`.
pub async fn until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually(what, limit, || {
        let check = condition();
        async move { check.await.then_some(()) }
    })
    .await
}
