//! One HyperLogLog++ sketch: a fixed hash, a versioned encoding, and an
//! honest standard error.
//!
//! Wraps `hyperloglogplus` 0.4.1. That crate neither checks which hasher built a
//! sketch nor validates what it deserializes, so this wrapper carries the hash
//! version itself, refuses to merge across versions or precisions, and only
//! hands bytes to serde after the checks of [`super::encoding`].

use std::hash::{BuildHasher, Hasher};

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::encoding::{
    decode_checked, RawHll, CHECKSUM_LEN, FORMAT_VERSION, HEADER_LEN, MAGIC, MAX_ENCODED_LEN,
};
use super::SketchError;

/// Register count of the sparse representation's linear counting in the crate
/// (`2^(25-1)`); its codes carry 25-bit indices.
const SPARSE_LC_REGISTERS: f64 = (1u64 << 24) as f64;

/// Number of HLL registers, as `2^p`. Higher is more accurate and larger.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u8", into = "u8")]
pub struct Precision(u8);

impl Precision {
    /// Smallest precision the crate supports.
    pub const MIN: u8 = 4;
    /// Largest precision the crate supports.
    pub const MAX: u8 = 18;
    /// p = 12: 4096 registers, relative standard error 1.04/64 = 1.6%.
    pub const DEFAULT: Precision = Precision(12);

    /// Checks the range `MIN..=MAX`.
    pub fn new(p: u8) -> Result<Self, SketchError> {
        if (Self::MIN..=Self::MAX).contains(&p) {
            Ok(Precision(p))
        } else {
            Err(SketchError::InvalidPrecision(p))
        }
    }

    /// The exponent p.
    pub fn get(self) -> u8 {
        self.0
    }

    /// `2^p`, the dense register count.
    pub fn registers(self) -> usize {
        1 << self.0
    }

    /// Relative standard error of the dense HLL estimator, 1.04/sqrt(2^p).
    pub fn relative_error(self) -> f64 {
        1.04 / (self.registers() as f64).sqrt()
    }
}

impl Default for Precision {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl TryFrom<u8> for Precision {
    type Error = SketchError;
    fn try_from(p: u8) -> Result<Self, SketchError> {
        Precision::new(p)
    }
}

impl From<Precision> for u8 {
    fn from(p: Precision) -> u8 {
        p.0
    }
}

/// Which function maps a client id to the 64-bit value a sketch records.
/// Sketches of different hash versions count the same client twice, so they
/// never merge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashVersion {
    /// xxh3-64 of the client id's UTF-8 bytes with seed [`SEED_V1`].
    Xxh3V1,
    /// A second hasher, only so tests can check that merges across versions are refused.
    #[cfg(test)]
    TestOnly,
}

/// Seed of [`HashVersion::Xxh3V1`] (ASCII "slipstre").
pub const SEED_V1: u64 = 0x736c_6970_7374_7265;

impl HashVersion {
    /// The version new sketches use.
    pub const CURRENT: HashVersion = HashVersion::Xxh3V1;

    /// Byte stored in the header.
    pub fn id(self) -> u8 {
        match self {
            HashVersion::Xxh3V1 => 1,
            #[cfg(test)]
            HashVersion::TestOnly => 250,
        }
    }

    /// Inverse of [`HashVersion::id`]; `None` for versions this build does not know.
    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(HashVersion::Xxh3V1),
            #[cfg(test)]
            250 => Some(HashVersion::TestOnly),
            _ => None,
        }
    }

    /// The value a sketch records for this client. Computed once per event
    /// and inserted into every sketch the event touches.
    pub fn hash_client(self, client_id: &str) -> ClientHash {
        let seed = match self {
            HashVersion::Xxh3V1 => SEED_V1,
            #[cfg(test)]
            HashVersion::TestOnly => 42,
        };
        ClientHash {
            version: self,
            value: xxh3_64_with_seed(client_id.as_bytes(), seed),
        }
    }
}

/// A client id already hashed, tagged with the hash version that made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHash {
    version: HashVersion,
    value: u64,
}

impl ClientHash {
    /// The 64-bit hash (top p bits pick the register).
    pub fn value(self) -> u64 {
        self.value
    }

