//! The checked encoding of a sketch (layout in the parent module's docs):
//! header and checksum checks, and a field-for-field mirror of the crate's
//! state so that every invariant the crate relies on is verified before its
//! deserializer sees the bytes.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use super::hll::{HashVersion, PassThrough, Precision};
use super::SketchError;

/// First four bytes of every encoded sketch.
pub const MAGIC: [u8; 4] = *b"SSHL";
/// Version of the byte layout described in the module docs.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before the payload: magic, format, hash, precision, representation, payload length.
pub const HEADER_LEN: usize = 12;
/// Bytes of the trailing checksum.
pub const CHECKSUM_LEN: usize = 8;
/// Largest encoding accepted (a dense p = 18 sketch is ~262 KB); bounds what a
/// caller can make us allocate.
pub const MAX_ENCODED_LEN: usize = 1 << 20;

/// Index width of sparse codes.
pub(super) const SPARSE_INDEX_BITS: u32 = 25;

/// Checks everything about encoded sketch bytes and decodes the mirror.
pub(super) fn decode_checked(
    bytes: &[u8],
) -> Result<(HashVersion, Precision, RawHll), SketchError> {
    let corrupt = |why: String| SketchError::Corrupt(why);
    if bytes.len() > MAX_ENCODED_LEN {
        return Err(corrupt(format!(
            "{} bytes, more than the {MAX_ENCODED_LEN} any sketch needs",
            bytes.len()
        )));
    }
    if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(corrupt(format!(
            "{} bytes, shorter than the {} of header and checksum",
            bytes.len(),
            HEADER_LEN + CHECKSUM_LEN
        )));
    }
    if bytes[..4] != MAGIC {
        return Err(corrupt("does not start with the magic \"SSHL\"".into()));
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    let sum = u64::from_le_bytes(sum.try_into().expect("8 bytes"));
    if xxh3_64(body) != sum {
        return Err(corrupt("checksum mismatch".into()));
    }
    if bytes[4] != FORMAT_VERSION {
        return Err(SketchError::UnsupportedFormat(bytes[4]));
    }
    let hash = HashVersion::from_id(bytes[5]).ok_or(SketchError::UnknownHashVersion(bytes[5]))?;
    let precision = Precision::new(bytes[6])
        .map_err(|_| corrupt(format!("precision {} outside 4..=18", bytes[6])))?;
    let dense = match bytes[7] {
        0 => false,
        1 => true,
        r => return Err(corrupt(format!("representation byte {r}, expected 0 or 1"))),
    };
    let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
    let payload = &body[HEADER_LEN..];
    if payload.len() != len {
        return Err(corrupt(format!(
            "payload length field says {len}, found {}",
            payload.len()
        )));
    }
    let raw: RawHll = match postcard::take_from_bytes(payload) {
        Ok((raw, [])) => raw,
        Ok((_, rest)) => return Err(corrupt(format!("{} trailing payload bytes", rest.len()))),
        Err(e) => return Err(corrupt(format!("payload does not decode: {e}"))),
    };
    raw.validate(precision, dense).map_err(corrupt)?;
    Ok((hash, precision, raw))
}

/// Field-for-field mirror of `HyperLogLogPlus<u64, PassThrough>` in
/// hyperloglogplus 0.4.1, so its postcard encoding can be decoded and checked
/// without touching the crate. A test pins the two encodings together.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RawHll {
    pub(super) builder: PassThrough,
    pub(super) precision: u8,
    pub(super) counts: (usize, usize, usize),
    pub(super) tmpset: Vec<u32>,
    pub(super) sparse: RawDifIntVec,
    pub(super) registers: Option<RawRegisters>,
    pub(super) phantom: PhantomData<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RawDifIntVec {
    pub(super) count: usize,
    pub(super) last: u32,
    pub(super) buf: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) struct RawRegisters {
    pub(super) buf: Vec<u32>,
    pub(super) count: usize,
    pub(super) zeros: usize,
}

pub(super) const REGISTERS_PER_WORD: usize = 5;
pub(super) const REGISTER_BITS: usize = 6;

