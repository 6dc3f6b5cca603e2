//! Figures 1, 5 and 6 on one deployment: a pod at 127.0.0.1 (where wrk connects from) whose
//! credentials are cached, the release agent and server, and nginx serving the very same JSON
//! as a static file at the same path.
//!
//! Figure 1 runs wrk against nginx and the agent in turns (nginx, agent, nginx, agent, ...),
//! with the same threads, connections, duration and IMDSv2 token header, and reports the median
//! round of each (by throughput), and the median of the rounds' latency percentiles. A second
//! nginx, identical to the first, takes a turn after the agent in each cycle: its p99 against
//! the first's (an A/A comparison, the same server twice) says how far the p99 verdict moves
//! from noise alone in the same run. Figure 6
//! samples the agent's resident memory while it is idle and while wrk loads it, and strips a copy
//! of the binary to weigh it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::deploy::{self, Env};
use crate::nginx;
use crate::procs::{self, Child};
use crate::report::{Report, Row, Verdict};
use crate::stats;
use crate::wrk::{self, Load, Round, TOKEN_HEADER, medians, micros};
use kiam_testkit::fake_kube::FakeKube;
use kiam_testkit::http;

const ROLE: &str = "hit-role";
const CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/hit-role";
/// The agent's counter of credential GETs answered from its node view.
const VIEW_HITS: &str = "kiam_agent_view_hits_total";