    /// The hash version that produced it.
    pub fn version(self) -> HashVersion {
        self.version
    }
}

/// Hands the crate the u64 we already computed, so the hash is ours and fixed.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

/// Returns the last u64 written. Only `u64`s are ever inserted; `write` is a
/// deterministic fallback that is never reached.
pub(crate) struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxh3_64_with_seed(bytes, self.0);
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub(super) type Hll = HyperLogLogPlus<u64, PassThrough>;

/// Which estimator the crate uses for the current state; decides the error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Regime {
    /// Sorted 25-bit-index codes, linear counting over 2^24: nearly exact.
    Sparse,
    /// 2^p registers with some still zero and a small count: linear counting.
    DenseLinear,
    /// 2^p registers, bias-corrected HLL estimate.
    Dense,
}

/// The counting answer every query returns (the JSON shape of DESIGN.md section 9).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountAnswer {
    /// Estimated number of distinct clients.
    pub estimate: f64,
    /// Absolute standard error of `estimate`.
    pub standard_error: f64,
    /// Lower end of the 95% interval (never below 0).
    pub lower: f64,
    /// Upper end of the 95% interval.
    pub upper: f64,
}

impl CountAnswer {
    /// `estimate ± 1.96 standard_error`, floored at zero.
    pub fn new(estimate: f64, standard_error: f64) -> Self {
        let half = 1.96 * standard_error;
        CountAnswer {
            estimate,
            standard_error,
            lower: (estimate - half).max(0.0),
            upper: estimate + half,
        }
    }

    /// `self / denominator` (e.g. DAU/MAU), with the delta-method error that
    /// treats the two as independent (conservative for DAU ⊆ MAU, which are
    /// positively correlated). `None` when the denominator is 0.
    pub fn ratio(&self, denominator: &CountAnswer) -> Option<CountAnswer> {
        if denominator.estimate <= 0.0 {
            return None;
        }
        let r = self.estimate / denominator.estimate;
        let rel_num = if self.estimate > 0.0 {
            self.standard_error / self.estimate
        } else {
            0.0
        };
        let rel_den = denominator.standard_error / denominator.estimate;
        let se = r * (rel_num * rel_num + rel_den * rel_den).sqrt();
        Some(CountAnswer::new(r, se))
    }
}

/// A distinct-count sketch of client ids.
///
/// Estimating, the error and encoding take `&mut self` because the crate
/// buffers sparse inserts and folds them in on `count()`.
#[derive(Clone, Debug)]
pub struct Sketch {
    pub(super) hll: Hll,
    pub(super) precision: Precision,
    pub(super) hash: HashVersion,
}

impl Sketch {
    /// An empty sketch with the current hash version.
    pub fn new(precision: Precision) -> Self {
        Self::with_hash(precision, HashVersion::CURRENT)
    }

    /// An empty sketch of a given hash version (decoding, tests).
    pub fn with_hash(precision: Precision, hash: HashVersion) -> Self {
        let hll = Hll::new(precision.get(), PassThrough).expect("Precision is always in range");
        Sketch {
            hll,
            precision,
            hash,
        }
    }

    /// Register-count exponent.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Hash function this sketch's values came from.
    pub fn hash_version(&self) -> HashVersion {
        self.hash
    }

    /// Records one client (idempotent).
    pub fn insert_client(&mut self, client_id: &str) {
        let h = self.hash.hash_client(client_id);
        self.hll.insert_any(&h.value);
    }

    /// Records a pre-hashed client; refuses a hash of another version.
    pub fn insert_hash(&mut self, h: ClientHash) -> Result<(), SketchError> {
        if h.version != self.hash {
            return Err(SketchError::IncompatibleHash {
                left: self.hash.id(),
                right: h.version.id(),
            });
        }
        self.hll.insert_any(&h.value);
        Ok(())
    }

    /// Union: afterwards `self` counts every client of either sketch once.
    pub fn merge(&mut self, other: &Sketch) -> Result<(), SketchError> {
        if self.hash != other.hash {
            return Err(SketchError::IncompatibleHash {
                left: self.hash.id(),
                right: other.hash.id(),
            });
        }
        if self.precision != other.precision {
            return Err(SketchError::IncompatiblePrecision {
                left: self.precision.get(),
                right: other.precision.get(),
            });
        }
        self.hll
            .merge(&other.hll)
            .map_err(|_| SketchError::IncompatiblePrecision {
                left: self.precision.get(),
                right: other.precision.get(),
            })
    }

