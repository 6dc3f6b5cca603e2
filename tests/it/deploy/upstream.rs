//! `helm upgrade` from a kiam or kube2iam release onto our chart, with the values it has (issue 26).
//!
//! `py/compat_check.py` renders the chart with real Helm for each upstream values file (kiam's
//! chart 6.1.2, with its CI values, and kube2iam's chart, written as facts in
//! `py/compat_kiam.py` and `py/compat_kube2iam.py`) and for every key of those files changed on
//! its own: each change must alter the render as the upstream chart's templates do, or fail naming
//! the key. Every rendering is validated against the Kubernetes schemas with duplicate keys
//! refused. Here every container command line of every rendering is parsed by the binary's own
//! flag parser, so a value that maps onto a flag the binary lacks fails.

use std::path::Path;
use std::process::Command;

use k8s_openapi::api::core::v1::Container;
use kiam::cli::Command as Sub;
use serde_json::Value;

use crate::deploy::render::{parse_argv, parse_command};
use crate::support::moto::venv_bin;

fn report() -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("compat.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/compat_check.py");
    let status =
        Command::new(venv_bin("python")).arg(&script).arg(&out).status().expect("run compat_check.py");
    assert!(status.success(), "compat_check.py failed: {status}");
    serde_json::from_slice(&std::fs::read(&out).expect("read report")).expect("JSON")
}

/// The containers of the agent, server and kube2iam-mode workloads of one rendering.
fn containers(objects: &[Value]) -> Vec<Container> {
    let workloads = objects.iter().filter(|o| matches!(o["kind"].as_str(), Some("DaemonSet" | "Deployment")));
    workloads
        .map(|o| &o["spec"]["template"]["spec"]["containers"][0])
        .map(|c| serde_json::from_value(c.clone()).unwrap_or_else(|e| panic!("{e}: {c}")))
        .collect()
}

#[test]
fn upstream_values_files_and_every_key_render_as_upstream_or_are_refused_by_name() {
    let report = report();
    let errors: Vec<&str> =
        report["errors"].as_array().expect("errors").iter().filter_map(Value::as_str).collect();
    assert!(errors.is_empty(), "{} problems:\n{}", errors.len(), errors.join("\n"));
    assert!(report["kubernetes_version"].as_str().is_some_and(|v| v >= "1.33"), "a current version");
    // kiam's 6.1.2 values and kube2iam's: well over a hundred keys, each tried.
    assert!(report["changes"].as_u64().is_some_and(|n| n >= 180), "changes tried: {}", report["changes"]);

    let refused = report["refused"].as_object().expect("refused");
    for key in ["psp.create", "agent.extraArgs", "kube2iam.lifecycle", "kube2iam.podSecurityPolicy.enabled"] {
        assert!(
            refused.values().any(|m| m.as_str().is_some_and(|m| m.contains(key))),
            "no refusal names {key}"
        );
    }

    let pki = tempfile::tempdir().expect("temp dir");
    std::fs::write(pki.path().join("file"), "").expect("a stand-in file");
    let cases = report["cases"].as_object().expect("cases");
    assert!(
        cases.contains_key("kiam: file")
            && cases.contains_key("kiam: ci")
            && cases.contains_key("kube2iam: file")
    );
    let mut parsed = 0;
    for (name, objects) in cases {
        for container in containers(objects.as_array().expect("objects")) {
            let command = parse_command(&container, pki.path());
            assert!(
                matches!(command, Sub::Agent(_) | Sub::Server(_) | Sub::Kube2iam(_)),
                "{name}: runs {command:?}"
            );
            for probe in [&container.liveness_probe, &container.readiness_probe].into_iter().flatten() {
                if let Some(exec) = &probe.exec {
                    let argv = exec.command.clone().unwrap_or_default();
                    assert!(matches!(parse_argv(argv, pki.path()), Sub::Health(_)), "{name}: probe");
                }
            }
            parsed += 1;
        }
    }
    assert!(parsed > 300, "command lines parsed: {parsed}");
}
