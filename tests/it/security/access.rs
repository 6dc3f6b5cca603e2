//! The server's authorization table (`kiam::policy::access`), every cell over real mutual TLS:
//! each RPC of each service the server serves, called by each kind of caller (the agent
//! certificate with and without a token proving its node, a per-node certificate, debug
//! certificates with and without a node, a certificate with an unknown role, no certificate),
//! with node binding off and on, about a pod on the caller's node (node-a) and one elsewhere
//! (node-b). What each call gets must be what the table says; the table itself keeps properties
//! its unit tests check (no credentials to a debug certificate, on any service).

use std::time::Duration;

use futures::StreamExt;
use kiam::pb;
use kiam::pb::debug::debug_client::DebugClient;
use kiam::pb::kiam_service_client::KiamServiceClient;
use kiam::pb::node::node_view_client::NodeViewClient;
use kiam::pb::token::pod_tokens_client::PodTokensClient;
use kiam::policy::access::{Access, Rpc, Scope, Who, access};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};

use crate::support::certs::CertFiles;
use crate::support::fake_kube_auth::TokenIdentity;
use crate::support::objects::{namespace, pod};
use crate::support::stack::{BASE_ARN, Options, Stack, tls_files};

const HERE: &str = "127.0.0.181";
const AWAY: &str = "127.0.0.182";
const AGENT_TOKEN: &str = "agent-token-node-a";
const LIMIT: Duration = Duration::from_secs(10);

/// Each pod's own token (`here`, `away`), signed by the fake API server's key, made once.
fn pod_tokens() -> &'static [String; 2] {
    static TOKENS: std::sync::OnceLock<[String; 2]> = std::sync::OnceLock::new();
    TOKENS.get_or_init(|| {
        [
            TokenIdentity::pod("team-a", "here", "uid-here", "node-a").jwt(),
            TokenIdentity::pod("team-a", "away", "uid-away", "node-b").jwt(),
        ]
    })
}

/// A stack with binding as given, a pod on node-a (`here`, role `app-a`) and one on node-b
/// (`away`, role `app-b`), an agent token proving node-a, and each pod's own token.
async fn stack(binding: bool) -> Stack {
    let stack = Stack::start_with(Options { node_binding: binding, ..Options::default() }).await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "here").ip(HERE).uid("uid-here").role("app-a").node("node-a").build());
    stack.kube.apply(pod("team-a", "away").ip(AWAY).uid("uid-away").role("app-b").node("node-b").build());
    stack.kube.issue_token(AGENT_TOKEN, TokenIdentity::agent_on("node-a"));
    let [here, away] = pod_tokens();
    stack.kube.issue_token(here, TokenIdentity::pod("team-a", "here", "uid-here", "node-a"));
    stack.kube.issue_token(away, TokenIdentity::pod("team-a", "away", "uid-away", "node-b"));
    for ip in [HERE, AWAY] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
    }
    stack
}

/// The certificate (if any) and token (if any) each kind of caller presents.
fn caller(stack: &Stack, who: Who) -> (Option<CertFiles>, Option<&'static str>) {
    let pki = &stack.pki;
    match who {
        Who::Agent => (Some(pki.agent()), None),
        Who::TokenNode => (Some(pki.agent()), Some(AGENT_TOKEN)),
        Who::NodeCert => (Some(pki.agent_for_node("access-node-a", "node-a")), None),
        Who::Debug => (Some(pki.debug("access-debug", None)), None),
        Who::DebugNode => (Some(pki.debug("access-debug-a", Some("node-a"))), None),
        Who::UnknownRole => (Some(pki.client_with_uris("access-admin", &["urn:kiam:role:admin"])), None),
        Who::Anonymous => (None, None),
    }
}

fn channel(stack: &Stack, cert: Option<&CertFiles>) -> Channel {
    let uri = format!("https://127.0.0.1:{}", stack.server_addr.port());
    let endpoint = Endpoint::from_shared(uri).expect("uri").timeout(LIMIT);
    let endpoint = match cert {
        Some(cert) => kiam::tls::client_config(&tls_files(cert), "127.0.0.1")
            .expect("client TLS")
            .apply(endpoint)
            .expect("tls"),
        None => {
            let ca = std::fs::read(&stack.pki.server().ca).expect("CA");
            let tls =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("127.0.0.1");
            endpoint.tls_config(tls).expect("tls")
        }
    };
    endpoint.connect_lazy()
}

fn request<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().expect("header"));
    }
    request
}

