//! The gate every STS call passes: a global bound on calls in flight, and a shared slow-down when
//! STS throttles, so that one busy moment cannot turn into a storm of retries.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::{StsError, StsErrorKind};

/// The first pause after a `Throttling` answer; each further one doubles it.
const THROTTLE_START: Duration = Duration::from_millis(200);
/// The longest pause.
const THROTTLE_MAX: Duration = Duration::from_secs(30);

/// Concurrency bound plus throttling back-off.
pub struct Gate {
    permits: Semaphore,
    throttle: Mutex<Throttle>,
}

#[derive(Default)]
struct Throttle {
    pause: Duration,
    until: Option<Instant>,
}

impl Gate {
    /// At most `concurrency` calls in flight.
    pub fn new(concurrency: usize) -> Gate {
        Gate { permits: Semaphore::new(concurrency.max(1)), throttle: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Throttle> {
        self.throttle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `call` once a permit is free and any throttling pause has passed.
    pub async fn run<T, F>(&self, call: F) -> Result<T, StsError>
    where
        F: std::future::Future<Output = Result<T, StsError>>,
    {
        let _permit = self.permits.acquire().await.map_err(|_| StsError {
            kind: StsErrorKind::Unavailable,
            code: None,
            message: "shutting down".into(),
        })?;
        let until = self.lock().until;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
        let result = call.await;
        let mut t = self.lock();
        match &result {
            Err(e) if e.kind == StsErrorKind::Throttled => {
                t.pause = (t.pause * 2).clamp(THROTTLE_START, THROTTLE_MAX);
                t.until = Some(Instant::now() + jitter(t.pause));
                tracing::warn!(
                    pause_ms = t.pause.as_millis() as u64,
                    "STS is throttling; slowing every fetch down"
                );
            }
            Ok(_) => {
                t.pause /= 2;
                if t.pause < THROTTLE_START {
                    *t = Throttle::default();
                }
            }
            Err(_) => {}
        }
        result
    }

    /// The current throttling pause (zero when STS is not throttling).
    pub fn pause(&self) -> Duration {
        self.lock().pause
    }
}

/// A random duration between half of `d` and `d`, so that retries do not line up.
pub fn jitter(d: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    d / 2 + d.mul_f64(f64::from(byte[0]) / 510.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttled() -> StsError {
        StsError {
            kind: StsErrorKind::Throttled,
            code: Some("Throttling".into()),
            message: "Rate exceeded".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_slows_every_later_call() {
        let gate = Gate::new(4);
        let _ = gate.run(async { Err::<(), _>(throttled()) }).await;
        assert_eq!(gate.pause(), THROTTLE_START);
        let _ = gate.run(async { Err::<(), _>(throttled()) }).await;
        assert_eq!(gate.pause(), THROTTLE_START * 2);
        let before = Instant::now();
        gate.run(async { Ok::<_, StsError>(()) }).await.expect("ok");
        assert!(Instant::now() - before >= THROTTLE_START, "the next call waited out the pause");
        assert_eq!(gate.pause(), THROTTLE_START);
        gate.run(async { Ok::<_, StsError>(()) }).await.expect("ok");
        assert_eq!(gate.pause(), Duration::ZERO, "successes end the slow-down");
    }

    #[tokio::test]
    async fn bounds_calls_in_flight() {
        let gate = std::sync::Arc::new(Gate::new(2));
        let live = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks: Vec<_> = (0..10)
            .map(|_| {
                let (gate, live, peak) = (gate.clone(), live.clone(), peak.clone());
                tokio::spawn(async move {
                    gate.run(async {
                        let n = live.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        peak.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        live.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, StsError>(())
                    })
                    .await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("join").expect("ok");
        }
        assert!(peak.load(std::sync::atomic::Ordering::SeqCst) <= 2);
    }
}
