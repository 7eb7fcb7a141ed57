//! [`Union`]: the union of many sketches (queries) or of many inserts (the
//! write buffer), computed on decoded codes and registers.

use std::marker::PhantomData;

use super::encoding::{
    decode_checked, RawDifIntVec, RawHll, RawRegisters, REGISTERS_PER_WORD, REGISTER_BITS,
    SPARSE_INDEX_BITS,
};
use super::hll::{ClientHash, HashVersion, Hll, PassThrough, Precision, Sketch};
use super::SketchError;

/// Unions many sketches and inserts at once, on decoded codes and registers.
///
/// Gives exactly the sketch that merging them one by one with
/// [`Sketch::merge`] (or inserting with [`Sketch::insert_hash`]) gives, same
/// bytes, but reads encoded sketches without the crate's second decode,
/// merges sparse lists in one pass instead of the crate's re-encoding of the
/// whole list every 33 codes, and takes register maxima on bytes. Queries
/// use it for 28-day unions, the write buffer for its inserts.
#[derive(Clone, Debug)]
pub struct Union {
    precision: Precision,
    hash: HashVersion,
    state: UnionState,
    /// Sparse codes inserted since the last [`Union::settle`], unsorted.
    pending: Vec<u32>,
}

#[derive(Clone, Debug)]
enum UnionState {
    /// Sorted, distinct sparse codes, within the crate's sparse byte limit.
    Sparse(Vec<u32>),
    /// One byte per register.
    Dense(Vec<u8>),
}

impl Union {
    /// An empty union (of the current hash version).
    pub fn new(precision: Precision) -> Self {
        Union {
            precision,
            hash: HashVersion::CURRENT,
            state: UnionState::Sparse(Vec::new()),
            pending: Vec::new(),
        }
    }

    /// Records one client, as [`Sketch::insert_hash`] does.
    pub fn insert_hash(&mut self, h: ClientHash) -> Result<(), SketchError> {
        self.check(h.version(), self.precision)?;
        let p = self.precision.get();
        match &mut self.state {
            UnionState::Dense(regs) => {
                let (zeros, index) = dense_update(h.value(), p);
                regs[index] = regs[index].max(zeros);
            }
            UnionState::Sparse(codes) => {
                self.pending.push(encode_hash(h.value(), p));
                // Amortized: settle when pending outgrows the settled list.
                if self.pending.len() >= codes.len().max(64) {
                    self.settle();
                }
            }
        }
        Ok(())
    }

