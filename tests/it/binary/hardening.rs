//! Start-up hardening of the `kiam` binary: the soft open-file limit is raised to the hard one,
//! so that the listeners' connection caps, not EMFILE, decide how many clients are served.

use std::time::Duration;

use tokio::process::Command;

use crate::support::certs::TestPki;
use crate::support::http::request;
use crate::support::process::{KIAM, free_port, kiam_through};

/// The soft and hard `Max open files` of a process, from `/proc`.
fn open_file_limits(pid: u32) -> Option<(String, String)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line.trim_start_matches("Max open files").split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

#[tokio::test]
async fn the_agent_raises_its_soft_open_file_limit() {
    let pki = TestPki::new();
    let tls = pki.agent();
    let port = free_port().to_string();
    // A shell lowers the soft limit, then becomes the agent (no server needed to start).
    let mut shell = Command::new("sh");
    shell.args(["-c", "ulimit -Sn 256 && exec \"$0\" \"$@\"", KIAM]);
    let args = ["agent", "--host", "127.0.0.1", "--port", &port, "--server-address", "127.0.0.1:9"];
    let args = [&args[..], &["--metadata-addr", "127.0.0.1:9"]].concat();
    let log = pki.dir().join("agent.log");
    let mut child = kiam_through(shell, &args, &tls, &log).spawn().expect("kiam agent starts");
    let ping = format!("http://127.0.0.1:{port}/ping");
    let up = || async { request("GET", &ping, &[], "", None).await.is_ok_and(|r| r.body == "pong") };
    crate::support::wait::until("the agent answers /ping", Duration::from_secs(15), up).await;
    let pid = child.id().expect("running");
    let (soft, hard) = open_file_limits(pid).expect("the agent's limits");
    assert_ne!(soft, "256", "the soft limit was not raised");
    assert_eq!(soft, hard);
    child.kill().await.expect("stop the agent");
}
