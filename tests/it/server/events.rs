//! Kubernetes Events on pods, as kiam records them, and rate-limited.

use std::time::Duration;

use kiam::pb;
use serde_json::Value;

use crate::support::objects::{namespace, pod};
use crate::support::stack::Stack;
use crate::support::wait::eventually;

fn creds(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

async fn wait_for_event(stack: &Stack, reason: &str, pod: &str) -> Value {
    let found = || {
        let events = stack.kube.events();
        async move { events.into_iter().find(|e| e["reason"] == reason && e["regarding"]["name"] == pod) }
    };
    eventually(&format!("{reason} on {pod}"), Duration::from_secs(10), found).await
}

#[tokio::test]
async fn denials_and_sts_failures_become_warning_events_on_the_pod() {
    let mut stack = Stack::start().await;
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("locked", "blocked").ip("10.64.0.1").role("app").build());
    stack.wait_for_pod("10.64.0.1".parse().expect("ip")).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    for _ in 0..5 {
        grpc.get_pod_credentials(creds("10.64.0.1", "app")).await.expect_err("forbidden");
    }
    let event = wait_for_event(&stack, "KiamRoleForbidden", "blocked").await;
    assert_eq!(event["type"], "Warning");
    assert_eq!(event["reportingController"], "kiam.server");
    assert_eq!(event["regarding"]["kind"], "Pod");
    assert_eq!(event["regarding"]["namespace"], "locked");
    let note = event["note"].as_str().expect("note");
    assert!(note.starts_with("failed assuming role \"app\": namespace policy expression"), "{note}");

    stack.moto.stop();
    stack.kube.apply(pod("team-a", "unlucky").ip("10.64.0.2").role("app").build());
    grpc.get_pod_credentials(creds("10.64.0.2", "app")).await.expect_err("STS is down");
    let event = wait_for_event(&stack, "KiamCredentialError", "unlucky").await;
    assert!(event["note"].as_str().expect("note").starts_with("failed retrieving credentials: "), "{event}");

    // Five denials of a crash-looping pod made one event, not five.
    let forbidden: Vec<Value> =
        stack.kube.events().into_iter().filter(|e| e["reason"] == "KiamRoleForbidden").collect();
    assert_eq!(forbidden.len(), 1, "{forbidden:?}");
    let count = forbidden[0]["series"]["count"].as_u64().unwrap_or(1);
    assert_eq!(count, 1, "rate-limited before it reached the API server");
}

/// kiam v4 matches `permitted` against the full ARN: an expression written for role names (the
/// kiam install guides' `k8s-production-.*`) denies everything, and the Event says what to write.
#[tokio::test]
async fn a_role_name_expression_is_named_in_the_denial_event_with_the_arn_form() {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("production").permitted("k8s-production-.*").build());
    stack.kube.apply(pod("production", "web").ip("10.64.0.3").role("k8s-production-web").build());
    stack.wait_for_pod("10.64.0.3".parse().expect("ip")).await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    grpc.get_pod_credentials(creds("10.64.0.3", "k8s-production-web")).await.expect_err("forbidden");
    let event = wait_for_event(&stack, "KiamRoleForbidden", "web").await;
    let note = event["note"].as_str().expect("note");
    assert!(note.contains("namespace policy expression 'k8s-production-.*' forbids role"), "{note}");
    assert!(note.contains("it can only match role names"), "{note}");
    assert!(note.ends_with("write 'arn:aws:iam::123456789012:role/k8s-production-.*'"), "{note}");
}

/// An expression that only compiles inside the server's anchoring group (it closes the group
/// and opens another) would permit every ARN; it is refused, with an Event saying why.
#[tokio::test]
async fn an_expression_that_escapes_its_anchoring_is_refused_with_an_event() {
    let stack = Stack::start().await;
    let escape = "arn:aws:iam::123456789012:role/team-a-.*)|(.*";
    stack.kube.apply(namespace("team-a").permitted(escape).build());
    stack.kube.apply(pod("team-a", "sly").ip("10.64.1.1").role("admin").build());
    let mut grpc = stack.client(&stack.pki.agent()).service();
    let status = grpc.get_pod_credentials(creds("10.64.1.1", "admin")).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    let event = wait_for_event(&stack, "KiamRoleForbidden", "sly").await;
    let note = event["note"].as_str().expect("note");
    assert!(note.contains("does not compile on its own"), "{note}");
}