    /// Folds pending codes into the sorted list, densifying past the limit.
    fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut pending = std::mem::take(&mut self.pending);
        let p = self.precision.get();
        match &mut self.state {
            UnionState::Dense(regs) => {
                for code in pending.drain(..) {
                    let (zeros, index) = decode_code(code, p);
                    regs[index] = regs[index].max(zeros);
                }
            }
            UnionState::Sparse(codes) => {
                pending.sort_unstable();
                pending.dedup();
                let merged = merge_sorted(codes, pending.drain(..));
                if dif_len(&merged) > sparse_limit(p) {
                    self.state = UnionState::Dense(codes_to_registers(&merged, p));
                } else {
                    *codes = merged;
                }
            }
        }
        // Keep the allocation for the next inserts.
        self.pending = pending;
    }

    /// Adds an encoded sketch ([`Sketch::to_bytes`]); corrupt bytes and
    /// sketches of another precision or hash version are errors.
    pub fn add_bytes(&mut self, bytes: &[u8]) -> Result<(), SketchError> {
        let (hash, precision, raw) = decode_checked(bytes)?;
        self.check(hash, precision)?;
        self.absorb(&raw);
        Ok(())
    }

    /// Adds a sketch.
    pub fn add(&mut self, sketch: &mut Sketch) -> Result<(), SketchError> {
        self.check(sketch.hash, sketch.precision)?;
        let raw = sketch.raw();
        self.absorb(&raw);
        Ok(())
    }

    fn check(&self, hash: HashVersion, precision: Precision) -> Result<(), SketchError> {
        if hash != self.hash {
            return Err(SketchError::IncompatibleHash {
                left: self.hash.id(),
                right: hash.id(),
            });
        }
        if precision != self.precision {
            return Err(SketchError::IncompatiblePrecision {
                left: self.precision.get(),
                right: precision.get(),
            });
        }
        Ok(())
    }

    /// `raw` has passed [`RawHll::validate`].
    fn absorb(&mut self, raw: &RawHll) {
        self.settle();
        let p = self.precision.get();
        match (&mut self.state, &raw.registers) {
            (UnionState::Sparse(codes), None) => {
                let merged = merge_sorted(codes, sparse_codes(&raw.sparse.buf));
                if dif_len(&merged) > sparse_limit(p) {
                    self.state = UnionState::Dense(codes_to_registers(&merged, p));
                } else {
                    *codes = merged;
                }
            }
            (UnionState::Sparse(codes), Some(r)) => {
                let mut regs = codes_to_registers(codes, p);
                max_words(&mut regs, &r.buf);
                self.state = UnionState::Dense(regs);
            }
            (UnionState::Dense(regs), None) => {
                for code in sparse_codes(&raw.sparse.buf) {
                    let (zeros, index) = decode_code(code, p);
                    regs[index] = regs[index].max(zeros);
                }
            }
            (UnionState::Dense(regs), Some(r)) => max_words(regs, &r.buf),
        }
    }

    /// The union as a sketch.
    pub fn finish(mut self) -> Sketch {
        self.to_sketch()
    }

    /// The union so far as a sketch; the union stays usable.
    pub fn to_sketch(&mut self) -> Sketch {
        self.settle();
        let p = self.precision.get();
        let m = self.precision.registers();
        let mut raw = RawHll {
            builder: PassThrough,
            precision: p,
            counts: (m, 1 << (SPARSE_INDEX_BITS - 1), sparse_limit(p)),
            tmpset: Vec::new(),
            sparse: RawDifIntVec {
                count: 0,
                last: 0,
                buf: Vec::new(),
            },
            registers: None,
            phantom: PhantomData,
        };
        let regs = match &self.state {
            UnionState::Sparse(codes) => {
                let mut buf = Vec::with_capacity(dif_len(codes));
                let mut last = 0u32;
                for &c in codes {
                    push_varint(&mut buf, c - last);
                    last = c;
                }
                raw.sparse = RawDifIntVec {
                    count: codes.len(),
                    last,
                    buf,
                };
                None
            }
            UnionState::Dense(regs) => Some(regs.clone()),
        };
        if let Some(regs) = regs {
            let buf = regs
                .chunks(REGISTERS_PER_WORD)
                .map(|c| {
                    c.iter()
                        .enumerate()
                        .fold(0u32, |w, (k, &v)| w | u32::from(v) << (k * REGISTER_BITS))
                })
                .collect();
            raw.registers = Some(RawRegisters {
                buf,
                count: m,
                zeros: regs.iter().filter(|&&v| v == 0).count(),
            });
        }
        let payload = postcard::to_allocvec(&raw).expect("in-memory postcard encoding cannot fail");
        let hll: Hll = postcard::from_bytes(&payload).expect("a well-formed mirror decodes");
        Sketch {
            hll,
            precision: self.precision,
            hash: self.hash,
        }
    }
}

/// The crate's sparse code of a hash: the 25-bit index, plus the register
/// value when the index bits below the top p are all zero.
fn encode_hash(hash: u64, p: u8) -> u32 {
    let index = (hash >> (64 - SPARSE_INDEX_BITS)) as u32;
    let low = index & ((1 << (SPARSE_INDEX_BITS - u32::from(p))) - 1);
    if low == 0 {
        let zeros =
            1 + ((hash << SPARSE_INDEX_BITS) | (1 << (SPARSE_INDEX_BITS - 1))).leading_zeros();
        (index << 7) | (zeros << 1) | 1
    } else {
        index << 1
    }
}

/// (register value, register index) of a hash in dense form, as the crate computes it.
fn dense_update(hash: u64, p: u8) -> (u8, usize) {
    let index = (hash >> (64 - u32::from(p))) as usize;
    let zeros = 1 + ((hash << p) | (1 << (p - 1))).leading_zeros();
    (zeros as u8, index)
}

/// Sorted union of two sorted, distinct code sequences.
fn merge_sorted(a: &[u32], b: impl Iterator<Item = u32>) -> Vec<u32> {
    let mut out = Vec::with_capacity(a.len() + 64);
    let mut a = a.iter().copied().peekable();
    for y in b {
        while let Some(&x) = a.peek() {
            if x < y {
                out.push(x);
                a.next();
            } else {
                if x == y {
                    a.next();
                }
                break;
            }
        }
        out.push(y);
    }
    out.extend(a);
    out
}

/// Byte limit of the crate's sparse list, `4·2^p/5`.
fn sparse_limit(p: u8) -> usize {
    4 * (1usize << p) / REGISTERS_PER_WORD
}

/// Decodes a validated sparse list.
fn sparse_codes(buf: &[u8]) -> impl Iterator<Item = u32> + '_ {
    let mut i = 0;
    let mut last = 0u32;
    std::iter::from_fn(move || {
        if i >= buf.len() {
            return None;
        }
        let mut dif = 0u32;
        let mut shift = 0;
        loop {
            let b = buf[i];
            i += 1;
            dif |= u32::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        last += dif;
        Some(last)
    })
}

fn push_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

