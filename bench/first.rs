//! Figure 2: time to first credential. A burst of pods is created in the fake API server, each
//! with its own IP and one of ten roles nobody has fetched yet. Right after each pod is
//! created, an SDK-shaped client starts for it: it connects from the pod's address and does
//! what every AWS SDK does (PUT a token, GET the role name, GET the credentials). The time
//! from the pod's creation to the client holding credentials is one sample.
//!
//! The baseline is one AssumeRole call from this process to the same moto: the least any path
//! from "pod exists" to "pod holds credentials" must spend.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kiam::creds::AssumeRole;

use crate::deploy::{self, Env};
use crate::report::{Report, Row, Verdict};
use crate::stats::{self, Samples};
use crate::support::fake_kube::FakeKube;

/// Pods in the burst.
const PODS: u32 = 256;
/// Nodes they are spread over, each with its own agent (64 pods a node; kubelet's default cap is
/// 110).
const NODES: u32 = 4;
/// Roles they share (each fetched once, on first need).
const ROLES: u32 = 10;
/// Tries an SDK-shaped client makes per request (the Rust SDK makes four, botocore one).
const TRIES: u32 = 3;
/// The bound on one HTTP exchange.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Runs figure 2, and adds the real binary's AssumeRole count for the burst to figure 4.
pub async fn run(env: &Env, report: &mut Report) {
    let kube = FakeKube::start().await;
    kube.apply(deploy::namespace("burst", "burst-"));
    let (_server, server_port, _) = env.server("burst-server", &kube).await;
    // One agent per node, as a DaemonSet runs them; each pod's client asks its node's agent.
    let mut agents = Vec::new();
    for n in 0..NODES {
        let agent = env.agent_with(&format!("burst-agent-{n}"), server_port, &node(n), &[]).await;
        agent.wait_view(0, Duration::from_secs(20)).await;
        agents.push(agent);
    }
    let addresses: Vec<SocketAddr> =
        agents.iter().map(|a| SocketAddr::from((Ipv4Addr::LOCALHOST, a.port))).collect();
    let baseline = assume_role_baseline(env).await;
    env.moto.start_recording().await;

    let mut clients = Vec::with_capacity(PODS as usize);
    for i in 0..PODS {
        let ip = deploy::nth_ip(Ipv4Addr::new(127, 1, 0, 0), i);
        let role = format!("burst-{}", i % ROLES);
        let pod = deploy::pod("burst", &format!("burst-{i}"), ip, &role, &node(i % NODES));
        let agent = addresses[(i % NODES) as usize];
        let created = Instant::now();
        kube.apply(pod);
        clients.push(tokio::spawn(async move { first_credentials(agent, ip, created).await }));
    }
    let (mut steps, mut failures, mut retries) = (Vec::new(), Vec::new(), 0);
    for client in clients {
        match client.await.expect("a client task does not panic") {
            Ok(done) => {
                retries += done.retries;
                steps.push(done);
            }
            Err(error) => failures.push(error),
        }
    }
    let samples = Samples::new(steps.iter().map(|s| s.credentials).collect());
    let tokens = Samples::new(steps.iter().map(|s| s.token).collect());
    let roles = Samples::new(steps.iter().map(|s| s.role).collect());
    // A SYN dropped by a full accept queue is sent again after the kernel's 1 s timeout.
    let resent = steps.iter().filter(|s| s.token >= Duration::from_secs(1)).count();
    let calls = env.moto.recorded_assume_roles().await.len();
    let (p50, p99) = (samples.percentile(50.0), samples.percentile(99.0));
    let (base50, base99) = (baseline.percentile(50.0), baseline.percentile(99.0));
    report.row(Row::compared(
        2,
        &format!("time to first credential p99, {PODS} pods in a burst (baseline: one AssumeRole)"),
        stats::ms(p99),
        stats::ms(base99),
        stats::ratio(p99.as_secs_f64(), base99.as_secs_f64()),
        "≤ 100 ms",
        Verdict::of(failures.is_empty() && p99 <= Duration::from_millis(100)),
    ));
    report.row(Row::compared(
        2,
        "time to first credential p50",
        stats::ms(p50),
        stats::ms(base50),
        stats::ratio(p50.as_secs_f64(), base50.as_secs_f64()),
        "",
        Verdict::Info,
    ));
    report.row(Row::compared(
        4,
        &format!("AssumeRole calls, release server, burst of {PODS} pods on {ROLES} roles"),
        calls.to_string(),
        ROLES.to_string(),
        stats::ratio(calls as f64, f64::from(ROLES)),
        "1 per identity",
        Verdict::of(calls == ROLES as usize),
    ));
    report.note(format!(
        "Figure 2: {PODS} pods (IPs 127.1.0.1 onwards, {ROLES} roles, none fetched before) created \
         back to back in the fake API server, spread over {NODES} nodes, each node with its own \
         release agent whose certificate names it (so the pods reach it through its node view), \
         each pod followed at once by an SDK-shaped client from the pod's address to its node's \
         agent: PUT token, GET role, GET credentials, one kept-alive connection, up \
         to {TRIES} tries per request. {} clients got credentials, {} failed{}, {retries} retried; \
         max {}. Since creation (p50 / p99): token {} / {} (includes the connection; {resent} \
         clients waited a second for it, their first SYN dropped by a full accept queue), role \
         {} / {} (the server has to learn of the pod), credentials {} / {}. The burst took the release server {calls} AssumeRole calls (moto's recorder). \
         Baseline: {} sequential AssumeRole calls from the bench process to the same moto (p50 \
         {}, p99 {}). The fake creates pods with their IP already set; a real pod gets its IP \
         later, from the kubelet, so real clocks start later than this one.",
        samples.len(),
        failures.len(),
        failures.first().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        stats::ms(samples.max()),
        stats::ms(tokens.percentile(50.0)),
        stats::ms(tokens.percentile(99.0)),
        stats::ms(roles.percentile(50.0)),
        stats::ms(roles.percentile(99.0)),
        stats::ms(p50),
        stats::ms(p99),
        baseline.len(),
        stats::ms(base50),
        stats::ms(base99),
    ));
}

