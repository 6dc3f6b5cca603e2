//! Latency samples and their percentiles (nearest-rank, on a sorted copy), and the number
//! formats the report uses.

use std::time::Duration;

/// A set of latency samples.
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Samples from a list.
    pub fn new(samples: Vec<Duration>) -> Samples {
        let mut samples = samples;
        samples.sort_unstable();
        Samples(samples)
    }

    /// How many samples there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The nearest-rank percentile `p` (0 < p ≤ 100); zero when there are no samples.
    pub fn percentile(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }
}

/// The median of some numbers (the lower middle one for an even count); 0 for none.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len().saturating_sub(1) / 2).copied().unwrap_or(0.0)
}

/// The median of `pick` over `items` (as [`median`]): each round's own percentile, say.
pub fn median_by<T>(items: &[T], pick: impl Fn(&T) -> Duration) -> Duration {
    Duration::from_secs_f64(median(&items.iter().map(|item| pick(item).as_secs_f64()).collect::<Vec<_>>()))
}

/// Milliseconds with three significant decimals: `0.412 ms`, `12.3 ms`.
pub fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    match ms {
        m if m < 10.0 => format!("{m:.3} ms"),
        m if m < 100.0 => format!("{m:.2} ms"),
        m => format!("{m:.0} ms"),
    }
}

/// Bytes in MiB, one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A ratio, two decimals and a `×`.
pub fn ratio(value: f64, baseline: f64) -> String {
    if baseline <= 0.0 {
        return "n/a".into();
    }
    format!("{:.2}×", value / baseline)
}

/// A throughput, grouped by thousands: `48 210 req/s`.
pub fn per_second(value: f64) -> String {
    let whole = value.round() as u64;
    let digits = whole.to_string();
    let mut grouped = String::new();
    for (at, digit) in digits.chars().enumerate() {
        if at > 0 && (digits.len() - at).is_multiple_of(3) {
            grouped.push(' ');
        }
        grouped.push(digit);
    }
    format!("{grouped} req/s")
}

/// Checks the arithmetic above on known inputs. The bench runs it first: `harness = false`
/// targets have no test runner, and a wrong percentile would silently skew every figure.
pub fn self_check() {
    let samples = Samples::new((1..=100).rev().map(Duration::from_millis).collect());
    assert_eq!(samples.percentile(50.0), Duration::from_millis(50));
    assert_eq!(samples.percentile(99.0), Duration::from_millis(99));
    assert_eq!(samples.percentile(100.0), Duration::from_millis(100));
    assert_eq!(samples.max(), Duration::from_millis(100));
    assert_eq!(Samples::default().percentile(99.0), Duration::ZERO);
    assert_eq!(per_second(48210.4), "48 210 req/s");
    assert_eq!(per_second(999.0), "999 req/s");
    assert_eq!(ratio(1.0, 2.0), "0.50×");
    assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    assert_eq!(median_by(&[3u64, 1, 2], |n| Duration::from_millis(*n)), Duration::from_millis(2));
    assert_eq!(ms(Duration::from_micros(412)), "0.412 ms");
}