impl RawHll {
    /// Every invariant the crate relies on (indexing, shifts, counters) and
    /// that its own code paths produce; anything else is corrupt.
    fn validate(&self, p: Precision, dense: bool) -> Result<(), String> {
        let pu = p.get();
        if self.precision != pu {
            return Err(format!(
                "payload precision {} differs from header precision {pu}",
                self.precision
            ));
        }
        let m = p.registers();
        let sparse_limit = 4 * m / REGISTERS_PER_WORD;
        if self.counts != (m, 1 << (SPARSE_INDEX_BITS - 1), sparse_limit) {
            return Err(format!(
                "counts {:?} do not match precision {pu}",
                self.counts
            ));
        }
        if !self.tmpset.is_empty() {
            return Err("unsorted temporary set is not empty".into());
        }
        match (&self.registers, dense) {
            (None, false) => self.validate_sparse(pu, sparse_limit),
            (Some(r), true) => {
                if self.sparse.count != 0 || self.sparse.last != 0 || !self.sparse.buf.is_empty() {
                    return Err("dense sketch also holds sparse codes".into());
                }
                validate_registers(r, pu)
            }
            _ => Err("representation byte disagrees with payload".into()),
        }
    }

    fn validate_sparse(&self, p: u8, limit: usize) -> Result<(), String> {
        let buf = &self.sparse.buf;
        if buf.len() > limit {
            return Err(format!(
                "sparse list of {} bytes exceeds {limit}",
                buf.len()
            ));
        }
        let low_bits = u32::from(SPARSE_INDEX_BITS as u8 - p);
        let (mut i, mut n, mut last) = (0usize, 0usize, 0u32);
        while i < buf.len() {
            // LEB128 u32: at most 5 bytes, the 5th holding at most 4 bits.
            let mut dif: u64 = 0;
            let mut shift = 0;
            loop {
                let Some(&b) = buf.get(i) else {
                    return Err("sparse list ends inside a varint".into());
                };
                i += 1;
                dif |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 28 {
                    return Err("sparse varint longer than 5 bytes".into());
                }
            }
            if n > 0 && dif == 0 {
                return Err("sparse codes not strictly increasing".into());
            }
            let code = u64::from(last) + dif;
            let code = u32::try_from(code).map_err(|_| "sparse code overflows u32".to_string())?;
            if code & 1 == 1 {
                // index<<7 | rho<<1 | 1, only when the index's low bits are zero.
                let rho = (code >> 1) & 0x3f;
                let index = code >> 7;
                if !(1..=40).contains(&rho) || index & ((1 << low_bits) - 1) != 0 {
                    return Err(format!("invalid sparse code {code:#x}"));
                }
            } else {
                let index = code >> 1;
                if index >> SPARSE_INDEX_BITS != 0 || index & ((1 << low_bits) - 1) == 0 {
                    return Err(format!("invalid sparse code {code:#x}"));
                }
            }
            last = code;
            n += 1;
        }
        if n != self.sparse.count || last != self.sparse.last {
            return Err(format!(
                "sparse header says {} codes ending at {}, list has {n} ending at {last}",
                self.sparse.count, self.sparse.last
            ));
        }
        Ok(())
    }
}

