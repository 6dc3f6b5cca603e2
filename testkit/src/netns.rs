//! Pod network namespaces: each [`PodNet`] is a netns joined to the host by a veth pair with its
//! own /30, so a process or socket inside it reaches the host with a distinct source IP, exactly
//! as a pod does on a node. Needs root.
//!
//! A [`NodeNet`] is a netns standing for a whole node, for tests of the agent's iptables rules:
//! pods made with [`PodNet::create_in`] hang off it instead of the test's own namespace, and its
//! `nat` table is its own, so a test may install `!eth0` or `kv+` rules, or a decoy metadata
//! service at 169.254.169.254, without touching the host or any other test.
//!
//! Slots are shared by every test *process* on the machine (nextest runs each test in its own):
//! slot N is owned by whoever holds `flock` on `/tmp/kiam-it-slots/N`, and the kernel drops that
//! lock if the process dies, so a slot that can be locked has no live owner and any namespace or
//! link left with its name is debris from a crashed run, deleted before reuse.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

const SLOT_DIR: &str = "/tmp/kiam-it-slots";
const SLOTS: u8 = 250;

/// One pod network: netns `kiamit-N`, veth `kvN-h` (host, 10.251.N.1/30) ↔ `kvN-p` (pod,
/// 10.251.N.2/30), default route via the host side. Torn down on drop.
pub struct PodNet {
    /// Namespace name (`kiamit-N`), as used by `ip netns exec`.
    pub name: String,
    /// The pod's address, the source IP the host sees.
    pub pod_ip: Ipv4Addr,
    /// The host end of the veth; servers bound here are reachable from the pod.
    pub host_ip: Ipv4Addr,
    /// Host-side veth name (`kvN-h`), e.g. for `iptables -i`.
    pub host_if: String,
    /// Pod-side veth name (`kvN-p`).
    pub pod_if: String,
    /// The node namespace holding the host end, or `None` for the test's own namespace.
    pub node: Option<String>,
    /// Keeps the slot: the flock on `/tmp/kiam-it-slots/N`; released after teardown.
    _slot_lock: File,
}

impl PodNet {
    /// Allocates a free slot and builds the namespace; panics (with the failing `ip` command's
    /// output) if that is impossible, e.g. when not running as root.
    pub fn create() -> PodNet {
        PodNet::try_create().unwrap_or_else(|e| panic!("PodNet::create: {e}"))
    }

    /// Like [`PodNet::create`] but returns the reason instead of panicking, so a caller can skip.
    pub fn try_create() -> Result<PodNet, String> {
        PodNet::try_create_on(None)
    }

    /// A pod of `node`: the host end of its veth lives in the node's namespace.
    pub fn create_in(node: &NodeNet) -> PodNet {
        PodNet::try_create_on(Some(&node.name)).unwrap_or_else(|e| panic!("PodNet::create_in: {e}"))
    }

    fn try_create_on(node: Option<&str>) -> Result<PodNet, String> {
        std::fs::create_dir_all(SLOT_DIR).map_err(|e| format!("mkdir {SLOT_DIR}: {e}"))?;
        let (slot, lock) = claim_slot()?;
        let net = PodNet {
            name: format!("kiamit-{slot}"),
            pod_ip: Ipv4Addr::new(10, 251, slot, 2),
            host_ip: Ipv4Addr::new(10, 251, slot, 1),
            host_if: format!("kv{slot}-h"),
            pod_if: format!("kv{slot}-p"),
            node: node.map(str::to_string),
            _slot_lock: lock,
        };
        net.teardown(); // leftovers of a crashed run; errors mean there were none
        let (ns, host, pod) = (&net.name, &net.host_if, &net.pod_if);
        let host_cidr = format!("{}/30", net.host_ip);
        let pod_cidr = format!("{}/30", net.pod_ip);
        let host_ip = net.host_ip.to_string();
        // The host side's commands run in the node's namespace when there is one.
        let on_host = |args: &[&str]| match node {
            Some(node) => ip(&[&["-n", node], args].concat()),
            None => ip(args),
        };
        // On failure `net` is dropped, which tears down whatever was built.
        ip(&["netns", "add", ns])?;
        match node {
            Some(node) => {
                ip(&["link", "add", host, "netns", node, "type", "veth", "peer", "name", pod, "netns", ns])?
            }
            None => ip(&["link", "add", host, "type", "veth", "peer", "name", pod, "netns", ns])?,
        };
        on_host(&["addr", "add", &host_cidr, "dev", host])?;
        on_host(&["link", "set", host, "up"])?;
        ip(&["-n", ns, "addr", "add", &pod_cidr, "dev", pod])?;
        ip(&["-n", ns, "link", "set", pod, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "route", "add", "default", "via", &host_ip])?;
        Ok(net)
    }

