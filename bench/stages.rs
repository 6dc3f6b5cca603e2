//! Figure 2's floor and its breakdown, stage by stage.
//!
//! The floor is what the harness can measure, in the same run, that no design could avoid: the
//! STS stand-in issuing the burst's distinct identities with the server's own parallelism
//! (`--fetchers`, 8 by default; moto answers them one at a time anyway), plus the watch
//! delivery of the last pod (from its creation in the fake API server to a watch in this
//! process seeing it).
//!
//! The breakdown places each pod's time on the path watch → index → prefetch queue → STS →
//! view push → agent → SDK: the timing tap ([`crate::tap`]) in front of moto says when the
//! server sent each role's AssumeRole and when its answer came back; the watch in this process
//! says when the pod's event was out; the client says when it held its token, role name and
//! credentials, and how often it retried.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kiam::creds::AssumeRole;

use crate::deploy::{self, Env};
use crate::stats::{self, Samples};
use crate::tap::Call;

/// The server's default `--fetchers`: how many STS calls it makes at once.
pub const SERVER_PARALLELISM: usize = 8;

/// How long moto takes to issue `identities` distinct identities, `SERVER_PARALLELISM` at a time,
/// from this process: the STS part of the floor.
pub async fn sts_floor(env: &Env, identities: u32, run: u32) -> Duration {
    let sts = std::sync::Arc::new(deploy::sts(env));
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(SERVER_PARALLELISM));
    let started = Instant::now();
    let mut calls = Vec::new();
    for i in 0..identities {
        let (sts, permits) = (std::sync::Arc::clone(&sts), std::sync::Arc::clone(&permits));
        calls.push(tokio::spawn(async move {
            let _permit = permits.acquire_owned().await.expect("the semaphore stays open");
            let identity = deploy::identity(&format!("floor-{run}-{i}"));
            sts.assume_role(&identity, Duration::from_secs(3600)).await.expect("moto answers AssumeRole");
        }));
    }
    for call in calls {
        call.await.expect("an AssumeRole task does not panic");
    }
    started.elapsed()
}

/// One pod of the burst, as the harness saw it.
pub struct Pod {
    pub created: Instant,
    pub role: String,
    /// When the watch in this process saw the pod (None: not within the limit).
    pub watched: Option<Instant>,
    /// Since creation: token, role name, credentials, and the client's retries.
    pub token: Duration,
    pub role_named: Duration,
    pub credentials: Duration,
    pub retries: u32,
}

/// The breakdown as a sentence for the report's note, and the watch delivery of the last pod.
pub fn describe(pods: &[Pod], calls: &[Call], burst_started: Instant) -> (String, Duration) {
    let first_created: HashMap<&str, Instant> = pods.iter().fold(HashMap::new(), |mut first, pod| {
        first.entry(pod.role.as_str()).or_insert(pod.created);
        first
    });
    // Each role's AssumeRole as the tap saw it (the first, if the server made more).
    let mut sts: HashMap<&str, &Call> = HashMap::new();
    for call in calls {
        if let Some(role) = call.role.as_deref() {
            sts.entry(role).or_insert(call);
        }
    }
    let since = |at: Instant, from: Instant| at.saturating_duration_since(from);
    // Watch → index → prefetch queue: the role's first pod created → its AssumeRole sent.
    let queued: Vec<Duration> = first_created
        .iter()
        .filter_map(|(role, created)| sts.get(role).map(|call| since(call.sent, *created)))
        .collect();
    let answered: Vec<Duration> = sts.values().filter_map(|c| c.answered.map(|a| since(a, c.sent))).collect();
    let last_answer = sts.values().filter_map(|c| c.answered).max();
    let watch: Vec<Duration> = pods.iter().filter_map(|p| p.watched.map(|w| since(w, p.created))).collect();
    let last_watch = pods.last().and_then(|p| p.watched.map(|w| since(w, p.created))).unwrap_or_default();
    // After both the pod's event and its role's credentials were out: view push → agent → SDK.
    let after: Vec<Duration> = pods
        .iter()
        .filter_map(|p| {
            let ready = p.watched?.max(sts.get(p.role.as_str())?.answered?);
            Some((p.created + p.credentials).saturating_duration_since(ready))
        })
        .collect();
    let waited_sts: Vec<Duration> =
        pods.iter().filter_map(|p| Some(since(sts.get(p.role.as_str())?.answered?, p.created))).collect();
    let retried = pods.iter().filter(|p| p.retries > 0).count();
    let slowest = pods.iter().max_by_key(|p| p.credentials);
    let pct = |samples: Vec<Duration>| {
        let samples = Samples::new(samples);
        format!("{} / {}", stats::ms(samples.percentile(50.0)), stats::ms(samples.percentile(99.0)))
    };
    let slowest = slowest.map_or_else(String::new, |p| {
        let call = sts.get(p.role.as_str());
        format!(
            " The slowest pod ({}, {}): watched at {}, its role's AssumeRole sent at {} and answered at {}, \
             token at {}, role name at {}, credentials at {}, {} retries.",
            p.role,
            stats::ms(p.credentials),
            p.watched.map_or("never".into(), |w| stats::ms(since(w, p.created))),
            call.map_or("never".into(), |c| signed(c.sent, p.created)),
            call.and_then(|c| c.answered).map_or("never".into(), |a| signed(a, p.created)),
            stats::ms(p.token),
            stats::ms(p.role_named),
            stats::ms(p.credentials),
            p.retries,
        )
    });
    let text = format!(
        "Stages (p50 / p99 over pods unless said): watch delivery to this process {}; the last \
         pod's {}; watch → index → prefetch queue → AssumeRole sent, per role (from its first \
         pod's creation) {}; moto's answer per call {} ({} calls through the tap, the last answered \
         {} after the burst began); a pod's wait for its role's credentials {}; view push → agent → \
         SDK, after both its event and its role's credentials were out {}; {} clients retried.{}",
        pct(watch),
        stats::ms(last_watch),
        pct(queued),
        pct(answered),
        calls.len(),
        last_answer.map_or("never".into(), |a| stats::ms(since(a, burst_started))),
        pct(waited_sts),
        pct(after),
        retried,
        slowest,
    );
    (text, last_watch)
}

/// `at` relative to `from`, with a sign (a role's call may come before a later pod's creation).
fn signed(at: Instant, from: Instant) -> String {
    if at >= from { stats::ms(at - from) } else { format!("−{}", stats::ms(from - at)) }
}
