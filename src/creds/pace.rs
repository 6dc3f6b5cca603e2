//! The per-server budget of AssumeRole calls (`--sts-rate`): a token bucket (one second's worth
//! of burst) whose next free slot goes to the most urgent caller waiting. A live request goes
//! before the prefetch of a new pod, which goes before a refresh (which has slack until expiry),
//! so a burst of new pods or a wave of renewals cannot make a pod's own request wait behind them.
//!
//! A caller's urgency is read again on every wake-up ([`Urgency`]): when a request arrives for
//! an identity whose prefetch is already waiting, it raises that wait to its own rank instead of
//! queueing behind it (the cache fetches each identity once).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Why STS is called, most urgent first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// A pod asked and the cache had nothing fresh.
    Request = 0,
    /// A new pod (or a server taking over a peer's identities) warms the cache.
    Prefetch = 1,
    /// The refresher renews credentials at half-life.
    Refresh = 2,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Request => "request",
            Reason::Prefetch => "prefetch",
            Reason::Refresh => "refresh",
        }
    }

    fn from_level(level: u8) -> Reason {
        match level {
            0 => Reason::Request,
            1 => Reason::Prefetch,
            _ => Reason::Refresh,
        }
    }
}

/// How urgent one identity's pending fetch is: the most urgent reason any caller has for it.
#[derive(Debug)]
pub struct Urgency(AtomicU8);

impl Default for Urgency {
    fn default() -> Self {
        Urgency(AtomicU8::new(Reason::Refresh as u8))
    }
}

impl Urgency {
    /// Raises the urgency to `reason` if that is more urgent.
    pub fn raise(&self, reason: Reason) {
        self.0.fetch_min(reason as u8, Ordering::SeqCst);
    }

    /// Back to the least urgent, once the fetch is done.
    pub fn reset(&self) {
        self.0.store(Reason::Refresh as u8, Ordering::SeqCst);
    }

    pub fn get(&self) -> Reason {
        Reason::from_level(self.0.load(Ordering::SeqCst))
    }
}

/// The budget.
pub struct Pace {
    interval: Duration,
    /// How far ahead of now the bucket may be booked (its burst).
    burst: Duration,
    state: Mutex<State>,
}

struct State {
    /// When the bucket is empty again (the theoretical arrival time of GCRA).
    booked: Instant,
    /// Callers waiting, by reason.
    waiting: [usize; 3],
}

/// Counts its caller as waiting at one rank; uncounts it when dropped (also when cancelled).
struct Waiting<'a> {
    pace: &'a Pace,
    level: Option<usize>,
}

impl Waiting<'_> {
    fn at(&mut self, state: &mut State, level: usize) {
        if let Some(old) = self.level.replace(level) {
            state.waiting[old] -= 1;
        }
        state.waiting[level] += 1;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(level) = self.level.take() {
            self.pace.lock().waiting[level] -= 1;
        }
    }
}

impl Pace {
    /// At most `per_second` calls a second on average, and that many at once after a quiet spell.
    pub fn new(per_second: u32) -> Pace {
        let per_second = per_second.max(1);
        let interval = Duration::from_secs(1) / per_second;
        Pace {
            interval,
            burst: interval * (per_second - 1),
            state: Mutex::new(State { booked: Instant::now(), waiting: [0; 3] }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot, ahead of every less urgent caller; `urgency` may rise while it waits.
    pub async fn take(&self, urgency: &Urgency) {
        let mut waiting = Waiting { pace: self, level: None };
        loop {
            let wake = {
                let mut state = self.lock();
                let now = Instant::now();
                let level = urgency.get() as usize;
                let ahead = state.waiting[..level].iter().any(|n| *n > 0);
                let start = state.booked.max(now);
                let free_at = start.checked_sub(self.burst).unwrap_or(now);
                if !ahead && free_at <= now {
                    state.booked = start + self.interval;
                    if let Some(old) = waiting.level.take() {
                        state.waiting[old] -= 1;
                    }
                    return;
                }
                waiting.at(&mut state, level);
                // Behind a more urgent caller: look again once it has had the next slot.
                if ahead { free_at.max(now) + self.interval } else { free_at }
            };
            tokio::time::sleep_until(wake).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_then_the_rate() {
        let pace = Pace::new(4);
        let urgency = Urgency::default();
        let start = Instant::now();
        for _ in 0..4 {
            pace.take(&urgency).await;
        }
        assert_eq!(Instant::now(), start, "a second's worth at once");
        for _ in 0..4 {
            pace.take(&urgency).await;
        }
        assert!(Instant::now() - start >= Duration::from_millis(990), "then four a second");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_go_before_prefetch_and_prefetch_before_refresh() {
        let pace = Arc::new(Pace::new(1));
        pace.take(&Urgency::default()).await; // the bucket is empty now
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for reason in [Reason::Refresh, Reason::Refresh, Reason::Prefetch, Reason::Request] {
            let (pace, order) = (Arc::clone(&pace), Arc::clone(&order));
            tasks.push(tokio::spawn(async move {
                let urgency = Urgency::default();
                urgency.raise(reason);
                pace.take(&urgency).await;
                order.lock().expect("lock").push(reason);
            }));
            tokio::task::yield_now().await;
        }
        for t in tasks {
            t.await.expect("join");
        }
        let order = order.lock().expect("lock").clone();
        assert_eq!(order, [Reason::Request, Reason::Prefetch, Reason::Refresh, Reason::Refresh]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_raised_urgency_jumps_the_queue_and_cancelled_waits_leave_it() {
        let pace = Arc::new(Pace::new(1));
        pace.take(&Urgency::default()).await;
        let boosted = Arc::new(Urgency::default());
        boosted.raise(Reason::Prefetch);
        let cancelled = {
            let pace = Arc::clone(&pace);
            tokio::spawn(async move {
                let u = Urgency::default();
                u.raise(Reason::Request);
                pace.take(&u).await;
            })
        };
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        let other = {
            let pace = Arc::clone(&pace);
            tokio::spawn(async move {
                let u = Urgency::default();
                u.raise(Reason::Prefetch);
                pace.take(&u).await;
                Instant::now()
            })
        };
        tokio::task::yield_now().await;
        boosted.raise(Reason::Request);
        let (p, b) = (Arc::clone(&pace), Arc::clone(&boosted));
        let first = tokio::spawn(async move {
            p.take(&b).await;
            Instant::now()
        });
        let (first, other) = (first.await.expect("join"), other.await.expect("join"));
        assert!(first < other, "the raised wait went first; the cancelled one held nothing up");
        assert_eq!(pace.lock().waiting, [0, 0, 0]);
    }
}
