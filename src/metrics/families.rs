//! The server's and the gRPC link's metric families (the agent's are in [`agent`](super::agent)).
//! Names, types, labels and buckets of kiam's metrics are kept as kiam had them; new ones have
//! bounded labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// kiam's latency buckets: 1 ms doubling, 13 of them (up to about 4 s).
pub(super) fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 13)
}

/// A histogram with kiam's latency buckets.
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// `code` label: an AWS error code (a small fixed set in practice).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorCode {
    pub code: String,
}

/// `kind` label: `pods` or `namespaces`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: &'static str,
}

/// The server's `kiam_sts_*` and `kiam_k8s_*` families, and the new server metrics.
#[derive(Clone, Debug)]
pub struct ServerMetrics {
    pub cache_size: Gauge,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub issuing_errors: Counter,
    /// New: AssumeRole calls made (single-flight makes this one per identity and refresh).
    pub assumerole_calls: Counter,
    /// New: requests answered with still-valid credentials while STS failed.
    pub stale_served: Counter,
    pub assumerole_timing: Histogram,
    pub assumerole_current: Gauge,
    pub dropped_pods: Counter,
    /// New: STS errors by AWS error code.
    pub sts_errors: Family<ErrorCode, Counter>,
    /// New: time to find the pod behind a request (including waits for pods not seen yet).
    pub pod_lookup: Histogram,
    /// New: requests that had to wait for a pod the watch had not delivered yet.
    pub pod_waits: Counter,
    /// New: life left in credentials at the moment they are served.
    pub served_remaining: Histogram,
    /// New: requests refused because several live pods claimed the caller's IP.
    pub ambiguous_ips: Counter,
    /// New: connections closed after `--grpc-max-connection-idle-duration` without a call.
    pub idle_connections_closed: Counter,
    /// New: watch failures (each followed by a restart) and complete relists.
    pub watch_restarts: Family<Kind, Counter>,
    pub relists: Family<Kind, Counter>,
    /// New: 1 once the kind's cache has synced.
    pub cache_synced: Family<Kind, Gauge>,
}

impl Default for ServerMetrics {
    fn default() -> Self {
        ServerMetrics {
            cache_size: Gauge::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            issuing_errors: Counter::default(),
            assumerole_calls: Counter::default(),
            stale_served: Counter::default(),
            assumerole_timing: latency_histogram(),
            assumerole_current: Gauge::default(),
            dropped_pods: Counter::default(),
            sts_errors: Family::default(),
            pod_lookup: latency_histogram(),
            pod_waits: Counter::default(),
            served_remaining: Histogram::new([
                60.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0, 7200.0, 21600.0, 43200.0,
            ]),
            ambiguous_ips: Counter::default(),
            idle_connections_closed: Counter::default(),
            watch_restarts: Family::default(),
            relists: Family::default(),
            cache_synced: Family::default(),
        }
    }
}

