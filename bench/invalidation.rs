//! Figure 7: invalidation latency. How long after the API server commits a change that takes an
//! IP away from a pod the agent stops answering from that pod's node-view entry.
//!
//! Each change is measured on a pod of its own, at its own IP on the agent's node, whose
//! credentials the agent already holds. Then the change is committed in the fake API server,
//! alternately:
//!
//! - *delete*: the pod is deleted (a DELETED event);
//! - *reuse*: the pod was already terminating (it keeps its IP until another pod claims it), and
//!   a new pod with another role is created at the same IP (one ADDED event).
//!
//! The agent drops a view entry in one place (`NodeView::remove`, on the server's Fence or
//! Remove), counting it in `kiam_agent_view_invalidations_total` in the same call (just before
//! it swaps in the view's state without the entry), and from then on no request is answered
//! from it. A poller scrapes that counter back to back on a kept-alive connection, in
//! a thread of its own so that its clock readings are not delayed by the bench's async runtime.
//! The sample runs from just before the call that commits the change in the fake to the arrival
//! of the first scrape showing the count moved: an upper bound (to within that swap), since the
//! entry was dropped by the time that scrape was read. The send time of the scrape before it is a lower bound; both are
//! reported. A GET from the pod's address then checks that the old entry is refused.
//!
//! Requests that arrive during the change are not used as the clock: a request for a deleted
//! pod waits (bounded by `--pod-wait-timeout`) before its 404, and a request's send time says
//! nothing of when the agent looked it up on a busy machine.
//!
//! The baseline is the same event reaching a plain watch of the fake from this process (kube's
//! watcher): the floor under any invalidation that starts from the watch.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;

use crate::deploy::{self, Env};
use crate::report::{Report, Row, Verdict};
use crate::stats::{self, Samples};
use kiam_testkit::fake_kube::FakeKube;
use kiam_testkit::objects;

/// The agent's counter of view entries dropped (by a Fence or a Remove).
const INVALIDATIONS: &str = "kiam_agent_view_invalidations_total";
/// Changes measured (half deletions, half reuses).
const CHANGES: u32 = 240;
/// The agent's `--pod-wait-timeout` here: how long a refused request for a deleted pod waits
/// before its 404 (it does not enter the sample; it only paces the run).
const POD_WAIT: &str = "100ms";
/// How long the poller scrapes before the change, so that it has readings from before it.
const LEAD: Duration = Duration::from_millis(10);
/// The most a poller may run, and the most one exchange may take.
const POLL_LIMIT: Duration = Duration::from_secs(5);

type Http = Client<HttpConnector, Empty<Bytes>>;

/// What the metrics poller saw.
struct Poll {
    /// When it sent the last scrape that still showed the old count.
    unmoved_sent: Option<Instant>,
    /// When the first scrape showing the invalidation came back.
    moved_answered: Option<Instant>,
    /// Round trips of the scrapes.
    round_trips: Vec<Duration>,
}

