//! Figure 2: time to first credential. A burst of pods is created in the fake API server, each
//! with its own IP and one of ten roles nobody has fetched yet. Right after each pod is
//! created, an SDK-shaped client starts for it: it connects from the pod's address and does
//! what every AWS SDK does (PUT a token, GET the role name, GET the credentials). The time
//! from the pod's creation to the client holding credentials is one sample.
//!
//! Everything the harness can do before the clock starts, it does: the pods' objects are built
//! and the clients are spawned, with their buffers, before the burst, and the clients speak
//! HTTP/1.1 on a plain socket. On this machine's two cores, the harness's own work during the
//! burst (hyper's client machinery and the first touch of its memory) once took as much CPU
//! as the four agents together, and counted against them.
//!
//! The baseline is one AssumeRole call from this process to the same moto: the least any path
//! from "pod exists" to "pod holds credentials" must spend. A second row divides the p99 by the
//! burst's floor, and the note breaks each pod's time down stage by stage ([`crate::stages`],
//! with the server reaching moto through [`crate::tap`]).

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use kiam::creds::AssumeRole;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

use crate::deploy::{self, Env};
use crate::report::{Report, Row, Verdict};
use crate::sched::Sched;
use crate::stages::{self, Pod};
use crate::stats::{self, Samples};
use crate::tap::Tap;
use kiam_testkit::fake_kube::FakeKube;

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
/// moto's name in the CPU breakdown.
const MOTO: &str = "moto";
/// Runs of the STS floor; the median is the floor's STS part.
const FLOOR_RUNS: u32 = 3;

