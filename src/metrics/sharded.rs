//! A counter and a histogram split into per-thread shards, for the series that every credential
//! hit moves (figure 1). prometheus-client's `Counter` is one atomic and its `Histogram` one
//! mutex: shared by every worker thread, each hit moved their cache lines from core to core,
//! which on two cores cost more than the rest of the hit's own work in user space. A shard is
//! one thread's (threads take them in turn), so a hit writes only lines its core already holds;
//! a scrape adds the shards up. They encode exactly as prometheus-client's own types do.
//!
//! Hand-written: prometheus-client has no sharded metric, and the crates that do (for other
//! metric libraries) would bring a second metrics stack for two small types.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per metric: enough that the worker threads of most nodes each have their own.
const SHARDS: usize = 8;

/// The most buckets of a [`ShardedHistogram`], the last one (`+Inf`) included: a shard is then
/// 16 words, two cache lines.
pub const MAX_BUCKETS: usize = 14;

/// This thread's shard.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|shard| *shard)
}

/// One shard's words, on cache lines of their own.
#[repr(align(128))]
#[derive(Debug)]
struct Line<const N: usize>([AtomicU64; N]);

impl<const N: usize> Default for Line<N> {
    fn default() -> Self {
        Line(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

/// A monotonic counter, as prometheus-client's `Counter<u64>`.
#[derive(Clone, Debug, Default)]
pub struct ShardedCounter(Arc<[Line<1>; SHARDS]>);

impl ShardedCounter {
    /// Adds one.
    pub fn inc(&self) {
        self.0[shard()].0[0].fetch_add(1, Ordering::Relaxed);
    }

    /// The total over every shard.
    pub fn get(&self) -> u64 {
        self.0.iter().map(|line| line.0[0].load(Ordering::Relaxed)).sum()
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Words of a histogram shard: the count, the sum (an `f64`'s bits), then one per bucket.
const WORDS: usize = MAX_BUCKETS + 2;

/// A histogram with fixed buckets, as prometheus-client's classic `Histogram`.
#[derive(Clone, Debug)]
pub struct ShardedHistogram(Arc<HistogramShards>);

#[derive(Debug)]
struct HistogramShards {
    /// Upper bounds, the last one `+Inf`.
    bounds: Vec<f64>,
    shards: [Line<WORDS>; SHARDS],
}

impl ShardedHistogram {
    /// A histogram with these upper bounds (and `+Inf`); bounds past [`MAX_BUCKETS`] are
    /// dropped, and the callers here pass constants within it.
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> ShardedHistogram {
        let mut bounds: Vec<f64> =
            bounds.into_iter().filter(|b| b.is_finite()).take(MAX_BUCKETS - 1).collect();
        bounds.push(f64::INFINITY);
        ShardedHistogram(Arc::new(HistogramShards { bounds, shards: Default::default() }))
    }

    /// Records one observation.
    pub fn observe(&self, v: f64) {
        let words = &self.0.shards[shard()].0;
        words[0].fetch_add(1, Ordering::Relaxed);
        // Only this thread writes the shard's sum (or, past `SHARDS` threads, very few).
        let _ = words[1].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some((f64::from_bits(bits) + v).to_bits())
        });
        let bucket = self.0.bounds.iter().position(|bound| v <= *bound).unwrap_or(self.0.bounds.len() - 1);
        words[2 + bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Count, sum, and each bucket's own count, over every shard.
    fn totals(&self) -> (u64, f64, Vec<(f64, u64)>) {
        let (mut count, mut sum) = (0, 0.0);
        let mut buckets: Vec<(f64, u64)> = self.0.bounds.iter().map(|bound| (*bound, 0)).collect();
        for line in &self.0.shards {
            count += line.0[0].load(Ordering::Relaxed);
            sum += f64::from_bits(line.0[1].load(Ordering::Relaxed));
            for (i, bucket) in buckets.iter_mut().enumerate() {
                bucket.1 += line.0[2 + i].load(Ordering::Relaxed);
            }
        }
        (count, sum, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (count, sum, buckets) = self.totals();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
    use prometheus_client::registry::Registry;

    use super::*;

    /// The text of a registry holding `metric` as `name`.
    fn text(name: &str, metric: impl EncodeMetric + Send + Sync + std::fmt::Debug + 'static) -> String {
        let mut registry = Registry::default();
        registry.register(name, "help", metric);
        let mut out = String::new();
        encode(&mut out, &registry).expect("encode");
        out
    }

    #[test]
    fn they_encode_as_prometheus_clients_own_types_from_many_threads() {
        let (counter, sharded) = (Counter::<u64>::default(), ShardedCounter::default());
        let buckets = || exponential_buckets(0.001, 2.0, 13);
        let (histogram, sharded_histogram) = (Histogram::new(buckets()), ShardedHistogram::new(buckets()));
        // More threads than shards, so that some share one.
        std::thread::scope(|s| {
            for t in 0..(SHARDS as u32 + 3) {
                let (counter, sharded) = (&counter, &sharded);
                let (histogram, sharded_histogram) = (&histogram, &sharded_histogram);
                s.spawn(move || {
                    for i in 0..200u32 {
                        counter.inc();
                        sharded.inc();
                        // Every bucket, +Inf included, in multiples of 1/1024 s, which add up
                        // exactly in any order.
                        let v = f64::from((i * 7 + t) % 40) * f64::from(1u32 << (i % 13)) / 1024.0;
                        histogram.observe(v);
                        sharded_histogram.observe(v);
                    }
                });
            }
        });
        assert_eq!(sharded.get(), 11 * 200);
        assert_eq!(text("hits", sharded), text("hits", counter));
        let (ours, theirs) = (text("latency", sharded_histogram), text("latency", histogram));
        assert!(ours.contains("latency_bucket{le=\"+Inf\"} 2200"), "{ours}");
        assert_eq!(ours, theirs);
    }
}
