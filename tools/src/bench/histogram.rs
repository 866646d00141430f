//! A log-linear (HDR-style) latency histogram: fixed buckets, no allocation per recorded value.
//!
//! Values below `2 * SUB_BUCKETS` get one bucket each; above that every power of two is split into
//! `SUB_BUCKETS` equal buckets, so a value is known to within `1 / SUB_BUCKETS` (1.6 %) of itself.

/// log2 of the number of buckets each power of two is split into.
const SUB_BUCKET_BITS: u32 = 6;
/// Buckets per power of two (relative precision `1 / SUB_BUCKETS`).
const SUB_BUCKETS: u64 = 1 << SUB_BUCKET_BITS;
/// Bucket count covering every `u64`: the index of `u64::MAX` plus one.
const BUCKET_COUNT: usize = (64 - SUB_BUCKET_BITS as usize + 1) * SUB_BUCKETS as usize;

/// Counts of recorded values (nanoseconds in `ferry bench`), with exact min, max and sum.
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64]>,
    count: u64,
    sum: u128,
    min: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket a value falls in.
fn bucket_of(value: u64) -> usize {
    if value < 2 * SUB_BUCKETS {
        return value as usize;
    }
    let msb = 63 - value.leading_zeros();
    let shift = msb - SUB_BUCKET_BITS;
    (shift as usize) * SUB_BUCKETS as usize + (value >> shift) as usize
}

/// The smallest and largest value of a bucket.
fn bucket_bounds(index: usize) -> (u64, u64) {
    let index = index as u64;
    if index < 2 * SUB_BUCKETS {
        return (index, index);
    }
    let shift = index / SUB_BUCKETS - 1;
    let mantissa = index - shift * SUB_BUCKETS;
    let low = mantissa << shift;
    (low, low.saturating_add((1u64 << shift) - 1))
}

impl Histogram {
    /// An empty histogram (the only allocation it ever makes).
    pub fn new() -> Self {
        Self {
            counts: vec![0; BUCKET_COUNT].into_boxed_slice(),
            count: 0,
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }

    /// Records one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        if let Some(slot) = self.counts.get_mut(bucket_of(value)) {
            *slot += 1;
        }
        self.count += 1;
        self.sum += u128::from(value);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    /// Adds every value recorded in `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts.iter()) {
            *mine += theirs;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Smallest recorded value (0 when empty).
    pub fn min(&self) -> u64 {
        if self.count == 0 {
            0
        } else {
            self.min
        }
    }

    /// Largest recorded value (0 when empty).
    pub fn max(&self) -> u64 {
        self.max
    }

    /// Arithmetic mean of the recorded values (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum as f64 / self.count as f64
    }

    /// The value below or at which `percent` % of the recorded values lie: the midpoint of the
    /// bucket holding that rank, clamped to the exact min and max (0 when empty).
    pub fn percentile(&self, percent: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let fraction = (percent / 100.0).clamp(0.0, 1.0);
        let rank = ((fraction * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0u64;
        for (index, &n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let (low, high) = bucket_bounds(index);
                let mid = low + (high - low) / 2;
                return mid.clamp(self.min, self.max);
            }
        }
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_contiguous_and_cover_u64() {
        let mut previous_high = None;
        for index in 0..BUCKET_COUNT {
            let (low, high) = bucket_bounds(index);
            assert!(low <= high, "bucket {index}");
            if let Some(p) = previous_high {
                assert_eq!(
                    low,
                    p + 1,
                    "bucket {index} starts where {} ended",
                    index - 1
                );
            }
            assert_eq!(bucket_of(low), index);
            assert_eq!(bucket_of(high), index);
            previous_high = Some(high);
        }
        assert_eq!(previous_high, Some(u64::MAX));
        assert_eq!(bucket_of(u64::MAX), BUCKET_COUNT - 1);
    }

    #[test]
    fn small_values_are_exact() {
        let mut h = Histogram::new();
        for v in 0..100 {
            h.record(v);
        }
        assert_eq!(h.percentile(50.0), 49);
        assert_eq!(h.percentile(99.0), 98);
        assert_eq!(h.percentile(100.0), 99);
        assert_eq!(h.min(), 0);
        assert_eq!(h.max(), 99);
        assert!((h.mean() - 49.5).abs() < 1e-9);
    }

    #[test]
    fn percentiles_of_uniform_values_are_within_precision() {
        let mut h = Histogram::new();
        // 1 µs .. 10 ms in nanoseconds, uniform.
        for us in 1..=10_000u64 {
            h.record(us * 1000);
        }
        for (p, expected) in [
            (50.0, 5_000_000.0),
            (99.0, 9_900_000.0),
            (99.9, 9_990_000.0),
        ] {
            let got = h.percentile(p) as f64;
            let error = (got - expected).abs() / expected;
            assert!(
                error < 1.0 / SUB_BUCKETS as f64,
                "p{p}: {got} vs {expected}"
            );
        }
        assert!(h.percentile(50.0) <= h.percentile(99.0));
        assert!(h.percentile(99.0) <= h.percentile(99.9));
        assert_eq!(h.percentile(100.0), 10_000_000);
        assert!((1000..=1016).contains(&h.percentile(0.0)));
    }

    #[test]
    fn tail_outlier_shows_in_p999_only() {
        let mut h = Histogram::new();
        for _ in 0..9990 {
            h.record(20_000);
        }
        for _ in 0..10 {
            h.record(5_000_000);
        }
        let p50 = h.percentile(50.0);
        assert!((19_700..=20_300).contains(&p50), "p50 {p50}");
        assert!(h.percentile(99.0) < 21_000);
        assert!(h.percentile(99.95) > 4_900_000);
    }

    #[test]
    fn merge_adds_counts_and_extremes() {
        let mut a = Histogram::new();
        let mut b = Histogram::new();
        a.record(10);
        b.record(1_000_000);
        b.record(30);
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert_eq!(a.min(), 10);
        assert_eq!(a.max(), 1_000_000);
        assert_eq!(a.percentile(50.0), 30);
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let h = Histogram::new();
        assert_eq!(h.percentile(99.0), 0);
        assert_eq!(h.mean(), 0.0);
        assert_eq!(h.min(), 0);
    }
}
