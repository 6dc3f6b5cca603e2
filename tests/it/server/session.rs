//! What sessions carry besides their role, as STS (moto's recorder) received it: session tags
//! with EKS Pod Identity's keys, marked transitive; inline session policies; one STS call per
//! identity with and without per-pod tags; refusals turned into Events and denials; and a
//! namespace's session policy as a ceiling no pod of it can lift (kiam and kube2iam modes).

use std::time::Duration;

use crate::support::http::get;
use crate::support::moto::AssumeRoleCall;
use crate::support::objects::{namespace, pod};
use crate::support::process::kiam_explain;
use crate::support::stack::{Options, Stack};
use crate::support::wait::eventually;

const POLICY: &str = r#"{ "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}] }"#;

async fn ask(stack: &Stack, ip: &str, role: &str) -> Result<(), tonic::Status> {
    let client = stack.client(&stack.pki.agent());
    client.get_pod_credentials(ip.parse().expect("ip"), role, 0).await.map(drop)
}

fn tags_of(call: &AssumeRoleCall) -> Vec<(&str, &str)> {
    call.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_and_session_policies_reach_sts_and_key_the_cache() {
    let flags = vec![
        "--session-tags=kubernetes-namespace,kubernetes-pod-name,eks-cluster-name",
        "--cluster-name=prod",
    ];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("127.0.0.221").role("app").service_account("web-sa").build());
    stack.kube.apply(pod("team-a", "api").ip("127.0.0.222").role("app").build());
    stack.kube.apply(
        pod("team-a", "narrow")
            .ip("127.0.0.223")
            .role("app")
            .annotation("iam.amazonaws.com/session-policy", POLICY)
            .build(),
    );
    for ip in ["127.0.0.221", "127.0.0.222", "127.0.0.223"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
        ask(&stack, ip, "app").await.expect("credentials");
        ask(&stack, ip, "app").await.expect("a second time, from the cache");
    }
    let calls = stack.wait_for_sts_calls(3).await;
    // Per-pod tags make each pod its own identity: exactly one call each, however often asked.
    assert_eq!(calls.len(), 3, "{calls:?}");
    let web = calls.iter().find(|c| c.tags.iter().any(|(_, v)| v == "web")).expect("web's call");
    assert_eq!(
        tags_of(web),
        [("eks-cluster-name", "prod"), ("kubernetes-namespace", "team-a"), ("kubernetes-pod-name", "web")]
    );
    assert_eq!(web.transitive, ["eks-cluster-name", "kubernetes-namespace", "kubernetes-pod-name"]);
    assert_eq!(web.policy, None);
    assert_eq!(web.source_identity, None, "SourceIdentity only with --source-identity");
    let narrow = calls.iter().find(|c| c.tags.iter().any(|(_, v)| v == "narrow")).expect("narrow's call");
    let sent: serde_json::Value =
        serde_json::from_str(narrow.policy.as_deref().expect("a policy")).expect("JSON");
    assert_eq!(sent, serde_json::from_str::<serde_json::Value>(POLICY).expect("JSON"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_per_pod_tags_pods_of_a_role_share_one_call() {
    let flags = vec!["--session-tags=kubernetes-namespace"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.moto.start_recording().await;
    for ns in ["team-a", "team-b"] {
        stack.kube.apply(namespace(ns).permitted(".*").build());
    }
    let pods =
        [("team-a", "a1", "127.0.0.231"), ("team-a", "a2", "127.0.0.232"), ("team-b", "b1", "127.0.0.233")];
    for (ns, name, ip) in pods {
        stack.kube.apply(pod(ns, name).ip(ip).role("app").build());
    }
    for (_, _, ip) in pods {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
        ask(&stack, ip, "app").await.expect("credentials");
    }
    let calls = stack.wait_for_sts_calls(2).await;
    assert_eq!(calls.len(), 2, "one per namespace tag value: {calls:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tags_or_policies_sts_would_refuse_are_denied_with_an_event() {
    let flags = vec!["--session-tags=kubernetes-pod-name"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.moto.start_recording().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let long = "p".repeat(300);
    stack.kube.apply(pod("team-a", &long).ip("127.0.0.241").role("app").build());
    stack.kube.apply(
        pod("team-a", "bad-policy")
            .ip("127.0.0.242")
            .role("app")
            .annotation("iam.amazonaws.com/session-policy", "[not json")
            .build(),
    );
    for ip in ["127.0.0.241", "127.0.0.242"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
        let refused = ask(&stack, ip, "app").await.expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    }
    let event = |name: String, text: &'static str| {
        let stack = &stack;
        async move {
            let events = stack.kube.events();
            let found = events.into_iter().find(|e| {
                e["reason"] == "KiamRoleForbidden"
                    && e["regarding"]["name"] == name.as_str()
                    && e["note"].as_str().is_some_and(|n| n.contains(text))
            });
            found.map(drop)
        }
    };
    eventually("an Event for the refused tags", Duration::from_secs(10), || {
        event(long.clone(), "session tags")
    })
    .await;
    eventually("an Event for the invalid policy", Duration::from_secs(10), || {
        event("bad-policy".into(), "session policy")
    })
    .await;
    assert!(stack.moto.recorded_assume_roles().await.is_empty(), "nothing STS would refuse was sent");
}

/// `kiam explain` shows the tags and the session policy a pod's session would carry.
#[tokio::test]
async fn explain_shows_tags_and_the_session_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let manifest = dir.path().join("m.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    iam.amazonaws.com/permitted: '.*'\n    iam.amazonaws.com/session-policy: '{}'\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: ns\n  annotations:\n    iam.amazonaws.com/role: app\nspec:\n  containers: [{{name: c}}]\nstatus:\n  podIP: 10.0.0.1\n  phase: Running\n",
        POLICY.replace('\'', "''")
    );
    std::fs::write(&manifest, text).expect("manifest");
    let manifest = manifest.to_str().expect("utf-8 path");
    let flags = ["-f", manifest, "--role-base-arn", "arn:aws:iam::123456789012:role/"];
    let tags = "--session-tags=kubernetes-namespace,kubernetes-pod-name";
    let json = kiam_explain(&[&flags[..], &[tags, "-o", "json", "ns/web"]].concat()).await.json();
    assert_eq!(
        json["session"]["tags"],
        serde_json::json!([["kubernetes-namespace", "ns"], ["kubernetes-pod-name", "web"]])
    );
    assert!(json["session"]["policy"].as_str().is_some_and(|p| p.contains("s3:GetObject")), "{json}");
}

/// What a pod that may create pods in a namespace would bring to lift the namespace's ceiling.
const WIDE: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#;
const CREDS: &str = "/latest/meta-data/iam/security-credentials/app";

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).expect("JSON")
}

/// Every call STS received for a pod of `namespace` (by the namespace tag) carried exactly the
/// namespace's policy, and none was made for `refused`.
fn assert_ceiling_held(calls: &[AssumeRoleCall], namespace: &str, refused: &str) {
    let tagged =
        |c: &AssumeRoleCall, key: &str, value: &str| c.tags.iter().any(|(k, v)| k == key && v == value);
    let ours: Vec<_> = calls.iter().filter(|c| tagged(c, "kubernetes-namespace", namespace)).collect();
    assert!(!ours.is_empty(), "the ceiling's plain pod was served: {calls:?}");
    for call in ours {
        let sent = call.policy.as_deref().map(json);
        assert_eq!(sent, Some(json(POLICY)), "a call without the namespace's policy: {call:?}");
    }
    assert!(!calls.iter().any(|c| tagged(c, "kubernetes-pod-name", refused)), "{calls:?}");
}

/// The attack: whoever may create pods in a namespace whose `session-policy` narrows every pod
/// annotates a pod with its own `Allow *`. It used to replace the namespace's policy. The pod is
/// refused (403 to the pod, an Event, `kiam explain` says why), its neighbour keeps the ceiling,
/// and STS never receives a call for the namespace without the namespace's policy.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_cannot_lift_its_namespaces_session_policy() {
    let flags = vec!["--session-tags=kubernetes-namespace,kubernetes-pod-name"];
    // The agent waits for moto's first answers (300 ms by default in tests).
    let pod_wait = Duration::from_secs(5);
    let stack = Stack::start_with(Options { server_flags: flags, pod_wait, ..Options::default() }).await;
    stack.moto.start_recording().await;
    let ceiling = namespace("ceiling").permitted(".*").annotation("iam.amazonaws.com/session-policy", POLICY);
    stack.kube.apply(ceiling.build());
    stack.kube.apply(namespace("free").permitted(".*").build());
    let with_policy = |ns: &str, name: &str, ip: &str| {
        pod(ns, name).ip(ip).role("app").annotation("iam.amazonaws.com/session-policy", WIDE).build()
    };
    stack.kube.apply(pod("ceiling", "plain").ip("127.0.0.225").role("app").build());
    stack.kube.apply(with_policy("ceiling", "lifter", "127.0.0.226"));
    stack.kube.apply(with_policy("free", "own", "127.0.0.227"));
    let agent = stack.agent_url(std::net::Ipv4Addr::LOCALHOST);
    for ip in ["127.0.0.225", "127.0.0.226", "127.0.0.227"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
    }
    let from = |ip: &str| Some(ip.parse().expect("ip"));
    let lifter = get(&format!("{agent}{CREDS}"), from("127.0.0.226")).await.expect("an answer");
    assert_eq!(lifter.status, 403, "{}", lifter.body);
    assert!(!lifter.body.contains("AccessKeyId"), "{}", lifter.body);
    let plain = get(&format!("{agent}{CREDS}"), from("127.0.0.225")).await.expect("an answer");
    assert_eq!(plain.status, 200, "{}", plain.body);
    // Without a namespace policy, a pod's own still narrows its own session.
    let own = get(&format!("{agent}{CREDS}"), from("127.0.0.227")).await.expect("an answer");
    assert_eq!(own.status, 200, "{}", own.body);
    let refused = ask(&stack, "127.0.0.226", "app").await.expect_err("refused by the server too");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let calls = stack.wait_for_sts_calls(2).await;
    assert_ceiling_held(&calls, "ceiling", "lifter");
    let own = calls.iter().find(|c| c.tags.iter().any(|(_, v)| v == "own")).expect("own's call");
    assert_eq!(own.policy.as_deref().map(json), Some(json(WIDE)));
    let note = || async {
        let events = stack.kube.events();
        events.into_iter().find(|e| {
            e["reason"] == "KiamRoleForbidden"
                && e["regarding"]["name"] == "lifter"
                && e["note"].as_str().is_some_and(|n| n.contains("namespace ceiling sets one"))
        })
    };
    eventually("an Event on the refused pod", Duration::from_secs(10), note).await;
    // The prefetcher and the refresher work from the same decision: still nothing without it.
    assert_ceiling_held(&stack.moto.recorded_assume_roles().await, "ceiling", "lifter");
}

/// `kiam explain` shows the refusal and its reason.
#[tokio::test]
async fn explain_shows_the_session_policy_ceiling() {
    let dir = tempfile::tempdir().expect("dir");
    let manifest = dir.path().join("m.yaml");
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    iam.amazonaws.com/permitted: '.*'\n    iam.amazonaws.com/session-policy: '{}'\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: ns\n  annotations:\n    iam.amazonaws.com/role: app\n    iam.amazonaws.com/session-policy: '{}'\nspec:\n  containers: [{{name: c}}]\nstatus:\n  podIP: 10.0.0.1\n  phase: Running\n",
        POLICY.replace('\'', "''"),
        WIDE.replace('\'', "''"),
    );
    std::fs::write(&manifest, text).expect("manifest");
    let manifest = manifest.to_str().expect("utf-8 path");
    let flags = ["-f", manifest, "--role-base-arn", "arn:aws:iam::123456789012:role/"];
    let json = kiam_explain(&[&flags[..], &["-o", "json", "ns/web"]].concat()).await.json();
    assert_eq!(json["verdict"]["allowed"], false, "{json}");
    assert_eq!(json["verdict"]["code"], "session-policy-ceiling", "{json}");
    assert!(
        json["verdict"]["reason"].as_str().is_some_and(|r| r.contains("namespace ns sets one")),
        "{json}"
    );
    let text = kiam_explain(&[&flags[..], &["ns/web"]].concat()).await;
    assert!(text.stdout.contains("DENIED (session-policy-ceiling)"), "{}", text.stdout);
}

