//! The edges of interception, on nodes made of network namespaces with the real `iptables`,
//! `ip6tables` and `conntrack`: the jump stays first in PREROUTING, a connection opened to the
//! node's metadata service before the DNAT cannot keep reaching it while one already sent to the
//! agent is kept, and on a node with an IPv6 address the IPv6 endpoint `fd00:ec2::254` is
//! intercepted too. Needs root.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use kiam::agent::iptables::{Interception, METADATA_IP, METADATA_IP6};
use tokio::task::block_in_place;

use crate::support::agent_node::{TestAgent, pod_get, wait_until};
use crate::support::fake_imds::{FakeImds, NODE_ROLE};
use crate::support::netns::{NodeNet, PodNet};
use crate::support::objects::{namespace, pod};
use crate::support::stack::Stack;

const ROLES: &str = "/latest/meta-data/iam/security-credentials/";

/// The node's own metadata service at 169.254.169.254 (and, with `v6`, at fd00:ec2::254).
fn decoy(node: &NodeNet, v6: bool) -> Vec<FakeImds> {
    node.add_address(METADATA_IP).expect("169.254.169.254 on the node");
    let mut decoys =
        vec![FakeImds::start_on_listener(node.listen(SocketAddr::from((METADATA_IP, 80))), false)];
    if v6 {
        node.add_address6(METADATA_IP6);
        decoys.push(FakeImds::start_on_listener(node.listen(SocketAddr::from((METADATA_IP6, 80))), false));
    }
    decoys
}

/// One GET on a kept-alive connection; the body, or why there is none.
fn exchange(stream: &mut TcpStream, path: &str) -> std::io::Result<String> {
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")?;
    let (mut seen, mut chunk) = (Vec::new(), [0u8; 4096]);
    // Bounded: each read waits at most the socket's timeout, and a response is small.
    for _ in 0..64 {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        seen.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&seen).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if body.len() >= length {
                return Ok(body[..length].to_string());
            }
        }
    }
    Err(std::io::ErrorKind::InvalidData.into())
}

/// `conntrack -L` inside the node.
fn tracked_flows(node: &NodeNet) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "conntrack", "-L"])
        .output()
        .expect("run conntrack");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A node with a pod (`app`, role `app-role`), the node's own metadata service, and an agent that
/// checks its rules every 200 ms. Fields drop in order: the agent before the namespaces.
struct CheckedNode {
    rules: Arc<Interception<kiam::agent::iptables::Command>>,
    _agent: TestAgent,
    _decoy: Vec<FakeImds>,
    _stack: Stack,
    net: PodNet,
    node: NodeNet,
}

