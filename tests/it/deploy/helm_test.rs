//! The chart's `helm test` hook (issue 26): one Pod, with a container per component the release
//! runs, that checks the servers answer `kiam health` over mTLS and the agent (or kube2iam
//! mode) of the test pod's node answers HTTP. On every rendered value set: it is a test hook,
//! least privilege, and points at the same addresses, ports and certificates as the workloads.
//! Then the rendered commands run against a real server and agent.

use std::path::Path;
use std::process::Command as StdCommand;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kiam::cli::Command as Sub;
use serde_json::{Value, json};

use crate::deploy::render::{Object, Rendered, Report, parse_argv};
use crate::support::certs::TestPki;
use crate::support::fake_imds::FakeImds;
use crate::support::fake_kube::FakeKube;
use crate::support::moto::{free_port, venv_bin};
use crate::support::process::kiam;
use crate::support::stack::BASE_ARN;

fn test_pod(r: &Rendered) -> Option<&Pod> {
    let pods: Vec<&Pod> =
        r.0.values()
            .filter_map(|(_, o)| match o {
                Object::Pod(p) => Some(p.as_ref()),
                _ => None,
            })
            .collect();
    assert!(pods.len() <= 1, "one test pod at most");
    pods.first().copied()
}

/// The value of `--name=VALUE` in `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().find_map(|a| a.strip_prefix(&format!("{name}=")))
}

/// The HTTP checks of a container running the check script: `PORT/PATH` each.
fn http_checks(c: &Container) -> Vec<String> {
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(command.get(..2), Some(&["/bin/bash".to_string(), "-c".into()][..]), "{command:?}");
    assert_eq!(command.get(3).map(String::as_str), Some("http-check"));
    command[4..].to_vec()
}

/// Non-root, no capability, no escalation, read-only root, no API token.
fn least_privilege(name: &str, pod: &Pod) {
    let spec = pod.spec.as_ref().expect("a spec");
    let context = spec.security_context.as_ref().expect("a pod securityContext");
    assert_eq!((context.run_as_user, context.run_as_non_root), (Some(65532), Some(true)), "{name}");
    assert_eq!(spec.automount_service_account_token, Some(false), "{name}: no API token");
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert!(spec.host_network.is_none() && spec.volumes.iter().flatten().all(|v| v.host_path.is_none()));
    for c in &spec.containers {
        let s = c.security_context.as_ref().expect("a container securityContext");
        assert_eq!(s.allow_privilege_escalation, Some(false), "{name}/{}", c.name);
        assert_eq!(s.read_only_root_filesystem, Some(true), "{name}/{}", c.name);
        assert!(s.run_as_user.is_none() && s.privileged.is_none(), "{name}/{}", c.name);
        let caps = s.capabilities.as_ref().expect("capabilities");
        assert_eq!((caps.drop.as_deref(), caps.add.as_ref()), (Some(&["ALL".to_string()][..]), None));
    }
}