/// kube2iam mode reads the same annotations and decides with the same code: the same ceiling.
#[tokio::test(flavor = "multi_thread")]
async fn kube2iam_mode_keeps_the_namespace_session_policy() {
    let objects = vec![
        namespace("ceiling").annotation("iam.amazonaws.com/session-policy", POLICY).build(),
        pod("ceiling", "plain").ip("127.0.0.228").role("app").build(),
        pod("ceiling", "lifter")
            .ip("127.0.0.229")
            .role("app")
            .annotation("iam.amazonaws.com/session-policy", WIDE)
            .build(),
    ];
    let k = crate::kube2iam::mode::start(&["--base-role-arn=arn:aws:iam::123456789012:role/"], objects).await;
    assert_eq!(crate::kube2iam::mode::get(&k, "127.0.0.229", CREDS).await.0, 403);
    assert_eq!(crate::kube2iam::mode::get(&k, "127.0.0.228", CREDS).await.0, 200);
    let calls = k.moto.recorded_assume_roles().await;
    assert!(!calls.is_empty(), "the plain pod's call");
    for call in &calls {
        assert_eq!(call.policy.as_deref().map(json), Some(json(POLICY)), "{call:?}");
    }
}

/// `--source-identity`: every AssumeRole names its pod as STS's SourceIdentity, `<pod>@<namespace>`
/// (long names shortened, still apart), so two pods of one role get sessions of their own, each
/// fetched once however often asked; kube2iam mode the same.
#[tokio::test(flavor = "multi_thread")]
async fn source_identity_names_each_pod_and_keys_the_cache() {
    let flags = vec!["--source-identity"];
    let stack = Stack::start_with(Options { server_flags: flags, ..Options::default() }).await;
    stack.moto.start_recording().await;
    let long = "w".repeat(120);
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(pod("team-a", "web").ip("127.0.0.231").role("app").build());
    stack.kube.apply(pod("team-a", "api").ip("127.0.0.232").role("app").build());
    stack.kube.apply(pod("team-a", &long).ip("127.0.0.233").role("app").build());
    for ip in ["127.0.0.231", "127.0.0.232", "127.0.0.233"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
        ask(&stack, ip, "app").await.expect("credentials");
        ask(&stack, ip, "app").await.expect("a second time, from the cache");
    }
    let calls = stack.wait_for_sts_calls(3).await;
    assert_eq!(calls.len(), 3, "one session per pod: {calls:?}");
    let mut identities: Vec<String> = calls.iter().filter_map(|c| c.source_identity.clone()).collect();
    identities.sort();
    assert_eq!(identities.len(), 3, "{calls:?}");
    assert_eq!(&identities[..2], ["api@team-a", "web@team-a"]);
    let shortened = &identities[2];
    assert!(shortened.len() == 64 && shortened.starts_with("www"), "{shortened}");
    assert!(shortened.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c)), "{shortened}");
    assert_eq!(*shortened, kiam::policy::role::source_identity("team-a", &long));

    let objects =
        vec![namespace("team-b").build(), pod("team-b", "job").ip("127.0.0.234").role("app").build()];
    let base = "--base-role-arn=arn:aws:iam::123456789012:role/";
    let k = crate::kube2iam::mode::start(&[base, "--source-identity"], objects).await;
    let (status, body) =
        crate::kube2iam::mode::get(&k, "127.0.0.234", "/latest/meta-data/iam/security-credentials/app").await;
    assert_eq!(status, 200, "{body}");
    let calls = k.moto.recorded_assume_roles().await;
    assert!(
        !calls.is_empty() && calls.iter().all(|c| c.source_identity.as_deref() == Some("job@team-b")),
        "{calls:?}"
    );
}
