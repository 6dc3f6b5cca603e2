//! `process_*` metrics (resident memory, CPU time, open file descriptors, start time), read
//! from `/proc/self` at scrape time, as Prometheus client libraries name them. This is a
//! collector of the kernel's numbers, not a copy of ours: the page size and clock-tick rate come
//! from the system (rustix), and CPU time is a counter, as the exposition format defines it.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The process's own resource use.
#[derive(Clone, Debug, Default)]
pub struct ProcessMetrics {
    pub resident_memory_bytes: Gauge,
    /// Only ever raised to the kernel's total, so it never goes down.
    pub cpu_seconds: Counter<f64, AtomicU64>,
    pub open_fds: Gauge,
    pub start_time_seconds: Gauge,
}

impl ProcessMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            self.resident_memory_bytes.clone(),
        );
        r.register(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            self.cpu_seconds.clone(),
        );
        r.register("process_open_fds", "Open file descriptors", self.open_fds.clone());
        r.register(
            "process_start_time_seconds",
            "Start time since the epoch, in seconds",
            self.start_time_seconds.clone(),
        );
    }

    /// Reads `/proc/self`; anything unreadable is left as it was.
    pub fn refresh(&self) {
        let page = i64::try_from(rustix::param::page_size()).unwrap_or(4096);
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        if let Some(rss) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<i64>().ok()))
        {
            self.resident_memory_bytes.set(rss * page);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as i64);
        }
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name: utime is the 14th, stime the 15th,
        // starttime the 22nd field of the whole line.
        let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
        let fields: Vec<&str> = after.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        if let (Some(user), Some(system)) = (field(14), field(15)) {
            let total = (user + system) / ticks;
            let seen = self.cpu_seconds.get();
            if total > seen {
                self.cpu_seconds.inc_by(total - seen);
            }
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("btime ").and_then(|v| v.trim().parse::<f64>().ok()))
        });
        if let (Some(start), Some(boot)) = (field(22), boot) {
            self.start_time_seconds.set((boot + start / ticks) as i64);
        }
    }
}
