//! Latency histograms with the proxy's bucket bounds
//! ([`nonstop_core::traffic::LATENCY_BOUNDS_US`]: 100 µs to about 66 s in
//! steps of ×1.25, plus an overflow bucket), so the proxy's per-backend
//! histograms go in bucket for bucket, merge exactly, and give a quantile
//! within one bucket (25%) of the exact one for any window.

use nonstop_core::traffic::{latency_bucket, LatencyHistogram, LATENCY_BOUNDS_US, LATENCY_BUCKETS};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How many counts a histogram has: one per bound, plus the overflow.
pub const BUCKETS: usize = LATENCY_BUCKETS + 1;

/// Counts per bucket (`counts[i]`: latencies in `(bound[i-1], bound[i]]`,
/// the last: above the last bound) and the sum of the latencies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    counts: Vec<u64>,
    sum_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; BUCKETS], sum_us: 0 }
    }
}

impl Histogram {
    /// An empty histogram.
    pub fn new() -> Histogram {
        Histogram::default()
    }

    /// The proxy's histogram (a difference of two readings of a
    /// backend's counters, or their merge over backends) with the sum of
    /// the latencies it counted. Counts past this version's buckets go to
    /// the overflow bucket.
    pub fn from_latency(latency: &LatencyHistogram, sum: Duration) -> Histogram {
        let mut h = Histogram::new();
        for (i, &c) in latency.counts.iter().enumerate() {
            let i = i.min(LATENCY_BUCKETS);
            h.counts[i] = h.counts[i].saturating_add(c);
        }
        h.sum_us = duration_us(sum);
        h
    }

    /// As [`Histogram::from_latency`] when the sum was not measured: each
    /// latency is taken at the geometric middle of its bucket (the first
    /// bucket's at half its bound; the overflow's at the last bound), so
    /// the sum is an estimate within the buckets' ×1.25.
    pub fn from_latency_estimating_sum(latency: &LatencyHistogram) -> Histogram {
        let mut h = Histogram::from_latency(latency, Duration::ZERO);
        let mut sum = 0u64;
        for (i, &c) in h.counts.iter().enumerate() {
            let mid = match i {
                0 => LATENCY_BOUNDS_US[0] / 2,
                i if i >= LATENCY_BUCKETS => LATENCY_BOUNDS_US[LATENCY_BUCKETS - 1],
                i => ((LATENCY_BOUNDS_US[i - 1] as f64) * (LATENCY_BOUNDS_US[i] as f64)).sqrt() as u64,
            };
            sum = sum.saturating_add(mid.saturating_mul(c));
        }
        h.sum_us = sum;
        h
    }

    /// Count one latency.
    pub fn observe(&mut self, latency: Duration) {
        let us = duration_us(latency);
        let i = latency_bucket(us);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Add `other`'s counts and sum to these.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine = mine.saturating_add(*theirs);
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
    }

    /// The counts, one per bucket ([`BUCKETS`]).
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// How many latencies were counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().fold(0u64, |s, &c| s.saturating_add(c))
    }

    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&c| c == 0)
    }

    /// The sum of the latencies counted.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_us)
    }

    pub(crate) fn sum_us(&self) -> u64 {
        self.sum_us
    }

    /// The mean latency, if any was counted.
    pub fn mean(&self) -> Option<Duration> {
        let n = self.count();
        (n > 0).then(|| Duration::from_micros(self.sum_us / n))
    }

    /// The upper bound of bucket `i`; `None` for the overflow bucket.
    pub fn bound(i: usize) -> Option<Duration> {
        LATENCY_BOUNDS_US.get(i).map(|&us| Duration::from_micros(us))
    }

    /// The `q` quantile (0 ≤ q ≤ 1, clamped; NaN is 0): the upper bound of
    /// the bucket holding the sample of rank ⌈q·count⌉ (at least the
    /// first). Never below the exact quantile and less than 1.25× it
    /// (rounded up to a microsecond) from 100 µs up to the last bound;
    /// 100 µs below that, the last bound above it. `None` if empty.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        // Totals stay far below 2^53: q·total in f64 is exact enough.
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        let mut bucket = LATENCY_BUCKETS;
        for (i, &c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen >= rank {
                bucket = i;
                break;
            }
        }
        Some(Duration::from_micros(LATENCY_BOUNDS_US[bucket.min(LATENCY_BUCKETS - 1)]))
    }

    /// Rebuild from parts (the persisted file, the rings); counts of
    /// another length are refused.
    pub(crate) fn from_parts(counts: Vec<u64>, sum_us: u64) -> Option<Histogram> {
        (counts.len() == BUCKETS).then_some(Histogram { counts, sum_us })
    }
}

