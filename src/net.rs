//! Listening sockets with a deep accept queue. `TcpListener::bind` asks for a backlog of 128,
//! so a burst of new pods asking at once (a Job fanning out, a node filling up) overflows it and
//! each dropped SYN waits a full second to be retried (issue 7's time-to-first-credential figure).

use std::io;
use std::net::SocketAddr;

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
}