    /// `ip netns exec <name> <program>`: a command that runs inside the pod's namespace. Add
    /// arguments and environment as usual (`env_clear` is passed through to `program`).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `f` on a fresh thread that has joined the pod's network namespace; sockets created
    /// on that thread (e.g. by a current-thread tokio runtime built there) live in the pod.
    pub fn run_in<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> R {
        in_netns(&self.name, f)
    }

    /// Makes a host service that listens on loopback (such as moto) reachable from the pod:
    /// relays `host_ip:<returned port>` (in the node's namespace, if the pod has a node) to
    /// `target` until the [`Relay`] is dropped.
    pub fn expose(&self, target: SocketAddr) -> Relay {
        let listen = SocketAddr::from((self.host_ip, 0));
        let listener = match &self.node {
            Some(node) => in_netns(node, || TcpListener::bind(listen)),
            None => TcpListener::bind(listen),
        };
        Relay::on(listener.unwrap_or_else(|e| panic!("relay: bind {listen}: {e}")), target)
    }

    fn teardown(&self) {
        // Deleting one end of a veth pair deletes both; deleting the netns would too, but the
        // host end is removed first so the name is free at once.
        match &self.node {
            Some(node) => drop(ip(&["-n", node, "link", "del", &self.host_if])),
            None => drop(ip(&["link", "del", &self.host_if])),
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Drop for PodNet {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Locks the first free slot file; the open file keeps the lock.
fn claim_slot() -> Result<(u8, File), String> {
    for slot in 1..=SLOTS {
        let path = format!("{SLOT_DIR}/{slot}");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| format!("open {path}: {e}"))?;
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok((slot, file));
        }
    }
    Err(format!("all {SLOTS} slots in {SLOT_DIR} are locked"))
}

pub(super) fn ip(args: &[&str]) -> Result<Output, String> {
    let out =
        Command::new("ip").args(args).output().map_err(|e| format!("run ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "ip {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A plain TCP relay from a listening address to a target, on std threads (it works whatever
/// runtime, if any, the caller uses). Stops accepting when dropped; open connections end when
/// either side closes.
pub struct Relay {
    addr: SocketAddr,
    /// A second handle on the listening socket, used to wake the blocked `accept` on drop.
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Relays each connection accepted on `listener` to `target`. Connections to the target are
    /// made from the calling thread's namespace, whichever one the listener is in.
    pub fn on(listener: TcpListener, target: SocketAddr) -> Relay {
        let addr = listener.local_addr().expect("relay local_addr");
        let waker = listener.try_clone().expect("clone the relay listener");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(inbound) = conn else { continue };
                let Ok(outbound) = TcpStream::connect(target) else {
                    continue; // dropping `inbound` closes it: the client sees a reset
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                pipe(&inbound, &outbound);
                pipe(&outbound, &inbound);
            }
        });
        Relay { addr, listener: waker, stop, acceptor: Some(acceptor) }
    }

    /// The relay's listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket makes a blocked accept(2) fail at once on Linux,
        // even when the address has already gone with its veth (a connect could not reach it).
        // SAFETY: shutdown on an fd owned by `self.listener`; no memory is involved.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Copies `from` → `to` on a detached thread, half-closing `to` at EOF.
fn pipe(from: &TcpStream, to: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}

/// Runs `f` on a fresh thread that has joined the network namespace `name`.
pub fn in_netns<F: FnOnce() -> R + Send, R: Send>(name: &str, f: F) -> R {
    let path = format!("/var/run/netns/{name}");
    std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `ns` is an open namespace fd for the whole call, and CLONE_NEWNET only
            // changes the network namespace of this (new, test-owned) thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        });
        handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// A node: netns `kiamnode-N` with loopback up and the agent's address, 10.251.N.1/32, on it.
/// Pods join it with [`PodNet::create_in`]. Deleted on drop (which also deletes the host ends of
/// its pods' veths, and its iptables rules with it).
pub struct NodeNet {
    /// Namespace name, for `ip netns exec`.
    pub name: String,
    /// Where the agent listens and the DNAT points.
    pub agent_ip: Ipv4Addr,
    _slot_lock: File,
}

impl NodeNet {
    /// Allocates a slot (shared with pods) and builds the namespace.
    pub fn create() -> NodeNet {
        NodeNet::try_create().unwrap_or_else(|e| panic!("NodeNet::create: {e}"))
    }

    fn try_create() -> Result<NodeNet, String> {
        std::fs::create_dir_all(SLOT_DIR).map_err(|e| format!("mkdir {SLOT_DIR}: {e}"))?;
        let (slot, lock) = claim_slot()?;
        let node = NodeNet {
            name: format!("kiamnode-{slot}"),
            agent_ip: Ipv4Addr::new(10, 251, slot, 1),
            _slot_lock: lock,
        };
        let _ = ip(&["netns", "del", &node.name]); // debris of a crashed run
        ip(&["netns", "add", &node.name])?;
        ip(&["-n", &node.name, "link", "set", "lo", "up"])?;
        node.add_address(node.agent_ip)?;
        Ok(node)
    }

    /// Adds `ip`/32 to the node's loopback (the agent's address, or 169.254.169.254 for a decoy
    /// of the node's real metadata service).
    pub fn add_address(&self, ip: Ipv4Addr) -> Result<(), String> {
        self::ip(&["-n", &self.name, "addr", "add", &format!("{ip}/32"), "dev", "lo"]).map(drop)
    }

    /// Gives the node a default route (through its loopback), as a real node has one: without
    /// it, the node's own connections to link-local addresses fail before any DNAT applies.
    pub fn add_default_route(&self) -> Result<(), String> {
        self::ip(&["-n", &self.name, "route", "add", "default", "dev", "lo"]).map(drop)
    }

    /// Runs `f` on a thread inside the node's namespace.
    pub fn run_in<F: FnOnce() -> R + Send, R: Send>(&self, f: F) -> R {
        in_netns(&self.name, f)
    }

    /// A listening socket in the node's namespace, ready for tokio (non-blocking).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        let listener = self
            .run_in(|| TcpListener::bind(addr))
            .unwrap_or_else(|e| panic!("bind {addr} in {}: {e}", self.name));
        listener.set_nonblocking(true).expect("non-blocking listener");
        listener
    }

    /// The command that runs `iptables` inside the node, for
    /// `kiam::agent::iptables::Command::with_program`.
    pub fn iptables_program(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name, "iptables"].map(String::from).to_vec()
    }

    /// `iptables -t nat -S` inside the node: every nat rule, one per line.
    pub fn nat_rules(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables", "-w", "-t", "nat", "-S"])
            .output()
            .expect("run iptables");
        assert!(out.status.success(), "iptables -S: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `iptables -w -t nat <args>` inside the node, as another program on the node would.
    pub fn iptables(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "iptables", "-w", "-t", "nat"])
            .args(args)
            .output()
            .map_err(|e| format!("run iptables: {e}"))?;
        if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
    }
}

impl Drop for NodeNet {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
