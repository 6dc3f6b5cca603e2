//! Prometheus metrics, under kiam's names so that existing dashboards and alerts keep working.
//! One [`Metrics`] value is created at start-up and shared; labels have bounded values only
//! (never a pod name or an IP).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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

/// Every metric of the process.
pub struct Metrics {
    registry: Registry,
    pub tls_server: TlsGauges,
    pub tls_client: TlsGauges,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tls_server = TlsGauges::default();
        let tls_client = TlsGauges::default();
        tls_server.register(&mut registry, "server");
        tls_client.register(&mut registry, "client");
        Metrics { registry, tls_server, tls_client }
    }
}

impl Metrics {
    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
