//! A fault-injecting proxy in front of moto's STS, for what moto cannot do: answer 5xx or
//! `Throttling`, or take as long as the test likes ([`Fault::Hold`] keeps every call waiting
//! until the fault is changed, which stands for any latency longer than the caller's deadline
//! without spending it in wall-clock time). With [`Fault::None`] calls pass through to moto.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

/// What the proxy does with each call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Pass it to moto.
    None,
    /// Answer with this HTTP status and STS error code.
    Status(u16, &'static str),
    /// Keep it waiting until the fault changes, then do what the new one says.
    Hold,
}

struct Shared {
    fault: watch::Sender<Fault>,
    upstream: Mutex<Option<SocketAddr>>,
    client: Client<HttpConnector, Body>,
    held: AtomicUsize,
}

/// The proxy; it stops when dropped.
pub struct StsFaults {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl StsFaults {
    /// Binds `127.0.0.1:0`; calls pass through once [`StsFaults::forward_to`] names moto.
    pub async fn start() -> StsFaults {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the STS proxy");
        let addr = listener.local_addr().expect("addr");
        let shared = Arc::new(Shared {
            fault: watch::channel(Fault::None).0,
            upstream: Mutex::new(None),
            client: Client::builder(TokioExecutor::new()).build_http(),
            held: AtomicUsize::new(0),
        });
        let app = axum::Router::new().fallback(handle).with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StsFaults { addr, shared, task }
    }

    /// `http://127.0.0.1:PORT`, the server's `--sts-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Passes calls to `upstream` (moto).
    pub fn forward_to(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().expect("proxy state") = Some(upstream);
    }

    /// Changes the fault; calls held by [`Fault::Hold`] go on under the new one.
    pub fn set(&self, fault: Fault) {
        self.shared.fault.send_replace(fault);
    }

    /// Calls waiting under [`Fault::Hold`] now.
    pub fn held(&self) -> usize {
        self.shared.held.load(Ordering::SeqCst)
    }
}

impl Drop for StsFaults {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let mut fault = shared.fault.subscribe();
    if *fault.borrow_and_update() == Fault::Hold {
        shared.held.fetch_add(1, Ordering::SeqCst);
        // Bounded by the test: the caller gives up, or the test changes the fault.
        while *fault.borrow_and_update() == Fault::Hold {
            if fault.changed().await.is_err() {
                break;
            }
        }
        shared.held.fetch_sub(1, Ordering::SeqCst);
    }
    let current = *fault.borrow();
    match current {
        Fault::Status(status, code) => sts_error(status, code),
        Fault::None | Fault::Hold => forward(&shared, request).await,
    }
}

fn sts_error(status: u16, code: &str) -> Response {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
         <Code>{code}</Code><Message>injected {code}</Message></Error><RequestId>fault</RequestId></ErrorResponse>"
    );
    Response::builder()
        .status(status)
        .header("content-type", "text/xml")
        .body(Body::from(body))
        .expect("a valid response")
}

async fn forward(shared: &Shared, request: Request) -> Response {
    let Some(upstream) = *shared.upstream.lock().expect("proxy state") else {
        return sts_error(503, "ServiceUnavailable");
    };
    let (mut parts, body) = request.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    parts.uri = format!("http://{upstream}{path}").parse().expect("an upstream URI");
    match shared.client.request(axum::http::Request::from_parts(parts, body)).await {
        Ok(response) => {
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            Response::from_parts(parts, Body::from(bytes))
        }
        Err(_) => sts_error(503, "ServiceUnavailable"),
    }
}
