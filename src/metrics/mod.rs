//! Prometheus metrics, under kiam's names so that existing dashboards and alerts keep working,
//! plus the ones kiam lacked. One [`Metrics`] value is created at start-up and shared; labels
//! have bounded values only (never a pod name or an IP). [`serve`] exposes them on
//! `--prometheus-listen-addr`, a listener of its own, never the agent's metadata port.
//!
//! The handle knows its process's mode ([`Mode`]): a shared component reports an event once
//! (an STS call, a cache hit, an answered request) and the handle counts it under the mode's
//! own names too (kube2iam's, in [`kube2iam`]).
//!
//! Every component counts into the one [`Metrics`] it is given (clones of a counter share its
//! value), so nothing is copied in at scrape time; a scrape only adds up the per-thread shards
//! of the agent's hit series ([`sharded`]), and the `process_*` collector reads the kernel's
//! numbers then.

mod agent;
mod families;
pub mod kube2iam;
mod process;
mod scale;
pub mod sharded;

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::listener::workers::Workers;
use crate::listener::{Limits, Tally};
use tokio_util::sync::CancellationToken;

pub use agent::{AgentMetrics, CredentialsOk, Cut, Handler, Response};
pub use families::{ErrorCode, GrpcMetrics, Kind, ServerMetrics, code_name, latency_histogram};
pub use process::ProcessMetrics;
pub use scale::{Reason, ScaleMetrics};

/// kiam's `grpc_<side>_tls_certificate_*` gauges for one side of the link.
#[derive(Clone, Debug, Default)]
pub struct TlsGauges {
    /// 1 while the last reload of the files failed (the old material stays in use).
    pub update_error: Gauge,
    /// 1 while the loaded certificate does not verify against the loaded CA bundle.
    pub verify_error: Gauge,
    /// When the loaded certificate expires, in seconds since the epoch.
    pub expiry_seconds: Gauge,
}

impl TlsGauges {
    fn register(&self, registry: &mut Registry, side: &str) {
        registry.register(
            format!("grpc_{side}_tls_certificate_update_error"),
            "Whether the last TLS reload failed (the previous certificate stays in use)",
            self.update_error.clone(),
        );
        registry.register(
            format!("grpc_{side}_tls_certificate_verify_error"),
            "Whether the loaded certificate fails to verify against the CA bundle",
            self.verify_error.clone(),
        );
        registry.register(
            format!("grpc_{side}_tls_certificate_expiry_seconds"),
            "When the loaded certificate expires, in seconds since the epoch",
            self.expiry_seconds.clone(),
        );
    }
}

/// Every metric of the process. Both sides' families are registered, so a dashboard's query
/// finds the series whichever side it scrapes (the other side's stay at zero).
pub struct Metrics {
    registry: Registry,
    pub agent: AgentMetrics,
    pub server: ServerMetrics,
    /// Peers (`--peers`) and the STS budget (`--sts-rate`).
    pub scale: ScaleMetrics,
    pub grpc_server: GrpcMetrics,
    pub grpc_client: GrpcMetrics,
    pub tls_server: TlsGauges,
    pub tls_client: TlsGauges,
    pub process: ProcessMetrics,
    /// The process's mode, and with it the families only that mode has: what the
    /// mode-specific methods ([`kube2iam`]) count into, so callers never ask.
    mode: Mode,
}

/// Which process the metrics belong to.
#[derive(Clone, Debug)]
pub enum Mode {
    /// kiam's agent or server (or any other `kiam` command): kiam's families only.
    Kiam,
    /// kube2iam mode: kube2iam's `kube2iam_*` families as well.
    Kube2iam(kube2iam::Kube2iamMetrics),
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            agent: AgentMetrics::default(),
            server: ServerMetrics::default(),
            scale: ScaleMetrics::default(),
            grpc_server: GrpcMetrics::default(),
            grpc_client: GrpcMetrics::default(),
            tls_server: TlsGauges::default(),
            tls_client: TlsGauges::default(),
            process: ProcessMetrics::default(),
            mode: Mode::Kiam,
        };
        m.agent.register(&mut registry);
        m.server.register(&mut registry);
        m.scale.register(&mut registry);
        m.grpc_server.register(&mut registry, "server");
        m.grpc_client.register(&mut registry, "client");
        m.tls_server.register(&mut registry, "server");
        m.tls_client.register(&mut registry, "client");
        m.process.register(&mut registry);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Every metric, plus kube2iam's `kube2iam_*` families (kube2iam mode).
    pub fn with_kube2iam() -> Metrics {
        let mut metrics = Metrics::default();
        let families = kube2iam::Kube2iamMetrics::default();
        families.register(&mut metrics.registry);
        let info = kube2iam::Info { version: env!("CARGO_PKG_VERSION"), build_date: "", commit_hash: "" };
        families.info.get_or_create(&info).set(1);
        metrics.mode = Mode::Kube2iam(families);
        metrics
    }

    /// The process's mode.
    pub fn mode(&self) -> &Mode {
        &self.mode
    }

    /// The text exposition of every metric, refreshed.
    pub fn encode(&self) -> String {
        self.process.refresh();
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// `GET /metrics`, as a router other listeners can extend.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = Arc::clone(&metrics);
            async move {
                let body = metrics.encode();
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
                    .into_response()
            }
        }),
    )
}