/// Runs figures 1, 5 and 6.
pub async fn run(env: &Env, load: &Load, report: &mut Report) {
    let kube = FakeKube::start().await;
    kube.apply(deploy::namespace("hits", "hit-"));
    kube.apply(deploy::pod("hits", "hit", IpAddr::V4(Ipv4Addr::LOCALHOST), ROLE, deploy::NODE));
    let (server, server_port, _) = env.server("hits-server", &kube).await;
    let mut deployed = env.agent("hits-agent", server_port).await;
    deployed.wait_view(1, Duration::from_secs(20)).await;
    let base = format!("http://127.0.0.1:{}", deployed.port);
    let token = token(&base).await;
    let document = get(&format!("{base}{CREDENTIALS_PATH}"), &token).await;
    assert!(document.contains("\"AccessKeyId\""), "the agent served no credentials: {document}");
    // The first GET (or the agent's fetcher) stored the credentials in the pod's view entry;
    // from now on a GET is a view hit.
    let hits_before = deployed.metric(VIEW_HITS).await;
    assert_eq!(get(&format!("{base}{CREDENTIALS_PATH}"), &token).await, document);
    assert_eq!(deployed.metric(VIEW_HITS).await, hits_before + 1.0, "a warm GET is a view hit");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let agent_idle = deployed.child.memory();

    crate::grpc::run(env.client(server_port), IpAddr::V4(Ipv4Addr::LOCALHOST), ROLE, report).await;

    let (mut nginx, nginx_url) = start_nginx(env, "nginx", &document, &token).await;
    // The A/A twin: the same nginx, configuration and document, on a port of its own.
    let (mut twin, twin_url) = start_nginx(env, "nginx-twin", &document, &token).await;
    let nginx_idle = nginx.memory();
    let script = env.scratch("wrk").join("report.lua");
    std::fs::write(&script, include_str!("wrk.lua")).expect("write the wrk script");
    let agent_url = format!("{base}{CREDENTIALS_PATH}");

    // A short warm-up for each, then the measured rounds in turns.
    let warm = Load { seconds: 1, ..load.clone() };
    wrk::round(&nginx_url, &token, &warm, &script, &mut nginx, None).await;
    wrk::round(&agent_url, &token, &warm, &script, &mut deployed.child, Some(&server)).await;
    wrk::round(&twin_url, &token, &warm, &script, &mut twin, None).await;
    let (mut nginx_rounds, mut agent_rounds, mut ping_rounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut twin_rounds = Vec::new();
    // View hits counted by the agent against requests wrk completed, over the measured rounds.
    let (mut hits, mut requests) = (0.0, 0);
    for _ in 0..load.rounds {
        nginx_rounds.push(wrk::round(&nginx_url, &token, load, &script, &mut nginx, None).await);
        let before = deployed.metric(VIEW_HITS).await;
        let round = wrk::round(&agent_url, &token, load, &script, &mut deployed.child, Some(&server)).await;
        hits += deployed.metric(VIEW_HITS).await - before;
        requests += round.requests;
        agent_rounds.push(round);
        twin_rounds.push(wrk::round(&twin_url, &token, load, &script, &mut twin, None).await);
    }
    drop(twin);
    // wrk counts the requests answered before it stopped; a few more may have been answered
    // after. Anything less than every request means some GETs did not come from the view.
    assert!(
        hits >= requests as f64 && hits <= requests as f64 * 1.01,
        "figure 1 did not measure view hits: {hits} hits for {requests} requests"
    );
    let agent = &mut deployed.child;
    // The agent's HTTP layer alone: `/ping` reads no view and asks no server.
    let ping_url = format!("{base}/ping");
    for _ in 0..load.rounds {
        ping_rounds.push(wrk::round(&ping_url, &token, load, &script, agent, None).await);
    }
    if let Some(dir) = &load.profile {
        let processes = [("agent", agent.pid()), ("server", server.pid())];
        let round = wrk::round(&agent_url, &token, load, &script, agent, Some(&server));
        match crate::profile::record(dir, "fig1", &processes, load.seconds, round).await {
            Ok(paths) => report.note(format!("Figure 1 profiles under wrk: {}", paths.join(", "))),
            Err(error) => report.note(format!("Figure 1 profiles: none ({error})")),
        }
    }
    let (n, a) = (median_round(&nginx_rounds), median_round(&agent_rounds));
    let throughput = a.per_s / n.per_s;
    let shape =
        format!("wrk -t{} -c{}, {} s × {}", load.threads, load.connections, load.seconds, load.rounds);
    report.row(Row::compared(
        1,
        &format!("credential GET throughput ({shape}; baseline: nginx)"),
        stats::per_second(a.per_s),
        stats::per_second(n.per_s),
        stats::ratio(a.per_s, n.per_s),
        "≥ 1.0× nginx",
        Verdict::of(throughput >= 1.0),
    ));
    report.row(Row::compared(
        1,
        "CPU per credential GET (agent + server; baseline: nginx)",
        format!("{:.1} µs", micros(a.cpu_per_request)),
        format!("{:.1} µs", micros(n.cpu_per_request)),
        stats::ratio(micros(a.cpu_per_request), micros(n.cpu_per_request)),
        "≤ 1.5× nginx",
        Verdict::of(a.cpu_per_request.as_secs_f64() <= 1.5 * n.cpu_per_request.as_secs_f64()),
    ));
    let ping = median_round(&ping_rounds);
    report.row(Row::compared(
        1,
        "agent GET /ping, no server call (same load; baseline: nginx)",
        stats::per_second(ping.per_s),
        stats::per_second(n.per_s),
        stats::ratio(ping.per_s, n.per_s),
        "",
        Verdict::Info,
    ));
    // Latencies are the median of the rounds' own percentiles, not those of the round with the
    // median throughput: one round's p99 on two shared cores ranges over a factor of four.
    let ((a_p50, a_p99), (n_p50, n_p99)) = (medians(&agent_rounds), medians(&nginx_rounds));
    report.row(latency("credential GET p50 (median of the rounds' p50s)", a_p50, n_p50, "", Verdict::Info));
    report.row(latency(
        "credential GET p99 (median of the rounds' p99s)",
        a_p99,
        n_p99,
        "≤ 1.0× nginx p99",
        Verdict::of(a_p99 <= n_p99),
    ));
    // The same comparison between two identical nginx: what the verdict above moves by when
    // nothing differs but the turn.
    let (_, t_p99) = medians(&twin_rounds);
    let twin_measure =
        "p99 of a second, identical nginx against the first (A/A: the verdict's noise; same rounds)";
    report.row(latency(twin_measure, t_p99, n_p99, "", Verdict::Info));
    // The same two at a paced load, under either's capacity: what an SDK sees on a busy node.
    let paced_agent = (agent_url.as_str(), &mut deployed.child, &server);
    crate::paced::run(env, load, &token, (&nginx_url, &mut nginx), paced_agent, report).await;

    let limit = 20 * 1024 * 1024;
    report.row(Row::compared(
        6,
        "agent RSS, idle (baseline: nginx, master + workers)",
        stats::mib(agent_idle.rss),
        stats::mib(nginx_idle.rss),
        stats::ratio(agent_idle.rss as f64, nginx_idle.rss as f64),
        "≤ 20 MiB",
        Verdict::of(agent_idle.rss <= limit),
    ));
    let agent_loaded = peak(&agent_rounds);
    let nginx_loaded = peak(&nginx_rounds);
    report.row(Row::compared(
        6,
        "agent RSS, peak under the figure-1 load",
        stats::mib(agent_loaded),
        stats::mib(nginx_loaded),
        stats::ratio(agent_loaded as f64, nginx_loaded as f64),
        "≤ 20 MiB",
        Verdict::of(agent_loaded <= limit),
    ));
    let (stripped, unstripped) = binary_size(&env.kiam, &env.scratch("strip")).await;
    report.row(Row::plain(
        6,
        &format!("release binary, stripped (as built: {})", stats::mib(unstripped)),
        stats::mib(stripped),
        "≤ 30 MiB",
        Verdict::of(stripped <= 30 * 1024 * 1024),
    ));
    report.note(format!(
        "Figures 1 and 6: one pod at 127.0.0.1 (wrk's source address) with its credentials cached; \
         wrk sent GET {CREDENTIALS_PATH} with an IMDSv2 token header to the release agent (whose \
         certificate names {node}, the pod's node, so it answers from its node view with no \
         server call: the agent counted {hits:.0} view hits for the {requests} requests of the \
         measured rounds) and to nginx ({}, 2 \
         workers, keep-alive unlimited, access log off) serving the agent's exact document as a \
         file. {} rounds of {} s each, alternating, after a 1 s warm-up each; throughput and CPU \
         per GET are the median-throughput round's, p50 and p99 the median of the rounds' own; \
         CPU per GET counts the agent and the (idle) server. Every process shares the same {} cores: wrk, nginx or agent + server. \
         nginx rounds: {}; agent rounds: {}; the A/A twin's rounds (a second nginx, \
         after the agent in each turn): {}. RSS is VmRSS/VmHWM from /proc, sampled every 50 ms; \
         of the agent's idle {}, {} is anonymous memory (heap, stacks) and the rest pages of the \
         binary and libraries; under load, anonymous memory reached {}.",
        nginx::version().await,
        load.rounds,
        load.seconds,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        describe(&nginx_rounds),
        describe(&agent_rounds),
        describe(&twin_rounds),
        stats::mib(agent_idle.rss),
        stats::mib(agent_idle.anon),
        stats::mib(agent_rounds.iter().map(|round| round.anon).max().unwrap_or(0)),
        node = deploy::NODE,
    ));
}

/// An IMDSv2 token for 127.0.0.1, from the agent.
async fn token(base: &str) -> String {
    let url = format!("{base}/latest/api/token");
    let response = http::request("PUT", &url, &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")], "", None)
        .await
        .expect("PUT the token");
    assert_eq!(response.status, 200, "token: {}", response.body);
    response.body
}

/// Starts nginx (scratch folder `name`) serving `document` at the credentials path on a free
/// port, waits for it, and checks that it serves the document byte for byte. Returns it and
/// the document's URL.
async fn start_nginx(env: &Env, name: &str, document: &str, token: &str) -> (Child, String) {
    let port = procs::free_port();
    let child = nginx::start(env, name, port, CREDENTIALS_PATH, document);
    procs::wait_listening(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(10)).await;
    let url = format!("http://127.0.0.1:{port}{CREDENTIALS_PATH}");
    assert_eq!(get(&url, token).await, document, "{name} serves the agent's document byte for byte");
    (child, url)
}

/// GETs `url` with the token and returns the body, which must come with a 200.
async fn get(url: &str, token: &str) -> String {
    let response = http::request("GET", url, &[(TOKEN_HEADER, token)], "", None).await.expect("GET");
    assert_eq!(response.status, 200, "GET {url}: {}", response.body);
    response.body
}

/// A figure-1 row comparing the agent's latency with nginx's.
pub fn latency(measure: &str, agent: Duration, nginx: Duration, target: &str, verdict: Verdict) -> Row {
    let ratio = stats::ratio(agent.as_secs_f64(), nginx.as_secs_f64());
    Row::compared(1, measure, stats::ms(agent), stats::ms(nginx), ratio, target, verdict)
}

/// The round with the median throughput.
fn median_round(rounds: &[Round]) -> &Round {
    let mut order: Vec<&Round> = rounds.iter().collect();
    order.sort_by(|a, b| a.per_s.total_cmp(&b.per_s));
    order[(order.len() - 1) / 2]
}

fn peak(rounds: &[Round]) -> u64 {
    rounds.iter().map(|round| round.memory).max().unwrap_or(0)
}

fn describe(rounds: &[Round]) -> String {
    let each: Vec<String> = rounds
        .iter()
        .map(|r| {
            format!(
                "{:.0}/s p99 {} CPU {:.1} µs/req ({:.1} µs of it in user space); per 1k req its \
                 threads' run-queue {}, wrk's {}; busiest threads {:.0} % and {:.0} % of its CPU",
                r.per_s,
                stats::ms(r.p99),
                micros(r.cpu_per_request),
                micros(r.user_per_request),
                r.target_sched.sched.per_thousand(r.requests),
                r.wrk_sched.per_thousand(r.requests),
                r.target_sched.busiest.0 * 100.0,
                r.target_sched.busiest.1 * 100.0,
            )
        })
        .collect();
    each.join(", ")
}

/// The stripped size of a copy of the binary, and the size as built.
async fn binary_size(kiam: &Path, scratch: &Path) -> (u64, u64) {
    let copy = scratch.join("kiam");
    std::fs::copy(kiam, &copy).expect("copy the binary");
    procs::output("strip", &["--strip-all".into(), copy.display().to_string()], Duration::from_secs(60))
        .await;
    let size = |path: &Path| std::fs::metadata(path).map(|m| m.len()).expect("stat the binary");
    (size(&copy), size(kiam))
}
