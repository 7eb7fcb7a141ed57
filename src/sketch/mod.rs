//! Distinct-client counts (DAU, WAU, MAU, per-branch DAU) from HyperLogLog++
//! sketches: pure logic, no I/O. The state layer stores the bytes; the HTTP
//! layer turns [`Query`] answers into JSON.
//!
//! # Layout
//! - [`hll`]: [`Sketch`], one HLL++ sketch with a fixed hash, its encoding
//!   and its standard error.
//! - [`encoding`]: the checks that make decoding any bytes safe.
//! - [`union`]: [`Union`], the union of many sketches at once (queries).
//! - [`key`]: [`SketchKey`], which sketches an event updates and their byte keys.
//! - [`query`]: the planner and the [`SketchSource`] a store implements.
//! - [`buffer`]: [`SketchBuffer`], deltas between two state flushes.
//!
//! # What is counted
//! Every activity event of a client on an activity date (UTC) updates the
//! sketches of that date: the all-clients rollup, one per `dimension = value`,
//! one per pair of dimensions, and one per full combination of the configured
//! dimensions (the finest). Experiment branches have their own sketch per
//! (experiment, branch, date). A segment over a range is the union of the
//! covering sketches; a client in several of them is counted once.
//!
//! # Sketch bytes, format version 1
//! Stored in the state, served base64 by `GET /v1/sketch`, and published in
//! the daily sketch table. All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `SSHL` (`53 53 48 4C`) |
//! | 4 | 1 | format version, `1` |
//! | 5 | 1 | hash version, `1`: a client id's value is xxh3-64 of its UTF-8 bytes with seed `0x736c697073747265` |
//! | 6 | 1 | precision p, 4..=18 (2^p registers) |
//! | 7 | 1 | representation: `0` sparse, `1` dense |
//! | 8 | 4 | payload length n (u32) |
//! | 12 | n | payload |
//! | 12+n | 8 | checksum: xxh3-64 (seed 0) of bytes `0..12+n`, u64 |
//!
//! The payload is the [postcard](https://docs.rs/postcard) 1.x encoding
//! (integers other than `u8` as LEB128 varints, sequences prefixed by a varint
//! length, `Option` as a `0`/`1` byte) of `hyperloglogplus` 0.4.1's
//! `HyperLogLogPlus` state, fields in this order:
//! 1. `precision`: u8, equal to the header's;
//! 2. `counts`: three varints, `2^p`, `2^24`, `floor(4·2^p/5)` (the sparse
//!    list's byte limit);
//! 3. `tmpset`: a sequence, always empty here (`00`);
//! 4. `sparse`: varint code count, varint last code, varint byte length and
//!    the bytes: the sorted, distinct u32 codes as LEB128 varints of their
//!    successive differences (the first from 0). For a value h, with
//!    `i = h >> 39` (25-bit index): if the low `25-p` bits of i are zero the
//!    code is `i << 7 | r << 1 | 1` with `r = 1 + leading_zeros(h << 25 | 1 << 24)`,
//!    else `i << 1`. Empty when dense.
//! 5. `registers`: `00` when sparse; else `01`, a varint length and that many
//!    varint u32 words, each packing 5 six-bit registers (register k in bits
//!    `6·(k mod 5)` of word `k / 5`, where register k holds the largest
//!    `1 + leading_zeros(h << p | 1 << (p-1))` over values with `h >> (64-p) = k`),
//!    then varints `2^p` and the number of zero registers.
//!
//! Equal sets of clients give equal bytes, whatever the order of inserts and
//! merges. Decoding checks the checksum, then every field above, before the
//! crate sees the payload: corrupt or hostile bytes are an error, never a
//! panic. The estimate is HLL++'s (Heule et al. 2013): linear counting over
//! 2^24 in sparse form; in dense form linear counting below the crate's
//! threshold, else the raw estimate with empirical bias correction.
//!
//! Keys are described in [`key`]. Sketches of different precision or hash
//! version never merge ([`SketchError::IncompatiblePrecision`],
//! [`SketchError::IncompatibleHash`]).

pub mod buffer;
pub mod encoding;
pub mod hll;
pub mod key;
pub mod query;
pub mod union;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use buffer::{merge_into, SketchBuffer, SketchWrite};
pub use hll::{ClientHash, CountAnswer, HashVersion, Precision, Regime, Sketch};
pub use key::{keys_for_event, Dimensions, Scope, SketchKey, MISSING_VALUE};
pub use query::{
    count, experiment_branches, group_by, group_by_with, plan, plan_at, union_sketch, union_with,
    Group, Level, MemorySource, Metered, Plan, Query, Read, SketchConfig, SketchSource, Visit,
};
pub use union::Union;

/// Everything that can go wrong with sketches, keys and sketch queries.
#[derive(Debug, thiserror::Error)]
pub enum SketchError {
    /// Bytes that are not a sketch of this format.
    #[error("corrupt sketch: {0}")]
    Corrupt(String),
    /// A sketch written by a newer format.
    #[error("sketch format version {0} is not supported (this build reads version 1)")]
    UnsupportedFormat(u8),
    /// A sketch hashed by a function this build does not know.
    #[error("sketch hash version {0} is unknown (this build knows version 1)")]
    UnknownHashVersion(u8),
    /// Merging would mix register counts.
    #[error("cannot merge a sketch of precision {right} into one of precision {left}")]
    IncompatiblePrecision { left: u8, right: u8 },
    /// Merging would count a client twice, once per hash.
    #[error("cannot merge a sketch of hash version {right} into one of hash version {left}")]
    IncompatibleHash { left: u8, right: u8 },
    /// Precision outside the supported range.
    #[error("precision {0} is out of range; expected 4 to 18 (12 is the default)")]
    InvalidPrecision(u8),
    /// Key bytes not made by [`SketchKey::encode`].
    #[error("bad sketch key: {0}")]
    BadKey(String),
    /// Invalid dimension configuration.
    #[error("sketch configuration: {0}")]
    Config(String),
    /// A query the planner refuses; the message says which part and why
    /// (for a 400 answer).
    #[error("{0}")]
    BadQuery(String),
    /// A query that needs more reads than a [`Metered`] source allows.
    #[error("the query reads more than {limit} sketches, the most one query may read")]
    OverBudget { limit: u64 },
    /// The store failed.
    #[error("sketch store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl SketchError {
    /// Wraps a store's own error (e.g. `sled::Error`).
    pub fn store(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SketchError::Store(Box::new(e))
    }
}