fn validate_registers(r: &RawRegisters, p: u8) -> Result<(), String> {
    let m = 1usize << p;
    if r.count != m || r.buf.len() != m.div_ceil(REGISTERS_PER_WORD) {
        return Err(format!(
            "{} register words for {} registers, expected {} for {m}",
            r.buf.len(),
            r.count,
            m.div_ceil(REGISTERS_PER_WORD)
        ));
    }
    let max = 65 - u32::from(p);
    let mut zeros = 0;
    for (w, &word) in r.buf.iter().enumerate() {
        if word >> (REGISTERS_PER_WORD * REGISTER_BITS) != 0 {
            return Err(format!("register word {w} uses its two spare bits"));
        }
        for k in 0..REGISTERS_PER_WORD {
            let v = (word >> (k * REGISTER_BITS)) & 0x3f;
            if w * REGISTERS_PER_WORD + k >= m {
                if v != 0 {
                    return Err("padding register is not zero".into());
                }
                continue;
            }
            if v > max {
                return Err(format!("register value {v} above the maximum {max}"));
            }
            zeros += usize::from(v == 0);
        }
    }
    if zeros != r.zeros {
        return Err(format!(
            "zero count {} but {zeros} registers are zero",
            r.zeros
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::hll::Sketch;
    use crate::sketch::testutil::{filled, p, Rng};

    #[test]
    fn mirror_matches_crate_encoding() {
        for n in [0u64, 5, 900, 5_000] {
            let mut s = filled(p(10), 0..n);
            let payload = s.payload();
            let raw: RawHll = postcard::from_bytes(&payload).unwrap();
            assert_eq!(postcard::to_allocvec(&raw).unwrap(), payload);
            raw.validate(p(10), n > 700).unwrap();
        }
    }

    #[test]
    fn every_corruption_is_an_error() {
        for n in [0u64, 3, 200, 3_000] {
            let mut s = filled(p(8), 0..n);
            let good = s.to_bytes();
            for i in 0..good.len() {
                for bit in 0..8 {
                    let mut bad = good.clone();
                    bad[i] ^= 1 << bit;
                    assert!(Sketch::from_bytes(&bad).is_err(), "flip byte {i} bit {bit}");
                }
            }
            for len in 0..good.len() {
                assert!(
                    Sketch::from_bytes(&good[..len]).is_err(),
                    "truncated to {len}"
                );
            }
            let mut longer = good.clone();
            longer.push(0);
            assert!(Sketch::from_bytes(&longer).is_err());
        }
    }

    /// Valid checksum, hostile payload: the structural check must catch what
    /// the crate would panic on (short register arrays, bad zero counts,
    /// overlong varints).
    #[test]
    fn hostile_payloads_with_valid_checksums_are_errors() {
        let mut rng = Rng::new(7);
        for n in [0u64, 3, 200, 3_000] {
            let mut s = filled(p(8), 0..n);
            let good = s.to_bytes();
            let payload = &good[HEADER_LEN..good.len() - CHECKSUM_LEN];
            for _ in 0..3_000 {
                let mut bad = payload.to_vec();
                match rng.below(3) {
                    0 => {
                        let i = rng.below(bad.len() as u64) as usize;
                        bad[i] = rng.next() as u8;
                    }
                    1 => bad.truncate(rng.below(bad.len() as u64 + 1) as usize),
                    _ => {
                        let i = rng.below(bad.len() as u64 + 1) as usize;
                        bad.insert(i, rng.next() as u8);
                    }
                }
                let reencoded = reseal(&good[..HEADER_LEN], &bad);
                // Ok is fine when the mutation produced another valid sketch;
                // what matters is no panic, and that Ok sketches still work.
                if let Ok(mut t) = Sketch::from_bytes(&reencoded) {
                    t.estimate();
                    t.standard_error();
                    t.insert_client("x");
                    let mut u = filled(p(8), 0..2_000);
                    u.merge(&t).unwrap();
                    u.estimate();
                }
            }
        }
        // Specific traps: a zero count that would underflow, and registers
        // claiming fewer words than the precision needs.
        let mut s = filled(p(8), 0..3_000);
        let mut raw = s.raw();
        raw.registers.as_mut().unwrap().zeros += 1;
        assert!(Sketch::from_bytes(&reseal_raw(&raw, true)).is_err());
        let mut raw = s.raw();
        raw.registers.as_mut().unwrap().buf.pop();
        assert!(Sketch::from_bytes(&reseal_raw(&raw, true)).is_err());
        let mut raw = filled(p(8), 0..20).raw();
        raw.sparse
            .buf
            .extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(Sketch::from_bytes(&reseal_raw(&raw, false)).is_err());
    }

    fn reseal(header: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = header.to_vec();
        out[8..12].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(payload);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    fn reseal_raw(raw: &RawHll, dense: bool) -> Vec<u8> {
        let header = [
            b'S',
            b'S',
            b'H',
            b'L',
            1,
            1,
            raw.precision,
            u8::from(dense),
            0,
            0,
            0,
            0,
        ];
        reseal(&header, &postcard::to_allocvec(raw).unwrap())
    }

    #[test]
    fn unknown_versions_are_refused() {
        let mut s = filled(Precision::DEFAULT, 0..10);
        let good = s.to_bytes();
        let body = &good[HEADER_LEN..good.len() - CHECKSUM_LEN];
        let mut h = good[..HEADER_LEN].to_vec();
        h[4] = 2;
        assert!(matches!(
            Sketch::from_bytes(&reseal(&h, body)),
            Err(SketchError::UnsupportedFormat(2))
        ));
        let mut h = good[..HEADER_LEN].to_vec();
        h[5] = 9;
        assert!(matches!(
            Sketch::from_bytes(&reseal(&h, body)),
            Err(SketchError::UnknownHashVersion(9))
        ));
    }
}