pub(crate) fn duration_us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// A histogram as a ring keeps it: counts in `u32` (a step never counts
/// four billion requests of one series; more saturates) to halve the
/// memory of the largest points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HistPoint {
    pub(crate) counts: Box<[u32]>,
    pub(crate) sum_us: u64,
}

impl HistPoint {
    pub(crate) fn new() -> HistPoint {
        HistPoint { counts: vec![0u32; BUCKETS].into_boxed_slice(), sum_us: 0 }
    }

    pub(crate) fn add(&mut self, h: &Histogram) {
        for (mine, &theirs) in self.counts.iter_mut().zip(h.counts()) {
            *mine = u32::try_from(u64::from(*mine).saturating_add(theirs)).unwrap_or(u32::MAX);
        }
        self.sum_us = self.sum_us.saturating_add(h.sum_us);
    }

    pub(crate) fn to_histogram(&self) -> Histogram {
        Histogram { counts: self.counts.iter().map(|&c| u64::from(c)).collect(), sum_us: self.sum_us }
    }

    /// Heap bytes held (the counts).
    pub(crate) const HEAP_BYTES: usize = BUCKETS * std::mem::size_of::<u32>();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exact_quantile(samples: &mut [u64], q: f64) -> u64 {
        samples.sort_unstable();
        let n = samples.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        samples[(rank - 1) as usize]
    }

    #[test]
    fn empty_and_single() {
        let mut h = Histogram::new();
        assert_eq!(h.quantile(0.5), None);
        assert_eq!(h.mean(), None);
        h.observe(Duration::from_millis(10));
        assert_eq!(h.count(), 1);
        assert_eq!(h.sum(), Duration::from_millis(10));
        let p = h.quantile(0.99).unwrap();
        assert!(p >= Duration::from_millis(10) && p < Duration::from_micros(12_500), "{p:?}");
        // Past the last bound: the last bound.
        let mut slow = Histogram::new();
        slow.observe(Duration::from_secs(600));
        assert_eq!(slow.quantile(0.5), Histogram::bound(LATENCY_BUCKETS - 1));
        assert_eq!(Histogram::bound(LATENCY_BUCKETS), None);
    }

    #[test]
    fn from_the_proxys_histogram() {
        let mut core = LatencyHistogram::new();
        for ms in [1, 2, 3, 50, 900] {
            core.record(Duration::from_millis(ms));
        }
        let h = Histogram::from_latency(&core, Duration::from_millis(956));
        assert_eq!(h.count(), 5);
        assert_eq!(h.counts(), core.counts.as_slice());
        assert_eq!(h.mean(), Some(Duration::from_micros(956_000 / 5)));
        // The estimated sum is within the buckets' width of the real one.
        let est = Histogram::from_latency_estimating_sum(&core).sum().as_secs_f64();
        assert!((0.956 / 1.25..=0.956 * 1.25).contains(&est), "{est}");
        // A longer histogram (another version's bounds) folds into overflow.
        let mut long = LatencyHistogram::new();
        long.counts.resize(BUCKETS + 3, 0);
        long.counts[BUCKETS + 2] = 4;
        assert_eq!(Histogram::from_latency(&long, Duration::ZERO).counts()[BUCKETS - 1], 4);
    }

    #[test]
    fn points_saturate_in_u32() {
        let mut p = HistPoint::new();
        let mut h = Histogram::new();
        h.counts[3] = u64::from(u32::MAX) + 10;
        p.add(&h);
        p.add(&h);
        assert_eq!(p.counts[3], u32::MAX);
        assert_eq!(p.to_histogram().counts()[3], u64::from(u32::MAX));
    }

    proptest! {
        /// Histograms merged from several sources give every quantile
        /// within one bucket of the exact quantile of all their samples.
        #[test]
        fn merged_quantiles_within_a_bucket(
            parts in proptest::collection::vec(proptest::collection::vec(100u64..60_000_000, 1..60), 1..6),
            q in 0.0f64..=1.0,
        ) {
            let mut merged = Histogram::new();
            let mut all = Vec::new();
            for part in &parts {
                let mut h = Histogram::new();
                for &us in part {
                    h.observe(Duration::from_micros(us));
                }
                merged.merge(&h);
                all.extend_from_slice(part);
            }
            prop_assert_eq!(merged.count(), all.len() as u64);
            prop_assert_eq!(merged.sum_us, all.iter().sum::<u64>());
            let exact = exact_quantile(&mut all, q);
            let est = duration_us(merged.quantile(q).unwrap());
            prop_assert!(est >= exact, "estimate {} below exact {}", est, exact);
            prop_assert!(est <= (exact * 5).div_ceil(4) + 1, "estimate {} more than a bucket above {}", est, exact);
        }
    }
}
