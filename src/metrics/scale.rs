//! The server's scale-out metrics: its share of the identities among its peers (`--peers`), the
//! peers it sees, identities that changed owner as peers came and went, and the STS budget
//! (`--sts-rate`): calls by reason and throttling answers.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `reason` label of an STS call: `request`, `prefetch` or `refresh`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// The families.
#[derive(Clone, Debug, Default)]
pub struct ScaleMetrics {
    /// Identities in use by live pods that this server owns (kept with `--peers` only).
    pub identities_owned: Gauge,
    /// Live servers this one sees, itself included (kept with `--peers` only).
    pub peers: Gauge,
    /// Identities in use that changed owner as peers left or joined, as this server counts them:
    /// those it took over from a peer that left and those it gave up to one that joined (summed
    /// over the servers, each move once).
    pub handoffs: Counter,
    /// AssumeRole calls by why they were made.
    pub sts_calls: Family<Reason, Counter>,
    /// AssumeRole calls STS answered with a throttling error.
    pub sts_throttled: Counter,
}

impl ScaleMetrics {
    /// Counts one STS call made for `reason`.
    pub fn sts_call(&self, reason: &'static str) {
        self.sts_calls.get_or_create(&Reason { reason }).inc();
    }

    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "kiam_server_identities_owned",
            "Identities in use that this server owns among its peers",
            self.identities_owned.clone(),
        );
        r.register("kiam_server_peers", "Live servers this one sees, itself included", self.peers.clone());
        r.register(
            "kiam_server_handoffs",
            "Identities in use that changed owner: taken over from a peer that left, or given up to one that joined",
            self.handoffs.clone(),
        );
        r.register("kiam_sts_calls_by_reason", "AssumeRole calls by reason", self.sts_calls.clone());
        r.register("kiam_sts_throttled", "AssumeRole calls STS throttled", self.sts_throttled.clone());
    }
}
