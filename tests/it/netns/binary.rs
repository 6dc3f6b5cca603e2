//! The `kiam agent` binary with `--iptables`, run inside a node namespace as a DaemonSet runs it
//! on a node: it installs its rules at start, and on SIGTERM removes them, or keeps them with
//! `--no-iptables-remove` (the flag kiam's Helm chart passes). Needs root.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kiam::agent::iptables::{self, Interception};
use tokio::process::Command;

use crate::support::agent_node::{NODE_AGENT_PORT, agent_config, pod_get, wait_until};
use crate::support::certs::TestPki;
use crate::support::netns::{NodeNet, PodNet};

const KIAM: &str = env!("CARGO_BIN_EXE_kiam");

/// Where the agent's log goes.
#[derive(Clone, Copy, PartialEq)]
enum Log {
    /// A file, returned.
    File,
    /// A pipe whose reading end is closed at once (`kiam agent ... 2>&1 | head -3`).
    ClosedPipe,
}

/// Runs the agent in `node` until it has installed its rules, then stops it with SIGTERM and
/// returns the rules as `iptables` shows them afterwards, and the agent's log.
async fn run_and_terminate(node: &NodeNet, net: &PodNet, extra: &[&str]) -> (bool, String) {
    run_and_terminate_logging(node, net, extra, Log::File).await
}

async fn run_and_terminate_logging(node: &NodeNet, net: &PodNet, extra: &[&str], to: Log) -> (bool, String) {
    let pki = TestPki::new();
    let agent = pki.agent();
    let (host, port) = (node.agent_ip.to_string(), NODE_AGENT_PORT.to_string());
    let mut flags = vec!["--iptables", "--host-interface=kv+", "--host", &host, "--port", &port];
    flags.extend_from_slice(extra);
    let rules = agent_config(&agent, &flags).iptables.expect("--iptables");
    let check = Arc::new(Interception::new(iptables::Command::with_program(node.iptables_program()), rules));

    let log = pki.dir().join("agent.log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &node.name, KIAM, "agent"])
        .args(&flags)
        .arg("--cert")
        .arg(&agent.cert)
        .arg("--key")
        .arg(&agent.key)
        .arg("--ca")
        .arg(&agent.ca)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(match to {
            Log::File => Stdio::from(std::fs::File::create(&log).expect("log file")),
            Log::ClosedPipe => Stdio::piped(),
        })
        .kill_on_drop(true)
        .spawn()
        .expect("kiam agent starts");
    drop(child.stderr.take()); // nobody reads the log any more: every line is a write to a closed pipe
    let installed = || {
        let check = Arc::clone(&check);
        async move { check.is_installed().await.unwrap_or(false) }
    };
    wait_until("kiam agent installs its rules", Duration::from_secs(20), installed).await;
    let url = "http://169.254.169.254/ping";
    let intercepted = || {
        std::future::ready(tokio::task::block_in_place(|| pod_get(net, url)).is_ok_and(|r| r.body == "pong"))
    };
    wait_until("the pod reaches the agent", Duration::from_secs(15), intercepted).await;

    let pid = child.id().expect("running") as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child we spawned (`ip netns exec` execs kiam in place).
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("the agent exits within 20 s of SIGTERM")
        .expect("wait");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "exit {status}:\n{text}");
    (check.is_installed().await.expect("check"), text)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_removes_its_rules_on_sigterm_or_keeps_them() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);

    let (kept, log) = run_and_terminate(&node, &net, &["--no-iptables-remove"]).await;
    assert!(kept, "--no-iptables-remove keeps the rules:\n{}\n{log}", node.nat_rules());
    assert!(log.contains("left in place"), "{log}");

    let (kept, log) = run_and_terminate(&node, &net, &[]).await;
    assert!(!kept, "removed by default:\n{}\n{log}", node.nat_rules());
    assert!(!node.nat_rules().contains("KIAM-RS"), "{}", node.nat_rules());
}

/// Logging into a closed pipe neither kills the agent nor skips its shutdown: it exits 0 on
/// SIGTERM and removes its rules (a panic would exit 101 and leave the DNAT behind).
#[tokio::test(flavor = "multi_thread")]
async fn a_closed_log_pipe_does_not_stop_the_shutdown() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let (kept, _) = run_and_terminate_logging(&node, &net, &["--level=debug"], Log::ClosedPipe).await;
    assert!(!kept, "removed:\n{}", node.nat_rules());
    assert!(!node.nat_rules().contains("KIAM-RS"), "{}", node.nat_rules());
}