/// Runs figure 7.
pub async fn run(env: &Env, report: &mut Report) {
    let kube = FakeKube::start().await;
    kube.apply(deploy::namespace("inval", "inval-"));
    let (_server, server_port, _) = env.server("inval-server", &kube).await;
    let deployed =
        env.agent_with("inval-agent", server_port, deploy::NODE, &["--pod-wait-timeout", POD_WAIT]).await;
    deployed.wait_view(0, Duration::from_secs(20)).await;
    let agent = SocketAddr::from((Ipv4Addr::LOCALHOST, deployed.port));
    let metrics = SocketAddr::from((Ipv4Addr::LOCALHOST, deployed.metrics_port));
    let seen = watch_events(&kube);

    let (mut deletes, mut reuses, mut watch) = (Vec::new(), Vec::new(), Vec::new());
    let (mut round_trips, mut statuses) = (Vec::new(), HashMap::<u16, u32>::new());
    let mut lower = Vec::new();
    let started = Instant::now();
    for i in 0..CHANGES {
        let reuse = i % 2 == 1;
        let ip = deploy::nth_ip(Ipv4Addr::new(127, 3, 0, 0), i);
        let name = format!("inval-{i}");
        let old = objects::pod("inval", &name).ip(&ip.to_string()).role("inval-a").node(deploy::NODE);
        let old = if reuse { old.terminating() } else { old };
        kube.apply(old.build());
        let client = pod_client(ip);
        let base = format!("http://{agent}");
        let token = token(&client, &base).await;
        let url = format!("{base}/latest/meta-data/iam/security-credentials/inval-a");
        let document = first_document(&client, &url, &token).await;

        // The agent has the pod and its credentials; wait until earlier changes are all in, so
        // that the next invalidation it counts is this one.
        let before = settled(&deployed).await;
        let poller = tokio::task::spawn_blocking(move || poll(metrics, before));
        tokio::time::sleep(LEAD).await;
        let (event, committed) = if reuse {
            let new = objects::pod("inval", &format!("{name}-new"))
                .ip(&ip.to_string())
                .role("inval-b")
                .node(deploy::NODE)
                .build();
            let committed = Instant::now();
            kube.apply(new);
            (format!("apply:{name}-new"), committed)
        } else {
            let committed = Instant::now();
            assert!(kube.delete("Pod", Some("inval"), &name), "the pod to delete exists");
            (format!("delete:{name}"), committed)
        };
        let poll = poller.await.expect("the poller does not panic");
        let (Some(unmoved), Some(moved)) = (poll.unmoved_sent, poll.moved_answered) else {
            panic!("{ip}: the agent counted no invalidation within {POLL_LIMIT:?} of the change")
        };
        assert!(
            moved > committed,
            "{ip}: the agent counted an invalidation {:?} before the change was committed",
            committed - moved
        );
        // The agent refuses the old entry from then on.
        let (status, body) = exchange(&client, "GET", &url, ("x-aws-ec2-metadata-token", &token)).await;
        assert!(status != 200 && body != document, "{ip}: the old entry still answered ({status})");
        *statuses.entry(status).or_default() += 1;
        round_trips.extend(poll.round_trips);
        let latency = moved - committed;
        lower.push(unmoved.saturating_duration_since(committed));
        if reuse {
            reuses.push(latency)
        } else {
            deletes.push(latency)
        }
        if let Some(at) = event_seen(&seen, &event, Duration::from_secs(5)).await {
            watch.push(at.saturating_duration_since(committed));
        }
        // Clear the node for the next change (not measured).
        kube.delete("Pod", Some("inval"), &name);
        kube.delete("Pod", Some("inval"), &format!("{name}-new"));
    }
    let took = started.elapsed();
    let all = Samples::new(deletes.iter().chain(&reuses).copied().collect());
    let watch = Samples::new(watch);
    let (deletes, reuses) = (Samples::new(deletes), Samples::new(reuses));
    let round_trips = Samples::new(round_trips);
    let lower = Samples::new(lower);
    let (p50, p99) = (all.percentile(50.0), all.percentile(99.0));
    let (base50, base99) = (watch.percentile(50.0), watch.percentile(99.0));
    report.row(Row::compared(
        7,
        &format!(
            "invalidation latency p99, {} changes: commit in the API server → agent refuses the old \
             entry (baseline: the watch event reaching this process)",
            all.len()
        ),
        stats::ms(p99),
        stats::ms(base99),
        stats::ratio(p99.as_secs_f64(), base99.as_secs_f64()),
        "≤ 20 ms",
        Verdict::of(all.len() >= 200 && p99 <= Duration::from_millis(20)),
    ));
    report.row(Row::compared(
        7,
        "invalidation latency p50",
        stats::ms(p50),
        stats::ms(base50),
        stats::ratio(p50.as_secs_f64(), base50.as_secs_f64()),
        "",
        Verdict::Info,
    ));
    let mut statuses: Vec<String> = statuses.iter().map(|(s, n)| format!("{n} × {s}")).collect();
    statuses.sort();
    report.note(format!(
        "Figure 7: {} changes on the agent's node, one pod each at its own IP (127.3.0.1 onwards), \
         whose credentials the agent held: {} deletions (p50 {}, p99 {}) and {} IP reuses, where \
         the pod was terminating and a new pod with another role was created at its IP (p50 {}, \
         p99 {}). A sample runs from just before the fake API server's commit call to the arrival \
         of the first scrape of the agent's /metrics (polled back to back from a thread of its \
         own) showing kiam_agent_view_invalidations_total moved (the agent counts in the call that \
         drops the entry, just before it swaps in the view's state without it). It is an upper \
         bound, to within that swap; the send time of the scrape \
         before it gives a lower bound (p50 {}, p99 {}); a scrape took p50 {} (max {}). After \
         each change, a GET from the pod's address got: {}. The server fences the agent (Fence, \
         then Ack) before it applies a change. The agent ran with --pod-wait-timeout {POD_WAIT} \
         (only how long a GET for a deleted pod waits before its 404). Baseline: the same events \
         reaching kube's watcher on the fake in the bench process ({} seen). {} s in all.",
        all.len(),
        deletes.len(),
        stats::ms(deletes.percentile(50.0)),
        stats::ms(deletes.percentile(99.0)),
        reuses.len(),
        stats::ms(reuses.percentile(50.0)),
        stats::ms(reuses.percentile(99.0)),
        stats::ms(lower.percentile(50.0)),
        stats::ms(lower.percentile(99.0)),
        stats::ms(round_trips.percentile(50.0)),
        stats::ms(round_trips.max()),
        statuses.join(", "),
        watch.len(),
        took.as_secs(),
    ));
}

