//! Pod network namespaces: each [`PodNet`] is a netns joined to the host by a veth pair with its
//! own /30, so a process or socket inside it reaches the host with a distinct source IP, exactly
//! as a pod does on a node (test-peers.md §5). Needs root.
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
        std::fs::create_dir_all(SLOT_DIR).map_err(|e| format!("mkdir {SLOT_DIR}: {e}"))?;
        let (slot, lock) = claim_slot()?;
        let net = PodNet {
            name: format!("kiamit-{slot}"),
            pod_ip: Ipv4Addr::new(10, 251, slot, 2),
            host_ip: Ipv4Addr::new(10, 251, slot, 1),
            host_if: format!("kv{slot}-h"),
            pod_if: format!("kv{slot}-p"),
            _slot_lock: lock,
        };
        net.teardown(); // leftovers of a crashed run; errors mean there were none
        let (ns, host, pod) = (&net.name, &net.host_if, &net.pod_if);
        let host_cidr = format!("{}/30", net.host_ip);
        let pod_cidr = format!("{}/30", net.pod_ip);
        let host_ip = net.host_ip.to_string();
        // On failure `net` is dropped, which tears down whatever was built.
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", host, "type", "veth", "peer", "name", pod, "netns", ns])?;
        ip(&["addr", "add", &host_cidr, "dev", host])?;
        ip(&["link", "set", host, "up"])?;
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
        let path = format!("/var/run/netns/{}", self.name);
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

    /// Makes a host service that listens on loopback (such as moto) reachable from the pod:
    /// relays `host_ip:<returned port>` to `target` until the [`Relay`] is dropped.
    pub fn expose(&self, target: SocketAddr) -> Relay {
        Relay::start(SocketAddr::from((self.host_ip, 0)), target)
    }

    fn teardown(&self) {
        // Deleting one end of a veth pair deletes both; deleting the netns would too, but the
        // host end is removed first so the name is free at once.
        let _ = ip(&["link", "del", &self.host_if]);
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

fn ip(args: &[&str]) -> Result<Output, String> {
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
    /// Binds `listen` (port 0 picks one) and relays each connection to `target`.
    pub fn start(listen: SocketAddr, target: SocketAddr) -> Relay {
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| panic!("relay: bind {listen}: {e}"));
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
