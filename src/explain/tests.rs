//! The decision chain over the cases users ask about, checked against the server's own
//! decision where both apply.

use super::chain::explain;
use super::find::{by_ip, by_name};
use super::*;
use crate::model::{NamespaceFacts, Permitted, PodFacts};

const ARN: &str = "arn:aws:iam::123456789012:role/app";

fn settings(node_binding: NodeBinding) -> Settings {
    Settings { policy: Policy::test(), default_session: "kiam".into(), node_binding }
}

fn pod(role: Option<&str>) -> PodFacts {
    PodFacts::test("team-a", "web", "10.0.0.5", role)
}

fn ns(permitted: Option<&str>) -> NamespaceFacts {
    NamespaceFacts {
        name: "team-a".into(),
        permitted: permitted.map(Permitted::new),
        allowed_roles: None,
        session_policy: None,
    }
}

fn run(pods: &[PodFacts], ns: Option<&NamespaceFacts>, requested: Option<&str>) -> Explanation {
    let located = by_name(pods, "team-a", "web");
    explain(&settings(NodeBinding::Off), "team-a/web".into(), &located, ns, requested)
}

#[test]
fn verdicts_and_reasons() {
    let allowed = run(&[pod(Some("app"))], Some(&ns(Some(".*"))), None);
    assert!(allowed.verdict.allowed, "{:?}", allowed.verdict);
    assert_eq!(allowed.verdict.reason, format!("pod team-a/web may assume {ARN}"));
    assert_eq!(allowed.role.as_ref().and_then(|r| r.arn.as_deref()), Some(ARN));
    assert_eq!(allowed.namespace.as_ref().and_then(|n| n.matches), Some(true));
    assert_eq!(allowed.session.as_ref().map(|s| s.name.as_str()), Some("kiam-kiam"));

    /// (role annotation, permitted, --role, verdict code, reason excerpt)
    type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str, &'a str);
    let cases: [Case; 6] = [
        (
            Some("app"),
            Some("team-b-.*"),
            None,
            "namespace-forbids",
            "namespace policy expression 'team-b-.*' forbids role",
        ),
        (Some("app"), None, None, "namespace-unset", "'(empty)'"),
        (
            Some("app"),
            Some(".*"),
            Some("other"),
            "role-mismatch",
            "requested 'other' but annotated with 'app'",
        ),
        (None, Some(".*"), None, "no-role-annotation", "no iam.amazonaws.com/role annotation"),
        (Some("app"), Some("("), None, "namespace-invalid", "is invalid"),
        (
            Some("app"),
            Some(".*/team-a-.*)|(.*"),
            None,
            "namespace-invalid",
            "is invalid: it does not compile on its own",
        ),
    ];
    for (role, permitted, requested, code, reason) in cases {
        let e = run(&[pod(role)], Some(&ns(permitted)), requested);
        assert!(!e.verdict.allowed);
        assert_eq!(e.verdict.code, code, "{:?}", e.verdict);
        assert!(e.verdict.reason.contains(reason), "{} should contain {reason}", e.verdict.reason);
    }
    let wrong = run(&[pod(Some("app"))], Some(&ns(Some(".*"))), Some("other"));
    assert_eq!(wrong.role.as_ref().and_then(|r| r.requested_matches), Some(false));
    assert_eq!(
        wrong.namespace.as_ref().and_then(|n| n.matches),
        Some(true),
        "the namespace step stands alone"
    );
    let unknown_ns = run(&[pod(Some("app"))], None, None);
    assert_eq!(unknown_ns.verdict.code, "namespace-unknown");
}

#[test]
fn verdicts_are_the_servers() {
    // Wherever a pod is found, the verdict is `Policy::decide`'s, with the same text.
    for (role, permitted, requested) in
        [(Some("app"), Some(".*"), "app"), (Some("app"), Some("x"), "app"), (None, Some(".*"), "app")]
    {
        let (p, n) = (pod(role), ns(permitted));
        let server = settings(NodeBinding::Off).policy.decide(&p, Some(&n), requested);
        let e = run(&[p], Some(&n), Some(requested));
        assert_eq!(e.verdict.allowed, server.is_ok());
        if let Err(denial) = server {
            assert!(e.verdict.reason.ends_with(&denial.to_string()));
        }
    }
}