/// Serves `GET /metrics` on `listener` until `shutdown`, under [`Limits::metrics`].
///
/// The agent is hostNetwork, so every pod on the node can reach this port: it gets the same
/// listener as the metadata port, with a header deadline, write deadlines and connection caps,
/// so that half-sent requests cannot use up the descriptors the credential paths need.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    serve_with(listener, metrics, &Limits::metrics(), Tally::default(), shutdown).await
}

/// [`serve`] under `limits`, counting connections into `tally`.
pub async fn serve_with(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limits: &Limits,
    tally: Tally,
    shutdown: CancellationToken,
) {
    crate::listener::serve(listener, router(metrics), limits, &Workers::inline(), tally, shutdown).await;
}

/// Serves `app` (which may read the caller's address as `ConnectInfo`) on `listener` until
/// `shutdown`, under [`Limits::metrics`] (kube2iam mode's metrics port with `/debug/store`).
pub async fn serve_app(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    crate::listener::serve(listener, app, &Limits::metrics(), &Workers::inline(), Tally::default(), shutdown)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_kiams_names() {
        let m = Metrics::default();
        m.agent.success.get_or_create(&Handler { handler: "credentials" }).inc();
        m.server.cache_hits.inc();
        m.grpc_server.unary(true, "GetPodCredentials", "OK");
        m.agent.handler_latency.get_or_create(&Handler { handler: "credentials" }).observe(0.003);
        let text = m.encode();
        for name in [
            "kiam_metadata_success_total{handler=\"credentials\"} 1",
            "kiam_sts_cache_hit_total 1",
            "kiam_sts_cacheSize 0",
            "grpc_server_handled_total{grpc_type=\"unary\",grpc_service=\"kiam.KiamService\",grpc_method=\"GetPodCredentials\",grpc_code=\"OK\"} 1",
            "kiam_metadata_handler_latency_seconds_bucket{le=\"0.004\",handler=\"credentials\"} 1",
            "grpc_client_tls_certificate_expiry_seconds",
            "process_resident_memory_bytes",
            "# TYPE process_cpu_seconds counter",
        ] {
            assert!(text.contains(name), "missing {name} in:\n{text}");
        }
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpSocket, TcpStream};

    async fn connect(from: &str, to: std::net::SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(std::net::SocketAddr::new(from.parse().expect("ip"), 0)).expect("bind");
        socket.connect(to).await.expect("connect")
    }

    async fn read_to_close(stream: &mut TcpStream) -> String {
        let mut all = Vec::new();
        let reading = async {
            let mut buf = [0u8; 8192];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                all.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), reading).await.expect("closed within 10 s");
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Half-sent requests are cut off, and one source cannot hold every connection: the node's
    /// pods can all reach an agent's metrics port.
    #[tokio::test]
    async fn the_metrics_listener_has_limits() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            header_read_timeout: Duration::from_millis(300),
            max_connections_per_source: 2,
            ..Limits::metrics()
        };
        let tally = Tally::default();
        let shutdown = CancellationToken::new();
        tokio::spawn({
            let (tally, shutdown) = (tally.clone(), shutdown.clone());
            async move { serve_with(listener, Arc::new(Metrics::default()), &limits, tally, shutdown).await }
        });

        let mut half = connect("127.0.0.1", addr).await;
        half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.expect("write");
        let _second = connect("127.0.0.1", addr).await;
        let mut third = connect("127.0.0.1", addr).await;
        assert_eq!(read_to_close(&mut third).await, "", "over the source's share");
        assert!(!read_to_close(&mut half).await.contains("200 OK"), "the half-sent request is cut off");
        assert_eq!(tally.cut("source_cap"), 1);

        let mut scrape = connect("127.0.0.2", addr).await;
        scrape
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let answer = read_to_close(&mut scrape).await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.contains("kiam_sts_cacheSize"), "{answer}");
        shutdown.cancel();
    }
}

#[cfg(test)]
mod dashboard_tests {
    use super::*;

    /// Every metric the shipped Grafana dashboard queries is one this process exposes.
    #[test]
    fn the_dashboard_queries_only_metrics_that_exist() {
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../../dashboards/kiam-rs.json"))
                .expect("the dashboard is JSON");
        let metrics = Metrics::default();
        metrics.agent.touch();
        metrics.server.touch();
        metrics.grpc_server.touch();
        metrics.grpc_client.touch();
        let exposed: std::collections::HashSet<String> = metrics
            .encode()
            .lines()
            .filter_map(|l| {
                l.strip_prefix("# TYPE ").and_then(|t| t.split_whitespace().next()).map(str::to_string)
            })
            .collect();
        let panels = dashboard["panels"].as_array().expect("panels");
        assert!(panels.len() >= 10);
        let names = regex::Regex::new(r"\b(?:kiam|grpc|process)_[A-Za-z0-9_]+").expect("regex");
        let mut checked = 0;
        for target in panels.iter().flat_map(|p| p["targets"].as_array().into_iter().flatten()) {
            let expr = target["expr"].as_str().expect("expr");
            for m in names.find_iter(expr) {
                let name = m.as_str();
                if matches!(name, "grpc_method" | "grpc_code" | "grpc_type" | "grpc_service") {
                    continue; // label names, not metrics
                }
                let base = ["_bucket", "_sum", "_count", "_total"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    exposed.contains(base) || exposed.contains(name),
                    "the dashboard queries {name}, which is not exposed: {exposed:?}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 25, "checked {checked} references");
    }
}
