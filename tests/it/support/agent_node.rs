//! Agents started by a test, next to (or instead of) the one a [`Stack`] runs, with their own
//! flags: on loopback, in front of any upstream metadata service, or inside a [`NodeNet`] with
//! `--iptables`, where pods reach them through 169.254.169.254 as on a real node.
//!
//! An agent in a node is wired as `kiam::agent::main` wires it, from real `kiam agent` flags,
//! with two differences: its listening socket is made inside the node's namespace, and its
//! `iptables` commands run there (`ip netns exec`). Its gRPC and upstream connections leave from
//! the test's own namespace, so it reaches the stack's server and fake metadata service on
//! loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiam::agent::iptables::{self, Interception};
use kiam::agent::{Agent, AgentStartError, Config};
use kiam::cli::{Cli, Command};
use kiam::client::GrpcClient;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::certs::CertFiles;
use super::http::{Response, request};
use super::netns::{NodeNet, PodNet};
use super::stack::Stack;

/// The port agents listen on inside a node (each node has its own address).
pub const NODE_AGENT_PORT: u16 = 8181;

/// A running agent; it stops when dropped, or through [`TestAgent::stop`].
pub struct TestAgent {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its interception rules, when started with `--iptables`.
    pub interception: Option<Arc<Interception<iptables::Command>>>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), AgentStartError>>>,
}

/// Parses `kiam agent` flags (with the stack's agent certificate) into a configuration.
pub fn agent_config(cert: &CertFiles, flags: &[&str]) -> Config {
    let (cert_path, key, ca) =
        (cert.cert.to_string_lossy(), cert.key.to_string_lossy(), cert.ca.to_string_lossy());
    let mut argv = vec!["kiam", "agent", "--cert", &cert_path, "--key", &key, "--ca", &ca];
    argv.extend_from_slice(flags);
    let Command::Agent(args) = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}")).command
    else {
        panic!("not an agent command line: {argv:?}")
    };
    args.config().unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

impl TestAgent {
    /// An agent on 127.0.0.1:0 asking the stack's server, forwarding to `upstream`, with the
    /// stack agent's defaults changed by `configure`.
    pub async fn on_loopback(
        stack: &Stack,
        upstream: SocketAddr,
        configure: impl FnOnce(Agent<GrpcClient>) -> Agent<GrpcClient>,
    ) -> TestAgent {
        TestAgent::on_loopback_with_server(stack, stack.server_addr, upstream, configure).await
    }

    /// [`TestAgent::on_loopback`] asking the server at `server` (a dead address, say).
    pub async fn on_loopback_with_server(
        stack: &Stack,
        server: SocketAddr,
        upstream: SocketAddr,
        configure: impl FnOnce(Agent<GrpcClient>) -> Agent<GrpcClient>,
    ) -> TestAgent {
        let (server, upstream) = (server.to_string(), upstream.to_string());
        let flags = [
            "--host",
            "127.0.0.1",
            "--server-address",
            &server,
            "--metadata-addr",
            &upstream,
            "--pod-wait-timeout",
            "1s",
        ];
        let config = agent_config(&stack.pki.agent(), &flags);
        let client = GrpcClient::connect_lazy(&config.client).expect("gRPC client");
        let agent = configure(Agent::from_config(client, &config).expect("agent"));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind agent");
        let addr = listener.local_addr().expect("agent addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kiam::agent::run(listener, Arc::new(agent), shutdown.clone()));
        TestAgent { addr, interception: None, shutdown, task: Some(task) }
    }

    /// An agent inside `node`, from `kiam agent` `flags` (which should include `--iptables` and
    /// `--host-interface`), listening on the node's agent address, asking the stack's server and
    /// forwarding to the stack's fake metadata service. Returns once its rules are installed.
    pub async fn in_node(stack: &Stack, node: &NodeNet, flags: &[&str]) -> TestAgent {
        let (host, port) = (node.agent_ip.to_string(), NODE_AGENT_PORT.to_string());
        let (server, upstream) = (stack.server_addr.to_string(), stack.imds.addr().to_string());
        let mut all =
            vec!["--host", &host, "--port", &port, "--server-address", &server, "--metadata-addr", &upstream];
        all.extend_from_slice(flags);
        let config = agent_config(&stack.pki.agent(), &all);
        let client = GrpcClient::connect_lazy(&config.client).expect("gRPC client");
        let agent = Agent::from_config(client, &config).expect("agent");
        let addr = SocketAddr::new(IpAddr::V4(node.agent_ip), NODE_AGENT_PORT);
        let listener = TcpListener::from_std(node.listen(addr)).expect("adopt the node's listener");
        let rules = config.iptables.clone().expect("in_node needs --iptables");
        let runner = iptables::Command::with_program(node.iptables_program());
        let interception = Arc::new(Interception::new(runner, rules));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(kiam::agent::serve(
            listener,
            Arc::new(agent),
            Some(Arc::clone(&interception)),
            shutdown.clone(),
        ));
        let agent =
            TestAgent { addr, interception: Some(Arc::clone(&interception)), shutdown, task: Some(task) };
        wait_until("the agent's iptables rules are installed", Duration::from_secs(20), || async {
            interception.is_installed().await.unwrap_or(false)
        })
        .await;
        agent
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops it and returns how `serve` ended (rule removal included).
    pub async fn stop(mut self) -> Result<(), AgentStartError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("the agent stops within 30 s")
            .expect("the agent task does not panic")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polling = async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(limit, polling)
        .await
        .unwrap_or_else(|_| panic!("timed out after {limit:?}: {what}"));
}

/// A GET from inside `net` (a pod), on a runtime of its own in the pod's namespace. Blocking:
/// call it through `tokio::task::block_in_place` from a multi-thread test.
pub fn pod_get(net: &PodNet, url: &str) -> Result<Response, String> {
    net.run_in(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime in the pod")
            .block_on(request("GET", url, &[], "", None))
    })
}
