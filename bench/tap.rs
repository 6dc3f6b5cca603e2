//! A timing tap between the release server and the STS stand-in (moto), for figure 2's
//! breakdown: a TCP relay on a loopback port of its own that passes every byte through as it
//! comes, and notes when each AssumeRole request began to arrive, for which role, and when the
//! last byte of its answer went back. Requests are told apart the way HTTP/1.1 keep-alive orders
//! them: on one connection, bytes from the server after an answer began start the next request.
//!
//! It costs each call one more loopback hop (tens of microseconds, against the milliseconds
//! moto takes); the figure says so. It relays on a runtime of its own ([`Apart`]), as a network
//! hop would: on the harness's runtime every AssumeRole, and its answer, waited behind the
//! burst's 256 client tasks, which put the harness's own queue on the path it measures.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kiam_testkit::apart::Apart;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One request through the tap: when its first byte arrived from the server, the role it named
/// (`RoleArn=…` in its form body, once seen), and when the last byte of its answer went back.
#[derive(Clone, Debug)]
pub struct Call {
    pub sent: Instant,
    pub role: Option<String>,
    pub answered: Option<Instant>,
}

/// The relay; it stops when dropped, with its runtime.
pub struct Tap {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<Call>>>,
    _runtime: Apart,
}

/// How long the relay waits for a peer before it gives a connection up (every loop bounded).
const IDLE: Duration = Duration::from_secs(120);

impl Tap {
    /// Listens on a free loopback port and relays every connection to `upstream`, on a runtime
    /// of its own.
    pub fn start(upstream: SocketAddr) -> Tap {
        let runtime = Apart::new("sts-tap");
        let (addr, calls) = runtime.run(Tap::listen(upstream));
        Tap { addr, calls, _runtime: runtime }
    }

    /// Binds and spawns the accept loop on the current runtime.
    async fn listen(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Call>>>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind the STS tap");
        let addr = listener.local_addr().expect("the tap's address");
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let record = Arc::clone(&calls);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    if let Ok(upstream) = TcpStream::connect(upstream).await {
                        relay(client, upstream, record).await;
                    }
                });
            }
        });
        (addr, calls)
    }

    /// The endpoint to give the server instead of moto's.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Forgets the calls so far.
    pub fn clear(&self) {
        self.calls.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// The calls since the last [`Tap::clear`], in the order they were sent.
    pub fn calls(&self) -> Vec<Call> {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone();
        calls.sort_by_key(|call| call.sent);
        calls
    }
}

/// Passes bytes both ways until either side closes, noting each request's start, role and end.
async fn relay(mut client: TcpStream, mut upstream: TcpStream, calls: Arc<Mutex<Vec<Call>>>) {
    let _ = (client.set_nodelay(true), upstream.set_nodelay(true));
    let (mut up, mut down) = ([0u8; 16 * 1024], [0u8; 16 * 1024]);
    // The request in flight on this connection (its index in `calls`), the bytes of its start
    // (for the role), and whether its answer has begun.
    let (mut current, mut head, mut answering) = (None::<usize>, Vec::new(), false);
    loop {
        let step = tokio::time::timeout(IDLE, async {
            tokio::select! {
                n = client.read(&mut up) => (true, n),
                n = upstream.read(&mut down) => (false, n),
            }
        })
        .await;
        let Ok((from_client, Ok(n))) = step else { return };
        if n == 0 {
            return;
        }
        let now = Instant::now();
        if from_client {
            {
                let mut calls = calls.lock().unwrap_or_else(PoisonError::into_inner);
                if current.is_none() || answering {
                    calls.push(Call { sent: now, role: None, answered: None });
                    (current, answering) = (Some(calls.len() - 1), false);
                    head.clear();
                }
                if head.len() < 8192 {
                    head.extend_from_slice(&up[..n]);
                }
                if let Some(at) = current
                    && calls[at].role.is_none()
                {
                    calls[at].role = role_in(&head);
                }
            }
            if upstream.write_all(&up[..n]).await.is_err() {
                return;
            }
        } else {
            answering = true;
            if let Some(at) = current {
                calls.lock().unwrap_or_else(PoisonError::into_inner)[at].answered = Some(now);
            }
            if client.write_all(&down[..n]).await.is_err() {
                return;
            }
        }
    }
}

/// The role's name in an AssumeRole form body (`RoleArn=arn%3Aaws%3Aiam%3A%3A…%3Arole%2F<name>`).
fn role_in(bytes: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(bytes);
    let arn = text.split("RoleArn=").nth(1)?;
    let arn = arn.split(['&', '\r', '\n']).next()?;
    let name = arn.rsplit("%2F").next()?.rsplit('/').next()?;
    (!name.is_empty()).then(|| name.to_owned())
}
