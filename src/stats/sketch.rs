//! Mergeable quantile summary: a log-linear histogram with exact per-bucket min and max.
//!
//! A bucket holds the values that share sign, binary exponent and the top 9 mantissa bits, so
//! every value in a bucket is within a factor (1 + 2^-9) of every other. Buckets are merged by
//! adding counts and taking min/max, which is exact and order-independent: any split of the
//! clients into partitions gives the same summary. Order statistics are read from it:
//! - exact when the rank is the first or last element of its bucket, or the bucket holds one
//!   distinct value (so small inputs and integer-valued metrics below 512 are exact);
//! - otherwise the bucket's midpoint (min + max) / 2, within a relative error of 2^-10
//!   (about 0.1%) of the true order statistic.
//!
//! Quantiles interpolate linearly between the order statistics at ranks floor(h) and
//! floor(h) + 1 with h = q (n - 1), the default of numpy and pandas (which Jetstream uses).

use serde::{Deserialize, Serialize};

/// Mantissa bits kept in a bucket key.
const MANTISSA_BITS: u32 = 9;

/// One histogram bucket.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Order-preserving key (see [`bucket_key`]).
    pub key: i32,
    pub count: u64,
    pub min: f64,
    pub max: f64,
}

/// Key of the bucket holding finite `x`; monotone in `x`, 0 for zero.
#[inline]
pub fn bucket_key(x: f64) -> i32 {
    if x == 0.0 {
        return 0;
    }
    let k = (x.abs().to_bits() >> (52 - MANTISSA_BITS)) as i32 + 1;
    if x > 0.0 {
        k
    } else {
        -k
    }
}

/// Mergeable quantile summary of a multiset of finite values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QuantileSketch {
    /// Sorted by key, no empty buckets.
    buckets: Vec<Bucket>,
    count: u64,
}

impl QuantileSketch {
    /// Builds a sketch from finite values (any order; the slice is sorted in place).
    pub fn from_values(values: &mut [f64]) -> Self {
        values.sort_unstable_by(f64::total_cmp);
        let mut buckets: Vec<Bucket> = Vec::new();
        for &x in values.iter() {
            let x = if x == 0.0 { 0.0 } else { x }; // -0.0 joins 0.0
            let key = bucket_key(x);
            match buckets.last_mut() {
                Some(b) if b.key == key => {
                    b.count += 1;
                    b.max = x;
                }
                _ => buckets.push(Bucket {
                    key,
                    count: 1,
                    min: x,
                    max: x,
                }),
            }
        }
        Self {
            count: values.len() as u64,
            buckets,
        }
    }

    /// Number of values summarized.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.buckets
    }

    pub fn min(&self) -> Option<f64> {
        self.buckets.first().map(|b| b.min)
    }

    pub fn max(&self) -> Option<f64> {
        self.buckets.last().map(|b| b.max)
    }

    /// Adds another sketch's values.
    pub fn merge(&mut self, other: &QuantileSketch) {
        let mut out = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.buckets, &other.buckets);
        while i < a.len() || j < b.len() {
            if j == b.len() || (i < a.len() && a[i].key < b[j].key) {
                out.push(a[i]);
                i += 1;
            } else if i == a.len() || b[j].key < a[i].key {
                out.push(b[j]);
                j += 1;
            } else {
                out.push(Bucket {
                    key: a[i].key,
                    count: a[i].count + b[j].count,
                    min: a[i].min.min(b[j].min),
                    max: a[i].max.max(b[j].max),
                });
                i += 1;
                j += 1;
            }
        }
        self.buckets = out;
        self.count += other.count;
    }

    /// Index of the bucket holding the value of 0-based rank `k`, and the rank of its first value.
    pub fn locate(&self, k: u64) -> (usize, u64) {
        let mut before = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            if k < before + b.count {
                return (i, before);
            }
            before += b.count;
        }
        (
            self.buckets.len() - 1,
            before - self.buckets.last().map_or(0, |b| b.count),
        )
    }

    /// The value of 0-based rank `k` (see the module doc for when it is exact).
    pub fn order_statistic(&self, k: u64) -> f64 {
        let (i, first) = self.locate(k);
        let b = &self.buckets[i];
        bucket_value(b, k - first)
    }

    /// The q-quantile with linear interpolation (numpy's default); None when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let h = q.clamp(0.0, 1.0) * (self.count - 1) as f64;
        let lo = h.floor();
        let frac = h - lo;
        let a = self.order_statistic(lo as u64);
        if frac == 0.0 {
            return Some(a);
        }
        let b = self.order_statistic(lo as u64 + 1);
        Some(a + frac * (b - a))
    }

    /// Fraction of values <= x; a bucket straddling x counts linearly between its min and max
    /// (error at most that bucket's count / n).
    pub fn cdf(&self, x: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let mut below = 0.0;
        for b in &self.buckets {
            if b.max <= x {
                below += b.count as f64;
            } else if b.min <= x {
                // b.min <= x < b.max: min counts, max does not, the rest spread linearly.
                let inner = (x - b.min) / (b.max - b.min);
                below += 1.0 + (b.count - 2) as f64 * inner;
            } else {
                break;
            }
        }
        Some(below / self.count as f64)
    }
}

