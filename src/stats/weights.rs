//! Bayesian-bootstrap weights drawn from a hash of (experiment seed, client, replicate).
//!
//! Client i's weight in replicate r is an Exp(1) variate, quantized to an integer number of
//! `1 / WEIGHT_SCALE` units so that sums of weights (and of weight × value products) are exact
//! and therefore independent of the order in which clients are added (DESIGN.md section 6).
//!
//! Definition (everything below is IEEE arithmetic without fused operations, so it gives the
//! same bits on every platform and in the scalar and vectorized code paths):
//! - `key = xxh3_64_with_seed(client_hash.to_le_bytes(), seed)`;
//! - `h = fmix32(fmix32((r * 0x9E3779B9) ^ lo32(key)) ^ hi32(key))` (murmur3's finalizer);
//! - `u = ((h >> 8) + 0.5) / 2^24` as f32, a uniform in (0, 1);
//! - `w = max(1, round_ties_even(-ln(u) * 2^16))` units of 2^-16 (rounded by adding 2^23 in f32), with `ln` evaluated by the
//!   polynomial in [`neg_ln`] (absolute error below 2e-6, far under the 2^-17 rounding step).
//!
//! The largest weight is `ln(2^25) * 2^16 < 2^21` units, so `w * x` is exact in f64 for any
//! |x| <= 2^32 and a product of a weight and a 26-bit quantized value fits in 47 bits.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Units per 1.0 of weight.
pub const WEIGHT_SCALE: f64 = 65536.0;

/// Per-client key from which all of its replicate weights derive.
#[inline]
pub fn client_key(seed: u64, client_hash: u64) -> u64 {
    xxh3_64_with_seed(&client_hash.to_le_bytes(), seed)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// -ln(u) for u in (0, 1], by range reduction to [sqrt(1/2), sqrt(2)) and the atanh series.
#[inline(always)]
pub fn neg_ln(u: f32) -> f32 {
    let bits = u.to_bits() as i32;
    let mut e = ((bits >> 23) & 0xff) - 127;
    let mut mbits = (bits & 0x007f_ffff) | 0x3f80_0000;
    // Move mantissas above sqrt(2) into [sqrt(1/2), 1) so |t| < 0.1716.
    let adj = (mbits > 0x3fb5_04f3) as i32;
    mbits -= adj << 23;
    e += adj;
    let m = f32::from_bits(mbits as u32);
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let p = t * (2.0 + t2 * (0.666_666_7 + t2 * (0.4 + t2 * (0.285_714_3 + t2 * 0.222_222_22))));
    -(e as f32 * std::f32::consts::LN_2 + p)
}

/// Weight (in units) of the client with `key` in replicate `r`.
#[inline(always)]
pub fn weight_units(key: u64, r: u32) -> f32 {
    let lo = key as u32;
    let hi = (key >> 32) as u32;
    let h = fmix32(fmix32(r.wrapping_mul(0x9e37_79b9) ^ lo) ^ hi);
    let u = ((h >> 8) as i32 as f32 + 0.5) * (1.0 / 16_777_216.0);
    // Adding 2^23 rounds to the nearest integer (ties to even) in the low mantissa bits.
    let y = neg_ln(u) * 65536.0 + 8_388_608.0;
    let w = (y.to_bits() - 0x4b00_0000) as i32;
    w.max(1) as f32
}

#[inline(always)]
pub(crate) fn fill_generic(key: u64, r0: u32, out: &mut [f64]) {
    // Two passes so the hash and logarithm run on full-width f32 vectors.
    let mut buf = [0f32; 64];
    for (c, chunk) in out.chunks_mut(64).enumerate() {
        let base = r0 + (c * 64) as u32;
        for (j, b) in buf.iter_mut().enumerate() {
            *b = weight_units(key, base + j as u32);
        }
        for (o, &b) in chunk.iter_mut().zip(&buf) {
            *o = b as f64;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fill_avx2(key: u64, r0: u32, out: &mut [f64]) {
    fill_generic(key, r0, out)
}

/// Writes the weights (in units) of replicates `r0 .. r0 + out.len()` for one client.
pub fn fill_weights(key: u64, r0: u32, out: &mut [f64]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { fill_avx2(key, r0, out) };
        return;
    }
    fill_generic(key, r0, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neg_ln_is_accurate() {
        let mut worst = 0f64;
        for i in 0..(1 << 16) {
            let u = ((i << 8) as f32 + 0.5) / 16_777_216.0;
            let err = (neg_ln(u) as f64 + (u as f64).ln()).abs();
            worst = worst.max(err);
        }
        assert!(worst < 2e-6, "worst {worst}");
        assert_eq!(neg_ln(1.0), 0.0);
    }

    #[test]
    fn weights_are_exp1_and_identical_across_paths() {
        let key = client_key(7, 42);
        let mut a = vec![0.0; 10_000];
        fill_weights(key, 0, &mut a);
        let b: Vec<f64> = (0..10_000).map(|r| weight_units(key, r) as f64).collect();
        assert_eq!(a, b);
        let mean = a.iter().sum::<f64>() / a.len() as f64 / WEIGHT_SCALE;
        assert!((mean - 1.0).abs() < 0.04, "mean {mean}");
        assert!(a
            .iter()
            .all(|&w| w >= 1.0 && w < (1 << 21) as f64 && w.fract() == 0.0));
        // Across clients in one replicate, too.
        let across: f64 = (0..10_000u64)
            .map(|c| weight_units(client_key(7, c), 3) as f64)
            .sum::<f64>()
            / 10_000.0
            / WEIGHT_SCALE;
        assert!((across - 1.0).abs() < 0.04, "mean {across}");
        // Golden values pin the definition down: a change here changes every published
        // interval, and re-publications would no longer match earlier publications.
        let golden = [
            ((1, 2, 3), 1_667_139_887_444_314_012, 28_758.0),
            ((0, 0, 0), 14_374_147_212_387_527_897, 19_148.0),
            ((42, 7, 999), 16_336_737_866_460_427_651, 2_177.0),
            ((7, u64::MAX, 123_456), 4_515_201_275_042_620_865, 131_925.0),
        ];
        for ((seed, client, r), key, w) in golden {
            assert_eq!(client_key(seed, client), key, "key of ({seed}, {client})");
            assert_eq!(weight_units(key, r), w, "weight of ({seed}, {client}, {r})");
        }
        // And from a client id, as materialization hashes it (xxh3 of the id's bytes).
        let id_hash = xxhash_rust::xxh3::xxh3_64(b"client-0001");
        assert_eq!(id_hash, 8_590_842_446_834_153_642);
        assert_eq!(weight_units(client_key(42, id_hash), 0), 32_468.0);
    }
    #[test]
    fn weights_have_exp1_variance_and_no_cross_replicate_correlation() {
        let n = 100_000u64;
        let draw = |r: u32| -> Vec<f64> {
            (0..n)
                .map(|c| {
                    weight_units(client_key(3, c.wrapping_mul(0x9e37_79b9_7f4a_7c15)), r) as f64
                        / WEIGHT_SCALE
                })
                .collect()
        };
        let (a, b) = (draw(7), draw(8));
        let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
        let (ma, mb) = (mean(&a), mean(&b));
        let var = a.iter().map(|w| (w - ma).powi(2)).sum::<f64>() / n as f64;
        let cov = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - ma) * (y - mb))
            .sum::<f64>()
            / n as f64;
        assert!((var - 1.0).abs() < 0.03, "variance {var}");
        assert!(cov.abs() < 0.02, "covariance {cov}");
    }
}
