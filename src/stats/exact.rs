//! Exact summation of f64 values, so that sums are independent of the order of addition.
//!
//! The accumulator is a fixed-point integer covering every finite f64 (2^-1074 .. 2^1024),
//! kept as 32-bit digits in i64 limbs; carries are resolved lazily. Rounding back to f64
//! happens once, from the canonical digit form, so equal exact sums give equal bits.

use serde::{Deserialize, Serialize};

const DIGITS: usize = 68; // 68 * 32 = 2176 bits >= 1074 + 1024 + headroom
const RESOLVE_EVERY: u32 = 1 << 29;

/// Order-independent exact sum of finite f64 values.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactSum {
    digits: Vec<i64>,
    pending: u32,
}

impl Default for ExactSum {
    fn default() -> Self {
        Self {
            digits: vec![0; DIGITS],
            pending: 0,
        }
    }
}

impl ExactSum {
    /// Adds a finite value (non-finite values are the caller's to filter).
    pub fn add(&mut self, x: f64) {
        debug_assert!(x.is_finite());
        if x == 0.0 {
            return;
        }
        let bits = x.to_bits();
        let biased = ((bits >> 52) & 0x7ff) as i64;
        let frac = bits & ((1u64 << 52) - 1);
        let (mant, pos) = if biased == 0 {
            (frac, 0)
        } else {
            (frac | (1u64 << 52), biased - 1)
        };
        let idx = (pos / 32) as usize;
        let v = (mant as u128) << (pos % 32);
        let sign = if x < 0.0 { -1 } else { 1 };
        for k in 0..3 {
            self.digits[idx + k] += sign * ((v >> (32 * k)) & 0xffff_ffff) as i64;
        }
        self.pending += 1;
        if self.pending >= RESOLVE_EVERY {
            self.resolve();
        }
    }

    /// Adds another exact sum (merging partitions).
    pub fn merge(&mut self, other: &ExactSum) {
        let mut o = other.clone();
        o.resolve();
        self.resolve();
        for (a, b) in self.digits.iter_mut().zip(&o.digits) {
            *a += *b;
        }
        self.resolve();
    }

    /// Brings digits 0..DIGITS-1 into [0, 2^32); the top limb keeps the sign.
    fn resolve(&mut self) {
        for i in 0..DIGITS - 1 {
            let carry = self.digits[i] >> 32;
            self.digits[i] -= carry << 32;
            self.digits[i + 1] += carry;
        }
        self.pending = 0;
    }

    /// The sum rounded to f64 (may be infinite when it exceeds the f64 range).
    pub fn value(&self) -> f64 {
        let mut d = self.digits.clone();
        let mut s = ExactSum {
            digits: std::mem::take(&mut d),
            pending: 0,
        };
        s.resolve();
        let negative = s.digits[DIGITS - 1] < 0;
        if negative {
            for x in s.digits.iter_mut() {
                *x = -*x;
            }
            s.resolve();
        }
        // Most significant non-zero digit, then 3 digits (>= 65 bits) rounded once via u128.
        let Some(top) = s.digits.iter().rposition(|&x| x != 0) else {
            return 0.0;
        };
        let lo = top.saturating_sub(2);
        let mut acc: u128 = 0;
        for i in (lo..=top).rev() {
            acc = (acc << 32) | s.digits[i] as u128;
        }
        let sticky = s.digits[..lo].iter().any(|&x| x != 0);
        // Fold lower digits into a sticky bit so rounding of the u128 -> f64 step is faithful.
        let acc = if sticky { acc | 1 } else { acc };
        let exp = 32 * lo as i32 - 1074;
        let v = acc as f64
            * 2f64.powi(exp.clamp(-1022, 1023))
            * 2f64.powi(exp - exp.clamp(-1022, 1023));
        if negative {
            -v
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_order_independent() {
        let xs = [1e100, 1.0, -1e100, 0.1, 0.2, -0.3, 5e-324, 3.5];
        let mut a = ExactSum::default();
        for &x in &xs {
            a.add(x);
        }
        let mut b = ExactSum::default();
        for &x in xs.iter().rev() {
            b.add(x);
        }
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        // 1 + 3.5 + (0.1 + 0.2 - 0.3 exactly, a tiny positive number) + 5e-324
        assert_eq!(a.value(), 4.5);
        let mut c = ExactSum::default();
        for x in [1.0, 2.0, 3.0, -10.0] {
            c.add(x);
        }
        assert_eq!(c.value(), -4.0);
        let mut d = ExactSum::default();
        d.add(0.1);
        assert_eq!(d.value(), 0.1);
        d.add(f64::MAX);
        d.add(f64::MAX);
        assert_eq!(d.value(), f64::INFINITY);
    }

    #[test]
    fn merge_equals_single_pass() {
        let xs: Vec<f64> = (0..1000)
            .map(|i| ((i * 7919) % 1000) as f64 * 0.37 - 100.0)
            .collect();
        let mut one = ExactSum::default();
        xs.iter().for_each(|&x| one.add(x));
        let mut p1 = ExactSum::default();
        let mut p2 = ExactSum::default();
        xs[..300].iter().for_each(|&x| p1.add(x));
        xs[300..].iter().for_each(|&x| p2.add(x));
        p2.merge(&p1);
        assert_eq!(one.value().to_bits(), p2.value().to_bits());
    }
}