/// One rendering's test pod, against its workloads.
fn check_one(name: &str, r: &Rendered, pki: &Path) {
    let components: Vec<&str> = ["server", "agent", "kube2iam"]
        .into_iter()
        .filter(|c| ["DaemonSet", "Deployment"].iter().any(|k| r.has(&format!("{k}/kiam-{c}"))))
        .collect();
    let Some(pod) = test_pod(r) else {
        assert!(components.is_empty(), "{name}: no test pod for {components:?}");
        return;
    };
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations.get("helm.sh/hook").map(String::as_str), Some("test"), "{name}");
    least_privilege(name, pod);
    let spec = pod.spec.as_ref().expect("a spec");
    let names: Vec<&str> = spec.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, components, "{name}: a check per component");
    for c in &spec.containers {
        let image = r.container(&c.name).image.clone();
        assert_eq!(c.image, image, "{name}: the component's own image");
        match c.name.as_str() {
            "server" => {
                let argv = c.command.clone().unwrap_or_default();
                assert!(matches!(parse_argv(argv.clone(), pki), Sub::Health(_)), "{name}: {argv:?}");
                let server = r.args("server");
                let port = flag(&server, "--bind").and_then(|b| b.rsplit_once(':')).map(|(_, p)| p);
                assert_eq!(
                    flag(&argv, "--server-address"),
                    Some(&*format!("kiam-server:{}", port.unwrap_or("?")))
                );
                if r.has("DaemonSet/kiam-agent") {
                    let agent = r.args("agent");
                    assert_eq!(flag(&argv, "--server-address"), flag(&agent, "--server-address"), "{name}");
                }
                // The agent's certificate where agents share one, else the server's.
                let secret = |spec: &k8s_openapi::api::core::v1::PodSpec| {
                    let volumes = spec.volumes.clone().unwrap_or_default();
                    let tls = volumes.into_iter().find(|v| v.name == "tls").expect("a tls volume");
                    tls.secret.and_then(|s| s.secret_name)
                };
                let own = if r.has("DaemonSet/kiam-agent") { secret(r.pod("agent")) } else { None };
                let expected = own.or_else(|| secret(r.pod("server")));
                assert_eq!(secret(spec), expected, "{name}: the TLS secret");
                let mounts = c.volume_mounts.clone().unwrap_or_default();
                assert!(mounts.iter().any(|m| m.mount_path == "/etc/kiam/tls" && m.read_only == Some(true)));
            }
            "agent" => {
                let args = r.args("agent");
                let mut want = vec![format!("{}/ping", flag(&args, "--port").expect("--port"))];
                if let Some(metrics) = flag(&args, "--prometheus-listen-addr") {
                    want.push(format!("{}/metrics", metrics.rsplit_once(':').expect("host:port").1));
                }
                assert_eq!(http_checks(c), want, "{name}");
            }
            "kube2iam" => {
                let port = flag(&r.args("kube2iam"), "--app-port").expect("--app-port").to_string();
                assert_eq!(http_checks(c), [format!("{port}/healthz")], "{name}");
            }
            other => panic!("{name}: an unknown check {other}"),
        }
    }
}

pub fn check(report: &Report) {
    let pki = tempfile::tempdir().expect("temp dir");
    std::fs::write(pki.path().join("file"), "").expect("a stand-in file");
    for (name, rendered) in &report.cases {
        check_one(name, rendered, pki.path());
    }
    let with = |c: &str| report.cases.values().filter(|r| test_pod(r).is_some_and(|p| has(p, c))).count();
    assert!(with("server") > 0 && with("agent") > 0 && with("kube2iam") > 0, "every kind of check renders");
    for (name, rendered) in &report.kustomize {
        assert!(test_pod(rendered).is_none(), "{name}: hooks are not installed by kustomize");
    }
}

fn has(pod: &Pod, container: &str) -> bool {
    pod.spec.as_ref().is_some_and(|s| s.containers.iter().any(|c| c.name == container))
}

/// The chart rendered with `values`, hooks included, through `py/deploy_check.py --render`.
fn render(values: &Value) -> Vec<Value> {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("objects.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/py/deploy_check.py");
    let status = StdCommand::new(venv_bin("python"))
        .arg(&script)
        .args(["--render", &values.to_string()])
        .arg(&out)
        .status()
        .expect("run deploy_check.py");
    assert!(status.success(), "deploy_check.py --render failed: {status}");
    serde_json::from_slice(&std::fs::read(&out).expect("objects")).expect("JSON")
}

/// Runs a rendered container's command, the downward API's HOST_IP given as 127.0.0.1, within
/// `limit`; true if it exits 0.
async fn run(argv: &[String], limit: Duration, log: &Path) -> bool {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOST_IP", "127.0.0.1")
        .stdout(std::fs::File::create(log).expect("log"))
        .stderr(std::fs::File::create(log.with_extension("err")).expect("log"))
        .kill_on_drop(true);
    let status = tokio::time::timeout(limit, cmd.status()).await;
    status.is_ok_and(|s| s.expect("runs").success())
}

