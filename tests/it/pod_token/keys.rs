//! Pods' tokens are verified on the server against the cluster's published signing keys (issuer
//! discovery and `/openid/v1/jwks` on the fake API server, which signs its tokens with its own
//! key), not with one TokenReview per request: a pod spraying forged tokens (fresh pod UIDs, its
//! neighbour's UID, another key, a key id the cluster does not publish) makes no API call and
//! spends nobody's budget, and its neighbour is served throughout. Every claim is checked
//! locally. TokenReview is only the fallback while the keys cannot be had, budgeted per node and
//! source address.

use std::net::IpAddr;
use std::time::Duration;

use crate::pod_token::endpoint::setup;
use crate::support::agent_node::TestAgent;
use crate::support::fake_kube_auth::{Signer, TokenIdentity};
use crate::support::http::request;
use crate::support::stack::Stack;
use crate::support::wait::until;

/// `web`'s address in [`setup`]: its requests come from there.
const WEB_IP: &str = "127.0.0.1";
/// An address no pod has: the sprayer's.
const SPRAYER: &str = "127.0.0.195";

fn web() -> TokenIdentity {
    TokenIdentity::pod("team-a", "web", "uid-web", "node-a")
}

async fn get_from(agent: &TestAgent, from: &str, token: &str) -> u16 {
    let url = format!("{}/v1/credentials", agent.url());
    let from: IpAddr = from.parse().expect("an address");
    let r = request("GET", &url, &[("authorization", token)], "", Some(from)).await.expect("an answer");
    r.status
}

fn count(stack: &Stack, what: &str) -> usize {
    stack.kube.requests().iter().filter(|r| r.contains(what)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_of_forged_tokens_makes_no_api_call_and_the_neighbour_is_served_throughout() {
    let (stack, agent) = setup().await;
    let real = web().jwt();
    assert_eq!(get_from(&agent, WEB_IP, &real).await, 200, "the neighbour, before");
    let keys_before = count(&stack, "/openid/v1/jwks");
    assert!(keys_before >= 1, "the keys were read");
    // 200 forged tokens from one pod, four kinds in turn, each with a fresh pod UID or the
    // neighbour's, with the neighbour's real token in between.
    for i in 0..200 {
        let uid = if i % 2 == 0 { format!("uid-fresh-{i}") } else { "uid-web".to_string() };
        let signer = if i % 4 < 2 { Signer::Forger } else { Signer::UnknownKid };
        let forged = TokenIdentity { pod_uid: uid, signer, ..web() }.jwt();
        assert_eq!(get_from(&agent, SPRAYER, &forged).await, 401, "forged token {i}");
        if i % 20 == 0 {
            assert_eq!(get_from(&agent, WEB_IP, &real).await, 200, "the neighbour, during ({i})");
        }
    }
    assert_eq!(get_from(&agent, WEB_IP, &real).await, 200, "the neighbour, after");
    assert_eq!(count(&stack, "tokenreviews"), 0, "no TokenReview at all");
    // An unknown key id may refresh the keys, at most once per 10 s.
    assert!(count(&stack, "/openid/v1/jwks") <= keys_before + 1, "{:?}", stack.kube.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_claim_is_checked_locally() {
    let (stack, agent) = setup().await;
    let cases = [
        ("signed by another key", TokenIdentity { signer: Signer::Forger, ..web() }),
        ("a key id the cluster does not publish", TokenIdentity { signer: Signer::UnknownKid, ..web() }),
        ("expired", TokenIdentity { expired: true, ..web() }),
        ("wrong audience", TokenIdentity { audiences: vec!["vault".into()], ..web() }),
        ("wrong issuer", TokenIdentity { issuer: "https://evil.example".into(), ..web() }),
        ("nbf in the future", TokenIdentity { not_before: 3600, ..web() }),
        ("not pod-bound", TokenIdentity { pod_uid: String::new(), ..web() }),
        ("an earlier pod of the name", TokenIdentity::pod("team-a", "web", "uid-old", "node-a")),
    ];
    for (case, identity) in cases {
        // Issued: TokenReview would accept most of them; local verification must not.
        let token = identity.jwt();
        stack.kube.issue_token(&token, identity);
        assert_eq!(get_from(&agent, WEB_IP, &token).await, 401, "{case}");
    }
    let token = web().jwt();
    assert_eq!(get_from(&agent, WEB_IP, &token).await, 200, "the real token");
    assert_eq!(count(&stack, "tokenreviews"), 0, "all decided without TokenReview");
    // The pod deleted: its still-valid token is refused.
    stack.kube.delete("Pod", Some("team-a"), "web");
    let cluster = std::sync::Arc::clone(stack.core.cluster());
    until("the server forgets the pod", Duration::from_secs(15), move || {
        std::future::ready(cluster.pod_by_name("team-a", "web").is_none())
    })
    .await;
    assert_eq!(get_from(&agent, WEB_IP, &token).await, 401, "deleted pod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_keys_token_review_is_the_fallback_within_a_budget_per_source() {
    let (stack, agent) = setup().await;
    stack.kube.withhold_keys(true);
    let real = web().jwt();
    stack.kube.issue_token(&real, web());
    assert_eq!(get_from(&agent, WEB_IP, &real).await, 200, "served through TokenReview");
    assert_eq!(count(&stack, "tokenreviews"), 1);
    // One source sprays 30 unknown tokens with fresh UIDs: its budget (5 a second) runs out,
    // and the neighbour, at its own address, is still served.
    let before = count(&stack, "tokenreviews");
    for i in 0..30 {
        let forged = TokenIdentity { pod_uid: format!("uid-fresh-{i}"), ..web() }.jwt();
        assert_ne!(get_from(&agent, SPRAYER, &forged).await, 200, "forged token {i}");
    }
    let spent = count(&stack, "tokenreviews") - before;
    assert!(spent < 30, "the budget is per source, not per claimed pod: {spent} reviews");
    let again = web().jwt();
    stack.kube.issue_token(&again, web());
    assert_eq!(get_from(&agent, WEB_IP, &again).await, 200, "the neighbour during the spray");
}
