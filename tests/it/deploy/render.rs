//! The Helm chart and the kustomize manifests (issue 13).
//!
//! `py/deploy_check.py` renders the chart with real Helm for a table of value sets, lints it,
//! renders the kustomize base and overlays with `kubectl kustomize`, validates every object
//! strictly against a current Kubernetes version's schemas, and checks that the kustomize
//! manifests (the base, each overlay, every combination of components) equal the chart. Here
//! every object is parsed as its k8s-openapi type, every container command line is parsed by the
//! binary's own flag parser (a container without a command runs the image's entrypoint,
//! `kube2iam`, so its args go to kube2iam mode's parser), with the flags that its environment
//! sets (each flag's `KIAM_*` variable, as the binary reads them), and each value set is checked
//! for what it must change.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use clap::{ArgAction, CommandFactory, Parser};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, EnvVar, Pod, PodSpec, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kiam::cli::{Cli, Command as Sub};
use kiam::kube2iam::Kube2iamCli;
use serde_json::Value;

use crate::support::moto::venv_bin;

/// One rendered object, parsed as its type (custom resources stay JSON). Parsing is the check;
/// most typed values are read only where a case needs them.
#[derive(Debug)]
#[allow(dead_code)]
pub enum Object {
    DaemonSet(Box<DaemonSet>),
    Deployment(Box<Deployment>),
    Service(Box<Service>),
    ServiceAccount(Box<ServiceAccount>),
    Secret(Box<Secret>),
    ClusterRole(Box<ClusterRole>),
    ClusterRoleBinding(Box<ClusterRoleBinding>),
    PodDisruptionBudget(Box<PodDisruptionBudget>),
    NetworkPolicy(Box<NetworkPolicy>),
    MutatingWebhookConfiguration(Box<MutatingWebhookConfiguration>),
    ConfigMap(Box<ConfigMap>),
    /// The `helm test` hook.
    Pod(Box<Pod>),
    Custom(Value),
}

fn parse(value: &Value) -> Object {
    fn typed<T: serde::de::DeserializeOwned>(value: &Value) -> Box<T> {
        Box::new(serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value}")))
    }
    match value["kind"].as_str().expect("every object has a kind") {
        "DaemonSet" => Object::DaemonSet(typed(value)),
        "Deployment" => Object::Deployment(typed(value)),
        "Service" => Object::Service(typed(value)),
        "ServiceAccount" => Object::ServiceAccount(typed(value)),
        "Secret" => Object::Secret(typed(value)),
        "ClusterRole" => Object::ClusterRole(typed(value)),
        "ClusterRoleBinding" => Object::ClusterRoleBinding(typed(value)),
        "PodDisruptionBudget" => Object::PodDisruptionBudget(typed(value)),
        "NetworkPolicy" => Object::NetworkPolicy(typed(value)),
        "MutatingWebhookConfiguration" => Object::MutatingWebhookConfiguration(typed(value)),
        "ConfigMap" => Object::ConfigMap(typed(value)),
        "Pod" => Object::Pod(typed(value)),
        "ServiceMonitor" | "PodMonitor" | "PrometheusRule" | "Certificate" | "Issuer" => {
            Object::Custom(value.clone())
        }
        other => panic!("the chart renders a kind the tests do not know: {other}"),
    }
}

/// Every object of one rendering, with the JSON it came from, keyed by `Kind/name`.
pub struct Rendered(pub BTreeMap<String, (Value, Object)>);

impl Rendered {
    fn new(values: &[Value]) -> Rendered {
        let mut map = BTreeMap::new();
        for value in values {
            let key = format!("{}/{}", value["kind"].as_str().unwrap_or(""), value["metadata"]["name"]);
            let key = key.replace('"', "");
            assert!(map.insert(key.clone(), (value.clone(), parse(value))).is_none(), "duplicate {key}");
        }
        Rendered(map)
    }

    pub fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    pub fn json(&self, key: &str) -> &Value {
        &self.0.get(key).unwrap_or_else(|| panic!("no {key} in {:?}", self.0.keys())).0
    }

    pub fn kinds(&self, kind: &str) -> Vec<&Value> {
        self.0.iter().filter(|(k, _)| k.starts_with(&format!("{kind}/"))).map(|(_, (v, _))| v).collect()
    }

    /// The pod spec of the agent, the kube2iam-mode DaemonSet or the server DaemonSet/Deployment.
    pub fn pod(&self, component: &str) -> &PodSpec {
        let found = ["DaemonSet", "Deployment"]
            .iter()
            .find_map(|kind| self.0.get(&format!("{kind}/kiam-{component}")));
        let template = match found.map(|(_, o)| o) {
            Some(Object::DaemonSet(d)) => d.spec.as_ref().map(|s| &s.template),
            Some(Object::Deployment(d)) => d.spec.as_ref().map(|s| &s.template),
            _ => panic!("no workload kiam-{component}"),
        };
        template.and_then(|t| t.spec.as_ref()).expect("a pod spec")
    }

    pub fn container(&self, component: &str) -> &Container {
        &self.pod(component).containers[0]
    }