/// Encoded length of sorted, distinct codes as the crate stores them.
fn dif_len(codes: &[u32]) -> usize {
    let mut last = 0;
    codes
        .iter()
        .map(|&c| {
            let n = varint_len(c - last);
            last = c;
            n
        })
        .sum()
}

/// (register value, register index) of a sparse code, as the crate decodes it.
fn decode_code(code: u32, p: u8) -> (u8, usize) {
    let p32 = u32::from(p);
    if code & 1 == 1 {
        let zeros = ((code >> 1) & 0x3f) + (SPARSE_INDEX_BITS - p32);
        (zeros as u8, (code >> (32 - p32)) as usize)
    } else {
        let zeros = (code << (6 + p32)).leading_zeros() + 1;
        let index = (code >> (SPARSE_INDEX_BITS + 1 - p32)) & ((1 << p32) - 1);
        (zeros as u8, index as usize)
    }
}

fn codes_to_registers(codes: &[u32], p: u8) -> Vec<u8> {
    let mut regs = vec![0u8; 1 << p];
    for &c in codes {
        let (zeros, index) = decode_code(c, p);
        regs[index] = regs[index].max(zeros);
    }
    regs
}

/// Register-wise maximum with the crate's packed words.
fn max_words(regs: &mut [u8], words: &[u32]) {
    for (chunk, &w) in regs.chunks_mut(REGISTERS_PER_WORD).zip(words) {
        for (k, r) in chunk.iter_mut().enumerate() {
            let v = ((w >> (k * REGISTER_BITS)) & 0x3f) as u8;
            *r = (*r).max(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::testutil::{filled, p, Rng};

    /// `Union` must give the very bytes of the crate's own merges, for any
    /// mix of sparse and dense inputs and at any precision.
    #[test]
    fn union_equals_sequential_merges() {
        let mut rng = Rng::new(99);
        for prec in [4u8, 8, 12, 14] {
            for round in 0..12 {
                let parts = 1 + rng.below(12) as usize;
                let mut sketches: Vec<Sketch> = (0..parts)
                    .map(|_| {
                        let n = [0u64, 1, 20, 300, 1_500, 6_000][rng.below(6) as usize];
                        let base = rng.below(4) * 2_000; // overlapping ranges
                        filled(p(prec), base..base + n)
                    })
                    .collect();
                let mut merged = Sketch::new(p(prec));
                let mut union = Union::new(p(prec));
                let mut union_of_bytes = Union::new(p(prec));
                for s in sketches.iter_mut() {
                    merged.merge(s).unwrap();
                    union.add(s).unwrap();
                    union_of_bytes.add_bytes(&s.to_bytes()).unwrap();
                }
                let expected = merged.to_bytes();
                assert_eq!(
                    union.finish().to_bytes(),
                    expected,
                    "p {prec} round {round}"
                );
                assert_eq!(
                    union_of_bytes.finish().to_bytes(),
                    expected,
                    "p {prec} round {round}"
                );
            }
        }
        // Many small sparse sketches: the union densifies on the way.
        let mut merged = Sketch::new(p(10));
        let mut union = Union::new(p(10));
        for i in 0..400u64 {
            let mut s = filled(p(10), i * 10..i * 10 + 12);
            merged.merge(&s).unwrap();
            union.add_bytes(&s.to_bytes()).unwrap();
        }
        assert_eq!(union.finish().to_bytes(), merged.to_bytes());
        // Inserts give the crate's own insert results, at every size.
        for prec in [4u8, 10, 12] {
            for n in [0u64, 1, 50, 700, 1_300, 2_000, 5_000, 40_000] {
                let mut u = Union::new(p(prec));
                for i in 0..n {
                    let h = HashVersion::CURRENT.hash_client(&format!("c-{i}"));
                    u.insert_hash(h).unwrap();
                    if i % 3 == 0 {
                        u.insert_hash(h).unwrap(); // repeats
                    }
                }
                let expected = filled(p(prec), 0..n).to_bytes();
                assert_eq!(u.to_sketch().to_bytes(), expected, "p {prec} n {n}");
                // Mixed with merges afterwards.
                u.add_bytes(&filled(p(prec), n / 2..n + 300).to_bytes())
                    .unwrap();
                assert_eq!(
                    u.finish().to_bytes(),
                    filled(p(prec), 0..n + 300).to_bytes()
                );
            }
        }
        // Refusals.
        let mut u = Union::new(p(12));
        assert!(u.add_bytes(&filled(p(14), 0..3).to_bytes()).is_err());
        assert!(u
            .add(&mut Sketch::with_hash(p(12), HashVersion::TestOnly))
            .is_err());
        assert!(u.add_bytes(b"garbage").is_err());
        assert!(u
            .insert_hash(HashVersion::TestOnly.hash_client("c"))
            .is_err());
    }
}
