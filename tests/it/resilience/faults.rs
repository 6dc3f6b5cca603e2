//! Fault injection against a whole stack: the API server down and back, a watch that stalls
//! without closing, and STS answering 5xx, throttling, or not at all (held longer than any
//! caller waits). Each outage is made observable by a condition (the watcher has failed, the
//! call is held), not by wall-clock time, so every test takes seconds.

use std::net::IpAddr;
use std::time::Duration;

use kiam::pb;
use tonic::Code;

use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};
use crate::support::sts_faults::{Fault, StsFaults};
use crate::support::wait::until;

const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn creds(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

/// A credentials request that gives up after `deadline`.
fn creds_within(ip: &str, role: &str, deadline: Duration) -> tonic::Request<pb::GetPodCredentialsRequest> {
    let mut request = tonic::Request::new(creds(ip, role));
    request.set_timeout(deadline);
    request
}

fn sts_errors(stack: &Stack, code: &str) -> u64 {
    let text = stack.core.metrics().encode();
    let prefix = format!("kiam_sts_errors_total{{code=\"{code}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Watch requests for pods so far.
fn pod_watches(stack: &Stack) -> usize {
    stack.kube.requests().iter().filter(|r| r.starts_with("GET /api/v1/pods") && r.contains("watch=")).count()
}

/// The API server goes down (a 60 s outage in production; here until the watcher has been
/// refused three times, which is all the server can notice of any outage) and comes back: known pods keep
/// their credentials throughout, a pod created during the outage waits and is then served. The
/// refusals show in `kiam_k8s_watch_restarts_total` (kube's client no longer retries them out of
/// sight).
#[tokio::test]
async fn the_api_server_down_and_back() {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "known").ip("10.80.0.1").role("app").build());
    stack.wait_for_pod(ip("10.80.0.1")).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    grpc.get_pod_credentials(creds("10.80.0.1", "app")).await.expect("served before");

    let watches = pod_watches(&stack);
    stack.kube.set_down(true);
    let refused = || std::future::ready(pod_watches(&stack) >= watches + 3);
    until("the watcher has been refused three times", Duration::from_secs(20), refused).await;
    let errors = || stack.core.cluster().watch_stats().pod_watch_errors;
    until("the refusals are counted as watch restarts", Duration::from_secs(20), || {
        std::future::ready(errors() >= 1)
    })
    .await;
    grpc.get_pod_credentials(creds("10.80.0.1", "app"))
        .await
        .expect("a known pod is served during the outage");
    stack.kube.apply(pod("team-a", "new").ip("10.80.0.2").role("app").build());
    let unseen = grpc.get_pod_credentials(creds("10.80.0.2", "app")).await.expect_err("not seen yet");
    assert_eq!(unseen.code(), Code::NotFound, "{unseen:?}");

    stack.kube.set_down(false);
    let served = || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds("10.80.0.2", "app")).await.is_ok() }
    };
    until("the new pod is served once the API server is back", Duration::from_secs(40), served).await;
    grpc.get_pod_credentials(creds("10.80.0.1", "app")).await.expect("and the known one still");
}

/// A watch that stops sending without closing: the server gives up on it after its timeout
/// (here 1 s) plus 5 s and watches again, so a new pod is found without anybody noticing the
/// stall. With the API server's default timeout this took five minutes.
#[tokio::test]
async fn a_watch_that_stalls_without_closing_is_replaced() {
    let options = Options { watch_timeout: Duration::from_secs(1), ..Options::default() };
    let stack = Stack::start_with(options).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "before").ip("10.81.0.1").role("app").build());
    stack.wait_for_pod(ip("10.81.0.1")).await;

    stack.kube.stall_watches();
    let watches_before = pod_watches(&stack);
    stack.kube.apply(pod("team-a", "during").ip("10.81.0.2").role("app").build());
    let found = || {
        std::future::ready(matches!(
            stack.core.cluster().pod_by_ip(ip("10.81.0.2")),
            kiam::cluster::Lookup::Found(_)
        ))
    };
    until("a pod created during the stall is found", Duration::from_secs(20), found).await;
    assert!(pod_watches(&stack) > watches_before, "by a new watch");
    let mut grpc = stack.client(&stack.pki.agent()).service();
    grpc.get_pod_credentials(creds("10.81.0.2", "app")).await.expect("served");
}