    /// The container's flags: those its environment sets, then its args.
    pub fn args(&self, component: &str) -> Vec<String> {
        let container = self.container(component);
        env_flags(container).into_iter().chain(container.args.clone().unwrap_or_default()).collect()
    }
}

/// What the Python side produced, checked for problems and parsed.
pub struct Report {
    pub cases: BTreeMap<String, Rendered>,
    pub kustomize: BTreeMap<String, Rendered>,
    /// Value sets the chart refused, with Helm's message.
    pub refused: BTreeMap<String, String>,
}

fn render() -> Report {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("deploy.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/deploy_check.py");
    let status =
        Command::new(venv_bin("python")).arg(&script).arg(&out).status().expect("run deploy_check.py");
    assert!(status.success(), "deploy_check.py failed: {status}");
    let report: Value = serde_json::from_slice(&std::fs::read(&out).expect("read report")).expect("JSON");
    let errors: Vec<&str> =
        report["errors"].as_array().expect("errors").iter().filter_map(Value::as_str).collect();
    assert!(errors.is_empty(), "lint, schema or equivalence problems:\n{}", errors.join("\n"));
    assert!(report["kubernetes_version"].as_str().is_some_and(|v| v >= "1.33"), "a current version");
    let group = |name: &str| -> BTreeMap<String, Rendered> {
        let object = report[name].as_object().expect("a map of renderings");
        object.iter().map(|(k, v)| (k.clone(), Rendered::new(v.as_array().expect("objects")))).collect()
    };
    let refused = report["refused"].as_object().expect("refused");
    let refused = refused.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string())).collect();
    Report { cases: group("cases"), kustomize: group("kustomize"), refused }
}

/// The downward API's fields in a stand-in cluster: the node's IP and name.
pub const HOST_IP: &str = "10.0.0.1";
pub const NODE_NAME: &str = "node-a";

/// Kubernetes' `$(VAR)` expansion of a container's args from its own env, with the downward
/// API's fields given stand-in values. Kubernetes leaves an unknown reference as written; here
/// that fails, since the flag would receive the literal text.
fn expand(arg: &str, env: &[EnvVar]) -> String {
    let mut out = arg.to_string();
    for var in env {
        let field = var.value_from.as_ref().and_then(|v| v.field_ref.as_ref()).map(|f| f.field_path.as_str());
        let value = match (var.value.as_deref(), field) {
            (Some(value), _) => value,
            (None, Some("status.podIP")) => HOST_IP,
            (None, Some("spec.nodeName")) => NODE_NAME,
            _ => continue,
        };
        out = out.replace(&format!("$({})", var.name), value);
    }
    assert!(!out.contains("$("), "{arg}: a reference to no variable of the container's env");
    out
}

/// The flags a container's environment sets, written as flags: each variable with a literal value
/// that the container's subcommand reads as a flag (found in the binary's own flag definitions),
/// unless its args give that flag, since the command line wins. A boolean set to `true` is the
/// bare flag; a switch set to `false` is no flag; anything else is `--flag=value`, which the
/// parser then checks.
pub fn env_flags(container: &Container) -> Vec<String> {
    let command = match container.command.as_deref() {
        Some([_, sub, ..]) => Cli::command().find_subcommand(sub).cloned(),
        Some(_) => None,
        None => Some(Kube2iamCli::command()),
    };
    let Some(command) = command else { return Vec::new() };
    let args = container.args.clone().unwrap_or_default();
    let mut flags = Vec::new();
    for var in container.env.iter().flatten() {
        let Some(value) = var.value.as_deref() else { continue };
        let arg = command.get_arguments().find(|a| a.get_env().is_some_and(|e| e == var.name.as_str()));
        let Some(long) = arg.and_then(|a| a.get_long()) else { continue };
        let flag = format!("--{long}");
        if args.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}="))) {
            continue;
        }
        let optional = arg.and_then(|a| a.get_num_args()).is_some_and(|n| n.min_values() == 0);
        match (arg.map(|a| a.get_action()), value) {
            (Some(ArgAction::SetTrue), "false") => {}
            (Some(ArgAction::SetTrue), "true") => flags.push(flag),
            (_, "true") if optional => flags.push(flag),
            _ => flags.push(format!("{flag}={value}")),
        }
    }
    flags
}

/// Parses a container's command line with the binary's own parser, TLS paths pointed at real
/// files, so a flag the binary lacks, a bad value or a rejected combination fails here. The flags
/// its environment sets come first (the command line wins over them). A
/// container without a command runs the image's entrypoint, `kube2iam`: kube2iam mode's parser
/// and validation, as `kube2iam ARGS` (the binary invoked by that name) runs them.
pub fn parse_command(container: &Container, pki: &Path) -> Sub {
    let env = container.env.clone().unwrap_or_default();
    let args: Vec<String> = env_flags(container)
        .into_iter()
        .chain(container.args.clone().unwrap_or_default().iter().map(|a| expand(a, &env)))
        .collect();
    match &container.command {
        Some(command) => parse_argv(command.iter().cloned().chain(args).collect(), pki),
        None => parse_kube2iam(args),
    }
}

