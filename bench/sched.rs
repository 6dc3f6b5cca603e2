//! What the scheduler did to a process tree during a figure-1 round, from `/proc`: how long its
//! threads sat runnable on a run queue without a core (`/proc/<pid>/task/<tid>/schedstat`), how
//! often they left a core on their own (to wait on epoll or a futex) or were preempted
//! (`voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` in `status`), and how the CPU
//! time spread over the threads (the agent's connection workers, nginx's worker processes).
//! This is the evidence for where figure 1's tail comes from (BENCHMARKS.md): a request's
//! latency beyond its few microseconds of work is time some thread waited for a core.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs;

/// Scheduler counts of a set of threads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sched {
    /// Time on a core.
    pub ran: Duration,
    /// Time runnable but waiting for a core (the run queue's delay).
    pub waited: Duration,
    /// Switches away because the thread waited for something (epoll, a futex).
    pub voluntary: u64,
    /// Switches away because the scheduler gave the core to another thread.
    pub involuntary: u64,
}

impl Sched {
    /// The counts of every thread of `pid` and its descendants so far.
    pub fn of(pid: u32) -> Sched {
        let tasks = procs::tree(pid).into_iter().flat_map(threads);
        tasks.map(|task| one(&task)).fold(Sched::default(), Sched::plus)
    }

    /// The counts of every thread of `pid` alone, not of its children (the bench process, whose
    /// children are the processes measured beside it).
    pub fn of_process(pid: u32) -> Sched {
        threads(pid).iter().map(|task| one(task)).fold(Sched::default(), Sched::plus)
    }

    fn plus(self, other: Sched) -> Sched {
        Sched {
            ran: self.ran + other.ran,
            waited: self.waited + other.waited,
            voluntary: self.voluntary + other.voluntary,
            involuntary: self.involuntary + other.involuntary,
        }
    }

    /// What happened between `before` and this (threads that ended meanwhile are not counted).
    pub fn since(self, before: Sched) -> Sched {
        Sched {
            ran: self.ran.saturating_sub(before.ran),
            waited: self.waited.saturating_sub(before.waited),
            voluntary: self.voluntary.saturating_sub(before.voluntary),
            involuntary: self.involuntary.saturating_sub(before.involuntary),
        }
    }

    /// "wait W ms, V voluntary and P preempted switches", each per 1000 of `requests`.
    pub fn per_thousand(&self, requests: u64) -> String {
        let per_k = |count: f64| count * 1000.0 / requests.max(1) as f64;
        format!(
            "wait {:.1} ms, {:.0} voluntary and {:.1} preempted switches",
            per_k(self.waited.as_secs_f64() * 1000.0),
            per_k(self.voluntary as f64),
            per_k(self.involuntary as f64),
        )
    }
}

/// A process tree's scheduler counts and per-thread CPU time at the start of a round.
pub struct Start {
    pid: u32,
    sched: Sched,
    threads: Vec<(u32, Duration)>,
}

/// What the scheduler did to a process tree over a round.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    pub sched: Sched,
    /// The shares of the tree's CPU time that its two busiest threads took: how evenly the load
    /// was spread over the workers.
    pub busiest: (f64, f64),
}

impl Start {
    pub fn now(pid: u32) -> Start {
        Start { pid, sched: Sched::of(pid), threads: thread_cpu(pid) }
    }

    /// What happened since [`Start::now`].
    pub fn finish(&self) -> Round {
        let after = thread_cpu(self.pid);
        let mut used: Vec<Duration> = after
            .iter()
            .map(|(tid, now)| {
                let then = self.threads.iter().find(|(t, _)| t == tid).map_or(Duration::ZERO, |(_, d)| *d);
                now.saturating_sub(then)
            })
            .collect();
        let total: f64 = used.iter().map(Duration::as_secs_f64).sum();
        used.sort_unstable_by(|a, b| b.cmp(a));
        let share = |at: usize| used.get(at).map_or(0.0, |d| d.as_secs_f64() / total.max(1e-9));
        Round { sched: Sched::of(self.pid).since(self.sched), busiest: (share(0), share(1)) }
    }
}

/// CPU time (user + system) of every thread of `pid` and its descendants, by thread id.
fn thread_cpu(pid: u32) -> Vec<(u32, Duration)> {
    let tasks = procs::tree(pid).into_iter().flat_map(threads);
    tasks
        .filter_map(|task| {
            let tid = task.file_name()?.to_str()?.parse().ok()?;
            let (user, system) = procs::cpu_of(&task.join("stat"));
            Some((tid, user + system))
        })
        .collect()
}

/// The thread folders of process `pid`.
fn threads(pid: u32) -> Vec<PathBuf> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    tasks.map(|task| task.path()).collect()
}

/// One thread's scheduler counts (zeros once it is gone).
fn one(task: &Path) -> Sched {
    let stat = std::fs::read_to_string(task.join("schedstat")).unwrap_or_default();
    // "<time on a core> <time waiting on a run queue> <slices>", in nanoseconds.
    let field_at = |at: usize| stat.split_whitespace().nth(at).and_then(|f| f.parse().ok()).unwrap_or(0);
    let (ran, waited) = (field_at(0), field_at(1));
    let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    Sched {
        ran: Duration::from_nanos(ran),
        waited: Duration::from_nanos(waited),
        voluntary: field("voluntary_ctxt_switches:"),
        involuntary: field("nonvoluntary_ctxt_switches:"),
    }
}

/// Figure 2's CPU breakdown: "<name> R / W" for each process (same names added up) since
/// `before`. R is the time on a core, W the time runnable without a core, from the live
/// threads' scheduler counts (exact). The process named `moto` serves each request on a thread
/// that ends with it, which those counts miss, so its R is its clock ticks instead (10 ms steps).
pub fn breakdown(pids: &[(&str, u32)], before: &[(Sched, Duration)], moto: &str) -> String {
    let mut by_name: Vec<(&str, Sched)> = Vec::new();
    for ((name, pid), (sched, ticks)) in pids.iter().zip(before) {
        let mut used = Sched::of_process(*pid).since(*sched);
        if *name == moto {
            used.ran = procs::process_cpu(*pid).saturating_sub(*ticks);
        }
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, sum)) => {
                sum.ran += used.ran;
                sum.waited += used.waited;
            }
            None => by_name.push((name, used)),
        }
    }
    let parts: Vec<String> = by_name
        .iter()
        .map(|(name, s)| format!("{name} {} / {}", crate::stats::ms(s.ran), crate::stats::ms(s.waited)))
        .collect();
    parts.join(", ")
}
