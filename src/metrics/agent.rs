//! The agent's metric families (`kiam_metadata_*`, kiam's, and the agent's new `kiam_agent_*`
//! series). Names, types, labels and buckets of kiam's are kept as kiam had them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::families::latency_buckets;
use super::sharded::{ShardedCounter, ShardedHistogram};

/// [`latency_histogram`](super::latency_histogram), sharded: the agent's, which every
/// credential hit moves.
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
