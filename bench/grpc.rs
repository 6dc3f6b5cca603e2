//! Figure 5: agent → server gRPC latency on a cache hit, at a fixed 1,000 requests/s over
//! mutual TLS, with the agent's own client (one HTTP/2 connection, as the agent has).
//!
//! The load is open-loop: a call starts every millisecond whether or not earlier ones have
//! answered, so a slow answer cannot hide the ones queued behind it. `GetHealth` on the same
//! connection at the same rate is the baseline: TLS, HTTP/2 and tonic, without the server's
//! lookup, policy and cache.

use std::future::Future;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kiam::agent::Backend;
use kiam::client::GrpcClient;
use tokio::time::MissedTickBehavior;

use crate::report::{Report, Row, Verdict};
use crate::stats::{self, Samples};

/// Calls per second.
const RATE: u32 = 1000;
/// How long the measured load lasts (the baseline gets half).
const SECONDS: u32 = 10;
/// A call that takes longer counts as failed.
const CALL_LIMIT: Duration = Duration::from_secs(5);

/// Latencies of one open-loop run, its failures and the rate it really sent at.
pub struct Run {
    pub samples: Samples,
    pub failed: usize,
    pub sent_per_s: f64,
}

/// Starts `count` calls at `RATE` per second and waits for all of them.
async fn open_loop<F, Fut>(count: usize, call: F) -> Run
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    open_loop_at(count, RATE, call).await
}

/// Starts `count` calls at `rate` per second and waits for all of them.
pub async fn open_loop_at<F, Fut>(count: usize, rate: u32, call: F) -> Run
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    // A late tick sends the missed calls at once, as a real arrival process would.
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut calls = Vec::with_capacity(count);
    for _ in 0..count {
        tick.tick().await;
        let call = call();
        calls.push(tokio::spawn(async move {
            let sent = Instant::now();
            let ok = tokio::time::timeout(CALL_LIMIT, call).await.unwrap_or(false);
            (ok, sent.elapsed())
        }));
    }
    let sent_per_s = count as f64 / started.elapsed().as_secs_f64();
    let (mut samples, mut failed) = (Vec::with_capacity(count), 0);
    for call in calls {
        match call.await {
            Ok((true, took)) => samples.push(took),
            _ => failed += 1,
        }
    }
    Run { samples: Samples::new(samples), failed, sent_per_s }
}

/// Measures figure 5 against the server on `server_port`, for the pod at `ip` with `role`
/// (whose credentials the caller has already had fetched, so every call is a cache hit).
pub async fn run(client: GrpcClient, ip: IpAddr, role: &str, report: &mut Report) {
    // Warm the connection, the server's code paths and the cache.
    for _ in 0..500 {
        client.pod_credentials(ip, role, 0).await.expect("a warm-up GetPodCredentials call succeeds");
    }
    let count = (RATE * SECONDS) as usize;
    let health = {
        let client = client.clone();
        open_loop(count / 2, move || {
            let client = client.clone();
            async move { client.get_health().await.is_ok() }
        })
        .await
    };
    let role_owned = role.to_owned();
    let credentials = {
        let client = client.clone();
        open_loop(count, move || {
            let (client, role) = (client.clone(), role_owned.clone());
            async move { client.pod_credentials(ip, &role, 0).await.is_ok() }
        })
        .await
    };
    let p99 = credentials.samples.percentile(99.0);
    let base99 = health.samples.percentile(99.0);
    let clean = credentials.failed == 0 && health.failed == 0;
    let verdict = Verdict::of(clean && p99 <= Duration::from_millis(2));
    report.row(Row::compared(
        5,
        "GetPodCredentials p99 at 1k req/s, mTLS, cache hit (baseline: GetHealth)",
        stats::ms(p99),
        stats::ms(base99),
        stats::ratio(p99.as_secs_f64(), base99.as_secs_f64()),
        "≤ 2 ms",
        verdict,
    ));
    let p50 = credentials.samples.percentile(50.0);
    let base50 = health.samples.percentile(50.0);
    report.row(Row::compared(
        5,
        "GetPodCredentials p50 at 1k req/s",
        stats::ms(p50),
        stats::ms(base50),
        stats::ratio(p50.as_secs_f64(), base50.as_secs_f64()),
        "",
        Verdict::Info,
    ));
    report.note(format!(
        "Figure 5: the agent's gRPC client (one HTTP/2 connection, mutual TLS) called the release \
         server open-loop at {RATE}/s: {} GetPodCredentials calls over {SECONDS} s (sent at {:.0}/s; \
         {} failed; p99.9 {}, max {}), then {} GetHealth calls as the baseline (sent at {:.0}/s; \
         {} failed). Latency is from each call's start to its answer, measured in the bench \
         process, so it includes the client's own work.",
        credentials.samples.len() + credentials.failed,
        credentials.sent_per_s,
        credentials.failed,
        stats::ms(credentials.samples.percentile(99.9)),
        stats::ms(credentials.samples.max()),
        health.samples.len() + health.failed,
        health.sent_per_s,
        health.failed,
    ));
}