impl ServerMetrics {
    /// Creates one series in every family.
    #[cfg(test)]
    pub(super) fn touch(&self) {
        drop(self.sts_errors.get_or_create(&ErrorCode { code: "Throttling".into() }));
        let kind = Kind { kind: "pods" };
        drop(self.watch_restarts.get_or_create(&kind));
        drop(self.relists.get_or_create(&kind));
        drop(self.cache_synced.get_or_create(&kind));
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register("kiam_sts_cacheSize", "Identities in the credentials cache", self.cache_size.clone());
        r.register("kiam_sts_cache_hit", "Credentials served from the cache", self.cache_hits.clone());
        r.register(
            "kiam_sts_cache_miss",
            "Credentials not in the cache when asked for",
            self.cache_misses.clone(),
        );
        r.register("kiam_sts_issuing_errors", "AssumeRole failures", self.issuing_errors.clone());
        r.register("kiam_sts_assumerole_calls", "AssumeRole calls made", self.assumerole_calls.clone());
        r.register(
            "kiam_sts_stale_served",
            "Requests answered with still-valid cached credentials because STS failed",
            self.stale_served.clone(),
        );
        r.register(
            "kiam_sts_assumerole_timing_seconds",
            "AssumeRole latency",
            self.assumerole_timing.clone(),
        );
        r.register(
            "kiam_sts_assumerole_current",
            "AssumeRole calls in flight",
            self.assumerole_current.clone(),
        );
        r.register(
            "kiam_k8s_dropped_pods",
            "Prefetch announcements dropped on a full buffer",
            self.dropped_pods.clone(),
        );
        r.register("kiam_sts_errors", "AssumeRole failures by AWS error code", self.sts_errors.clone());
        r.register(
            "kiam_server_pod_lookup_seconds",
            "Time to find the pod behind a request",
            self.pod_lookup.clone(),
        );
        r.register(
            "kiam_server_pod_waits",
            "Requests that waited for a pod not seen yet",
            self.pod_waits.clone(),
        );
        r.register(
            "kiam_server_credentials_remaining_seconds",
            "Life left in credentials when served",
            self.served_remaining.clone(),
        );
        r.register(
            "kiam_server_ambiguous_ips",
            "Requests refused: several live pods on one IP",
            self.ambiguous_ips.clone(),
        );
        r.register(
            "kiam_k8s_watch_restarts",
            "Watch failures, each followed by a restart",
            self.watch_restarts.clone(),
        );
        r.register("kiam_k8s_relists", "Complete relists of a kind", self.relists.clone());
        r.register("kiam_k8s_cache_synced", "Whether the kind's cache has synced", self.cache_synced.clone());
    }
}

/// go-grpc-prometheus's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Rpc {
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
}

/// go-grpc-prometheus's labels with the status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcCode {
    pub grpc_type: &'static str,
    pub grpc_service: &'static str,
    pub grpc_method: &'static str,
    pub grpc_code: &'static str,
}

/// `grpc_<side>_{started,handled,msg_received,msg_sent}_total`, as go-grpc-prometheus names them.
#[derive(Clone, Debug, Default)]
pub struct GrpcMetrics {
    pub started: Family<Rpc, Counter>,
    pub handled: Family<RpcCode, Counter>,
    pub msg_received: Family<Rpc, Counter>,
    pub msg_sent: Family<Rpc, Counter>,
}

impl GrpcMetrics {
    /// Creates one series in every family.
    #[cfg(test)]
    pub(super) fn touch(&self) {
        self.unary(true, "GetHealth", "OK");
    }

    pub(super) fn register(&self, r: &mut Registry, side: &str) {
        r.register(format!("grpc_{side}_started"), "RPCs started", self.started.clone());
        r.register(format!("grpc_{side}_handled"), "RPCs completed, by status code", self.handled.clone());
        r.register(format!("grpc_{side}_msg_received"), "Messages received", self.msg_received.clone());
        r.register(format!("grpc_{side}_msg_sent"), "Messages sent", self.msg_sent.clone());
    }

    /// Records one unary call of `kiam.KiamService/<method>` that ended with `code`
    /// (`"OK"` on success). A server receives the request and sends the response; a client
    /// the other way round.
    pub fn unary(&self, server: bool, method: &'static str, code: &'static str) {
        let rpc = Rpc { grpc_type: "unary", grpc_service: "kiam.KiamService", grpc_method: method };
        self.started.get_or_create(&rpc).inc();
        let (request, response) =
            if server { (&self.msg_received, &self.msg_sent) } else { (&self.msg_sent, &self.msg_received) };
        request.get_or_create(&rpc).inc();
        if code == "OK" {
            response.get_or_create(&rpc).inc();
        }
        let with_code = RpcCode {
            grpc_type: "unary",
            grpc_service: "kiam.KiamService",
            grpc_method: method,
            grpc_code: code,
        };
        self.handled.get_or_create(&with_code).inc();
    }
}

/// go-grpc-prometheus's `grpc_code` names.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}
