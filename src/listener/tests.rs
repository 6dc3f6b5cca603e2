//! The listener's limits on real loopback sockets: one source cannot take every slot, and a
//! client that never reads its answers is cut off. Loopback answers on all of 127.0.0.0/8, so
//! each "pod" here is a source address of its own.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::*;

const LIMIT: Duration = Duration::from_secs(10);

/// A listener answering every GET with `body_len` bytes, under `limits`.
async fn start(limits: Limits, body_len: usize) -> (SocketAddr, Tally, CancellationToken) {
    let body = "x".repeat(body_len);
    let router = Router::new().fallback(move || std::future::ready(body.clone()));
    let (addr, tally, shutdown, _serving) = start_on(limits, router, Workers::inline()).await;
    (addr, tally, shutdown)
}

/// A listener serving `router` under `limits`.
async fn start_router(limits: Limits, router: Router) -> (SocketAddr, Tally, CancellationToken) {
    let (addr, tally, shutdown, _serving) = start_on(limits, router, Workers::inline()).await;
    (addr, tally, shutdown)
}

/// A listener serving `router` under `limits` with its connections on `workers`; the task that
/// serves it, which ends after shutdown and the drain.
async fn start_on(
    limits: Limits,
    router: Router,
    workers: Workers,
) -> (SocketAddr, Tally, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tally, shutdown) = (Tally::default(), CancellationToken::new());
    let serving = tokio::spawn({
        let (tally, shutdown) = (tally.clone(), shutdown.clone());
        async move { serve(listener, router, &limits, &workers, tally, shutdown).await }
    });
    (addr, tally, shutdown, serving)
}

async fn connect(from: &str, to: SocketAddr, recv_buffer: Option<u32>) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
    }
    socket.bind(SocketAddr::new(from.parse::<IpAddr>().expect("ip"), 0)).expect("bind");
    socket.connect(to).await.expect("connect")
}

/// Reads until the server closes; what was read.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let reading = async {
        let mut buf = [0u8; 16384];
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            all.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(LIMIT, reading).await.expect("the server closes the connection");
    all
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let polling = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(LIMIT, polling).await.unwrap_or_else(|_| panic!("timed out: {what}"));
}

#[tokio::test]
async fn one_source_cannot_take_every_connection() {
    let (addr, tally, _shutdown) = start(capped(), 4).await;
    one_source_capped(addr, &tally).await;
}

/// Three connections per source, and a long header deadline: only the per-source cap can close
/// an extra connection in time.
fn capped() -> Limits {
    Limits {
        max_connections_per_source: 3,
        header_read_timeout: Duration::from_secs(60),
        ..Limits::default()
    }
}