async fn checked_node() -> CheckedNode {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let stack = Stack::with_pod_nets(&[(&net, "app", "app-role")]).await;
    let decoy = decoy(&node, false);
    let flags = ["--iptables", "--host-interface=kv+", "--iptables-check-interval=200ms"];
    let agent = TestAgent::in_node(&stack, &node, &flags).await;
    let rules = agent.interception.clone().expect("rules");
    CheckedNode { rules, _agent: agent, _decoy: decoy, _stack: stack, net, node }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rule_put_above_the_jump_is_put_below_it_again() {
    let CheckedNode { rules, net, node, .. } = &checked_node().await;

    // A rule on top of PREROUTING that lets metadata traffic through to the node's service.
    node.iptables(&["-I", "PREROUTING", "1", "-p", "tcp", "-d", "169.254.169.254/32", "-j", "ACCEPT"])
        .expect("insert above the jump");
    let restored = || {
        let rules = rules.clone();
        async move { rules.restorations() >= 1 && rules.is_installed().await.unwrap_or(false) }
    };
    wait_until("the jump is first again", Duration::from_secs(10), restored).await;
    let first = node.nat_rules().lines().find(|l| l.starts_with("-A PREROUTING")).unwrap_or("").to_string();
    assert!(first.ends_with("-j KIAM-RS"), "{}", node.nat_rules());
    let mine = block_in_place(|| pod_get(net, &format!("http://169.254.169.254{ROLES}"))).expect("answered");
    assert_eq!(mine.body, "app-role");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_opened_before_the_dnat_does_not_keep_reaching_the_node() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let stack = Stack::with_pod_nets(&[(&net, "app", "app-role")]).await;
    let _decoy = decoy(&node, false);

    // A node's connections are tracked before the agent starts (kube-proxy's rules match on
    // conntrack state); in a bare namespace the kernel would track none of them.
    let filter = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables", "-w", "-A", "INPUT", "-m", "conntrack"])
        .args(["--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"])
        .status()
        .expect("run iptables");
    assert!(filter.success(), "a conntrack rule of another program");
    // Before the agent starts, the pod keeps a connection to the node's metadata service.
    let mut early = net.run_in(|| TcpStream::connect((METADATA_IP, 80))).expect("connect to the node");
    early.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(block_in_place(|| exchange(&mut early, ROLES)).expect("the node answers"), NODE_ROLE);

    let _agent = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+"]).await;
    // The flush follows the rules' installation, which is all the helper above waits for.
    let flushed = || std::future::ready(!tracked_flows(&node).contains("dst=169.254.169.254"));
    wait_until("the agent deletes the tracked flow", Duration::from_secs(10), flushed).await;
    // Its flow was forgotten when the rules went in: the next packet is NATed to the agent,
    // which knows no such connection and resets it. The pod reconnects, and is intercepted.
    let again = block_in_place(|| exchange(&mut early, ROLES));
    assert!(again.as_deref().is_err(), "the kept-alive connection still reaches the node: {again:?}");
    let mine = block_in_place(|| pod_get(&net, &format!("http://169.254.169.254{ROLES}"))).expect("answered");
    assert_eq!(mine.body, "app-role");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restoration_keeps_the_flows_already_sent_to_the_agent() {
    let CheckedNode { rules, net, node, .. } = &checked_node().await;

    // A pod's kept-alive connection, sent to the agent by the DNAT.
    let mut kept = net.run_in(|| TcpStream::connect((METADATA_IP, 80))).expect("connect");
    kept.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    assert_eq!(block_in_place(|| exchange(&mut kept, ROLES)).expect("the agent answers"), "app-role");
    let pod = net.pod_ip.to_string();
    let before = flow_id(node, &pod).expect("the pod's flow is tracked");

    // Something empties our chain; the check loop puts the rule back and flushes (restorations
    // count after the flush).
    node.iptables(&["-F", "KIAM-RS"]).expect("empty the chain");
    wait_until("the rules are restored", Duration::from_secs(10), || {
        std::future::ready(rules.restorations() >= 1)
    })
    .await;
    // The flush deleted the flows that reach the node's service, not this one: it is the same
    // tracked flow, and the connection goes on.
    assert_eq!(flow_id(node, &pod), Some(before), "{}", tracked_flows(node));
    assert_eq!(block_in_place(|| exchange(&mut kept, ROLES)).expect("still answered"), "app-role");
}

/// The conntrack id of the flow from `pod` to the metadata address, inside the node.
fn flow_id(node: &NodeNet, pod: &str) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "conntrack", "-L", "-p", "tcp", "--orig-src", pod])
        .args(["--orig-dst", "169.254.169.254", "-o", "id"])
        .output()
        .expect("run conntrack");
    let flows = String::from_utf8_lossy(&out.stdout).into_owned();
    flows.split_whitespace().find_map(|word| word.strip_prefix("id=")).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_node_with_ipv6_the_ipv6_endpoint_is_intercepted() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let (pod6, agent6) = (net.enable_ipv6(), node.enable_ipv6());
    let decoys = decoy(&node, true);
    let stack = Stack::start().await;
    stack.kube.apply(namespace("team-a").permitted(".*").build());
    let v4 = net.pod_ip.to_string();
    stack.kube.apply(pod("team-a", "dual").ip(&v4).also_ip(&pod6.to_string()).role("app-role").build());
    stack.wait_for_pod(IpAddr::V4(net.pod_ip)).await;
    let url6 = format!("http://[{METADATA_IP6}]{ROLES}");

    // Without the agent, the pod reaches the node's own service over IPv6.
    let before = block_in_place(|| pod_get(&net, &url6)).expect("the node answers over IPv6");
    assert_eq!(before.body, NODE_ROLE);

    let host6 = format!("--host-ipv6={agent6}");
    let agent = TestAgent::in_node(&stack, &node, &["--iptables", "--host-interface=kv+", &host6]).await;
    assert!(node.nat_rules6().contains("-j KIAM-RS"), "{}", node.nat_rules6());
    // The agent's IPv6 listener and the pod's route settle after the rules do (addresses may still
    // be tentative under load): wait for the first answer, bounded.
    let answered =
        || std::future::ready(block_in_place(|| pod_get(&net, &url6)).is_ok_and(|r| r.status == 200));
    crate::support::wait::until("the agent answers over IPv6", Duration::from_secs(15), answered).await;
    let mine = block_in_place(|| pod_get(&net, &url6)).expect("the agent answers over IPv6");
    assert_eq!((mine.status, mine.body.as_str()), (200, "app-role"));
    let v4_too = block_in_place(|| pod_get(&net, &format!("http://{METADATA_IP}{ROLES}")));
    assert_eq!(v4_too.expect("IPv4 as before").body, "app-role");
    let seen: Vec<IpAddr> = decoys[1].requests().iter().map(|r| r.peer.ip()).collect();
    assert_eq!(seen, vec![IpAddr::V6(pod6)], "only the request made before the agent reached the node");

    agent.stop().await.expect("clean stop");
    assert!(!node.nat_rules6().contains("KIAM-RS"), "removed:\n{}", node.nat_rules6());
}