    /// Estimated distinct clients.
    pub fn estimate(&mut self) -> f64 {
        self.hll.count()
    }

    /// Which estimator produced `estimate()`.
    pub fn regime(&mut self) -> Regime {
        self.hll.count();
        let raw = self.raw();
        match &raw.registers {
            None => Regime::Sparse,
            Some(r) => {
                let m = self.precision.registers();
                if r.zeros != 0 {
                    let lc = m as f64 * (m as f64 / r.zeros as f64).ln();
                    if lc <= linear_counting_threshold(self.precision) {
                        return Regime::DenseLinear;
                    }
                }
                Regime::Dense
            }
        }
    }

    /// Absolute standard error of `estimate()`, by regime:
    /// - sparse: codes keep 25-bit indices, so the only error is clients whose
    ///   indices collide, about Poisson(λ = n²/2^26), plus the crate's linear
    ///   counting over 2^24 slots, which adds back +λ on average. Error ≈ λ ± √λ:
    ///   we report √(λ(1+λ)), the root-mean-square error (0.12 at n = 1000).
    /// - dense with linear counting (small n): √(m(e^t − t − 1)), t = n/m
    ///   (Whang et al.), about 1.2% of n for p = 12.
    /// - dense HLL: 1.04/√m · n.
    pub fn standard_error(&mut self) -> f64 {
        let n = self.estimate();
        standard_error_for(self.regime(), self.precision, n)
    }

    /// 95% interval `(lower, upper)` around the estimate, floored at zero.
    pub fn interval95(&mut self) -> (f64, f64) {
        let a = self.answer();
        (a.lower, a.upper)
    }

    /// Estimate, error and interval together.
    pub fn answer(&mut self) -> CountAnswer {
        let n = self.estimate();
        CountAnswer::new(n, standard_error_for(self.regime(), self.precision, n))
    }

    /// True when nothing was ever inserted.
    pub fn is_empty(&mut self) -> bool {
        self.estimate() == 0.0
    }

    pub(super) fn payload(&mut self) -> Vec<u8> {
        // count() folds the crate's unordered temporary set into the sorted
        // sparse list; without it, equal sketches could encode differently.
        self.hll.count();
        postcard::to_allocvec(&self.hll).expect("in-memory postcard encoding cannot fail")
    }

    fn hll_is_dense(&self, payload: &[u8]) -> bool {
        // The representation is the `registers` Option near the end; decoding
        // the mirror is the only way to see it through the crate's API.
        let raw: RawHll =
            postcard::from_bytes(payload).expect("mirror matches the crate's own encoding");
        raw.registers.is_some()
    }

    pub(super) fn raw(&mut self) -> RawHll {
        let bytes = self.payload();
        postcard::from_bytes(&bytes).expect("mirror matches the crate's own encoding")
    }

    /// The versioned, checksummed encoding (module docs). Equal sets of
    /// clients give equal bytes, whatever the order of inserts and merges.
    pub fn to_bytes(&mut self) -> Vec<u8> {
        let payload = self.payload();
        let dense = self.hll_is_dense(&payload);
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + CHECKSUM_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(FORMAT_VERSION);
        out.push(self.hash.id());
        out.push(self.precision.get());
        out.push(u8::from(dense));
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Decodes `to_bytes` output. Any other input, corrupt or hostile, is an
    /// `Err`; nothing reaches the crate's deserializer before the checksum
    /// and every invariant it relies on have been checked.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sketch, SketchError> {
        let (hash, precision, _) = decode_checked(bytes)?;
        let payload = &bytes[HEADER_LEN..bytes.len() - CHECKSUM_LEN];
        let hll: Hll = postcard::from_bytes(payload)
            .map_err(|e| SketchError::Corrupt(format!("payload does not decode: {e}")))?;
        Ok(Sketch {
            hll,
            precision,
            hash,
        })
    }
}