#[tokio::test]
async fn the_helm_test_hook_passes_against_a_running_server_and_agent() {
    let pki = TestPki::new();
    let (kube, imds) = (FakeKube::start().await, FakeImds::start().await);
    let (grpc, http, metrics) = (free_port(), free_port(), free_port());
    // The chart's defaults, on ports free here.
    let values = json!({
        "agent": {"host": {"port": http}, "prometheus": {"port": metrics}},
        "server": {"service": {"targetPort": grpc}},
    });
    let objects = render(&values);
    let pod = objects.iter().find(|o| o["kind"] == "Pod").expect("the test pod");
    let pod: Pod = serde_json::from_value(pod.clone()).expect("a Pod");
    let containers = pod.spec.expect("a spec").containers;
    let command = |name: &str| {
        let c = containers.iter().find(|c| c.name == name).unwrap_or_else(|| panic!("no {name} check"));
        c.command.clone().expect("a command")
    };

    let logs = pki.dir();
    let kubeconfig = kube.write_kubeconfig(logs);
    let server_addr = format!("127.0.0.1:{grpc}");
    let server_args = [
        "server",
        "--bind",
        &server_addr,
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--role-base-arn",
        BASE_ARN,
    ];
    let _server = kiam(&server_args, &pki.server(), &logs.join("server.log")).spawn().expect("server starts");
    let agent_args = [
        "agent",
        "--port",
        &http.to_string(),
        "--host",
        "127.0.0.1",
        "--server-address",
        &server_addr,
        "--metadata-addr",
        &imds.addr().to_string(),
        "--prometheus-listen-addr",
        &format!("127.0.0.1:{metrics}"),
    ];
    let mut agent = kiam(&agent_args, &pki.agent(), &logs.join("agent.log")).spawn().expect("agent starts");

    // The server check: the binary, the rendered flags; the Service's name stands for this
    // loopback address (the server's certificate holds both), the secret's files for the test's.
    let agent_tls = pki.agent();
    let server_check: Vec<String> = command("server")
        .into_iter()
        .map(|a| {
            let a = a.replace("kiam-server:", "127.0.0.1:");
            match a.split_once("=/etc/kiam/tls/") {
                Some((flag, _)) => {
                    let file = match flag {
                        "--cert" => &agent_tls.cert,
                        "--key" => &agent_tls.key,
                        _ => &agent_tls.ca,
                    };
                    format!("{flag}={}", file.display())
                }
                None => a,
            }
        })
        .collect();
    assert_eq!(server_check[0], "/kiam");
    let server_check: Vec<String> = std::iter::once(crate::support::process::KIAM.to_string())
        .chain(server_check[1..].iter().cloned())
        .collect();
    assert!(
        run(&server_check, Duration::from_secs(60), &logs.join("check-server.log")).await,
        "kiam health passes"
    );

    // The agent check: the rendered script as it is, both of its HTTP checks.
    let agent_check = command("agent");
    assert!(agent_check.iter().any(|a| a.ends_with("/metrics")), "{agent_check:?}");
    let passed = run(&agent_check, Duration::from_secs(60), &logs.join("check-agent.log")).await;
    let out = std::fs::read_to_string(logs.join("check-agent.log")).unwrap_or_default();
    assert!(passed, "the agent check passes: {out}");
    assert!(out.contains(&format!("127.0.0.1:{http}/ping: HTTP/1.1 200")), "{out}");
    assert!(out.contains(&format!("127.0.0.1:{metrics}/metrics: HTTP/1.1 200")), "{out}");

    // Without the agent, the check does not pass: it finds no answer and keeps trying (for a
    // minute; cut short here).
    agent.kill().await.expect("stop the agent");
    let log = logs.join("check-agent-down.log");
    assert!(!run(&agent_check, Duration::from_secs(3), &log).await, "no agent, no pass");
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(out.contains(&format!("127.0.0.1:{http}/ping: no answer")), "{out}");
}