/// `iptables` starts failing while the agent runs: the check loop logs it and the agent keeps
/// serving through the rules already in place; once `iptables` works again, a deleted rule is
/// restored.
#[tokio::test(flavor = "multi_thread")]
async fn an_iptables_that_starts_failing_does_not_stop_the_agent() {
    let node = NodeNet::create();
    let net = PodNet::create_in(&node);
    let stack = Stack::with_pod_nets(&[(&net, "app", "app-role")]).await;
    let broken = tempfile::NamedTempFile::new().expect("flag file");
    let flag = broken.path().to_string_lossy().into_owned();
    // iptables, except while the flag file exists.
    let script = format!(
        "if [ -e {flag} ]; then echo broken >&2; exit 4; fi; exec ip netns exec {} \"$0\" \"$@\"",
        node.name
    );
    let runner = kiam::agent::iptables::Command::with_program(vec![
        "sh".into(),
        "-c".into(),
        script,
        "iptables".into(),
    ]);
    std::fs::remove_file(broken.path()).expect("working at first");
    let flags = ["--iptables", "--host-interface=kv+", "--iptables-check-interval=100ms"];
    let agent = TestAgent::in_node_with(&stack, &node, &stack.pki.agent(), &flags, runner).await;
    let rules = agent.interception.clone().expect("rules");

    std::fs::write(broken.path(), "").expect("break iptables");
    let failing = || {
        let rules = rules.clone();
        async move { !rules.is_installed().await.unwrap_or(false) }
    };
    wait_until("iptables fails", Duration::from_secs(10), failing).await;
    let url = format!("http://169.254.169.254{ROLES}");
    for _ in 0..3 {
        let mine = block_in_place(|| pod_get(&net, &url)).expect("still intercepted and served");
        assert_eq!(mine.body, "app-role");
    }
    std::fs::remove_file(broken.path()).expect("mend iptables");
    let jump: Vec<&str> = rules.rules().jump.iter().map(String::as_str).collect();
    node.iptables(&[&["-D", "PREROUTING"], jump.as_slice()].concat()).expect("delete the jump");
    let restored = || {
        let rules = rules.clone();
        async move { rules.restorations() >= 1 && rules.is_installed().await.unwrap_or(false) }
    };
    wait_until("restored once iptables works", Duration::from_secs(10), restored).await;
}
