//! kiam-rs benchmarks: every figure of issues 7 and 11, each against a baseline measured in the same run,
//! on loopback, with every loop bounded. `bash scripts/bench` installs the peers, builds the
//! release binary and runs this; see BENCHMARKS.md for the figures and how to read them.
//!
//! - [`hits`]: figure 1 (credential GETs through the agent vs nginx, under wrk) and figure 6
//!   (agent memory, binary size), around [`grpc`]: figure 5 (agent → server gRPC at 1k/s).
//! - [`first`]: figure 2 (time to first credential for a burst of new pods), with its floor and
//!   stage-by-stage breakdown in [`stages`], timed at the STS stand-in by [`tap`].
//! - [`memory`]: figure 3 (server memory and start-up with 0, 10k and 100k pods).
//! - [`sts`]: figure 4 (AssumeRole calls for a burst and over two refresh periods).
//! - [`entry`]: figure 6's cost of one node-view entry in the agent (counted allocations).
//! - [`invalidation`]: figure 7 (from a pod change in the API server to the agent refusing the
//!   old node-view entry).
//! - [`churn`]: figure 8 (server lookups and node-view stream updates at 100k pods, idle and
//!   under 200 pod updates per second).
//! - [`hostile`]: figure 9 (issue 14: quiet pods' p99 beside a hostile pod).
//! - [`scale`]: figure 10 (issue 31: AssumeRole calls against 1, 2, 3 and 5 servers, with and
//!   without `--peers`, and after one server stops).
//! - [`fanout`]: figure 11 (one server, 2,000 node-view subscribers from [`fleet`], 150k pods).
//! - [`soak`]: figure 12 (agent and server under load, churn and server restarts for an hour),
//!   only on demand: `--soak`.
//!
//! The pieces: [`deploy`] starts the release binary as server and agent, [`procs`] owns child
//! processes and reads their memory and open files, [`sched`] what the scheduler did to them,
//! [`profile`] runs `perf`, [`stats`] does percentiles, [`report`] writes the table; the fake API
//! server, moto, the PKI and the HTTP client are the integration tests' peers, from the
//! `kiam_testkit` crate (testkit/).
//!
//! Usage: `kiam_bench [--kiam PATH] [--out FILE] [--only 1,2,...] [--sizes 0,10000,100000]
//! [--wrk-threads N] [--wrk-connections N] [--wrk-seconds N] [--wrk-rounds N] [--profile DIR]
//! [--revision TEXT] [--soak] [--soak-seconds N]`. `--profile` records the agent and server with
//! `perf` under one more figure-1 round ([`profile`]). The default run is figures 1 to 9 and 11;
//! `--soak` runs figure 12 alone (as does `--only 12`), for `--soak-seconds` (3600 by default).

mod churn;
mod deploy;
mod entry;
mod fanout;
mod first;
mod fleet;
mod grpc;
mod hits;
mod hostile;
mod invalidation;
mod memory;
mod nginx;
mod paced;
mod procs;
mod profile;
mod report;
mod scale;
mod sched;
mod soak;
mod stages;
mod stats;
mod sts;
mod tap;
mod wrk;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use report::{Machine, Report};

/// Counts live heap bytes, for the cost of a node-view entry ([`entry`]).
#[global_allocator]
static ALLOCATOR: entry::Counting = entry::Counting;

/// What the command line asked for.
struct Options {
    kiam: PathBuf,
    out: PathBuf,
    figures: BTreeSet<u8>,
    sizes: Vec<u32>,
    load: wrk::Load,
    revision: String,
    /// How long figure 12's soak lasts.
    soak_seconds: u64,
}

