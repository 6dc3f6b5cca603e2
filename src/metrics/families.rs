//! The metric families, grouped by the part of the system that moves them. Names, types,
//! labels and buckets of kiam's metrics are kept as kiam had them; new ones have bounded labels.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::sharded::{ShardedCounter, ShardedHistogram};

/// kiam's latency buckets: 1 ms doubling, 13 of them (up to about 4 s).
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 13)
}

/// A histogram with kiam's latency buckets.
pub fn latency_histogram() -> Histogram {
    Histogram::new(latency_buckets())
}

/// [`latency_histogram`], sharded: the agent's, which every credential hit moves.
fn sharded_latency_histogram() -> ShardedHistogram {
    ShardedHistogram::new(latency_buckets())
}

/// `handler` label of the agent's metrics (`credentials`, `roleName`, `health`, `proxy`, ...).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Handler {
    pub handler: &'static str,
}

/// `handler` and status `code` of a response.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Response {
    pub handler: &'static str,
    pub code: u16,
}

/// Why a listener cut a connection (`reason` label).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Cut {
    /// `source_cap` (its source already held its share), `head_timeout` (its request head, or
    /// the next one on a kept-alive connection, did not arrive in time), `write_timeout` (it
    /// stopped reading its responses) or `max_age` (it lived too long).
    pub reason: &'static str,
}

/// The agent's `kiam_metadata_*` family.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Sharded, as `success`, `responses` and `view_hits`: every hit moves them.
    pub handler_latency: Family<Handler, ShardedHistogram, fn() -> ShardedHistogram>,
    pub credential_fetch_errors: Family<Handler, Counter>,
    pub credential_encode_errors: Family<Handler, Counter>,
    pub find_role_errors: Family<Handler, Counter>,
    pub empty_role: Family<Handler, Counter>,
    pub success: Family<Handler, ShardedCounter>,
    pub responses: Family<Response, ShardedCounter>,
    pub proxy_requests_blocked: Counter,
    /// New: DNAT rules restored after something else deleted them.
    pub iptables_restorations: Counter,
    /// New: 1 while the node view's stream is live.
    pub view_live: Gauge,
    /// New: entries in the node view.
    pub view_entries: Gauge,
    /// New: when the node view stopped being known current (seconds since the epoch; 0 while live).
    pub view_down_since: Gauge,
    /// New: node-view entries dropped by a Remove or a Fence.
    pub view_invalidations: Counter,
    /// New: credential requests answered from the node view with no network call.
    pub view_hits: ShardedCounter,
    /// New: node-view streams the servers refused (the agent then uses unary calls).
    pub view_refusals: Counter,
    /// New: connections open on the metadata listener.
    pub connections_open: Gauge,
    /// New: connections the metadata listener cut, by reason.
    pub connections_cut: Family<Cut, Counter>,
    /// The series a credential GET answered 200 moves, looked up once (see [`CredentialsOk`]).
    credentials_ok: std::sync::OnceLock<CredentialsOk>,
}

/// The three series of a `credentials` response with status 200, in kiam's families: the hit
/// path moves them on every GET, and a family lookup hashes its labels under a lock each time.
#[derive(Clone, Debug)]
pub struct CredentialsOk {
    pub responses: ShardedCounter,
    pub latency: ShardedHistogram,
    pub success: ShardedCounter,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            handler_latency: Family::new_with_constructor(sharded_latency_histogram),
            credential_fetch_errors: Family::default(),
            credential_encode_errors: Family::default(),
            find_role_errors: Family::default(),
            empty_role: Family::default(),
            success: Family::default(),
            responses: Family::default(),
            proxy_requests_blocked: Counter::default(),
            iptables_restorations: Counter::default(),
            view_live: Gauge::default(),
            view_entries: Gauge::default(),
            view_down_since: Gauge::default(),
            view_invalidations: Counter::default(),
            view_hits: ShardedCounter::default(),
            view_refusals: Counter::default(),
            connections_open: Gauge::default(),
            connections_cut: Family::default(),
            credentials_ok: std::sync::OnceLock::new(),
        }
    }
}

impl AgentMetrics {
    /// The series of a `credentials` response with status 200, created at the first one (as
    /// kiam's are) and kept.
    pub fn credentials_ok(&self) -> &CredentialsOk {
        self.credentials_ok.get_or_init(|| {
            let handler = Handler { handler: "credentials" };
            CredentialsOk {
                responses: self
                    .responses
                    .get_or_create(&Response { handler: "credentials", code: 200 })
                    .clone(),
                latency: self.handler_latency.get_or_create(&handler).clone(),
                success: self.success.get_or_create(&handler).clone(),
            }
        })
    }

    /// Creates one series in every family (families without series are not exposed at all).
    #[cfg(test)]
    pub(super) fn touch(&self) {
        let h = Handler { handler: "credentials" };
        drop(self.handler_latency.get_or_create(&h));
        for family in [
            &self.credential_fetch_errors,
            &self.credential_encode_errors,
            &self.find_role_errors,
            &self.empty_role,
        ] {
            drop(family.get_or_create(&h));
        }
        drop(self.success.get_or_create(&h));
        drop(self.responses.get_or_create(&Response { handler: "credentials", code: 200 }));
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "kiam_metadata_handler_latency_seconds",
            "Latency of metadata handlers",
            self.handler_latency.clone(),
        );
        r.register(
            "kiam_metadata_credential_fetch_errors",
            "Errors fetching credentials",
            self.credential_fetch_errors.clone(),
        );
        r.register(
            "kiam_metadata_credential_encode_errors",
            "Errors encoding credentials",
            self.credential_encode_errors.clone(),
        );
        r.register(
            "kiam_metadata_find_role_errors",
            "Errors finding a pod's role",
            self.find_role_errors.clone(),
        );
        r.register("kiam_metadata_empty_role", "Requests from pods without a role", self.empty_role.clone());
        r.register("kiam_metadata_success", "Requests answered successfully", self.success.clone());
        r.register("kiam_metadata_responses", "Responses by handler and status code", self.responses.clone());
        r.register(
            "kiam_metadata_proxy_requests_blocked",
            "Requests blocked by the allow-route regexp",
            self.proxy_requests_blocked.clone(),
        );
        r.register(
            "kiam_agent_iptables_restorations",
            "DNAT rules restored after being deleted",
            self.iptables_restorations.clone(),
        );
        r.register("kiam_agent_view_live", "Whether the node view's stream is live", self.view_live.clone());
        r.register("kiam_agent_view_entries", "Pod IPs in the node view", self.view_entries.clone());
        r.register(
            "kiam_agent_view_down_since_seconds",
            "When the node view stopped being known current, in seconds since the epoch (0 while live)",
            self.view_down_since.clone(),
        );
        r.register(
            "kiam_agent_view_invalidations",
            "Node-view entries dropped by a removal or a fence",
            self.view_invalidations.clone(),
        );
        r.register(
            "kiam_agent_view_hits",
            "Credential requests answered from the node view without a network call",
            self.view_hits.clone(),
        );
        r.register(
            "kiam_agent_view_refusals",
            "Node-view streams the servers refused (the agent then asks with unary calls)",
            self.view_refusals.clone(),
        );
        r.register(
            "kiam_agent_connections_open",
            "Connections open on the metadata listener",
            self.connections_open.clone(),
        );
        r.register(
            "kiam_agent_connections_cut",
            "Connections the metadata listener cut: over the per-source cap, stalled writes, too old",
            self.connections_cut.clone(),
        );
    }
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
