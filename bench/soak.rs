//! Figure 12: the soak, on demand only (`bash scripts/bench --soak`, one hour by default;
//! `--soak-seconds N` for a shorter one). The release agent and server, 1,000 credential GETs a
//! second through the agent from 20 known pods (each from its own 127.2.0.x address, over a fresh
//! connection per GET), pod churn in the fake API server (10 events a second: pods created and
//! deleted on the agent's node and another), and the server stopped and started again on the same
//! port every 10 minutes (every sixth of a shorter run).
//!
//! Measured: the agent's and the server's RSS and open files (`/proc/PID/fd`) at the start (once
//! the load has run a twelfth of the soak, at most a minute) and at the end, and every GET for a
//! known pod that failed (anything but a 200 with credentials), with when it failed relative to
//! the restarts. The agent is one process throughout; the server at the end is the last one
//! started, so its figures compare two processes of the same build under the same load.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::deploy::{self, Env};
use crate::procs::{self, Child};
use crate::report::{Report, Row, Verdict};
use crate::stats::{self, Samples};
use kiam_testkit::fake_kube::FakeKube;

/// Known pods, on the agent's node, asked for in turn.
const KNOWN: u32 = 20;
const ROLES: u32 = 5;
/// Credential GETs per second.
const RATE: u32 = 1000;
/// Pod events per second (a creation and, once [`CHURN_LIVE`] pods exist, a deletion in turn).
const CHURN_PER_S: u32 = 10;
/// Churned pods alive at once.
const CHURN_LIVE: u32 = 50;
/// The server is restarted this often (in a soak shorter than six of these, six times as often).
const RESTART_EVERY: Duration = Duration::from_secs(600);
/// GETs in flight at most; a GET that would exceed it is not sent, and counted.
const MAX_IN_FLIGHT: usize = 4096;
/// Flat: the end within this fraction of the start.
const FLAT: f64 = 0.05;
/// Failures kept with their details (all are counted).
const FAILURES_KEPT: usize = 5;

/// One process's footprint.
#[derive(Clone, Copy)]
struct Footprint {
    rss: u64,
    files: usize,
}

