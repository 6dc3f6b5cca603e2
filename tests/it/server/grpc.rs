//! The server's gRPC face: kiam's status messages (which kiam agents match) with real codes,
//! credentials as the proto carries them, and mutual TLS that refuses strangers.

use kiam::pb;
use tonic::Code;

use crate::support::objects::{namespace, pod};
use crate::support::stack::{Stack, tls_files};

async fn cluster() -> Stack {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(namespace("locked").build());
    stack.kube.apply(pod("team-a", "good").ip("10.9.0.1").role("app").build());
    stack.kube.apply(pod("locked", "locked").ip("10.9.0.2").role("app").build());
    stack.wait_for_pod("10.9.0.1".parse().expect("ip")).await;
    stack.wait_for_pod("10.9.0.2".parse().expect("ip")).await;
    stack
}

fn creds_request(ip: &str, role: &str) -> pb::GetPodCredentialsRequest {
    pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() }
}

#[tokio::test]
async fn statuses_keep_kiams_messages_with_real_codes() {
    let stack = cluster().await;
    let mut grpc = stack.client(&stack.pki.agent()).service();

    let ok = grpc.get_pod_credentials(creds_request("10.9.0.1", "app")).await.expect("allowed").into_inner();
    assert_eq!((ok.code.as_str(), ok.r#type.as_str()), ("Success", "AWS-HMAC"));
    assert!(ok.access_key_id.starts_with("ASIA") && !ok.secret_access_key.is_empty() && !ok.token.is_empty());
    assert!(kiam::creds::time::parse(&ok.expiration).is_some(), "{}", ok.expiration);

    let role = grpc.get_pod_role(pb::GetPodRoleRequest { ip: "10.9.0.1".into() }).await.expect("role");
    assert_eq!(role.into_inner().name, "app");

    let cases = [
        (creds_request("10.9.0.2", "app"), Code::PermissionDenied, "forbidden by policy"),
        (creds_request("10.9.0.1", "admin"), Code::PermissionDenied, "forbidden by policy"),
        (creds_request("10.9.0.3", "app"), Code::NotFound, "no pod found"),
        (creds_request("not-an-ip", "app"), Code::InvalidArgument, "invalid pod IP"),
    ];
    for (request, code, message) in cases {
        let label = format!("{request:?}");
        let status = grpc.get_pod_credentials(request).await.expect_err(&label);
        assert_eq!(status.code(), code, "{label}");
        assert!(status.message().starts_with(message), "{label}: {}", status.message());
    }
    // kiam agents match these two messages exactly.
    let denied = grpc.get_pod_credentials(creds_request("10.9.0.2", "app")).await.expect_err("denied");
    assert_eq!(denied.message(), "forbidden by policy");
    let missing = grpc.get_pod_role(pb::GetPodRoleRequest { ip: "10.9.0.3".into() }).await.expect_err("none");
    assert_eq!((missing.code(), missing.message()), (Code::NotFound, "pod not found"));
    let health = grpc.get_health(pb::GetHealthRequest {}).await.expect("health").into_inner();
    assert_eq!(health.message, "ok");
}

#[tokio::test]
async fn concurrent_requests_for_one_identity_make_one_sts_call() {
    let stack = Stack::start().await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "good").ip("10.9.0.1").role("app").build());
    // The requests race the prefetch of the same identity: all of them share one call.
    let client = stack.client(&stack.pki.agent());
    let calls = (0..20).map(|_| {
        let mut grpc = client.service();
        async move { grpc.get_pod_credentials(creds_request("10.9.0.1", "app")).await }
    });
    let keys: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("credentials").into_inner().access_key_id)
        .collect();
    assert!(keys.windows(2).all(|w| w[0] == w[1]), "all callers share one set: {keys:?}");
    let recorded = stack.moto.recorded_assume_roles().await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].role_arn, "arn:aws:iam::123456789012:role/app");
    assert_eq!(recorded[0].session_name, "kiam-kiam");
    assert_eq!(recorded[0].duration_seconds, Some(3600));
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_ca_are_served() {
    let stack = cluster().await;
    assert_eq!(stack.client(&stack.pki.agent()).get_health().await.expect("agent cert"), "ok");
    let stranger = stack.client(&stack.pki.stranger()).get_health().await;
    assert!(stranger.is_err(), "a certificate from another CA is refused: {stranger:?}");

    // No client certificate at all.
    let files = tls_files(&stack.pki.agent());
    let ca = std::fs::read(&files.ca).expect("ca");
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
        .domain_name("127.0.0.1");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("https://127.0.0.1:{}", stack.server_addr.port()))
            .expect("uri")
            .tls_config(tls)
            .expect("tls")
            .connect_lazy();
    let mut anonymous = pb::kiam_service_client::KiamServiceClient::new(channel);
    let refused = anonymous.get_pod_credentials(creds_request("10.9.0.1", "app")).await;
    assert!(refused.is_err(), "no client certificate, no credentials: {refused:?}");
}

/// Anything that reaches the server's port can open connections before proving anything: one
/// address may hold at most 16 handshakes in progress, more are closed at once, and agents
/// elsewhere are served meanwhile.
#[tokio::test]
async fn one_address_cannot_hold_every_handshake() {
    let stack = cluster().await;
    let from: std::net::IpAddr = "127.0.0.5".parse().expect("ip");
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(crate::support::raw_http::connect(from, stack.server_addr).await);
    }
    let mut extra = crate::support::raw_http::connect(from, stack.server_addr).await;
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut extra, &mut byte),
    )
    .await
    .expect("closed at once, not after the 10 s handshake timeout");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    let mut grpc = stack.client(&stack.pki.agent()).service();
    grpc.get_pod_credentials(creds_request("10.9.0.1", "app")).await.expect("agents are served");
}