/// Value of the element at offset `j` within bucket `b`.
pub fn bucket_value(b: &Bucket, j: u64) -> f64 {
    if j == 0 || b.min == b.max {
        b.min
    } else if j + 1 == b.count {
        b.max
    } else {
        b.min + (b.max - b.min) * 0.5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch(xs: &[f64]) -> QuantileSketch {
        QuantileSketch::from_values(&mut xs.to_vec())
    }

    #[test]
    fn small_inputs_are_exact() {
        let s = sketch(&[3.0, 1.0, 2.0, 5.0, 4.0, 10.0, 9.0, 8.0, 7.0, 6.0]);
        // numpy.quantile(1..=10, q) = 1 + 9q
        for (i, q) in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
            .iter()
            .enumerate()
        {
            let expected = [1.9, 2.8, 3.7, 4.6, 5.5, 6.4, 7.3, 8.2, 9.1][i];
            assert!((s.quantile(*q).unwrap() - expected).abs() < 1e-12);
        }
        assert_eq!(s.quantile(0.0), Some(1.0));
        assert_eq!(s.quantile(1.0), Some(10.0));
        assert_eq!(s.cdf(3.0), Some(0.3));
        assert_eq!(s.cdf(0.5), Some(0.0));
        assert_eq!(s.cdf(10.0), Some(1.0));
        assert_eq!(QuantileSketch::default().quantile(0.5), None);
    }

    #[test]
    fn keys_are_monotone_and_negative_values_work() {
        let xs = [-1e10, -3.5, -1e-300, 0.0, 1e-300, 2.0, 2.001, 1e300];
        for w in xs.windows(2) {
            assert!(bucket_key(w[0]) <= bucket_key(w[1]));
        }
        let s = sketch(&[-2.0, -1.0, 0.0, 1.0, 2.0]);
        assert_eq!(s.quantile(0.5), Some(0.0));
        assert_eq!(s.quantile(0.25), Some(-1.0));
    }

    #[test]
    fn error_bound_holds_and_merge_is_order_independent() {
        let xs: Vec<f64> = (1..=100_000)
            .map(|i| (i as f64 * 0.618_034).fract() * 1000.0 + 1.0)
            .collect();
        let mut sorted = xs.clone();
        sorted.sort_by(f64::total_cmp);
        let whole = sketch(&xs);
        for k in (0..100_000u64).step_by(997) {
            let truth = sorted[k as usize];
            let est = whole.order_statistic(k);
            assert!(
                (est - truth).abs() <= truth * (1.0 / 1024.0),
                "{k}: {est} vs {truth}"
            );
        }
        let mut a = sketch(&xs[..40_000]);
        let b = sketch(&xs[40_000..70_000]);
        let c = sketch(&xs[70_000..]);
        let mut other = c.clone();
        other.merge(&a);
        other.merge(&b);
        a.merge(&b);
        a.merge(&c);
        assert_eq!(a, whole);
        assert_eq!(other, whole);
    }
}
