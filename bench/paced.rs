//! Figure 1 at a paced load: the same wrk, connections and token against nginx and the agent,
//! but each connection waits [`PACE_MS`] after every answer before it sends the next request
//! (wrk's `delay()` hook; wrk's latency clock starts when the request is written, so the pause
//! is not counted). That holds both targets to about the same rate, under either one's
//! capacity, as on a busy node whose pods ask often but do not saturate the agent.
//!
//! Why a second measure beside the saturated one: at saturation (closed loop, no pause) wrk,
//! the target and its two cores are all busy, so each round's p99 is a few scheduler slices of
//! whichever thread was off a core, for nginx as for the agent (BENCHMARKS.md, issue 30), and
//! the faster target also keeps wrk's own threads busier. Paced, the cores have room, and the
//! p99 says what the target itself adds. It is reported for information beside the saturated
//! verdict: on two shared cores its rounds' p99s still spread over a factor of two or three for
//! both targets (BENCHMARKS.md), so it does not settle issue 30's verdict either.

use crate::deploy::Env;
use crate::hits::latency;
use crate::procs::Child;
use crate::report::{Report, Verdict};
use crate::stats;
use crate::wrk::{self, Load, Round, medians};

/// Milliseconds each connection waits after an answer before its next request.
pub const PACE_MS: u32 = 1;

/// Runs `load.rounds` paced rounds against each target in turns (nginx first) and reports their
/// p50 and p99 (the median of the rounds' own) and rates.
pub async fn run(
    env: &Env,
    load: &Load,
    token: &str,
    nginx: (&str, &mut Child),
    agent: (&str, &mut Child, &Child),
    report: &mut Report,
) {
    let (nginx_url, nginx_child) = nginx;
    let (agent_url, agent_child, server) = agent;
    let script = env.scratch("wrk-paced").join("paced.lua");
    let pace = format!("\ndelay = function()\n  return {PACE_MS}\nend\n");
    std::fs::write(&script, format!("{}{pace}", include_str!("wrk.lua")))
        .expect("write the paced wrk script");
    let (mut nginx_rounds, mut agent_rounds) = (Vec::new(), Vec::new());
    for _ in 0..load.rounds {
        nginx_rounds.push(wrk::round(nginx_url, token, load, &script, nginx_child, None).await);
        agent_rounds.push(wrk::round(agent_url, token, load, &script, agent_child, Some(server)).await);
    }
    let ((a_p50, a_p99), (n_p50, n_p99)) = (medians(&agent_rounds), medians(&nginx_rounds));
    let rate = |rounds: &[Round]| stats::median(&rounds.iter().map(|r| r.per_s).collect::<Vec<_>>());
    let (a_rate, n_rate) = (rate(&agent_rounds), rate(&nginx_rounds));
    let shape = format!(
        "wrk -t{} -c{}, {PACE_MS} ms between an answer and the next request",
        load.threads, load.connections
    );
    let measure = format!("credential GET p99 at a paced load ({shape}; median of the rounds' p99s)");
    // Information: issue 30's verdict is the saturated p99's, above.
    report.row(latency(&measure, a_p99, n_p99, "", Verdict::Info));
    report.row(latency("credential GET p50 at the paced load", a_p50, n_p50, "", Verdict::Info));
    let each = |rounds: &[Round]| {
        rounds
            .iter()
            .map(|r| format!("{:.0}/s p99 {}", r.per_s, stats::ms(r.p99)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.note(format!(
        "Figure 1, paced: the same wrk against the same two targets, {} rounds of {} s each in \
         turns, with wrk's delay() hook holding each connection {PACE_MS} ms after every answer \
         (wrk's latency excludes the pause), so both run at about the same rate, under either's \
         capacity: median {} for nginx and {} for the agent. nginx rounds: {}; agent rounds: {}.",
        load.rounds,
        load.seconds,
        stats::per_second(n_rate),
        stats::per_second(a_rate),
        each(&nginx_rounds),
        each(&agent_rounds),
    ));
}