/// The name of the `n`-th node (the benchmarks' [`deploy::NODE`] is node 1).
fn node(n: u32) -> String {
    format!("node-{n}")
}

/// AssumeRole latency from this process to moto: 50 sequential calls after 5 warm-ups.
async fn assume_role_baseline(env: &Env) -> Samples {
    let sts = deploy::sts(env);
    let identity = deploy::identity("baseline");
    let mut samples = Vec::new();
    for call in 0..55 {
        let started = Instant::now();
        sts.assume_role(&identity, Duration::from_secs(3600)).await.expect("moto answers AssumeRole");
        if call >= 5 {
            samples.push(started.elapsed());
        }
    }
    Samples::new(samples)
}

/// When, since the pod's creation, one SDK-shaped client had its token, its role name and its
/// credentials, and how many requests it had to repeat.
struct Steps {
    token: Duration,
    role: Duration,
    credentials: Duration,
    retries: u32,
}

/// What an AWS SDK does to get credentials from the metadata service, from `ip`.
async fn first_credentials(agent: SocketAddr, ip: IpAddr, created: Instant) -> Result<Steps, String> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip));
    connector.set_nodelay(true);
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let base = format!("http://{agent}");
    let mut retries = 0;
    let (_, token) = exchange(&client, "PUT", &format!("{base}/latest/api/token"), None).await?;
    let token_at = created.elapsed();
    let list = format!("{base}/latest/meta-data/iam/security-credentials/");
    let role = with_tries(&mut retries, || exchange(&client, "GET", &list, Some(&token))).await?;
    let role_at = created.elapsed();
    let credentials = format!("{list}{role}");
    let document = with_tries(&mut retries, || exchange(&client, "GET", &credentials, Some(&token))).await?;
    if !document.contains("\"AccessKeyId\"") {
        return Err(format!("{ip}: no credentials in {document:?}"));
    }
    Ok(Steps { token: token_at, role: role_at, credentials: created.elapsed(), retries })
}

/// Repeats a request that did not answer 200, up to [`TRIES`] times, 20 ms apart.
async fn with_tries<F, Fut>(retries: &mut u32, mut request: F) -> Result<String, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(u16, String), String>>,
{
    let mut last = String::new();
    for attempt in 0..TRIES {
        if attempt > 0 {
            *retries += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match request().await {
            Ok((200, body)) => return Ok(body),
            Ok((status, body)) => last = format!("{status} {}", body.trim()),
            Err(error) => last = error,
        }
    }
    Err(last)
}

/// One request; the token PUT must answer 200, the GETs' statuses are for the caller to judge.
async fn exchange(
    client: &Client<HttpConnector, Empty<Bytes>>,
    method: &str,
    url: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let mut request = hyper::Request::builder().method(method).uri(url);
    request = match token {
        Some(token) => request.header("x-aws-ec2-metadata-token", token),
        None => request.header("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
    };
    let request = request.body(Empty::new()).map_err(|e| format!("build {method} {url}: {e}"))?;
    let exchange = async {
        let response = client.request(request).await.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| format!("{method} {url}: {e}"))?;
        Ok::<_, String>((status, String::from_utf8_lossy(&body.to_bytes()).into_owned()))
    };
    let (status, body) = tokio::time::timeout(EXCHANGE_LIMIT, exchange)
        .await
        .map_err(|_| format!("{method} {url}: no answer within {EXCHANGE_LIMIT:?}"))??;
    if token.is_none() && status != 200 {
        return Err(format!("{method} {url}: {status} {body}"));
    }
    Ok((status, body))
}
