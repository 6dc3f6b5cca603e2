//! Figure 3: the release server's memory and start-up with 0, 10k and 100k pods in the fake API
//! server (spread over 100 namespaces and 10 roles, each pod with its own IP).
//!
//! For each size a fresh fake is filled, the server is started against it, and the time from
//! spawning the process to its "caches synced; serving" log line is its start-up. Once the
//! refresher has fetched the ten roles, resident memory is read from `/proc`. Bytes per pod is
//! the growth from 0 pods, divided by the pods. The baseline for start-up is the fake's own
//! answers to the paged list the server sends first, fetched by this process: the floor under
//! any client's start-up.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::deploy::{self, Env};
use crate::procs::Memory;
use crate::report::{Report, Row, Verdict};
use crate::stats;
use kiam_testkit::fake_kube::FakeKube;
use kiam_testkit::http;

const NAMESPACES: u32 = 100;
const ROLES: u32 = 10;

/// One server start against `pods` pods.
struct Point {
    pods: u32,
    memory: Memory,
    ready: Duration,
    /// The fake's answer to `GET /api/v1/pods?limit=500`, timed from this process.
    list: Duration,
    list_bytes: usize,
    /// How long filling the fake took (context only).
    fill: Duration,
    sts_calls: usize,
}

/// Runs figure 3 for each size in `sizes` (the first must be 0), and adds the AssumeRole count at
/// the largest size to figure 4.
pub async fn run(env: &Env, sizes: &[u32], report: &mut Report) {
    assert_eq!(sizes.first(), Some(&0), "bytes per pod are counted from an empty cluster");
    let mut points = Vec::new();
    for &pods in sizes {
        points.push(measure(env, pods).await);
    }
    let empty = &points[0];
    for point in &points {
        let growth = point.memory.rss.saturating_sub(empty.memory.rss);
        let per_pod = if point.pods > 0 {
            format!(" ({} B/pod)", growth / u64::from(point.pods))
        } else {
            String::new()
        };
        report.row(Row::plain(
            3,
            &format!("server RSS, {} pods (peak {})", thousands(point.pods), stats::mib(point.memory.peak)),
            format!("{}{per_pod}", stats::mib(point.memory.rss)),
            "",
            Verdict::Info,
        ));
    }
    let largest = points.last().expect("at least one size");
    if largest.pods > 0 {
        let per_pod = largest.memory.rss.saturating_sub(empty.memory.rss) / u64::from(largest.pods);
        let json_per_pod = (largest.list_bytes / largest.pods as usize) as u64;
        report.row(Row::compared(
            3,
            &format!(
                "server bytes per pod at {} pods (baseline: the pod's JSON in the list)",
                thousands(largest.pods)
            ),
            format!("{per_pod} B"),
            format!("{json_per_pod} B"),
            stats::ratio(per_pod as f64, json_per_pod as f64),
            "≤ 1 KiB",
            Verdict::of(per_pod <= 1024),
        ));
        report.row(Row::compared(
            3,
            &format!(
                "server start to ready at {} pods (baseline: the fake's list answer alone)",
                thousands(largest.pods)
            ),
            stats::ms(largest.ready),
            stats::ms(largest.list),
            stats::ratio(largest.ready.as_secs_f64(), largest.list.as_secs_f64()),
            "≤ 10 s",
            Verdict::of(largest.ready <= Duration::from_secs(10)),
        ));
        report.row(Row::compared(
            4,
            &format!(
                "AssumeRole calls, release server start with {} pods on {ROLES} roles",
                thousands(largest.pods)
            ),
            largest.sts_calls.to_string(),
            ROLES.to_string(),
            stats::ratio(largest.sts_calls as f64, f64::from(ROLES)),
            "1 per identity",
            Verdict::of(largest.sts_calls == ROLES as usize),
        ));
    }
    let each: Vec<String> = points
        .iter()
        .map(|p| {
            format!(
                "{} pods: fake filled in {}, listed ({:.1} MiB in pages) in {}, ready in {}",
                thousands(p.pods),
                stats::ms(p.fill),
                p.list_bytes as f64 / 1048576.0,
                stats::ms(p.list),
                stats::ms(p.ready)
            )
        })
        .collect();
    report.note(format!(
        "Figure 3: pods spread over {NAMESPACES} namespaces and {ROLES} roles, each shaped like a \
         Deployment's pod (labels, owner reference, one container), listed in pages of 500 as \
         kube's watcher asks. RSS read after the refresher fetched the roles and 2 s of quiet; \
         peak is VmHWM. {}.",
        each.join("; ")
    ));
}

async fn measure(env: &Env, pods: u32) -> Point {
    let kube = FakeKube::start().await;
    for n in 0..NAMESPACES {
        kube.apply(deploy::namespace(&format!("team-{n}"), "mem-"));
    }
    let filling = Instant::now();
    for i in 0..pods {
        let ip = deploy::nth_ip(Ipv4Addr::new(10, 0, 0, 0), i);
        let (namespace, role) = (format!("team-{}", i % NAMESPACES), format!("mem-{}", i % ROLES));
        kube.apply(deploy::pod(&namespace, &format!("app-{i}"), ip, &role, &format!("node-{}", i % 1000)));
    }
    let fill = filling.elapsed();
    let listing = Instant::now();
    let list_bytes = list_all(&kube).await;
    let list = listing.elapsed();
    env.moto.start_recording().await;
    let (mut server, _port, ready) = env.server(&format!("memory-{pods}"), &kube).await;
    let synced = deploy::synced_pods(&server);
    assert_eq!(synced, Some(u64::from(pods)), "the server synced every pod");
    // The refresher's first pass, right after the sync, fetches every role in use.
    let expected = if pods == 0 { 0 } else { ROLES as usize };
    let waiting = Instant::now();
    let mut sts_calls = env.moto.recorded_assume_roles().await.len();
    while sts_calls < expected && waiting.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sts_calls = env.moto.recorded_assume_roles().await.len();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.assert_running();
    let memory = server.memory();
    sts_calls = env.moto.recorded_assume_roles().await.len();
    Point { pods, memory, ready, list, list_bytes, fill, sts_calls }
}

/// Lists every pod as kube's watcher does (pages of 500, following `continue`) and returns the
/// bytes received.
pub async fn list_all(kube: &FakeKube) -> usize {
    let (mut bytes, mut token) = (0, String::new());
    // Bounded: 100k pods are 200 pages.
    for _ in 0..10_000 {
        let url = format!("{}/api/v1/pods?limit=500&continue={token}", kube.url());
        let page = http::get(&url, None).await.expect("list a page of pods");
        assert_eq!(page.status, 200, "list: {}", page.body);
        bytes += page.body.len();
        let page: serde_json::Value = serde_json::from_str(&page.body).expect("a list is JSON");
        match page["metadata"]["continue"].as_str() {
            Some(next) if !next.is_empty() => token = next.to_owned(),
            _ => return bytes,
        }
    }
    panic!("the pod list did not end within 10 000 pages")
}

/// `100000` as `100k`, `10000` as `10k`, smaller numbers as they are.
fn thousands(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) { format!("{}k", n / 1000) } else { n.to_string() }
}
