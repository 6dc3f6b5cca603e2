//! Hand-written HTTP/1.1 requests on a raw socket, for what a well-behaved client cannot send:
//! paths with backslashes or escapes exactly as written, oversized or too many headers, a head
//! that never finishes. The socket binds a chosen source address, as `http::request` does, so
//! the agent sees the request coming from that pod.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Upper bound on one exchange.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// What came back before the server closed the connection.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// The status code of the first response, if one was read.
    pub status: Option<u16>,
    /// Everything read, lossily decoded.
    pub text: String,
}

impl RawResponse {
    /// The body of the first response (after the blank line).
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, body)| body)
    }
}

/// Connects to `to` from `from`.
pub async fn connect(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = if from.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.expect("socket");
    socket.bind(SocketAddr::new(from, 0)).unwrap_or_else(|e| panic!("bind {from}: {e}"));
    tokio::time::timeout(TIMEOUT, socket.connect(to))
        .await
        .unwrap_or_else(|_| panic!("connect {to}: timed out"))
        .unwrap_or_else(|e| panic!("connect {to}: {e}"))
}

/// Sends `head` (request line and headers, without the final blank line; `Connection: close`
/// is added) and reads until the server closes.
pub async fn send(from: IpAddr, to: SocketAddr, head: &str) -> RawResponse {
    let mut stream = connect(from, to).await;
    let request = format!("{head}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write request");
    read_to_close(&mut stream).await
}

/// A `GET <path>` from `from` with extra header lines.
pub async fn get(from: IpAddr, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254");
    for (name, value) in headers {
        head.push_str(&format!("\r\n{name}: {value}"));
    }
    send(from, to, &head).await
}

/// Reads until EOF (or a reset, which counts as the end), within [`TIMEOUT`].
pub async fn read_to_close(stream: &mut TcpStream) -> RawResponse {
    let mut bytes = Vec::new();
    let reading = async {
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(TIMEOUT, reading).await.expect("the server closes the connection within 10 s");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status =
        text.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|code| code.parse().ok());
    RawResponse { status, text }
}