fn parse_kube2iam(args: Vec<String>) -> Sub {
    let argv: Vec<String> = std::iter::once("kube2iam".to_string()).chain(args).collect();
    let cli = Kube2iamCli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}:\n{e}"));
    cli.args.logging().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    drop(cli.args.config().unwrap_or_else(|e| panic!("{argv:?}: {e}")));
    Sub::Kube2iam(cli.args)
}

pub fn parse_argv(argv: Vec<String>, pki: &Path) -> Sub {
    assert_eq!(argv.first().map(String::as_str), Some("/kiam"), "{argv:?}");
    let mut argv: Vec<String> = argv
        .into_iter()
        .map(|a| match a.split_once("=/etc/kiam/tls/") {
            Some((flag, _)) => format!("{flag}={}", pki.join("file").display()),
            None => a,
        })
        .collect();
    if argv.get(1).map(String::as_str) == Some("agent") {
        argv.push("--host=10.0.0.1".into()); // HOST_IP, from the downward API in a cluster
    }
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}:\n{e}"));
    match &cli.command {
        Sub::Agent(a) => drop(a.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"))),
        Sub::Server(s) => drop(s.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"))),
        Sub::Health(h) => drop(h.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"))),
        other => panic!("no workload runs {other:?}"),
    }
    cli.command
}

#[test]
fn chart_and_manifests_render_lint_validate_and_parse() {
    let report = render();
    let pki = tempfile::tempdir().expect("temp dir");
    std::fs::write(pki.path().join("file"), "").expect("a stand-in file");
    let all = report.cases.iter().chain(report.kustomize.iter());
    for (name, rendered) in all {
        for component in ["agent", "server", "kube2iam"] {
            let workload = ["DaemonSet", "Deployment"].map(|kind| format!("{kind}/kiam-{component}"));
            if !workload.iter().any(|key| rendered.has(key)) {
                continue;
            }
            let container = rendered.container(component);
            let command = parse_command(container, pki.path());
            assert!(
                matches!(
                    (&command, component),
                    (Sub::Agent(_), "agent") | (Sub::Server(_), "server") | (Sub::Kube2iam(_), "kube2iam")
                ),
                "{name}: {component} runs {command:?}"
            );
            for probe in [&container.liveness_probe, &container.readiness_probe].into_iter().flatten() {
                if let Some(exec) = &probe.exec {
                    let argv = exec.command.clone().unwrap_or_default();
                    assert!(matches!(parse_argv(argv, pki.path()), Sub::Health(_)), "{name}: probe");
                }
            }
        }
    }
    for (name, rendered) in report.cases.iter().chain(report.kustomize.iter()) {
        users_are_explicit(name, rendered);
    }
    crate::deploy::cases::check(&report);
}

/// The image's default user is root (kiam's and kube2iam's charts rely on it), so every
/// container of ours names its user: 65532:65532, non-root, no capabilities, or root with
/// every capability dropped but the one or two that its job needs.
fn users_are_explicit(name: &str, rendered: &Rendered) {
    for (key, (_, object)) in &rendered.0 {
        let pod = match object {
            Object::DaemonSet(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            Object::Deployment(d) => d.spec.as_ref().and_then(|s| s.template.spec.as_ref()),
            _ => continue,
        };
        let pod = pod.unwrap_or_else(|| panic!("{name}: {key} has no pod spec"));
        let pod_context = pod.security_context.as_ref();
        let containers = pod.init_containers.iter().flatten().chain(&pod.containers);
        for c in containers {
            let context = c.security_context.as_ref();
            let user = context.and_then(|s| s.run_as_user).or(pod_context.and_then(|s| s.run_as_user));
            let group = context.and_then(|s| s.run_as_group).or(pod_context.and_then(|s| s.run_as_group));
            let non_root =
                context.and_then(|s| s.run_as_non_root).or(pod_context.and_then(|s| s.run_as_non_root));
            let caps = context.and_then(|s| s.capabilities.as_ref());
            let dropped = caps.and_then(|c| c.drop.clone()).unwrap_or_default();
            let added = caps.and_then(|c| c.add.clone()).unwrap_or_default();
            let privileged = context.and_then(|s| s.privileged).unwrap_or(false);
            let at = format!("{name}: {key} container {}", c.name);
            assert!(!privileged, "{at} is privileged");
            assert_eq!(dropped, ["ALL"], "{at} drops every capability");
            match user {
                Some(0) => {
                    let needs: &[&[&str]] = &[&["NET_ADMIN", "NET_RAW"], &["NET_BIND_SERVICE"]];
                    assert!(
                        needs.contains(&added.iter().map(String::as_str).collect::<Vec<_>>().as_slice()),
                        "{at}: root with {added:?}"
                    );
                    assert_eq!(non_root, Some(false), "{at}");
                }
                Some(65532) => {
                    assert_eq!((group, non_root), (Some(65532), Some(true)), "{at}");
                    assert!(added.is_empty(), "{at}: non-root with {added:?} has none effective");
                }
                other => panic!("{at} runs as {other:?}: the image's default user is root"),
            }
        }
    }
}
