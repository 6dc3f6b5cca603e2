//! The image's default user under the securityContexts that kiam's and kube2iam's own charts
//! render, and under ours: the `kiam agent` binary runs as the Dockerfile's `USER`, with exactly
//! the capabilities a container runtime (containerd, CRI-O) grants each securityContext, in a
//! node namespace of the test's, in both iptables modes, and must install its DNAT rule. Needs
//! root.
//!
//! The model of the runtime: a container's bounding, permitted and effective sets are the
//! runtime's default set for a non-privileged container, plus `capabilities.add`, minus
//! `capabilities.drop` (`ALL` drops the defaults; `add` still applies), or every capability when
//! `privileged`; no inheritable and no ambient capabilities. A process whose uid is not 0 keeps
//! none of them across `execve`, so only root holds any. `setpriv` reproduces exactly that.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::SecurityContext;
use tokio::process::{Child, Command};

use crate::support::certs::{CertFiles, TestPki};
use crate::support::netns::NodeNet;

const KIAM: &str = env!("CARGO_BIN_EXE_kiam");
const PORT: u16 = 8181;

/// containerd's (and CRI-O's) default capabilities of a container that is not privileged.
const RUNTIME_DEFAULT: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// uswitch/kiam `helm/kiam` 6.1.2, `templates/agent-daemonset.yaml` with `agent.host.iptables`:
/// the agent container's whole securityContext (no pod-level one, no runAsUser).
const KIAM_CHART_AGENT: &str = r#"{"capabilities": {"add": ["NET_ADMIN"]}}"#;

/// jtblin/kube2iam `charts/kube2iam`, `templates/daemonset.yaml` with `host.iptables`.
const KUBE2IAM_CHART: &str = r#"{"privileged": true}"#;

/// Ours (deploy/helm/kiam-rs), the agent with `agent.host.iptables` (and kube2iam mode with
/// `kube2iam.host.iptables`).
const OUR_CHART_IPTABLES: &str = r#"{"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
  "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": false,
  "capabilities": {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}}"#;

/// Ours, the agent without iptables.
const OUR_CHART_PLAIN: &str = r#"{"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
  "runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": true, "capabilities": {"drop": ["ALL"]}}"#;

/// The image's `USER uid:gid`, read from the Dockerfile (the last `USER` line wins; none: root).
fn image_user() -> (u32, u32) {
    let dockerfile = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("read the Dockerfile");
    let Some(user) = dockerfile.lines().rev().find_map(|l| l.trim().strip_prefix("USER ")) else {
        return (0, 0);
    };
    let (uid, gid) = user.trim().split_once(':').unwrap_or((user.trim(), "0"));
    let number = |s: &str| s.parse().unwrap_or_else(|_| panic!("USER {user}: numeric ids expected"));
    (number(uid), number(gid))
}

/// What the container's process is: uid, gid and its capabilities (bounding set).
struct Process {
    uid: u32,
    gid: u32,
    caps: Vec<String>,
}

fn process(context: &str) -> Process {
    let context: SecurityContext = serde_json::from_str(context).expect("a securityContext");
    let (image_uid, image_gid) = image_user();
    let uid = context.run_as_user.map_or(image_uid, |u| u as u32);
    // runAsUser without runAsGroup: the user's primary group (root's is 0), else the image's.
    let gid = context.run_as_group.map(|g| g as u32).unwrap_or(if uid == 0 { 0 } else { image_gid });
    let caps = if context.privileged == Some(true) {
        vec!["ALL".to_string()]
    } else {
        let listed = |l: Option<&Vec<String>>| l.cloned().unwrap_or_default();
        let added = listed(context.capabilities.as_ref().and_then(|c| c.add.as_ref()));
        let dropped = listed(context.capabilities.as_ref().and_then(|c| c.drop.as_ref()));
        let mut caps: Vec<String> = if dropped.iter().any(|d| d == "ALL") {
            Vec::new()
        } else {
            RUNTIME_DEFAULT.iter().map(|c| c.to_string()).filter(|c| !dropped.contains(c)).collect()
        };
        for cap in added {
            if !caps.contains(&cap) {
                caps.push(cap);
            }
        }
        caps
    };
    Process { uid, gid, caps }
}

/// Which iptables the node uses: the image's wrapper picks `iptables-<mode>`.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Nft,
    Legacy,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Nft => "nft",
            Mode::Legacy => "legacy",
        }
    }
}

/// TLS files as a Secret volume mounts them: readable by every user.
fn mounted_secret(pki: &TestPki) -> CertFiles {
    let agent = pki.agent();
    for path in [pki.dir(), &agent.cert, &agent.key, &agent.ca] {
        let mode = if path.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).expect("chmod");
    }
    agent
}

/// A `bin/` whose `iptables` is the image's wrapper (deploy/image/iptables).
fn image_bin(pki: &TestPki) -> PathBuf {
    let bin = pki.dir().join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir bin");
    let wrapper = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/image/iptables");
    std::os::unix::fs::symlink(wrapper, bin.join("iptables")).expect("link iptables");
    bin
}

