//! Test helpers: deterministic randomness (no rand dependency needed) and
//! filled sketches.

use super::hll::{Precision, Sketch};

/// splitmix64.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// Precision `x`, which must be valid.
pub fn p(x: u8) -> Precision {
    Precision::new(x).unwrap()
}

/// A sketch of clients "c-{i}" for each i.
pub fn filled(precision: Precision, ids: impl IntoIterator<Item = u64>) -> Sketch {
    let mut s = Sketch::new(precision);
    for i in ids {
        s.insert_client(&format!("c-{i}"));
    }
    s
}
