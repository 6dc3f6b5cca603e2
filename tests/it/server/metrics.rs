//! Metrics under kiam's names: after a scripted scenario (hits, a denial, a pod without a role,
//! an STS error), the agent's and the server's `/metrics` show exactly the expected movements.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::http::request;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{Options, Stack};

/// Scrapes `/metrics` over HTTP and parses `name{labels} value` lines.
async fn scrape(url: &str) -> HashMap<String, f64> {
    let text = request("GET", url, &[], "", None).await.expect("metrics answer").body;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?))))
        .collect()
}

async fn serve(metrics: Arc<kiam::metrics::Metrics>, stop: &CancellationToken) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/metrics", listener.local_addr().expect("addr"));
    tokio::spawn(kiam::metrics::serve(listener, metrics, stop.clone()));
    url
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scripted_scenario_moves_exactly_the_expected_counters() {
    // A budget long enough for the STS failure (with the SDK's own retries) to come back as an
    // error rather than as a timeout.
    let mut stack =
        Stack::start_with(Options { pod_wait: Duration::from_secs(5), ..Options::default() }).await;
    let stop = CancellationToken::new();
    let agent_url = serve(Arc::clone(&stack.agent_metrics), &stop).await;
    let server_url = serve(Arc::clone(stack.core.metrics()), &stop).await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(pod("team-a", "good").ip("127.0.0.81").role("app").build());
    stack.kube.apply(pod("locked", "locked").ip("127.0.0.82").role("app").build());
    stack.kube.apply(pod("team-a", "norole").ip("127.0.0.83").build());
    for ip in ["127.0.0.81", "127.0.0.82", "127.0.0.83"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
    }
    // "app" is in the cache (prefetched, or fetched by this call) before the counting starts.
    use kiam::agent::Backend;
    stack
        .client(&stack.pki.agent())
        .pod_credentials("127.0.0.81".parse().expect("ip"), "app", 0)
        .await
        .expect("warm");
    let (agent0, server0) = (scrape(&agent_url).await, scrape(&server_url).await);

    let base = format!(
        "{}/latest/meta-data/iam/security-credentials/",
        stack.agent_url(IpAddr::from([127, 0, 0, 1]))
    );
    let get = |path: String, from: &'static str| async move {
        request("GET", &path, &[], "", Some(from.parse().expect("ip"))).await.expect("agent answers").status
    };
    assert_eq!(get(format!("{base}app"), "127.0.0.81").await, 200);
    assert_eq!(get(format!("{base}app"), "127.0.0.81").await, 200);
    assert_eq!(get(format!("{base}app"), "127.0.0.82").await, 403);
    assert_eq!(get(base.clone(), "127.0.0.83").await, 404);
    // An STS error: STS goes away, and a pod with an identity never fetched asks.
    stack.moto.stop();
    stack.kube.apply(pod("team-a", "unlucky").ip("127.0.0.84").role("other").build());
    // The pod's prefetch fails first, so the request that follows finds the identity backing off
    // and makes no STS call of its own: the counts below cannot race.
    let errors = &stack.core.metrics().server.issuing_errors;
    let failed = || std::future::ready(errors.get() >= 1);
    crate::support::wait::until("the prefetch of \"other\" fails", Duration::from_secs(10), failed).await;
    assert_eq!(get(format!("{base}other"), "127.0.0.84").await, 500);

    let server1 = scrape(&server_url).await;
    let agent1 = scrape(&agent_url).await;
    let a = |key: &str| delta(&agent0, &agent1, key);
    let s = |key: &str| delta(&server0, &server1, key);

    assert_eq!(a(r#"kiam_metadata_responses_total{handler="credentials",code="200"}"#), 2.0);
    assert_eq!(a(r#"kiam_metadata_responses_total{handler="credentials",code="403"}"#), 1.0);
    assert_eq!(a(r#"kiam_metadata_responses_total{handler="credentials",code="500"}"#), 1.0);
    assert_eq!(a(r#"kiam_metadata_responses_total{handler="roleName",code="404"}"#), 1.0);
    assert_eq!(a(r#"kiam_metadata_success_total{handler="credentials"}"#), 2.0);
    assert_eq!(a(r#"kiam_metadata_empty_role_total{handler="roleName"}"#), 1.0);
    assert_eq!(a(r#"kiam_metadata_credential_fetch_errors_total{handler="credentials"}"#), 2.0);
    assert_eq!(a(r#"kiam_metadata_find_role_errors_total{handler="credentials"}"#), 0.0);
    let ok = r#"grpc_client_handled_total{grpc_type="unary",grpc_service="kiam.KiamService",grpc_method="GetPodCredentials",grpc_code="OK"}"#;
    assert_eq!(a(ok), 2.0);

    assert_eq!(s("kiam_sts_cache_hit_total"), 2.0, "two hits on the prefetched identity");
    assert_eq!(s("kiam_sts_cache_miss_total"), 2.0, "the failing identity: its prefetch and the request");
    assert_eq!(
        s("kiam_sts_issuing_errors_total"),
        1.0,
        "one STS call failed (the prefetch); the request found the back-off"
    );
    let handled = |code: &str| {
        format!(
            r#"grpc_server_handled_total{{grpc_type="unary",grpc_service="kiam.KiamService",grpc_method="GetPodCredentials",grpc_code="{code}"}}"#
        )
    };
    assert_eq!(s(&handled("OK")), 2.0);
    assert_eq!(s(&handled("PermissionDenied")), 1.0);
    assert_eq!(s(&handled("Internal")), 1.0);
    assert_eq!(server1.get("kiam_sts_cacheSize"), Some(&2.0));
    assert_eq!(server1.get(r#"kiam_k8s_cache_synced{kind="pods"}"#), Some(&1.0));
    assert!(server1.keys().any(|k| k.starts_with("kiam_sts_errors_total{code=")), "STS errors by code");
    assert!(server1.get("process_resident_memory_bytes").is_some_and(|v| *v > 0.0));
    stop.cancel();
}
