//! `--service-account-roles`: a ServiceAccount annotated with IRSA's `eks.amazonaws.com/role-arn`
//! (or kiam's key) names the role of its pods; the pod's own annotation wins; the namespace's
//! `permitted` expression applies to both; edits and deletions of the ServiceAccount follow.

use std::time::Duration;

use serde_json::json;

use crate::support::objects::{namespace, pod};
use crate::support::process::kiam_explain;
use crate::support::stack::{Options, Stack};
use crate::support::wait::until;

fn service_account(ns: &str, name: &str, role: Option<&str>) -> serde_json::Value {
    let mut sa =
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"namespace": ns, "name": name}});
    if let Some(role) = role {
        sa["metadata"]["annotations"] = json!({"eks.amazonaws.com/role-arn": role});
    }
    sa
}

async fn role_of(stack: &Stack, ip: &str) -> Option<String> {
    let client = stack.client(&stack.pki.agent());
    client.get_pod_role(ip.parse().expect("ip")).await.ok().map(|r| r.name).filter(|r| !r.is_empty())
}

async fn allowed(stack: &Stack, ip: &str, role: &str) -> bool {
    let client = stack.client(&stack.pki.agent());
    client.get_pod_credentials(ip.parse().expect("ip"), role, 0).await.is_ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_accounts_role_serves_its_pods_and_follows_edits() {
    let options = Options { server_flags: vec!["--service-account-roles"], ..Options::default() };
    let stack = Stack::start_with(options).await;
    let app = "arn:aws:iam::123456789012:role/sa-app";
    stack
        .kube
        .apply(namespace("team-a").permitted("arn:aws:iam::123456789012:role/(sa-app|own|sa-next)").build());
    stack.kube.apply(service_account("team-a", "web-sa", Some(app)));
    stack.kube.apply(service_account(
        "team-a",
        "locked-sa",
        Some("arn:aws:iam::123456789012:role/not-permitted"),
    ));
    stack.kube.apply(pod("team-a", "web").ip("127.0.0.251").service_account("web-sa").build());
    stack.kube.apply(pod("team-a", "own").ip("127.0.0.252").service_account("web-sa").role("own").build());
    stack.kube.apply(pod("team-a", "locked").ip("127.0.0.253").service_account("locked-sa").build());
    stack.kube.apply(pod("team-a", "plain").ip("127.0.0.254").build());
    for ip in ["127.0.0.251", "127.0.0.252", "127.0.0.253", "127.0.0.254"] {
        stack.wait_for_pod(ip.parse().expect("ip")).await;
    }
    let limit = Duration::from_secs(10);
    // The ServiceAccount's role, when the pod names none.
    until("web gets its ServiceAccount's role", limit, || async {
        role_of(&stack, "127.0.0.251").await.as_deref() == Some(app)
    })
    .await;
    assert!(allowed(&stack, "127.0.0.251", app).await);
    // The pod's own annotation wins.
    assert_eq!(role_of(&stack, "127.0.0.252").await.as_deref(), Some("own"));
    assert!(allowed(&stack, "127.0.0.252", "own").await);
    // The namespace's policy applies to a ServiceAccount's role too.
    assert!(!allowed(&stack, "127.0.0.253", "arn:aws:iam::123456789012:role/not-permitted").await);
    // No annotation anywhere (the default ServiceAccount has none): no role.
    assert_eq!(role_of(&stack, "127.0.0.254").await, None);

    // Edited while the pod runs: the new role, and the old one is refused.
    let next = "arn:aws:iam::123456789012:role/sa-next";
    stack.kube.apply(service_account("team-a", "web-sa", Some(next)));
    until("the edit applies", limit, || async {
        role_of(&stack, "127.0.0.251").await.as_deref() == Some(next)
    })
    .await;
    assert!(allowed(&stack, "127.0.0.251", next).await);
    assert!(!allowed(&stack, "127.0.0.251", app).await);
    // Deleted: no role.
    stack.kube.delete("ServiceAccount", Some("team-a"), "web-sa");
    until("the deletion applies", limit, || async { role_of(&stack, "127.0.0.251").await.is_none() }).await;
    assert!(!allowed(&stack, "127.0.0.251", next).await);
    assert_eq!(
        role_of(&stack, "127.0.0.252").await.as_deref(),
        Some("own"),
        "the annotated pod is unaffected"
    );
}

/// `kiam explain --service-account-roles` resolves the role as the server does, and says where
/// it came from.
#[tokio::test]
async fn explain_says_the_role_came_from_the_service_account() {
    let dir = tempfile::tempdir().expect("dir");
    let manifest = dir.path().join("m.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  annotations:\n    iam.amazonaws.com/permitted: '.*'\n\
         ---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web-sa\n  namespace: ns\n  annotations:\n    eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/sa-app\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: ns\nspec:\n  serviceAccountName: web-sa\n  containers: [{name: c}]\nstatus:\n  podIP: 10.0.0.1\n  phase: Running\n",
    )
    .expect("manifest");
    let manifest = manifest.to_str().expect("utf-8 path");
    let flags =
        ["-f", manifest, "--role-base-arn", "arn:aws:iam::123456789012:role/", "--service-account-roles"];
    let out = kiam_explain(&[&flags[..], &["-o", "json", "ns/web"]].concat()).await;
    let json = out.json();
    assert_eq!(out.code, 0, "{json}");
    assert_eq!(json["role"]["source"], "service account web-sa");
    assert_eq!(json["role"]["arn"], "arn:aws:iam::123456789012:role/sa-app");
}

/// Against the cluster too, `kiam explain --service-account-roles` reads the pod's ServiceAccount.
#[tokio::test(flavor = "multi_thread")]
async fn explain_reads_the_service_account_from_the_cluster() {
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    stack.kube.apply(service_account("team-a", "web-sa", Some("arn:aws:iam::123456789012:role/sa-app")));
    stack.kube.apply(pod("team-a", "web").ip("10.70.0.1").service_account("web-sa").build());
    let kubeconfig = stack.kube.write_kubeconfig(stack.pki.dir());
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
    let flags = ["--kubeconfig", kubeconfig, "--role-base-arn", "arn:aws:iam::123456789012:role/"];
    let out =
        kiam_explain(&[&flags[..], &["--service-account-roles", "-o", "json", "team-a/web"]].concat()).await;
    let json = out.json();
    assert_eq!(json["role"]["source"], "service account web-sa", "{json}");
    assert_eq!(out.code, 0, "{json}");
}