#[test]
fn lookups_fail_like_the_server() {
    let missing = run(&[], Some(&ns(Some(".*"))), None);
    assert_eq!((missing.verdict.code, missing.pod.is_none()), ("pod-not-found", true));

    let mut host = pod(Some("app"));
    host.host_network = true;
    let e = run(&[host.clone()], Some(&ns(Some(".*"))), None);
    assert_eq!(e.verdict.code, "host-network");
    assert_eq!(e.role.as_ref().and_then(|r| r.arn.as_deref()), Some(ARN), "the other steps are still shown");
    let by_address = explain(
        &settings(NodeBinding::Off),
        "ip 10.0.0.5".into(),
        &by_ip(&[host], "10.0.0.5".parse().expect("ip")),
        None,
        None,
    );
    assert_eq!(by_address.verdict.code, "host-network");
    assert!(by_address.verdict.reason.starts_with("no pod found for IP 10.0.0.5"));

    let mut old = pod(Some("app"));
    old.terminating = true;
    let mut new = PodFacts::test("team-a", "new", "10.0.0.5", Some("app"));
    new.node_name = Some("node-1".into());
    let e = run(&[old, new.clone()], Some(&ns(Some(".*"))), None);
    assert_eq!((e.verdict.code, e.lookup.pods.clone()), ("ip-reused", vec!["team-a/new".to_string()]));
    let twin = PodFacts::test("team-a", "web", "10.0.0.5", Some("app"));
    let e = run(&[twin, new], Some(&ns(Some(".*"))), None);
    assert_eq!(e.verdict.code, "ambiguous-ip");
}

#[test]
fn node_binding() {
    let p = pod(Some("app"));
    let n = ns(Some(".*"));
    let located = by_name(std::slice::from_ref(&p), "team-a", "web");
    let check = |binding| explain(&settings(binding), "q".into(), &located, Some(&n), None).verdict;
    assert!(check(NodeBinding::On { agent_node: None }).allowed, "the pod's own agent may ask");
    assert!(check(NodeBinding::On { agent_node: Some("node-1".into()) }).allowed);
    let other = check(NodeBinding::On { agent_node: Some("node-2".into()) });
    assert_eq!(
        (other.code, other.reason.as_str()),
        ("other-node", "pod team-a/web is not on node node-2, the caller's")
    );
    let mut unscheduled = p.clone();
    unscheduled.node_name = None;
    let located = by_name(&[unscheduled], "team-a", "web");
    let e = explain(&settings(NodeBinding::On { agent_node: None }), "q".into(), &located, Some(&n), None);
    assert_eq!(e.verdict.code, "other-node");
}

#[test]
fn the_external_id_is_never_printed() {
    let p = pod(Some("app")).with_extras(|e| {
        e.external_id = Some("ext-very-secret".into());
        e.session_name = Some("my app".into());
    });
    let e = run(&[p], Some(&ns(Some(".*"))), None);
    assert_eq!(e.session.as_ref().map(|s| (s.name.as_str(), s.external_id_set)), Some(("kiam-my-app", true)));
    assert_eq!(e.identity.as_ref().and_then(|i| i.external_id.as_deref()), Some("ext-very-secret"));
    let printed = format!(
        "{}{}{:?}",
        render::text(std::slice::from_ref(&e)),
        render::json(std::slice::from_ref(&e), true),
        e
    );
    assert!(!printed.contains("ext-very-secret"), "{printed}");
    assert!(printed.contains("set (not shown)"));
}

#[test]
fn pod_targets() {
    assert_eq!(parse_pod("a/b"), Ok(Target::Pod { namespace: "a".into(), name: "b".into() }));
    for bad in ["b", "/b", "a/", "a/b/c"] {
        assert!(parse_pod(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_role_name_expression_is_called_out_with_the_arn_form() {
    let form = "arn:aws:iam::123456789012:role/k8s-production-.*";
    let e = run(&[pod(Some("k8s-production-web"))], Some(&ns(Some("k8s-production-.*"))), None);
    assert_eq!(e.verdict.code, "namespace-forbids");
    assert!(e.verdict.reason.contains(&format!("write '{form}'")), "{}", e.verdict.reason);
    assert_eq!(e.namespace.as_ref().and_then(|n| n.arn_form.as_deref()), Some(form));
    let text = render::text(std::slice::from_ref(&e));
    assert_eq!(text.matches(form).count(), 2, "in the namespace step and the verdict:\n{text}");
    let json: serde_json::Value =
        serde_json::from_str(&render::json(std::slice::from_ref(&e), true)).expect("JSON");
    assert_eq!(json["namespace"]["arn_form"], form);
    // A pod without a role is not denied by the expression, but the namespace still says so.
    let e = run(&[pod(None)], Some(&ns(Some("k8s-production-.*"))), None);
    assert_eq!(e.verdict.code, "no-role-annotation");
    let text = render::text(std::slice::from_ref(&e));
    assert!(text.contains("pitfall") && text.contains(form), "{text}");
    // An ARN-shaped expression, or matching anywhere in the ARN: nothing to say.
    let e = run(&[pod(Some("app"))], Some(&ns(Some("arn:aws:iam::123456789012:role/web"))), None);
    assert_eq!(e.namespace.as_ref().and_then(|n| n.arn_form.clone()), None);
    let mut loose = settings(NodeBinding::Off);
    loose.policy.strict_namespace_regexp = false;
    let located = by_name(&[pod(Some("k8s-production-web"))], "team-a", "web");
    let namespace = ns(Some("k8s-production-.*"));
    let e = explain(&loose, "team-a/web".into(), &located, Some(&namespace), None);
    assert!(e.verdict.allowed && e.namespace.as_ref().is_some_and(|n| n.arn_form.is_none()));
}
