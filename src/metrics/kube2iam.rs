//! kube2iam's metrics, under kube2iam's names (`kube2iam_*`), registered only in kube2iam mode so
//! that existing dashboards keep working after the switch. The role label is bounded by the
//! roles in use, never by pods.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// kube2iam's buckets: 1 ms doubling, 14 of them (about 8 s).
fn buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 14))
}

/// `code` (the AWS error code, or `Success`) and `role_arn` of an AssumeRole call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IamCall {
    pub code: String,
    pub role_arn: String,
}

/// `role_arn` of a cache hit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabel {
    pub role_arn: String,
}

/// `code`, `method` and `handler` of an HTTP response, with kube2iam's handler names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpCall {
    pub code: String,
    pub method: String,
    pub handler: &'static str,
}

/// `version`, `build_date` and `commit_hash`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Info {
    pub version: &'static str,
    pub build_date: &'static str,
    pub commit_hash: &'static str,
}

/// The `kube2iam_*` families.
#[derive(Clone, Debug)]
pub struct Kube2iamMetrics {
    pub iam_request_duration: Family<IamCall, Histogram, fn() -> Histogram>,
    pub iam_cache_hits: Family<RoleLabel, Counter>,
    pub dup_req_count: Counter,
    pub dup_req_success_count: Counter,
    pub pod_not_in_pod_cache: Counter,
    pub http_request_duration: Family<HttpCall, Histogram, fn() -> Histogram>,
    pub healthcheck_status: Gauge,
    pub info: Family<Info, Gauge>,
}

impl Default for Kube2iamMetrics {
    fn default() -> Self {
        Kube2iamMetrics {
            iam_request_duration: Family::new_with_constructor(buckets),
            iam_cache_hits: Family::default(),
            dup_req_count: Counter::default(),
            dup_req_success_count: Counter::default(),
            pod_not_in_pod_cache: Counter::default(),
            http_request_duration: Family::new_with_constructor(buckets),
            healthcheck_status: Gauge::default(),
            info: Family::default(),
        }
    }
}

impl Kube2iamMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("kube2iam");
        r.register(
            "iam_request_duration_seconds",
            "Time taken to complete IAM requests in seconds",
            self.iam_request_duration.clone(),
        );
        r.register("iam_cache_hits", "Number of IAM credential cache hits", self.iam_cache_hits.clone());
        r.register(
            "iam_k8s_dup_req_count",
            "Requests from an IP more than one pod claims",
            self.dup_req_count.clone(),
        );
        r.register(
            "iam_k8s_dup_req_success_count",
            "Such requests resolved to one pod (never, here: ambiguous IPs are refused)",
            self.dup_req_success_count.clone(),
        );
        r.register(
            "iam_k8s_pod_not_in_pod_cache",
            "Requests from an IP no known pod has",
            self.pod_not_in_pod_cache.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "Time taken to answer HTTP requests in seconds",
            self.http_request_duration.clone(),
        );
        r.register(
            "healthcheck_status",
            "1 when the last health check passed",
            self.healthcheck_status.clone(),
        );
        r.register("info", "Build information", self.info.clone());
    }
}

/// The events whose series depend on the mode: each counts kiam's own series where its caller
/// does, and kube2iam's here, in kube2iam mode only.
impl super::Metrics {
    fn kube2iam(&self) -> Option<&Kube2iamMetrics> {
        match &self.mode {
            super::Mode::Kube2iam(families) => Some(families),
            super::Mode::Kiam => None,
        }
    }

    /// An STS call for `role_arn` ended after `elapsed`, with AWS's error code on failure
    /// (`None` when it succeeded).
    pub fn sts_call(&self, role_arn: &str, error_code: Option<&str>, elapsed: Duration) {
        if let Some(k) = self.kube2iam() {
            let code = error_code.unwrap_or("Success").to_string();
            let call = IamCall { code, role_arn: role_arn.to_string() };
            k.iam_request_duration.get_or_create(&call).observe(elapsed.as_secs_f64());
        }
    }

    /// Credentials for `role_arn` were served from the cache.
    pub fn cache_hit(&self, role_arn: &str) {
        if let Some(k) = self.kube2iam() {
            k.iam_cache_hits.get_or_create(&RoleLabel { role_arn: role_arn.to_string() }).inc();
        }
    }

    /// The metadata endpoint answered `status` to `method` after `elapsed`; `handler` names the
    /// route kube2iam's way (called only in kube2iam mode).
    pub fn http_answered(
        &self,
        status: u16,
        method: &str,
        handler: impl FnOnce() -> &'static str,
        elapsed: Duration,
    ) {
        if let Some(k) = self.kube2iam() {
            let call = HttpCall { code: status.to_string(), method: method.to_string(), handler: handler() };
            k.http_request_duration.get_or_create(&call).observe(elapsed.as_secs_f64());
        }
    }

    /// kube2iam's `/healthz` found the node's metadata service up or down.
    pub fn health_checked(&self, up: bool) {
        if let Some(k) = self.kube2iam() {
            k.healthcheck_status.set(i64::from(up));
        }
    }

    /// A request came from an IP no known pod has.
    pub fn pod_not_found(&self) {
        if let Some(k) = self.kube2iam() {
            k.pod_not_in_pod_cache.inc();
        }
    }

    /// A request came from an IP several pods claim (and was refused).
    pub fn ambiguous_ip(&self) {
        if let Some(k) = self.kube2iam() {
            k.dup_req_count.inc();
        }
    }
}