/// Three connections from 127.0.0.1 are held, a fourth is reset, 127.0.0.2 is served meanwhile,
/// and a share comes back when its connection closes.
async fn one_source_capped(addr: SocketAddr, tally: &Tally) {
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect("127.0.0.1", addr, None).await);
    }
    until("three connections open", || tally.open.get() == 3).await;
    // Reset, without an answer: a flood leaves no TIME_WAIT state behind in the agent. (The reset
    // can beat the client's own connect to the finish when the listener runs on other threads.)
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(IpAddr::from([127, 0, 0, 1]), 0)).expect("bind");
    let extra = match tokio::time::timeout(LIMIT, socket.connect(addr)).await.expect("connected or reset") {
        Ok(mut extra) => {
            let mut byte = [0u8; 1];
            tokio::time::timeout(LIMIT, extra.read(&mut byte)).await.expect("the agent drops it").map(|_| ())
        }
        Err(error) => Err(error),
    };
    assert_eq!(extra.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    assert_eq!(tally.cut("source_cap"), 1);
    // Another source is served while the first holds its share.
    let mut other = connect("127.0.0.2", addr, None).await;
    other.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let answer = String::from_utf8(read_to_close(&mut other).await).expect("utf-8");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A share is given back when its connection closes.
    drop(held.pop());
    until("the share is given back", || tally.open.get() == 2).await;
    let mut again = connect("127.0.0.1", addr, None).await;
    again.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    assert!(read_to_close(&mut again).await.starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn a_client_that_never_reads_is_cut_off() {
    let limits = Limits { write_timeout: Duration::from_millis(200), ..Limits::default() };
    let (addr, tally, _shutdown) = start(limits, 256 * 1024).await;
    // Pipelined requests for far more than the socket buffers hold, and no reading.
    let mut greedy = connect("127.0.0.3", addr, Some(4096)).await;
    let requests = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
    greedy.write_all(requests.as_bytes()).await.expect("write");
    until("the stalled connection is cut", || tally.cut("write_timeout") == 1).await;
    until("and closed", || tally.open.get() == 0).await;
    let read = read_to_close(&mut greedy).await;
    assert!(read.len() < 200 * 256 * 1024, "not every answer was written: {} bytes", read.len());
}

#[tokio::test]
async fn a_connection_lives_at_most_its_age() {
    let limits = Limits {
        max_connection_age: Duration::from_millis(300),
        header_read_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let (addr, tally, _shutdown) = start(limits, 4).await;
    let mut old = connect("127.0.0.4", addr, None).await;
    old.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let read = read_to_close(&mut old).await;
    assert!(read.starts_with(b"HTTP/1.1 200"), "answered, then closed");
    assert_eq!(tally.cut("max_age"), 1);
}

#[tokio::test]
async fn a_slow_answer_is_not_cut_but_an_idle_connection_after_it_is() {
    let limits = Limits { header_read_timeout: Duration::from_millis(300), ..Limits::default() };
    // An answer that takes three head deadlines (a pod being waited for, say).
    let slow = || async {
        tokio::time::sleep(Duration::from_millis(900)).await;
        "late"
    };
    let (addr, tally, _shutdown) = start_router(limits, Router::new().fallback(slow)).await;
    let mut client = connect("127.0.0.5", addr, None).await;
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let started = tokio::time::Instant::now();
    let read = String::from_utf8(read_to_close(&mut client).await).expect("utf-8");
    assert!(read.starts_with("HTTP/1.1 200") && read.ends_with("late"), "answered: {read}");
    // Then closed, idle on a kept-alive connection, one deadline after the answer.
    assert!(started.elapsed() >= Duration::from_millis(1100), "closed after {:?}", started.elapsed());
    assert_eq!(tally.cut("head_timeout"), 1);
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_its_deadline() {
    let limits = Limits { header_read_timeout: Duration::from_millis(300), ..Limits::default() };
    let (addr, tally, _shutdown) = start(limits, 4).await;
    let mut slow = connect("127.0.0.6", addr, None).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.expect("write");
    let trickle = async {
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(b"X-Slow: a\r\n").await.is_err() {
                return;
            }
        }
    };
    tokio::time::timeout(LIMIT, trickle).await.expect("bounded");
    until("the late head is cut", || tally.cut("head_timeout") == 1).await;
    let read = read_to_close(&mut slow).await;
    assert!(read.is_empty(), "no answer: {}", String::from_utf8_lossy(&read));
}

#[tokio::test]
async fn with_workers_the_cap_is_per_source_across_them_and_shutdown_drains_them() {
    let thread = || std::future::ready(std::thread::current().name().unwrap_or_default().to_owned());
    let router = Router::new().fallback(thread);
    let (addr, tally, shutdown, serving) =
        start_on(capped(), router, Workers::new(2).expect("workers")).await;
    // Served on a worker's thread, not the caller's runtime.
    let mut client = connect("127.0.0.7", addr, None).await;
    client.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
    let answer = String::from_utf8(read_to_close(&mut client).await).expect("utf-8");
    assert!(answer.ends_with("kiam-conn-0") || answer.ends_with("kiam-conn-1"), "{answer}");
    until("closed", || tally.open.get() == 0).await;
    // Whichever worker accepts them, the shares of one source are counted together.
    one_source_capped(addr, &tally).await;
    shutdown.cancel();
    tokio::time::timeout(LIMIT, serving).await.expect("every worker stops accepting").expect("serve");
    assert!(TcpStream::connect(addr).await.is_err(), "nothing listens after shutdown");
}