impl Sketch {
    /// [`Sketch::to_bytes`] in standard base64 (with padding), as `GET /v1/sketch` serves it.
    pub fn to_base64(&mut self) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(self.to_bytes())
    }

    /// Inverse of [`Sketch::to_base64`]; input longer than any sketch is refused
    /// before decoding.
    pub fn from_base64(text: &str) -> Result<Sketch, SketchError> {
        use base64::Engine as _;
        if text.len() > MAX_ENCODED_LEN.div_ceil(3) * 4 {
            return Err(SketchError::Corrupt(format!(
                "{} base64 characters, more than any sketch needs",
                text.len()
            )));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| SketchError::Corrupt(format!("not base64: {e}")))?;
        Sketch::from_bytes(&bytes)
    }
}
/// The crate's switch from linear counting to the HLL estimate (its table).
fn linear_counting_threshold(p: Precision) -> f64 {
    const T: [f64; 15] = [
        10.0, 10.0, 40.0, 80.0, 220.0, 400.0, 900.0, 1800.0, 3100.0, 6500.0, 11500.0, 20000.0,
        50000.0, 120000.0, 350000.0,
    ];
    T[(p.get() - Precision::MIN) as usize]
}

fn standard_error_for(regime: Regime, p: Precision, n: f64) -> f64 {
    if n <= 0.0 {
        return 0.0;
    }
    match regime {
        Regime::Sparse => {
            let lambda = n * n / (2.0 * SPARSE_LC_REGISTERS * 2.0);
            (lambda * (1.0 + lambda)).sqrt()
        }
        Regime::DenseLinear => {
            let m = p.registers() as f64;
            let t = n / m;
            (m * (t.exp_m1() - t)).sqrt()
        }
        Regime::Dense => p.relative_error() * n,
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::testutil::{filled, p, Rng};

    /// (clients "c-0".."c-{n-1}", encoded length, xxh3 of the encoding).
    const GOLDEN: [(u64, usize, u64); 4] = [
        (0, 34, 15869223772642306644),
        (10, 71, 5760765484341741691),
        (1_000, 2813, 11598267631968439636),
        (100_000, 3316, 9368292350266771443),
    ];

    #[test]
    fn precision_bounds() {
        assert!(Precision::new(3).is_err());
        assert!(Precision::new(19).is_err());
        assert_eq!(Precision::default().get(), 12);
        assert!((Precision::DEFAULT.relative_error() - 0.01625).abs() < 1e-12);
    }

    #[test]
    fn hash_is_pinned() {
        // Changing the hash silently corrupts every stored sketch: this value
        // must never change under HashVersion::Xxh3V1.
        let h = HashVersion::Xxh3V1.hash_client("c-00042").value();
        assert_eq!(h, xxh3_64_with_seed(b"c-00042", SEED_V1));
        let mut s = filled(Precision::DEFAULT, 0..3);
        let bytes = s.to_bytes();
        assert_eq!(
            &bytes[..12],
            &[
                b'S',
                b'S',
                b'H',
                b'L',
                1,
                1,
                12,
                0,
                (bytes.len() - 20) as u8,
                0,
                0,
                0
            ]
        );
    }

    /// Pins the encoding itself: a different checksum here means sketches
    /// written by another build (or process: nothing may depend on a random
    /// hasher state) would no longer be equal to ours.
    #[test]
    fn encoding_is_pinned_across_builds() {
        let got: Vec<(u64, usize, u64)> = GOLDEN
            .iter()
            .map(|&(n, _, _)| {
                let b = filled(Precision::DEFAULT, 0..n).to_bytes();
                (n, b.len(), xxh3_64(&b))
            })
            .collect();
        assert_eq!(got, GOLDEN);
    }

    #[test]
    fn base64_round_trips_and_bounds_input() {
        let mut s = filled(Precision::DEFAULT, 0..100);
        let text = s.to_base64();
        assert_eq!(Sketch::from_base64(&text).unwrap().to_bytes(), s.to_bytes());
        assert!(Sketch::from_base64("not base64!").is_err());
        assert!(Sketch::from_base64(&"A".repeat(2 << 20)).is_err());
    }

    #[test]
    fn empty_sketch_encodes_and_estimates_zero() {
        let mut s = Sketch::new(Precision::DEFAULT);
        assert_eq!(s.estimate(), 0.0);
        assert_eq!(s.standard_error(), 0.0);
        let b = s.to_bytes();
        let mut t = Sketch::from_bytes(&b).unwrap();
        assert_eq!(t.estimate(), 0.0);
        assert_eq!(t.to_bytes(), b);
    }

    #[test]
    fn small_counts_are_exact() {
        for n in [1u64, 2, 10, 100, 500] {
            let mut s = filled(Precision::DEFAULT, 0..n);
            assert_eq!(s.estimate().round() as u64, n);
            assert_eq!(s.regime(), Regime::Sparse);
        }
    }

    #[test]
    fn bytes_do_not_depend_on_insert_or_merge_order() {
        // Sizes cover sparse, the sparse/dense switch, linear counting and HLL.
        for (n, seed) in [
            (40u64, 1u64),
            (1_100, 2),
            (1_500, 3),
            (2_500, 4),
            (30_000, 5),
        ] {
            let mut direct = filled(Precision::DEFAULT, 0..n);
            let expected = direct.to_bytes();
            // A second, independent build: reversed order, split in random
            // parts, merged in random order, with duplicates.
            let mut rng = Rng::new(seed);
            let mut parts: Vec<Sketch> = (0..7).map(|_| Sketch::new(Precision::DEFAULT)).collect();
            for i in (0..n).rev() {
                let k = rng.below(7) as usize;
                parts[k].insert_client(&format!("c-{i}"));
                if rng.below(10) == 0 {
                    parts[(k + 1) % 7].insert_client(&format!("c-{i}"));
                }
            }
            let mut acc = parts.pop().unwrap();
            while let Some(part) = parts.pop() {
                acc.merge(&part).unwrap();
            }
            assert_eq!(acc.to_bytes(), expected, "n = {n}");
            let mut back = Sketch::from_bytes(&expected).unwrap();
            assert_eq!(back.to_bytes(), expected);
            assert_eq!(back.estimate(), direct.estimate());
        }
    }

    #[test]
    fn merges_across_precision_or_hash_are_refused() {
        let mut a = filled(p(12), 0..10);
        let b = filled(p(14), 0..10);
        assert!(matches!(
            a.merge(&b),
            Err(SketchError::IncompatiblePrecision {
                left: 12,
                right: 14
            })
        ));
        let mut c = Sketch::with_hash(p(12), HashVersion::TestOnly);
        c.insert_client("c-1");
        assert!(matches!(
            a.merge(&c),
            Err(SketchError::IncompatibleHash { .. })
        ));
        assert!(matches!(
            c.merge(&a),
            Err(SketchError::IncompatibleHash { .. })
        ));
        let h = HashVersion::TestOnly.hash_client("c-1");
        assert!(a.insert_hash(h).is_err());
        // Nothing changed on refusal.
        assert_eq!(a.estimate().round(), 10.0);
    }

    /// z-scores of independent sketches against the truth, per regime; the
    /// reported error must match the observed spread (RMS z in 0.7..1.4).
    #[test]
    fn standard_error_matches_observed_spread() {
        let cases: &[(u8, u64, Regime)] = &[
            (18, 40_000, Regime::Sparse),
            (12, 1_800, Regime::DenseLinear),
            (12, 2_800, Regime::DenseLinear),
            (12, 6_000, Regime::Dense),
            (12, 40_000, Regime::Dense),
            (10, 20_000, Regime::Dense),
        ];
        for &(prec, n, regime) in cases {
            let trials = 60;
            let mut sum_z2 = 0.0;
            for t in 0..trials {
                let mut s = Sketch::new(p(prec));
                let base = (t as u64) << 32;
                for i in 0..n {
                    s.insert_client(&format!("{}", base + i));
                }
                assert_eq!(s.regime(), regime, "p {prec} n {n}");
                let a = s.answer();
                let z = (a.estimate - n as f64) / a.standard_error;
                assert!(z.abs() < 4.0, "p {prec} n {n}: z = {z}");
                sum_z2 += z * z;
            }
            let rms = (sum_z2 / trials as f64).sqrt();
            eprintln!("p {prec} n {n} {regime:?}: RMS z = {rms}");
            assert!(
                (0.7..1.4).contains(&rms),
                "p {prec} n {n} {regime:?}: RMS z = {rms}"
            );
        }
    }
}
