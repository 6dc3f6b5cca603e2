//! One wrk round against one target, as figure 1 runs it (saturated, and paced in
//! [`crate::paced`]): wrk's totals and latency percentiles (read from the JSON line
//! `bench/wrk.lua` prints), the target's CPU per request and memory, and what the scheduler did
//! to the target's threads and to wrk's during the round.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::procs::Child;
use crate::sched::{self, Sched};
use crate::stats;

/// The header that carries the IMDSv2 token.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// wrk's settings, the same for nginx and the agent.
#[derive(Clone, Debug)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub seconds: u32,
    pub rounds: u32,
    /// `--profile DIR`: also profile the agent and server under one more round.
    pub profile: Option<std::path::PathBuf>,
}

/// What `bench/wrk.lua` prints.
#[derive(Debug, Deserialize)]
struct WrkSummary {
    requests: u64,
    duration_us: u64,
    connect: u64,
    read: u64,
    write: u64,
    status: u64,
    timeout: u64,
    p50_us: u64,
    p99_us: u64,
}

/// One wrk round, the target's largest resident memory by its end, and the most of it that was
/// anonymous in the 50 ms samples.
pub struct Round {
    pub requests: u64,
    pub per_s: f64,
    pub p50: Duration,
    pub p99: Duration,
    pub memory: u64,
    pub anon: u64,
    /// CPU time of the target (and the server behind it), per request served.
    pub cpu_per_request: Duration,
    /// The part of it spent in user space (the rest is the kernel's: TCP, wake-ups).
    pub user_per_request: Duration,
    /// What the scheduler did to the target's threads (the agent's, or nginx's master and
    /// workers) during the round, and to wrk's (up to its last 50 ms sample).
    pub target_sched: sched::Round,
    pub wrk_sched: Sched,
}

/// One wrk run against `url`, sampling `target`'s memory every 50 ms while it runs, and counting
/// the CPU time `target` and `also` (the server behind the agent) spend.
pub async fn round(
    url: &str,
    token: &str,
    load: &Load,
    script: &Path,
    target: &mut Child,
    also: Option<&Child>,
) -> Round {
    let cpu = |target: &Child| {
        let (user, system) = target.cpu_split();
        let (also_user, also_system) = also.map_or((Duration::ZERO, Duration::ZERO), Child::cpu_split);
        (user + also_user, system + also_system)
    };
    let cpu_before = cpu(target);
    let sched_start = sched::Start::now(target.pid());
    let args = [
        format!("-t{}", load.threads),
        format!("-c{}", load.connections),
        format!("-d{}s", load.seconds),
        "--timeout".into(),
        "5s".into(),
        "-s".into(),
        script.display().to_string(),
        "-H".into(),
        format!("{TOKEN_HEADER}: {token}"),
        url.to_owned(),
    ];
    let child = tokio::process::Command::new("wrk")
        .args(&args)
        .kill_on_drop(true)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start wrk (apt-get install wrk)");
    let wrk_pid = child.id();
    let output = child.wait_with_output();
    tokio::pin!(output);
    let limit = tokio::time::sleep(Duration::from_secs(u64::from(load.seconds) + 30));
    tokio::pin!(limit);
    let (mut memory, mut anon, mut wrk_sched) = (0, 0, Sched::default());
    let output = loop {
        tokio::select! {
            output = &mut output => break output.expect("wait for wrk"),
            () = &mut limit => panic!("wrk did not finish in time"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                let now = target.memory();
                (memory, anon) = (memory.max(now.rss), anon.max(now.anon));
                // wrk's threads are gone once it exits: the last sample before then.
                if let Some(pid) = wrk_pid {
                    let now = Sched::of(pid);
                    // Its threads end one by one: keep the sample with the most switches.
                    if now.voluntary + now.involuntary > wrk_sched.voluntary + wrk_sched.involuntary {
                        wrk_sched = now;
                    }
                }
            }
        }
    };
    target.assert_running();
    let target_sched = sched_start.finish();
    let cpu_after = cpu(target);
    let user = cpu_after.0.saturating_sub(cpu_before.0);
    let cpu_used = user + cpu_after.1.saturating_sub(cpu_before.1);
    // The high-water mark catches what 50 ms samples miss (it also covers start-up).
    let memory = memory.max(target.memory().peak);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().find(|line| line.starts_with('{')).unwrap_or_else(|| {
        panic!("wrk printed no summary:\n{stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    });
    let summary: WrkSummary = serde_json::from_str(line).expect("wrk.lua prints valid JSON");
    let errors = summary.connect + summary.read + summary.write + summary.status + summary.timeout;
    assert!(summary.requests > 0 && errors == 0, "wrk against {url} saw errors: {line}");
    Round {
        requests: summary.requests,
        per_s: summary.requests as f64 / (summary.duration_us as f64 / 1e6),
        p50: Duration::from_micros(summary.p50_us),
        p99: Duration::from_micros(summary.p99_us),
        memory,
        anon,
        cpu_per_request: cpu_used / u32::try_from(summary.requests).unwrap_or(u32::MAX),
        user_per_request: user / u32::try_from(summary.requests).unwrap_or(u32::MAX),
        target_sched,
        wrk_sched,
    }
}

/// The median of the rounds' own p50s and p99s.
pub fn medians(rounds: &[Round]) -> (Duration, Duration) {
    (stats::median_by(rounds, |r| r.p50), stats::median_by(rounds, |r| r.p99))
}

pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