fn options() -> Options {
    let mut options = Options {
        kiam: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/kiam")),
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench/results.md")),
        // Figure 12 (an hour) runs only when asked for (`--soak`).
        figures: (1..=11).collect(),
        sizes: vec![0, 10_000, 100_000],
        load: wrk::Load { threads: 2, connections: 32, seconds: 5, rounds: 3, profile: None },
        revision: "unknown revision".into(),
        soak_seconds: 3600,
    };
    let mut args = std::env::args().skip(1);
    let number = |value: Option<String>, flag: &str| -> u32 {
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{flag} needs a number"))
    };
    let list = |value: Option<String>, flag: &str| -> Vec<u32> {
        let value = value.unwrap_or_else(|| panic!("{flag} needs a comma-separated list"));
        value
            .split(',')
            .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{flag}: bad number {v:?}")))
            .collect()
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--kiam" => options.kiam = args.next().expect("--kiam needs a path").into(),
            "--out" => options.out = args.next().expect("--out needs a path").into(),
            "--revision" => options.revision = args.next().expect("--revision needs a text"),
            "--only" => options.figures = list(args.next(), "--only").into_iter().map(|f| f as u8).collect(),
            "--sizes" => options.sizes = list(args.next(), "--sizes"),
            "--wrk-threads" => options.load.threads = number(args.next(), "--wrk-threads"),
            "--wrk-connections" => options.load.connections = number(args.next(), "--wrk-connections"),
            "--wrk-seconds" => options.load.seconds = number(args.next(), "--wrk-seconds"),
            "--wrk-rounds" => options.load.rounds = number(args.next(), "--wrk-rounds"),
            "--soak" => options.figures = [12].into(),
            "--soak-seconds" => options.soak_seconds = u64::from(number(args.next(), "--soak-seconds")),
            "--profile" => options.load.profile = Some(args.next().expect("--profile needs a folder").into()),
            other => panic!("unknown argument {other:?} (see bench/main.rs for the usage)"),
        }
    }
    assert!(
        options.kiam.exists(),
        "{} is missing: build it with cargo build --release",
        options.kiam.display()
    );
    options
}

#[tokio::main]
async fn main() {
    stats::self_check();
    let options = options();
    let started = Instant::now();
    let date = kiam_testkit::objects::now().replace('T', " ").replace('Z', " UTC");
    let machine = Machine::describe(options.revision.clone(), date);
    let env = deploy::Env::new(options.kiam.clone()).await;
    let mut report = Report::default();
    let wants = |figures: &[u8]| figures.iter().any(|f| options.figures.contains(f));
    if wants(&[1, 5, 6]) {
        println!("== figures 1, 5, 6: hits through the agent vs nginx, gRPC at 1k/s, footprint");
        hits::run(&env, &options.load, &mut report).await;
    }
    if wants(&[6]) {
        entry::run(&env, &mut report).await;
    }
    if wants(&[2]) {
        println!("== figure 2: time to first credential");
        first::run(&env, &mut report).await;
    }
    if wants(&[3]) {
        println!("== figure 3: server memory and start-up");
        memory::run(&env, &options.sizes, &mut report).await;
    }
    if wants(&[4]) {
        println!("== figure 4: STS efficiency");
        sts::run(&env, &mut report).await;
    }
    if wants(&[7]) {
        println!("== figure 7: invalidation latency");
        invalidation::run(&env, &mut report).await;
    }
    if wants(&[8]) {
        println!("== figure 8: server under churn");
        churn::run(&env, &mut report).await;
    }
    if wants(&[9]) {
        println!("== figure 9: a hostile pod among quiet ones");
        hostile::run(&env, &mut report).await;
    }
    if wants(&[10]) {
        println!("== figure 10: STS calls against server replicas");
        scale::run(&env, &mut report).await;
    }
    if wants(&[11]) {
        println!("== figure 11: fan-out to 2,000 node-view subscribers");
        fanout::run(&env, &mut report).await;
    }
    if wants(&[12]) {
        println!("== figure 12: soak for {} s", options.soak_seconds);
        soak::run(&env, options.soak_seconds, &mut report).await;
    }
    report.rows.sort_by_key(|row| row.figure);
    // Notes start "Figure N" or "Figures N and M"; keep them in figure order too.
    report.notes.sort_by_key(|note| note.chars().find(char::is_ascii_digit));
    let text = report::markdown(&machine, &report.rows, &report.notes, started.elapsed().as_secs_f64());
    println!("\n{text}");
    std::fs::write(&options.out, &text).expect("write the results file");
    println!("written to {}", options.out.display());
}