/// Runs figure 2, and adds the real binary's AssumeRole count for the burst to figure 4.
pub async fn run(env: &Env, report: &mut Report) {
    // Apart from the clients, as a real API server is: on this process's runtime, its watch
    // streams would wait behind the 256 clients' tasks (BENCHMARKS.md, issue 30).
    let kube = FakeKube::start_apart();
    kube.apply(deploy::namespace("burst", "burst-"));
    // The server reaches moto through the timing tap, for the breakdown.
    let tap = Tap::start(env.moto.addr());
    let (server, server_port, _) = env.server_with_sts("burst-server", &kube, &tap.endpoint()).await;
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
    let mut floors = Vec::new();
    for run in 0..FLOOR_RUNS {
        floors.push(stages::sts_floor(env, ROLES, run).await);
    }
    let sts_floor = Samples::new(floors).percentile(50.0);
    // A watch of the fake from this process, open before the burst: when each pod's event is out.
    // On a runtime of its own, as the server's watch is in its own process: on this process's
    // runtime it waited behind the 256 clients' tasks, and saw the pods about 20 ms after the
    // server did, which inflated the floor's watch part.
    let watches = kube.watch_count();
    let watcher = kiam_testkit::apart::Apart::new("burst-watch");
    let seen = {
        let _inside = watcher.enter();
        crate::invalidation::watch_events(&kube)
    };
    let opened = Instant::now();
    while kube.watch_count() <= watches && opened.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // The pods and their parked clients, before the clock starts.
    let (mut pods, mut clients, mut pods_go) = (Vec::new(), Vec::new(), Vec::new());
    let (parked, mut all_parked) = mpsc::channel::<()>(1);
    for i in 0..PODS {
        let ip = deploy::nth_ip(Ipv4Addr::new(127, 1, 0, 0), i);
        let role = format!("burst-{}", i % ROLES);
        pods.push(deploy::pod("burst", &format!("burst-{i}"), ip, &role, &node(i % NODES)));
        let (go, task) = client(addresses[(i % NODES) as usize], ip, parked.clone());
        clients.push(task);
        pods_go.push(go);
    }
    drop(parked);
    while all_parked.recv().await.is_some() {}
    tap.clear();
    // Who used the cores during the burst: this process (the fake API server, the clients, the
    // watch, the tap), moto, the server and the agents.
    let mut pids = vec![("the bench process (fake API server, clients, tap)", std::process::id())];
    pids.extend([(MOTO, env.moto.pid()), ("the server", server.pid())]);
    pids.extend(agents.iter().map(|a| ("the agents", a.child.pid())));
    let cpu_before: Vec<(Sched, Duration)> =
        pids.iter().map(|(_, pid)| (Sched::of_process(*pid), crate::procs::process_cpu(*pid))).collect();
    let burst_started = Instant::now();
    let mut created = Vec::new();
    for (pod, go) in pods.into_iter().zip(pods_go) {
        let at = Instant::now();
        kube.apply(pod);
        let _ = go.send(at);
        created.push(at);
    }
    let creation_took = burst_started.elapsed();
    let (mut steps, mut failures, mut retries, mut burst) = (Vec::new(), Vec::new(), 0, Vec::new());
    // One bound for all the watch look-ups together (every loop bounded).
    let mut watch_deadline = None;
    for (i, client) in clients.into_iter().enumerate() {
        match client.await.expect("a client task does not panic") {
            Ok(done) => {
                retries += done.retries;
                let name = format!("apply:burst-{i}");
                let deadline = *watch_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(5));
                let left = deadline.saturating_duration_since(Instant::now());
                let watched = crate::invalidation::event_seen(&seen, &name, left).await;
                burst.push(Pod {
                    created: created[i],
                    role: format!("burst-{}", i as u32 % ROLES),
                    watched,
                    token: done.token,
                    role_named: done.role,
                    credentials: done.credentials,
                    retries: done.retries,
                });
                steps.push(done);
            }
            Err(error) => failures.push(error),
        }
    }
    let burst_took = burst_started.elapsed();
    let cpu = crate::sched::breakdown(&pids, &cpu_before, MOTO);
    let (breakdown, last_watch) = stages::describe(&burst, &tap.calls(), burst_started);
    let floor = sts_floor + last_watch;
    let samples = Samples::new(steps.iter().map(|s| s.credentials).collect());
    let tokens = Samples::new(steps.iter().map(|s| s.token).collect());
    let roles = Samples::new(steps.iter().map(|s| s.role).collect());
    // A SYN dropped by a full accept queue is sent again after the kernel's 1 s timeout.
    let resent = steps.iter().filter(|s| s.token >= Duration::from_secs(1)).count();
    // Counted at the tap, not by moto's recorder: recording costs moto time per call, which the
    // floor (measured without it) would not pay.
    let calls = tap.calls().iter().filter(|call| call.role.is_some()).count();
    let (p50, p99) = (samples.percentile(50.0), samples.percentile(99.0));
    let (base50, base99) = (baseline.percentile(50.0), baseline.percentile(99.0));
    report.row(Row::compared(
        2,
        &format!("time to first credential p99, {PODS} pods in a burst (baseline: one AssumeRole)"),
        stats::ms(p99),
        stats::ms(base99),
        stats::ratio(p99.as_secs_f64(), base99.as_secs_f64()),
        "≤ 50 ms",
        Verdict::of(failures.is_empty() && p99 <= Duration::from_millis(50)),
    ));
    report.row(Row::compared(
        2,
        "time to first credential p99 (baseline: the floor, moto issuing the burst's identities \
         8 at a time + the last pod's watch delivery)",
        stats::ms(p99),
        stats::ms(floor),
        stats::ratio(p99.as_secs_f64(), floor.as_secs_f64()),
        "≤ 1.5× the floor",
        Verdict::of(failures.is_empty() && p99.as_secs_f64() <= 1.5 * floor.as_secs_f64()),
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
         to {TRIES} tries per request (the pods' objects and the parked clients are made before \
         the burst; the clients speak HTTP/1.1 on a plain socket). {} clients got credentials, \
         {} failed{}, {retries} retried; max {}. Since creation (p50 / p99): token {} / {} \
         (includes the connection; {resent} clients waited a second for it, their first SYN \
         dropped by a full accept queue), role {} / {} (the server has to learn of the pod), \
         credentials {} / {}. The burst took the release server {calls} AssumeRole calls \
         (requests naming a role, counted at the tap). \
         Baseline: {} sequential AssumeRole calls from the bench process to the same moto (p50 \
         {}, p99 {}). The fake creates pods with their IP already set; a real pod gets its IP \
         later, from the kubelet, so real clocks start later than this one. Floor: moto issued \
         {ROLES} distinct identities, {} at a time, from this process in {} (median of \
         {FLOOR_RUNS}), plus the last pod's watch delivery, {}. The server reached moto through a \
         timing tap (one more loopback hop per call). Creating the {PODS} pods took {}; the last \
         client was done {} after the first pod. On-CPU time / time runnable without a core, over \
         that span (2 cores: {} of CPU in all): {cpu}. {breakdown}",
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
        stages::SERVER_PARALLELISM,
        stats::ms(sts_floor),
        stats::ms(last_watch),
        stats::ms(creation_took),
        stats::ms(burst_took),
        stats::ms(burst_took * 2),
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

/// Spawns the client of the pod at `ip`, which waits for the pod's creation time and then does
/// what every AWS SDK does to get credentials from the metadata service. The client drops
/// `parked` once it is ready and waiting.
fn client(agent: SocketAddr, ip: IpAddr, parked: mpsc::Sender<()>) -> (oneshot::Sender<Instant>, Client) {
    let (go, created) = oneshot::channel::<Instant>();
    let task = tokio::spawn(async move {
        let mut connection = Connection::new(agent, ip);
        drop(parked);
        let created = created.await.map_err(|_| format!("{ip}: the burst never started"))?;
        first_credentials(&mut connection, created).await
    });
    (go, task)
}

/// A pod's client task.
type Client = tokio::task::JoinHandle<Result<Steps, String>>;

/// PUT a token, GET the role name, GET the credentials, on one kept-alive connection.
async fn first_credentials(connection: &mut Connection, created: Instant) -> Result<Steps, String> {
    let mut retries = 0;
    let (status, token) = connection.exchange("PUT", TOKEN, TTL_HEADER).await?;
    if status != 200 {
        return Err(format!("{}: PUT {TOKEN}: {status} {token}", connection.ip));
    }
    let token_at = created.elapsed();
    let header = format!("x-aws-ec2-metadata-token: {token}");
    let role = connection.get(LIST, &header, &mut retries).await?;
    let role_at = created.elapsed();
    let credentials = format!("{LIST}{role}");
    let document = connection.get(&credentials, &header, &mut retries).await?;
    if !document.contains("\"AccessKeyId\"") {
        return Err(format!("{}: no credentials in {document:?}", connection.ip));
    }
    Ok(Steps { token: token_at, role: role_at, credentials: created.elapsed(), retries })
}

/// The token request and the header it carries.
const TOKEN: &str = "/latest/api/token";
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds: 21600";
/// The role list.
const LIST: &str = "/latest/meta-data/iam/security-credentials/";
/// Room for one request and for one response of the agent (head and credential document).
const BUFFER: usize = 4096;

/// One pod's kept-alive HTTP/1.1 connection to its agent, from the pod's address, opened on first
/// use and again after the agent closes it. Its buffers are allocated and written once, before
/// the burst, as an SDK's process exists before it asks: on this VM the first touch of a page
/// costs tens of microseconds, and it was over a third of the harness's CPU during the burst.
struct Connection {
    agent: SocketAddr,
    ip: IpAddr,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    response: Vec<u8>,
}

impl Connection {
    fn new(agent: SocketAddr, ip: IpAddr) -> Self {
        let (mut request, mut response) = (vec![0u8; BUFFER], vec![0u8; BUFFER]);
        request.clear();
        response.clear();
        Self { agent, ip, stream: None, request, response }
    }

    /// A GET until it answers 200, up to [`TRIES`] times, 20 ms apart; the body.
    async fn get(&mut self, path: &str, header: &str, retries: &mut u32) -> Result<String, String> {
        let mut last = String::new();
        for attempt in 0..TRIES {
            if attempt > 0 {
                *retries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            match self.exchange("GET", path, header).await {
                Ok((200, body)) => return Ok(body),
                Ok((status, body)) => last = format!("{}: GET {path}: {status} {}", self.ip, body.trim()),
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// One request with one extra header line; its status and body, within [`EXCHANGE_LIMIT`].
    /// Any failure drops the connection, so that a retry opens a new one.
    async fn exchange(&mut self, method: &str, path: &str, header: &str) -> Result<(u16, String), String> {
        let answer = tokio::time::timeout(EXCHANGE_LIMIT, self.try_exchange(method, path, header)).await;
        let answer = answer.unwrap_or_else(|_| Err(format!("no answer within {EXCHANGE_LIMIT:?}")));
        answer.map_err(|error| {
            self.stream = None;
            format!("{}: {method} {path}: {error}", self.ip)
        })
    }

    async fn try_exchange(
        &mut self,
        method: &str,
        path: &str,
        header: &str,
    ) -> Result<(u16, String), String> {
        if self.stream.is_none() {
            self.stream = Some(self.connect().await.map_err(|e| format!("connect: {e}"))?);
        }
        let stream = self.stream.as_mut().ok_or("no connection")?;
        self.request.clear();
        write!(self.request, "{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{header}\r\n\r\n")
            .map_err(|e| e.to_string())?;
        stream.write_all(&self.request).await.map_err(|e| format!("write: {e}"))?;
        self.response.clear();
        let (status, body) = loop {
            if let Some(parsed) = parse(&self.response)? {
                break parsed;
            }
            if self.response.len() == BUFFER {
                return Err(format!("an answer larger than {BUFFER} bytes"));
            }
            if stream.read_buf(&mut self.response).await.map_err(|e| format!("read: {e}"))? == 0 {
                return Err("closed by the agent".into());
            }
        };
        let body = String::from_utf8_lossy(&self.response[body]).into_owned();
        Ok((status, body))
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(self.ip, 0))?;
        let stream = socket.connect(self.agent).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// The status and the body's place in `bytes` once a whole response with a `Content-Length` is
/// in; `None` while more is to come.
fn parse(bytes: &[u8]) -> Result<Option<(u16, std::ops::Range<usize>)>, String> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "a head that is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.strip_prefix("HTTP/1.1 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let length: usize = lines
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, value)| value.trim().parse().ok())
        .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
    let body = end + 4..end + 4 + length;
    Ok((bytes.len() >= body.end).then_some((status, body)))
}
