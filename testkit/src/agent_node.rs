//! Agents started by a test, next to (or instead of) the one a [`Stack`] runs, with their own
//! flags: on loopback, in front of any upstream metadata service, or inside a [`NodeNet`] with
//! `--iptables`, where pods reach them through 169.254.169.254 as on a real node.
//!
//! Every agent is assembled by `kiam::agent::assemble`, as `kiam agent` assembles it, from real
//! `kiam agent` flags. An agent in a node differs in two ways: its listening socket is made
//! inside the node's namespace, and its `iptables` commands run there (`ip netns exec`). Its gRPC and upstream connections leave from
//! the test's own namespace, so it reaches the stack's server and fake metadata service on
//! loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kiam::agent::iptables::{self, Interception};
use kiam::agent::{self as agent, AgentStartError, Config, Running};
use kiam::cli::{Cli, Command};
use kiam::client::{Dns, Resolve};
use kiam::metrics::Metrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::certs::CertFiles;
use crate::http::{Response, request};
use crate::netns::{NodeNet, PodNet};
use crate::stack::Stack;

/// The port agents listen on inside a node (each node has its own address).
pub const NODE_AGENT_PORT: u16 = 8181;

/// A running agent; it stops when dropped, or through [`TestAgent::stop`].
pub struct TestAgent {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its interception rules, when started with `--iptables`.
    pub interception: Option<Arc<Interception<iptables::Command>>>,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    running: Option<Running<iptables::Command>>,
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
        configure: impl FnOnce(&mut Config),
    ) -> TestAgent {
        TestAgent::on_loopback_with_server(stack, stack.server_addr, upstream, configure).await
    }

    /// [`TestAgent::on_loopback`] asking the server at `server` (a dead address, say).
    pub async fn on_loopback_with_server(
        stack: &Stack,
        server: SocketAddr,
        upstream: SocketAddr,
        configure: impl FnOnce(&mut Config),
    ) -> TestAgent {
        TestAgent::on_loopback_as(&stack.pki.agent(), server, upstream, &[], configure).await
    }

    /// An agent on loopback presenting `cert`, with `extra` flags.
    pub async fn on_loopback_as(
        cert: &CertFiles,
        server: SocketAddr,
        upstream: SocketAddr,
        extra: &[&str],
        configure: impl FnOnce(&mut Config),
    ) -> TestAgent {
        let mut config = loopback_config(cert, &server.to_string(), upstream, "1s", extra);
        configure(&mut config);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind agent");
        TestAgent::assemble(&config, listener, iptables::Command::default())
    }

    /// An agent on loopback presenting `cert` that finds `kiam-server:<port>` through `resolver`,
    /// looking again every 100 ms, and waits up to `wait` for an unknown pod.
    pub async fn resolving(
        cert: &CertFiles,
        port: u16,
        upstream: SocketAddr,
        wait: &str,
        resolver: Arc<dyn Resolve>,
    ) -> TestAgent {
        let server = format!("kiam-server:{port}");
        let config = loopback_config(cert, &server, upstream, wait, &["--server-resolve-interval", "100ms"]);
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind agent");
        TestAgent::assemble_with(&config, listener, iptables::Command::default(), resolver)
    }

    /// Assembles and starts an agent for `config` on `listener`.
    pub fn assemble(config: &Config, listener: TcpListener, runner: iptables::Command) -> TestAgent {
        TestAgent::assemble_with(config, listener, runner, Arc::new(Dns))
    }

    /// [`TestAgent::assemble`], finding the servers with `resolver`.
    pub fn assemble_with(
        config: &Config,
        listener: TcpListener,
        runner: iptables::Command,
        resolver: Arc<dyn Resolve>,
    ) -> TestAgent {
        TestAgent::start(config, (listener, None), runner, resolver)
    }

    /// Starts an agent on an IPv4 listener and, optionally, an IPv6 one.
    fn start(
        config: &Config,
        (listener, listener6): (TcpListener, Option<TcpListener>),
        runner: iptables::Command,
        resolver: Arc<dyn Resolve>,
    ) -> TestAgent {
        let metrics = Arc::new(Metrics::default());
        let backend = agent::connect(config, &metrics, resolver).expect("gRPC client");
        let view_client = Some(backend.clone());
        let deps = agent::Deps {
            backend,
            listener,
            listener6,
            metrics_listener: None,
            metrics: Arc::clone(&metrics),
            iptables: runner,
            view_client,
        };
        let shutdown = CancellationToken::new();
        let running = agent::assemble(config, deps, shutdown.clone()).expect("agent");
        let (addr, interception) = (running.addr, running.interception.clone());
        TestAgent { addr, interception, metrics, shutdown, running: Some(running) }
    }

    /// An agent inside `node`, from `kiam agent` `flags` (which should include `--iptables` and
    /// `--host-interface`), listening on the node's agent address, asking the stack's server and
    /// forwarding to the stack's fake metadata service. Returns once its rules are installed.
    pub async fn in_node(stack: &Stack, node: &NodeNet, flags: &[&str]) -> TestAgent {
        TestAgent::in_node_as(stack, node, &stack.pki.agent(), flags).await
    }

    /// [`TestAgent::in_node`] presenting `cert` (one naming the node gets the node view).
    pub async fn in_node_as(stack: &Stack, node: &NodeNet, cert: &CertFiles, flags: &[&str]) -> TestAgent {
        let runner = iptables::Command::with_program(node.iptables_program());
        TestAgent::in_node_with(stack, node, cert, flags, runner).await
    }

    /// [`TestAgent::in_node`], running `iptables` through `runner`.
    pub async fn in_node_with(
        stack: &Stack,
        node: &NodeNet,
        cert: &CertFiles,
        flags: &[&str],
        runner: iptables::Command,
    ) -> TestAgent {
        let (host, port) = (node.agent_ip.to_string(), NODE_AGENT_PORT.to_string());
        let (server, upstream) = (stack.server_addr.to_string(), stack.imds.addr().to_string());
        let mut all =
            vec!["--host", &host, "--port", &port, "--server-address", &server, "--metadata-addr", &upstream];
        all.extend_from_slice(flags);
        let config = agent_config(cert, &all);
        let addr = SocketAddr::new(IpAddr::V4(node.agent_ip), NODE_AGENT_PORT);
        let listener = TcpListener::from_std(node.listen(addr)).expect("adopt the node's listener");
        let listener6 = config
            .listen_addr6()
            .map(|addr6| TcpListener::from_std(node.listen(addr6)).expect("adopt the node's IPv6 listener"));
        let agent = TestAgent::start(&config, (listener, listener6), runner, Arc::new(Dns));
        let interception = Arc::clone(agent.interception.as_ref().expect("in_node needs --iptables"));
        wait_until("the agent's iptables rules are installed", Duration::from_secs(20), || async {
            interception.is_installed().await.unwrap_or(false)
        })
        .await;
        // The agent serves only once its rules are in and the tracked flows flushed: an answer
        // from it says the node is ready, whatever a test's pods do next.
        let ping = format!("http://{addr}/ping");
        wait_until("the agent serves in the node", Duration::from_secs(20), || {
            let answer = tokio::task::block_in_place(|| node_get(node, &ping));
            std::future::ready(answer.is_ok_and(|r| r.status == 200))
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
        let running = self.running.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), running.wait())
            .await
            .expect("the agent stops within 30 s")
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub use crate::wait::until as wait_until;

/// A GET from inside `net` (a pod), on a runtime of its own in the pod's namespace. Blocking:
/// call it through `tokio::task::block_in_place` from a multi-thread test.
/// A GET from inside the node's namespace (not through the interception).
fn node_get(node: &NodeNet, url: &str) -> Result<Response, String> {
    node.run_in(|| get_here(url))
}

pub fn pod_get(net: &PodNet, url: &str) -> Result<Response, String> {
    net.run_in(|| get_here(url))
}

/// A GET from this thread's namespace, on a runtime of its own.
fn get_here(url: &str) -> Result<Response, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime on this thread")
        .block_on(request("GET", url, &[], "", None))
}

/// An agent's flags on loopback: asking `server`, forwarding to `upstream`, waiting up to `wait`
/// for an unknown pod, then `extra`.
fn loopback_config(
    cert: &CertFiles,
    server: &str,
    upstream: SocketAddr,
    wait: &str,
    extra: &[&str],
) -> Config {
    let upstream = upstream.to_string();
    let flags = ["--host", "127.0.0.1", "--server-address", server, "--metadata-addr", &upstream];
    let flags: Vec<&str> = flags.iter().chain(&["--pod-wait-timeout", wait]).chain(extra).copied().collect();
    agent_config(cert, &flags)
}