impl Footprint {
    /// RSS now, and the fewest open files over five reads 20 ms apart (a GET's socket in flight
    /// is not a leak).
    async fn of(child: &Child) -> Footprint {
        let mut files = usize::MAX;
        for _ in 0..5 {
            files = files.min(procs::open_files(child.pid()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Footprint { rss: child.memory().rss, files }
    }

    fn flat(start: Footprint, end: Footprint) -> bool {
        end.rss as f64 <= start.rss as f64 * (1.0 + FLAT)
            && end.files as f64 <= start.files as f64 * (1.0 + FLAT)
    }
}

/// What the load saw.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    skipped: AtomicU64,
    /// (seconds since the load started, what went wrong), the first [`FAILURES_KEPT`].
    failures: Mutex<Vec<(f64, String)>>,
    /// Every tenth latency.
    latencies: Mutex<Vec<Duration>>,
    /// Failures by the second of the load they happened in.
    by_second: Mutex<std::collections::BTreeMap<u64, u64>>,
}

/// Runs figure 12 for `seconds`.
pub async fn run(env: &Env, seconds: u64, report: &mut Report) {
    let soak = Duration::from_secs(seconds);
    let restart_every = RESTART_EVERY.min(soak / 6);
    let warm = (soak / 12).min(Duration::from_secs(60));
    let kube = FakeKube::start().await;
    kube.apply(deploy::namespace("soak", "soak-"));
    let known: Vec<(IpAddr, String)> = (0..KNOWN)
        .map(|i| (deploy::nth_ip(Ipv4Addr::new(127, 2, 0, 0), i), format!("soak-{}", i % ROLES)))
        .collect();
    for (i, (ip, role)) in known.iter().enumerate() {
        kube.apply(deploy::pod("soak", &format!("known-{i}"), *ip, role, deploy::NODE));
    }
    let port = procs::free_port();
    let (mut server, first_ready) = env.server_at("soak-server-0", &kube, port).await;
    let agent = env.agent("soak-agent", port).await;
    agent.wait_view(KNOWN as usize, Duration::from_secs(30)).await;

    let load = Arc::new(Load::default());
    let started = Instant::now();
    let generator = tokio::spawn(generate(agent.port, known, soak, Arc::clone(&load)));
    let (mut restarts, mut readies, mut start, mut server_start) = (Vec::new(), Vec::new(), None, None);
    let mut churn = tokio::time::interval(Duration::from_secs(1) / CHURN_PER_S);
    churn.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut events, mut next_restart, mut agent_rss) = (0u32, restart_every, Vec::new());
    // Bounded: one event per tick, and the soak's end ends it.
    while started.elapsed() < soak {
        churn.tick().await;
        churn_event(&kube, events);
        events += 1;
        if start.is_none() && started.elapsed() >= warm {
            start = Some(Footprint::of(&agent.child).await);
            server_start = Some(Footprint::of(&server).await);
        }
        if started.elapsed() >= next_restart && next_restart + restart_every <= soak + Duration::from_secs(1)
        {
            let stopping = started.elapsed();
            // Child's drop waits for the process: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || drop(server)).await;
            let name = format!("soak-server-{}", restarts.len() + 1);
            let (next, ready) = env.server_at(&name, &kube, port).await;
            server = next;
            restarts.push((stopping, started.elapsed()));
            agent_rss.push((stopping.as_secs(), agent.child.memory().rss));
            readies.push(ready);
            next_restart += restart_every;
        }
    }
    let end = Footprint::of(&agent.child).await;
    let server_end = Footprint::of(&server).await;
    generator.await.expect("the load does not panic");
    server.assert_running();
    let (start, server_start) = (start.expect("a start sample"), server_start.expect("a start sample"));

    let (ok, failed, skipped) = (
        load.ok.load(Ordering::Relaxed),
        load.failed.load(Ordering::Relaxed),
        load.skipped.load(Ordering::Relaxed),
    );
    let failures = load.failures.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let latencies = Samples::new(load.latencies.lock().unwrap_or_else(PoisonError::into_inner).clone());
    let sent = ok + failed;
    let label = |s: u64| {
        if s >= 3600 && s.is_multiple_of(3600) { format!("{} h", s / 3600) } else { format!("{s} s") }
    };
    report.row(Row::compared(
        12,
        &format!(
            "failed credential GETs for known pods over a {} soak at {RATE}/s, {} server restarts \
             (baseline: GETs sent)",
            label(seconds),
            restarts.len()
        ),
        failed.to_string(),
        sent.to_string(),
        stats::ratio(failed as f64, sent as f64),
        "0",
        Verdict::of(failed == 0 && skipped == 0),
    ));
    for (who, s, e) in
        [("agent", start, end), ("server (the last one started vs the first)", server_start, server_end)]
    {
        report.row(Row::compared(
            12,
            &format!("{who}: RSS / open files at the end of the soak (baseline: at the start)"),
            format!("{} / {} files", stats::mib(e.rss), e.files),
            format!("{} / {} files", stats::mib(s.rss), s.files),
            format!(
                "{} / {}",
                stats::ratio(e.rss as f64, s.rss as f64),
                stats::ratio(e.files as f64, s.files as f64)
            ),
            "within 5 %",
            Verdict::of(Footprint::flat(s, e)),
        ));
    }
    let windows: Vec<String> = restarts
        .iter()
        .zip(&readies)
        .map(|((from, to), ready)| {
            format!("{:.1}–{:.1} s (ready in {})", from.as_secs_f64(), to.as_secs_f64(), stats::ms(*ready))
        })
        .collect();
    let seconds_failed: Vec<String> = (load.by_second.lock().unwrap_or_else(PoisonError::into_inner).iter())
        .map(|(second, n)| format!("{n} in second {second}"))
        .collect();
    let rss_text: Vec<String> =
        agent_rss.iter().map(|(at, rss)| format!("{} at {at} s", stats::mib(*rss))).collect();
    let failure_text: Vec<String> =
        failures.iter().map(|(at, what)| format!("at {at:.1} s: {what}")).collect();
    report.note(format!(
        "Figure 12: a {} soak (run with `--soak`; {}). {KNOWN} known pods on the agent's node \
         with {ROLES} roles; the load, open-loop at {RATE} GETs/s in turn over the pods, each GET \
         from its pod's 127.2.0.x address on a fresh connection to the agent's \
         /latest/meta-data/iam/security-credentials/<role>, counted failed unless a 200 with \
         credentials came within 10 s: {ok} answered, {failed} failed, {skipped} not sent because \
         {MAX_IN_FLIGHT} were in flight; latency of every tenth p50 {}, p99 {}, p99.9 {}, max {}. \
         Churn: {CHURN_PER_S} pod events/s ({events} in all), created and deleted in turn on the \
         agent's node and another, at most {CHURN_LIVE} alive (never asked for; events wait while \
         a restart is under way). The server was ready in {} at first and restarted (SIGTERM, \
         then a new process on the same port) every {} s: {}. Footprints read {} s into the load \
         (start) and at its end, open files the fewest over five reads 20 ms apart; the agent's RSS \
         at each restart: {}. Failures by second of the load: {}. {}",
        label(seconds),
        if seconds >= 3600 { "the full hour" } else { "shorter than the issue's hour" },
        stats::ms(latencies.percentile(50.0)),
        stats::ms(latencies.percentile(99.0)),
        stats::ms(latencies.percentile(99.9)),
        stats::ms(latencies.max()),
        stats::ms(first_ready),
        restart_every.as_secs(),
        if windows.is_empty() { "none".to_owned() } else { windows.join(", ") },
        warm.as_secs(),
        if rss_text.is_empty() { "none".to_owned() } else { rss_text.join(", ") },
        if seconds_failed.is_empty() { "none".to_owned() } else { seconds_failed.join(", ") },
        if failure_text.is_empty() {
            "No GET failed.".to_owned()
        } else {
            format!("First failures: {}.", failure_text.join("; "))
        },
    ));
}

/// Pod event `n`: creates churn pod `n / 2` (even `n`) or deletes the one [`CHURN_LIVE`] older
/// (odd `n`), alternating between the agent's node and another.
fn churn_event(kube: &FakeKube, n: u32) {
    let k = n / 2;
    if n.is_multiple_of(2) {
        let node = if k.is_multiple_of(2) { deploy::NODE } else { "node-2" };
        let ip = deploy::nth_ip(Ipv4Addr::new(10, 9, 0, 0), k % 60_000);
        kube.apply(deploy::pod("soak", &format!("churn-{k}"), ip, &format!("soak-{}", k % ROLES), node));
    } else if k >= CHURN_LIVE {
        kube.delete("Pod", Some("soak"), &format!("churn-{}", k - CHURN_LIVE));
    }
}

/// GETs at [`RATE`] for `soak`, in turn over `pods`, each on its own task.
async fn generate(port: u16, pods: Vec<(IpAddr, String)>, soak: Duration, load: Arc<Load>) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let count = u64::from(RATE) * soak.as_secs();
    for n in 0..count {
        tick.tick().await;
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            load.skipped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (ip, role) = pods[(n % pods.len() as u64) as usize].clone();
        let load = Arc::clone(&load);
        tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{port}/latest/meta-data/iam/security-credentials/{role}");
            let sent = Instant::now();
            let outcome = match kiam_testkit::http::get(&url, Some(ip)).await {
                Ok(r) if r.status == 200 && r.body.contains("AccessKeyId") => Ok(sent.elapsed()),
                Ok(r) => {
                    Err(format!("{ip}: HTTP {} {}", r.status, r.body.chars().take(120).collect::<String>()))
                }
                Err(error) => Err(format!("{ip}: {error}")),
            };
            match outcome {
                Ok(took) => {
                    if load.ok.fetch_add(1, Ordering::Relaxed).is_multiple_of(10) {
                        load.latencies.lock().unwrap_or_else(PoisonError::into_inner).push(took);
                    }
                }
                Err(what) => {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                    let second = started.elapsed().as_secs();
                    *load
                        .by_second
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .entry(second)
                        .or_default() += 1;
                    let mut kept = load.failures.lock().unwrap_or_else(PoisonError::into_inner);
                    if kept.len() < FAILURES_KEPT {
                        kept.push((started.elapsed().as_secs_f64(), what));
                    }
                }
            }
            drop(permit);
        });
    }
    // Every GET is bounded (10 s), so this is too.
    let _ = tokio::time::timeout(Duration::from_secs(15), in_flight.acquire_many(MAX_IN_FLIGHT as u32)).await;
}
