//! Listening sockets with a deep accept queue. `TcpListener::bind` asks for a backlog of 128,
//! so a burst of new pods asking at once (a Job fanning out, a node filling up) overflows it and
//! each dropped SYN waits a full second to be retried (issue 7's time-to-first-credential figure).
//! And [`Sources`], the per-source share of a listener's connections, so that one address (one
//! pod) cannot take every slot.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::net::{TcpListener, TcpSocket};

/// The accept queue asked for (the kernel caps it at `net.core.somaxconn`).
pub const BACKLOG: u32 = 4096;

/// Listens on `addr` with [`BACKLOG`].
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Resolves `host:port` and listens on its first address.
pub async fn listen_on(address: &str) -> io::Result<TcpListener> {
    let addr = tokio::net::lookup_host(address).await?.next().ok_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to no address"))
    })?;
    listen(addr)
}

/// Connections open by source address, each address allowed at most a fixed number.
pub struct Sources {
    cap: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's share of its source's count, given back on drop.
pub struct Share {
    sources: Arc<Sources>,
    ip: IpAddr,
}

impl Sources {
    /// At most `cap` connections per source address.
    pub fn new(cap: usize) -> Arc<Sources> {
        Arc::new(Sources { cap, open: Mutex::new(HashMap::new()) })
    }

    /// A share for `ip` (IPv4-mapped IPv6 counts as IPv4), unless it already holds its cap.
    pub fn claim(self: &Arc<Self>, ip: IpAddr) -> Option<Share> {
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_default();
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(Share { sources: Arc::clone(self), ip })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut open = self.sources.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listens_on_a_name_or_an_address() {
        let a = listen_on("localhost:0").await.expect("a name");
        let b = listen("127.0.0.1:0".parse().expect("addr")).expect("an address");
        let c = tokio::net::TcpStream::connect(b.local_addr().expect("addr")).await;
        assert!(c.is_ok() && a.local_addr().is_ok());
        assert!(listen_on("no-such-host.invalid:1").await.is_err());
    }

    #[test]
    fn each_source_gets_its_share() {
        let sources = Sources::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let first = sources.claim(a).expect("one");
        let _second = sources.claim(a).expect("two");
        assert!(sources.claim(a).is_none(), "a third is refused");
        assert!(sources.claim("::ffff:10.0.0.1".parse().expect("mapped")).is_none(), "mapped is the same");
        let _other = sources.claim(b).expect("another source has its own share");
        drop(first);
        assert!(sources.claim(a).is_some(), "a share comes back when its connection closes");
    }
}
