//! The processes a benchmark starts (the real `kiam` binary, nginx, wrk): spawned with a clean
//! environment and their output in a log file, killed and reaped when dropped, and measured
//! through `/proc` (resident memory, now and at its peak; open files).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A child process that is killed when this is dropped.
pub struct Child {
    name: String,
    child: std::process::Child,
    log: PathBuf,
}

impl Child {
    /// Starts `program args…` with only `env` (plus `PATH`) in its environment, so that nothing
    /// from the caller's (`RUST_LOG`, `KIAM_*`, AWS profiles) changes what is measured. Its
    /// stdout and stderr go to `<dir>/<name>.log`.
    pub fn spawn(name: &str, program: &Path, args: &[String], env: &[(&str, &str)], dir: &Path) -> Child {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create the child's log file");
        let mut command = Command::new(program);
        command.args(args).env_clear().stdin(Stdio::null());
        command.env("PATH", std::env::var_os("PATH").unwrap_or_default());
        command.envs(env.iter().copied());
        let child = command
            .stdout(file.try_clone().expect("clone the log file handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({}): {e}", program.display()));
        Child { name: name.to_owned(), child, log }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the child has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics, with the child's log, if it has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited ({status}):\n{}", self.name, self.log());
        }
    }

    /// Polls the log every 5 ms until it contains `needle`, and returns how long that took from
    /// `since`. Panics after `limit`, or if the child exits first.
    pub async fn wait_for_log(&mut self, needle: &str, since: Instant, limit: Duration) -> Duration {
        loop {
            if self.log().contains(needle) {
                return since.elapsed();
            }
            self.assert_running();
            assert!(
                since.elapsed() < limit,
                "{} did not log {needle:?} within {limit:?}:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Resident memory of this process and its descendants (nginx's workers).
    pub fn memory(&self) -> Memory {
        tree(self.pid()).into_iter().map(memory).fold(Memory::default(), |a, b| Memory {
            rss: a.rss + b.rss,
            peak: a.peak + b.peak,
            anon: a.anon + b.anon,
        })
    }
}

impl Child {
    /// CPU time (user + system) used so far by this process and its descendants.
    pub fn cpu(&self) -> Duration {
        let (user, system) = self.cpu_split();
        user + system
    }

    /// The user and the system (kernel) parts of [`Child::cpu`].
    pub fn cpu_split(&self) -> (Duration, Duration) {
        tree(self.pid())
            .into_iter()
            .map(cpu)
            .fold((Duration::ZERO, Duration::ZERO), |(u, s), (du, ds)| (u + du, s + ds))
    }
}

/// CPU time (user + system) used so far by the process `pid` alone (this one, say).
pub fn process_cpu(pid: u32) -> Duration {
    let (user, system) = cpu(pid);
    user + system
}

/// User and system CPU time used by one process, from `/proc/<pid>/stat` (zero once it is gone).
fn cpu(pid: u32) -> (Duration, Duration) {
    cpu_of(Path::new(&format!("/proc/{pid}/stat")))
}

/// User and system CPU time from a process's or a thread's `stat` file.
pub fn cpu_of(path: &Path) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces; utime and
    // stime are the 14th and 15th fields of the line, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |at: usize| fields.get(at).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    (Duration::from_millis(ticks(11) * 10), Duration::from_millis(ticks(12) * 10))
}

impl Drop for Child {
    /// Asks the process to stop (SIGTERM: nginx's master then stops its workers, kiam shuts down
    /// gracefully), waits at most 5 s, then kills it and whatever it left behind.
    fn drop(&mut self) {
        let members = tree(self.pid());
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let left: Vec<String> = (members.iter().skip(1))
            .filter(|pid| Path::new(&format!("/proc/{pid}")).exists())
            .map(ToString::to_string)
            .collect();
        if !left.is_empty() {
            let _ = Command::new("kill").arg("-KILL").args(&left).status();
        }
    }
}

/// Resident set size, now and at its high-water mark, and how much of it is anonymous (heap and
/// stacks, as opposed to pages of the binary and libraries), in bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub rss: u64,
    pub peak: u64,
    pub anon: u64,
}

/// `VmRSS`, `VmHWM` and `RssAnon` of one process (zeros once it is gone).
pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    Memory { rss: field("VmRSS:"), peak: field("VmHWM:"), anon: field("RssAnon:") }
}

/// How many files (sockets, pipes, …) `pid` has open: the entries of `/proc/<pid>/fd` (0 once it
/// is gone).
pub fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |entries| entries.count())
}

/// `pid` and all its descendants, through `/proc/<pid>/task/<tid>/children`.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut at = 0;
    // Bounded: a process tree here has a handful of members.
    while at < all.len() && all.len() < 256 {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", all[at])).into_iter().flatten().flatten();
        for task in tasks {
            let children = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            all.extend(children.split_whitespace().filter_map(|pid| pid.parse::<u32>().ok()));
        }
        at += 1;
    }
    all
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// Waits (at most `limit`) until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, limit: Duration) {
    let started = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_err() {
        assert!(started.elapsed() < limit, "nothing listens on {addr} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs a command to completion (bounded by `limit`) and returns its stdout; panics with its
/// stderr if it fails.
pub async fn output(program: &str, args: &[String], limit: Duration) -> String {
    let run = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    let out = tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