/// What one call about each pod (here, away) got.
async fn call(stack: &Stack, rpc: Rpc, who: Who) -> [Result<(), Status>; 2] {
    let (cert, token) = caller(stack, who);
    let channel = channel(stack, cert.as_ref());
    let [here, away] = pod_tokens();
    let pods = [(HERE, "uid-here", "app-a", here.as_str()), (AWAY, "uid-away", "app-b", away.as_str())];
    if rpc == Rpc::ViewWatch {
        // One stream (a node holds few), whose snapshot says which pods it shows.
        let subscribe = pb::node::AgentMessage {
            kind: Some(pb::node::agent_message::Kind::Subscribe(pb::node::Subscribe { node: String::new() })),
        };
        let messages = futures::stream::iter([subscribe]).chain(futures::stream::pending());
        let watched = async {
            let mut stream = NodeViewClient::new(channel).watch(request(messages, token)).await?.into_inner();
            match stream.message().await? {
                Some(pb::node::ViewMessage { kind: Some(pb::node::view_message::Kind::Snapshot(s)) }) => {
                    Ok(s.entries.into_iter().map(|e| e.ip).collect::<Vec<_>>())
                }
                other => Err(Status::internal(format!("not a snapshot: {other:?}"))),
            }
        };
        let shown = tokio::time::timeout(LIMIT, watched).await.expect("answered in time");
        return pods.map(|(ip, ..)| match &shown {
            Ok(ips) if ips.iter().any(|i| i == ip) => Ok(()),
            Ok(_) => Err(Status::permission_denied("not in the view")),
            Err(status) => Err(status.clone()),
        });
    }
    let mut out = Vec::new();
    for (ip, uid, role, pod_token) in pods {
        let channel = channel.clone();
        let one = async {
            match rpc {
                Rpc::GetPodRole => {
                    let message = pb::GetPodRoleRequest { ip: ip.into() };
                    KiamServiceClient::new(channel).get_pod_role(request(message, token)).await.map(drop)
                }
                Rpc::GetPodCredentials => {
                    let message = pb::GetPodCredentialsRequest { ip: ip.into(), role: role.into() };
                    KiamServiceClient::new(channel)
                        .get_pod_credentials(request(message, token))
                        .await
                        .map(drop)
                }
                Rpc::GetHealth => {
                    let message = pb::GetHealthRequest {};
                    KiamServiceClient::new(channel).get_health(request(message, token)).await.map(drop)
                }
                Rpc::ViewCredentials => {
                    let message =
                        pb::node::CredentialsRequest { ip: ip.into(), uid: uid.into(), role: role.into() };
                    NodeViewClient::new(channel).credentials(request(message, token)).await.map(drop)
                }
                Rpc::TokenCredentials => {
                    let message =
                        pb::token::TokenCredentialsRequest { token: pod_token.into(), source: ip.into() };
                    PodTokensClient::new(channel).credentials(request(message, token)).await.map(drop)
                }
                Rpc::CacheState => {
                    let message = pb::debug::CacheStateRequest {
                        role_arn: format!("{BASE_ARN}{role}"),
                        session_name: "kiam-kiam".into(),
                        ..Default::default()
                    };
                    DebugClient::new(channel).cache_state(request(message, token)).await.map(drop)
                }
                Rpc::ViewWatch => unreachable!("answered above"),
            }
        };
        out.push(tokio::time::timeout(LIMIT, one).await.expect("answered in time"));
    }
    let away = out.pop().expect("away");
    let here = out.pop().expect("here");
    [here, away]
}

/// Whether `got` is what `want` says, for the pod on the caller's node and the one elsewhere.
fn check(rpc: Rpc, want: Access, got: &[Result<(), Status>; 2]) -> Result<(), String> {
    let refused = |r: &Result<(), Status>| match r {
        Err(s) => matches!(s.code(), Code::PermissionDenied | Code::Unauthenticated),
        Ok(()) => false,
    };
    // The other node's pod token may also meet the per-pod TokenReview budget first: refused all
    // the same.
    let budgeted = |r: &Result<(), Status>| {
        rpc == Rpc::TokenCredentials && r.as_ref().is_err_and(|s| s.code() == Code::ResourceExhausted)
    };
    let [here, away] = got;
    let fits = match want {
        Access::Pods(Scope::Cluster) | Access::CacheState(Scope::Cluster) => here.is_ok() && away.is_ok(),
        Access::Pods(Scope::OwnNode) | Access::CacheState(Scope::OwnNode) => {
            here.is_ok() && (refused(away) || budgeted(away))
        }
        Access::Health => here.is_ok() && away.is_ok(),
        // No client certificate: the handshake itself fails, before any RPC.
        Access::Refused(kiam::policy::access::Refusal::Anonymous) => here.is_err() && away.is_err(),
        Access::Refused(_) => refused(here) && refused(away),
    };
    if fits { Ok(()) } else { Err(format!("want {want:?}, got {got:?}")) }
}

async fn every_cell(binding: bool) {
    let stack = stack(binding).await;
    let mut wrong = Vec::new();
    for rpc in Rpc::ALL {
        for who in Who::ALL {
            let got = call(&stack, rpc, who).await;
            if let Err(e) = check(rpc, access(rpc, binding, who), &got) {
                wrong.push(format!("{rpc:?} × {who:?} (binding {binding}): {e}"));
            }
        }
    }
    assert!(wrong.is_empty(), "cells the server does not keep:\n{}", wrong.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_of_the_authorization_table_binding_off() {
    every_cell(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cell_of_the_authorization_table_binding_on() {
    every_cell(true).await;
}

/// The hole the table closed: a debug certificate got a pod's credentials from `PodTokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_certificate_gets_no_credentials_from_pod_tokens() {
    let stack = stack(false).await;
    for who in [Who::Debug, Who::DebugNode] {
        let [here, _] = call(&stack, Rpc::TokenCredentials, who).await;
        let refused = here.expect_err("refused");
        assert_eq!(refused.code(), Code::PermissionDenied, "{who:?}: {refused:?}");
    }
}
