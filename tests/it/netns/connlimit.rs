//! `--iptables-connlimit`: on a node made of network namespaces with the real `iptables`, the
//! kernel resets a pod's connection to the agent above the limit before the agent accepts it
//! (so a flood costs the agent no file descriptor), while another pod still connects and is
//! served. Needs root.

use std::net::TcpStream;
use std::time::Duration;

use kiam::agent::iptables::METADATA_IP;
use tokio::task::block_in_place;

use crate::support::agent_node::{TestAgent, pod_get};
use crate::support::netns::{NodeNet, PodNet};
use crate::support::stack::Stack;

const LIMIT: usize = 4;

/// `iptables -t filter -S` inside the node.
fn filter_rules(node: &NodeNet) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables", "-w", "-t", "filter", "-S"])
        .output()
        .expect("run iptables");
    assert!(out.status.success(), "iptables -S: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_kernel_refuses_a_pods_connection_above_the_limit_and_serves_its_neighbour() {
    let node = NodeNet::create();
    let (flood, quiet) = (PodNet::create_in(&node), PodNet::create_in(&node));
    let stack =
        Stack::with_pod_nets(&[(&flood, "flood", "flood-role"), (&quiet, "quiet", "quiet-role")]).await;
    let limit = format!("--iptables-connlimit={LIMIT}");
    let _agent = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+", &limit]).await;

    // The rule: a filter chain of the agent's own, jumped to first from INPUT for its port.
    let rules = filter_rules(&node);
    let input = rules.lines().find(|l| l.starts_with("-A INPUT")).unwrap_or_default();
    assert!(input.ends_with("-j KIAM-RS-LIM") && input.contains(&node.agent_ip.to_string()), "{rules}");
    let reject = rules.lines().find(|l| l.starts_with("-A KIAM-RS-LIM")).unwrap_or_default();
    for part in [&*format!("--connlimit-above {LIMIT}"), "--connlimit-mask 32", "--reject-with tcp-reset"] {
        assert!(reject.contains(part), "{part}: {rules}");
    }

    // The flooding pod holds LIMIT connections to the agent (through the DNAT); the next is
    // refused by the kernel at connect, before any accept.
    let connect = |net: &PodNet| {
        block_in_place(|| {
            net.run_in(|| TcpStream::connect_timeout(&(METADATA_IP, 80).into(), Duration::from_secs(5)))
        })
    };
    let held: Vec<TcpStream> =
        (0..LIMIT).map(|i| connect(&flood).unwrap_or_else(|e| panic!("connection {i}: {e}"))).collect();
    let refused = connect(&flood).expect_err("connection LIMIT + 1 is refused");
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // Its neighbour is not counted against it: connected and served.
    let url = "http://169.254.169.254/latest/meta-data/iam/security-credentials/";
    let served = block_in_place(|| pod_get(&quiet, url)).expect("the neighbour is answered");
    assert_eq!((served.status, served.body.as_str()), (200, "quiet-role"));
    drop(held);
}
