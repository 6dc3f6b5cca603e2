//! Which pod the caller really is: IP reuse, terminating and hostNetwork pods, two live pods on
//! one IP, pods created just before their first request, and service through a broken watch.

use std::net::IpAddr;
use std::time::Duration;

use kiam::pb;
use tonic::Code;

use crate::support::objects::{namespace, pod};
use crate::support::stack::Stack;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn creds(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

fn role_of(ip: &str) -> pb::GetPodRoleRequest {
    pb::GetPodRoleRequest { ip: ip.into() }
}

async fn stack() -> Stack {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack
}

/// Waits (bounded) until `check` holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let check = move || std::future::ready(check());
    crate::support::wait::until(what, Duration::from_secs(10), check).await;
}

#[tokio::test]
async fn a_pod_created_just_before_its_request_is_answered() {
    let stack = stack().await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    // No wait for the watch: the server waits for the pod within the call's deadline.
    stack.kube.apply(pod("team-a", "fresh").ip("10.60.0.1").role("app").build());
    let answer = grpc.get_pod_credentials(creds("10.60.0.1", "app")).await.expect("no 'pod not found' race");
    assert!(answer.into_inner().access_key_id.starts_with("ASIA"));
    stack.kube.apply(pod("team-a", "fresher").ip("10.60.0.2").role("app").build());
    let role = grpc.get_pod_role(role_of("10.60.0.2")).await.expect("role, too");
    assert_eq!(role.into_inner().name, "app");
    // A pod in a namespace created a moment earlier: the namespace watch may lag the pod watch.
    stack.kube.apply(namespace("brand-new").permitted(".*").build());
    stack.kube.apply(pod("brand-new", "first").ip("10.60.0.3").role("app").build());
    grpc.get_pod_credentials(creds("10.60.0.3", "app")).await.expect("not denied for a namespace in flight");
}

#[tokio::test]
async fn a_reused_ip_belongs_to_the_new_pod_only() {
    let stack = stack().await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    stack.kube.apply(pod("team-a", "old").ip("10.61.0.1").role("old-role").terminating().build());
    stack.wait_for_pod(ip("10.61.0.1")).await;
    // Terminating, and nobody else has the IP: it keeps its credentials.
    grpc.get_pod_credentials(creds("10.61.0.1", "old-role")).await.expect("terminating pod still served");

    stack.kube.apply(pod("team-a", "new").ip("10.61.0.1").role("new-role").build());
    crate::support::wait::until("the new pod owns the IP", Duration::from_secs(10), || {
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_role(role_of("10.61.0.1")).await.expect("role").into_inner().name == "new-role" }
    })
    .await;
    let old = grpc.get_pod_credentials(creds("10.61.0.1", "old-role")).await.expect_err("old role");
    assert_eq!(old.code(), Code::PermissionDenied);
    grpc.get_pod_credentials(creds("10.61.0.1", "new-role")).await.expect("new pod served");

    // A finished pod never matches; a hostNetwork pod never matches.
    stack.kube.apply(pod("team-a", "done").ip("10.61.0.2").role("app").phase("Succeeded").build());
    stack.kube.apply(pod("team-a", "host").ip("10.61.0.3").role("app").host_network(true).build());
    stack.kube.apply(pod("team-a", "marker").ip("10.61.0.4").role("app").build());
    stack.wait_for_pod(ip("10.61.0.4")).await; // everything applied before it has been seen too
    for address in ["10.61.0.2", "10.61.0.3"] {
        let status = grpc.get_pod_credentials(creds(address, "app")).await.expect_err(address);
        assert_eq!((status.code(), status.message()), (Code::NotFound, "no pod found"), "{address}");
    }
}

/// The IP of a terminating pod may already belong to a new pod the watch has not delivered:
/// the server waits a moment for it before answering with the terminating pod.
#[tokio::test]
async fn a_request_for_a_terminating_pods_ip_waits_for_a_new_owner() {
    let stack = stack().await;
    let grpc = stack.client(&stack.pki.agent()).service();
    stack.kube.apply(pod("team-a", "leaving").ip("10.61.1.1").role("old-role").terminating().build());
    stack.kube.apply(pod("team-a", "marker").ip("10.61.1.9").role("app").build());
    stack.wait_for_pod(ip("10.61.1.9")).await;
    let waits = stack.core.metrics().server.pod_waits.get();
    let asking = tokio::spawn({
        let mut grpc = grpc.clone();
        async move { grpc.get_pod_role(role_of("10.61.1.1")).await }
    });
    eventually("the request waits", || stack.core.metrics().server.pod_waits.get() > waits).await;
    stack.kube.apply(pod("team-a", "arriving").ip("10.61.1.1").role("new-role").build());
    let role = asking.await.expect("task").expect("answered");
    assert_eq!(role.into_inner().name, "new-role", "the new pod, never the terminating one's role");
}

#[tokio::test]
async fn two_live_pods_on_one_ip_are_refused_with_an_event() {
    let stack = stack().await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    stack.kube.apply(pod("team-a", "one").ip("10.62.0.1").role("app").build());
    stack.kube.apply(pod("team-a", "two").ip("10.62.0.1").role("app").build());
    stack.kube.apply(pod("team-a", "marker").ip("10.62.0.9").role("app").build());
    stack.wait_for_pod(ip("10.62.0.9")).await;
    let status = grpc.get_pod_credentials(creds("10.62.0.1", "app")).await.expect_err("ambiguous");
    assert_eq!((status.code(), status.message()), (Code::FailedPrecondition, "multiple running pods found"));
    assert_eq!(stack.core.ambiguous_lookups(), 1);
    eventually("an event on each pod", || {
        let events = stack.kube.events();
        ["one", "two"].iter().all(|name| {
            events.iter().any(|e| e["reason"] == "KiamAmbiguousIP" && e["regarding"]["name"] == *name)
        })
    })
    .await;
}

#[tokio::test]
async fn a_broken_watch_and_410_gone_do_not_interrupt_service() {
    let stack = stack().await;
    let mut grpc = stack.client(&stack.pki.agent()).service();
    stack.kube.apply(pod("team-a", "steady").ip("10.63.0.1").role("app").build());
    stack.wait_for_pod(ip("10.63.0.1")).await;
    let lists_before = pod_lists(&stack);
    // Drop every watch and compact: the watcher's next watch gets 410 Gone and relists.
    stack.kube.compact();
    grpc.get_pod_credentials(creds("10.63.0.1", "app")).await.expect("served while the watch recovers");
    stack.kube.apply(pod("team-a", "after").ip("10.63.0.2").role("app").build());
    stack.wait_for_pod(ip("10.63.0.2")).await;
    eventually("a relist of pods", || pod_lists(&stack) > lists_before).await;
    grpc.get_pod_credentials(creds("10.63.0.1", "app")).await.expect("the relist kept the index whole");
    grpc.get_pod_credentials(creds("10.63.0.2", "app")).await.expect("and added the new pod");
}

/// How many times the server listed (not watched) pods.
fn pod_lists(stack: &Stack) -> usize {
    stack
        .kube
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v1/pods") && !r.contains("watch="))
        .count()
}