async fn faulty_stack() -> (Stack, StsFaults) {
    let faults = StsFaults::start().await;
    let stack =
        Stack::start_with(Options { sts_endpoint: Some(faults.endpoint()), ..Options::default() }).await;
    faults.forward_to(stack.moto.addr());
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    (stack, faults)
}

/// STS answers 500: the caller gets an error promptly (a pod, a short text and a request ID,
/// nothing of STS's), the failure is counted by code, and once STS recovers the pod is served.
#[tokio::test]
async fn sts_answering_5xx_fails_the_call_and_recovers() {
    let (stack, faults) = faulty_stack().await;
    faults.set(Fault::Status(500, "InternalFailure"));
    stack.kube.apply(pod("team-a", "web").ip("127.0.0.81").role("app").build());
    stack.wait_for_pod(ip("127.0.0.81")).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    let status = grpc.get_pod_credentials(creds("127.0.0.81", "app")).await.expect_err("STS fails");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(sts_errors(&stack, "InternalFailure") > 0);
    let url = format!("{}{CREDS}app", stack.agent_url(ip("127.0.0.1")));
    let pod_view = request("GET", &url, &[], "", Some(ip("127.0.0.81"))).await.expect("the agent answers");
    assert_eq!(pod_view.status, 500);
    assert!(
        !pod_view.body.contains("InternalFailure") && pod_view.body.contains("request id"),
        "{}",
        pod_view.body
    );

    faults.set(Fault::None);
    let served = || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds("127.0.0.81", "app")).await.is_ok() }
    };
    until("served once STS recovers", Duration::from_secs(30), served).await;
}

/// STS throttles: the caller is told to slow down (ResourceExhausted), the code is counted,
/// and the server gets its credentials once STS lets it.
#[tokio::test]
async fn sts_throttling_is_reported_and_outlasted() {
    let (stack, faults) = faulty_stack().await;
    faults.set(Fault::Status(400, "Throttling"));
    stack.kube.apply(pod("team-a", "busy").ip("10.82.0.1").role("app").build());
    stack.wait_for_pod(ip("10.82.0.1")).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    let status = grpc.get_pod_credentials(creds("10.82.0.1", "app")).await.expect_err("throttled");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(sts_errors(&stack, "Throttling") > 0);
    faults.set(Fault::None);
    let served = || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds("10.82.0.1", "app")).await.is_ok() }
    };
    until("served once STS stops throttling", Duration::from_secs(30), served).await;
}

/// STS takes longer than any caller waits (10 s in production; here held until released):
/// every caller gets its answer by its own deadline, concurrent callers share one STS call, and
/// once STS answers the credentials are served.
#[tokio::test]
async fn sts_slower_than_the_callers_deadline() {
    let (stack, faults) = faulty_stack().await;
    faults.set(Fault::Hold);
    stack.kube.apply(pod("team-a", "patient").ip("10.83.0.1").role("app").build());
    stack.wait_for_pod(ip("10.83.0.1")).await;
    until("the prefetch is held", Duration::from_secs(10), || std::future::ready(faults.held() == 1)).await;
    let grpc = stack.client(&stack.pki.agent()).service();
    let started = tokio::time::Instant::now();
    let callers = (0..3).map(|_| {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds_within("10.83.0.1", "app", Duration::from_secs(1))).await }
    });
    for answer in futures::future::join_all(callers).await {
        let status = answer.expect_err("STS has not answered");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled | Code::Unavailable),
            "{status:?}"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(5), "bounded by the deadline: {:?}", started.elapsed());
    assert_eq!(faults.held(), 1, "one STS call for every caller");

    faults.set(Fault::None);
    let mut grpc = grpc.clone();
    let served = || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_credentials(creds("10.83.0.1", "app")).await.is_ok() }
    };
    until("served once STS answers", Duration::from_secs(30), served).await;
    grpc.get_pod_credentials(creds("10.83.0.1", "app")).await.expect("and again, from the cache");
}