/// Starts the agent in `node` as `process`, with `flags`, the log in `log`.
fn spawn(node: &NodeNet, pki: &TestPki, who: &Process, mode: Mode, flags: &[String], log: &Path) -> Child {
    let tls = mounted_secret(pki);
    let caps: String = who.caps.iter().map(|c| format!(",+{}", c.to_lowercase())).collect();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(image_bin(pki)).chain(std::env::split_paths(&path)))
        .expect("PATH");
    Command::new("ip")
        .args(["netns", "exec", &node.name, "setpriv"])
        .arg(format!("--reuid={}", who.uid))
        .arg(format!("--regid={}", who.gid))
        .args(["--clear-groups", "--inh-caps=-all", "--ambient-caps=-all"])
        .arg(format!("--bounding-set=-all{caps}"))
        .args(["--", KIAM, "agent"])
        .args(flags)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .arg("--ca")
        .arg(&tls.ca)
        .env_clear()
        .env("PATH", path)
        .env("KIAM_IPTABLES_MODE", mode.name())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("the agent starts")
}

/// The node's nat table as `iptables-<mode> -S` shows it.
fn nat_rules(node: &NodeNet, mode: Mode) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, &format!("iptables-{}", mode.name()), "-w", "-t", "nat", "-S"])
        .output()
        .expect("iptables -S");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls until `done` holds, the agent exits, or 20 s pass; returns whether `done` held.
async fn wait_for(agent: &mut Child, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        if done() {
            return true;
        }
        if agent.try_wait().expect("try_wait").is_some() {
            return done();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Runs the agent with `--iptables` under `context` in a fresh node whose iptables is in
/// `mode`; returns the DNAT rule's presence, with the rules and the log for messages.
async fn installs_rule(context: &str, mode: Mode) -> Result<(), String> {
    let node = NodeNet::create();
    let pki = TestPki::new();
    let log = pki.dir().join("agent.log");
    let who = process(context);
    let flags = ["--iptables", "--host-interface=kv+", "--no-iptables-remove"].map(String::from).to_vec();
    let flags = [flags, vec!["--host".into(), node.agent_ip.to_string(), "--port".into(), PORT.to_string()]];
    let mut agent = spawn(&node, &pki, &who, mode, &flags.concat(), &log);
    let dnat = format!("-j DNAT --to-destination {}:{PORT}", node.agent_ip);
    let installed = wait_for(&mut agent, || {
        let rules = nat_rules(&node, mode);
        rules.contains(&dnat) && rules.contains("169.254.169.254/32")
    })
    .await;
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    if installed {
        return Ok(());
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    Err(format!(
        "uid {} gid {} caps {:?}, iptables-{}: no DNAT rule\n{}\n{text}",
        who.uid,
        who.gid,
        who.caps,
        mode.name(),
        nat_rules(&node, mode)
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_image_user_installs_the_dnat_rule_under_each_charts_security_context() {
    let cases = [
        ("kiam's chart (add NET_ADMIN)", KIAM_CHART_AGENT),
        ("kube2iam's chart (privileged)", KUBE2IAM_CHART),
        ("our chart (root, NET_ADMIN and NET_RAW only)", OUR_CHART_IPTABLES),
    ];
    let mut failures = Vec::new();
    for (chart, context) in cases {
        for mode in [Mode::Nft, Mode::Legacy] {
            if let Err(e) = installs_rule(context, mode).await {
                failures.push(format!("{chart}: {e}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}

/// Our chart's agent without iptables runs as 65532:65532 with no capability at all, and serves.
#[tokio::test(flavor = "multi_thread")]
async fn our_non_root_agent_serves_without_capabilities() {
    let node = NodeNet::create();
    let pki = TestPki::new();
    let log = pki.dir().join("agent.log");
    let who = process(OUR_CHART_PLAIN);
    assert_eq!((who.uid, who.gid, who.caps.len()), (65532, 65532, 0));
    let flags = ["--host".to_string(), node.agent_ip.to_string(), "--port".into(), PORT.to_string()];
    let mut agent = spawn(&node, &pki, &who, Mode::Nft, &flags, &log);
    let addr = std::net::SocketAddr::from((node.agent_ip, PORT));
    let ping = || {
        node.run_in(|| {
            use std::io::{Read, Write};
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = s.write_all(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            body.ends_with("pong")
        })
    };
    let served = wait_for(&mut agent, ping).await;
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.id().unwrap_or(0))).unwrap_or_default();
    let _ = agent.start_kill();
    let _ = agent.wait().await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(served, "the agent as 65532 without capabilities answers /ping\n{text}");
    let effective = status.lines().find(|l| l.starts_with("CapEff:")).unwrap_or("CapEff: ?");
    assert!(status.is_empty() || effective.ends_with("0000000000000000"), "{effective}");
    assert!(nat_rules(&node, Mode::Nft).lines().all(|l| !l.contains("DNAT")), "no rule without --iptables");
}