/// A client that connects from the pod's address and keeps its connection.
fn pod_client(ip: IpAddr) -> Http {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// One exchange; the status and body.
async fn exchange(client: &Http, method: &str, url: &str, header: (&str, &str)) -> (u16, String) {
    let request = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header(header.0, header.1)
        .body(Empty::new())
        .expect("a valid request");
    let exchange = async {
        let response = client.request(request).await.expect("the agent answers");
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.expect("read the body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(POLL_LIMIT, exchange).await.unwrap_or_else(|_| panic!("{method} {url}: no answer"))
}

async fn token(client: &Http, base: &str) -> String {
    let url = format!("{base}/latest/api/token");
    let (status, token) =
        exchange(client, "PUT", &url, ("x-aws-ec2-metadata-token-ttl-seconds", "21600")).await;
    assert_eq!(status, 200, "token: {token}");
    token
}

/// The pod's credentials, once the agent has the pod in its view and its credentials (bounded).
async fn first_document(client: &Http, url: &str, token: &str) -> String {
    let started = Instant::now();
    loop {
        let (status, body) = exchange(client, "GET", url, ("x-aws-ec2-metadata-token", token)).await;
        if status == 200 && body.contains("\"AccessKeyId\"") {
            return body;
        }
        assert!(started.elapsed() < POLL_LIMIT, "{url}: no credentials ({status} {body})");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Scrapes the agent's `/metrics` back to back until its invalidation counter passes `before`
/// (bounded by [`POLL_LIMIT`]), on a blocking connection in a thread of its own: the times it
/// writes down are not delayed by the bench's async runtime, which also runs the fake API server.
fn poll(metrics: SocketAddr, before: f64) -> Poll {
    let mut stream = blocking_connection(metrics, IpAddr::V4(Ipv4Addr::LOCALHOST));
    let request = "GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n";
    let started = Instant::now();
    let mut poll = Poll { unmoved_sent: None, moved_answered: None, round_trips: Vec::new() };
    while started.elapsed() < POLL_LIMIT {
        let sent = Instant::now();
        stream.write_all(request.as_bytes()).expect("send a scrape to the agent");
        let (status, body) = read_response(&mut stream);
        let answered = Instant::now();
        poll.round_trips.push(answered - sent);
        assert_eq!(status, 200, "agent /metrics: {body}");
        if counter(&body, INVALIDATIONS) > before {
            poll.moved_answered = Some(answered);
            break;
        }
        poll.unmoved_sent = Some(sent);
    }
    poll
}

/// The value of an unlabelled sample in a metrics page (0 when absent).
fn counter(page: &str, name: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The agent's invalidation count once it has stayed the same for 50 ms (bounded).
async fn settled(agent: &deploy::Agent) -> f64 {
    let started = Instant::now();
    let mut last = agent.metric(INVALIDATIONS).await;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = agent.metric(INVALIDATIONS).await;
        if now == last {
            return now;
        }
        assert!(started.elapsed() < POLL_LIMIT, "the agent's invalidations do not settle");
        last = now;
    }
}

/// A blocking TCP connection from `ip` to `agent`, with [`POLL_LIMIT`] as its read timeout.
fn blocking_connection(agent: SocketAddr, ip: IpAddr) -> std::net::TcpStream {
    // std cannot bind before connecting; tokio's socket can, and converts.
    let connect = async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind(SocketAddr::new(ip, 0)).expect("bind the pod's address");
        socket.connect(agent).await.expect("connect to the agent")
    };
    let stream = tokio::runtime::Handle::current().block_on(connect).into_std().expect("a std stream");
    stream.set_nonblocking(false).expect("a blocking stream");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream.set_read_timeout(Some(POLL_LIMIT)).expect("a read timeout");
    stream
}

/// Reads one HTTP/1.1 response with a Content-Length: its status and body.
fn read_response(stream: &mut std::net::TcpStream) -> (u16, String) {
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status line");
            let length: usize = head
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse().ok())?
                })
                .expect("the agent sends a Content-Length");
            while buffer.len() < end + 4 + length {
                let n = stream.read(&mut chunk).expect("read the body");
                assert!(n > 0, "the agent closed the connection mid-answer");
                buffer.extend_from_slice(&chunk[..n]);
            }
            return (status, String::from_utf8_lossy(&buffer[end + 4..end + 4 + length]).into_owned());
        }
        let n = stream.read(&mut chunk).expect("read an answer (within the poll limit)");
        assert!(n > 0, "the agent closed the connection");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// When kube's watcher in this process saw each pod event, by `apply:<name>` or `delete:<name>`.
pub type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// Watches every pod of the fake from this process (the baseline), until the fake stops.
pub fn watch_events(kube: &FakeKube) -> Seen {
    let seen: Seen = Arc::default();
    let api = kube::Api::<Pod>::all(kube.kube_client());
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(Ok(event)) = events.next().await {
            let at = Instant::now();
            let (kind, pod) = match event {
                watcher::Event::Apply(pod) => ("apply", pod),
                watcher::Event::Delete(pod) => ("delete", pod),
                _ => continue,
            };
            let key = format!("{kind}:{}", pod.metadata.name.unwrap_or_default());
            record.lock().unwrap_or_else(PoisonError::into_inner).insert(key, at);
        }
    });
    seen
}

/// When the baseline watch saw the event `key` (waiting at most `limit` for it, and looking at
/// least once), taking it out.
pub async fn event_seen(seen: &Seen, key: &str, limit: Duration) -> Option<Instant> {
    let started = Instant::now();
    loop {
        if let Some(at) = seen.lock().unwrap_or_else(PoisonError::into_inner).remove(key) {
            return Some(at);
        }
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
