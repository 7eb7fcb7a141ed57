//! Which sketches exist, and their byte keys.
//!
//! Key bytes: `[key space = 1][date][scope tag][strings...]`, where the date is
//! days since 1970-01-01 as an i32 with its sign bit flipped, big-endian, and
//! every string is escaped (`00` → `00 FF`) and terminated by `00 01`. The
//! encoding sorts exactly like [`SketchKey`]'s `Ord`, so all sketches of one
//! date are one contiguous prefix (publishing a day, dropping old days) and
//! every query below is a point read or a prefix scan within one date.
//!
//! Pair and finest keys list dimensions by name, so reordering the configured
//! dimensions changes nothing; adding or removing one changes the keys written
//! from then on (earlier days keep the rollups of the dimensions they had).

use std::fmt;

use chrono::{Datelike, NaiveDate};

use super::SketchError;

/// Byte 0 of every key. Names this layout and the hash it goes with
/// ([`super::HashVersion::Xxh3V1`]): a new hash starts a new key space, so
/// sketches of two hashers never meet in one key.
pub const KEY_SPACE: u8 = 1;

/// Value used when an event lacks a configured dimension.
pub const MISSING_VALUE: &str = "";
/// Dimension values are cut to this many bytes (at a char boundary) so that a
/// client cannot make keys of unbounded size.
pub const MAX_VALUE_BYTES: usize = 64;
/// At most this many configured dimensions (an event touches 2 + d + d(d-1)/2 sketches).
pub const MAX_DIMENSIONS: usize = 8;

const TAG_ALL: u8 = 1;
const TAG_SINGLE: u8 = 2;
const TAG_PAIR: u8 = 3;
const TAG_FINEST: u8 = 4;
const TAG_BRANCH: u8 = 5;

/// The configured dimensions, sorted by name (the canonical order inside
/// pair and finest keys, so that reordering the config changes no key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dimensions(Vec<String>);

impl Dimensions {
    /// Validates names: 1 to 32 bytes of `[a-z0-9_]`, no duplicates, at most
    /// [`MAX_DIMENSIONS`].
    pub fn new<I, S>(names: I) -> Result<Self, SketchError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut v: Vec<String> = names.into_iter().map(Into::into).collect();
        for n in &v {
            let ok = !n.is_empty()
                && n.len() <= 32
                && n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(SketchError::Config(format!(
                    "dimension name {n:?}: expected 1 to 32 characters of a-z, 0-9 and _"
                )));
            }
        }
        v.sort();
        let before = v.len();
        v.dedup();
        if v.len() != before {
            return Err(SketchError::Config("a dimension is listed twice".into()));
        }
        if v.len() > MAX_DIMENSIONS {
            return Err(SketchError::Config(format!(
                "{} dimensions configured, at most {MAX_DIMENSIONS} are supported",
                v.len()
            )));
        }
        Ok(Dimensions(v))
    }

    /// Names in canonical (sorted) order.
    pub fn names(&self) -> &[String] {
        &self.0
    }

    /// Whether `name` is configured.
    pub fn contains(&self, name: &str) -> bool {
        self.0.iter().any(|d| d == name)
    }

    /// The event's value for each configured dimension, in canonical order:
    /// [`MISSING_VALUE`] when absent, cut to [`MAX_VALUE_BYTES`]. Unconfigured
    /// dimensions are ignored. `out` is cleared first.
    pub fn values_of<'a>(&self, event: &[(&'a str, &'a str)], out: &mut Vec<&'a str>) {
        out.clear();
        out.extend(self.0.iter().map(|d| value_for(event, d)));
    }
}

impl Default for Dimensions {
    /// `os`, `channel`, `country`, `app_version`.
    fn default() -> Self {
        Dimensions::new(["os", "channel", "country", "app_version"]).expect("valid defaults")
    }
}

/// The event's value of dimension `name`, as [`Dimensions::values_of`] gives it.
pub(crate) fn value_for<'a>(event: &[(&'a str, &'a str)], name: &str) -> &'a str {
    let v = event
        .iter()
        .find(|(k, _)| *k == name)
        .map_or(MISSING_VALUE, |(_, v)| *v);
    truncate(v)
}

/// `v` cut to [`MAX_VALUE_BYTES`] at a char boundary.
pub(crate) fn truncate(v: &str) -> &str {
    if v.len() <= MAX_VALUE_BYTES {
        return v;
    }
    let mut end = MAX_VALUE_BYTES;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    &v[..end]
}

/// What one sketch covers within its date.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Every active client (the unfiltered rollup).
    All,
    /// Clients with `dim = value`.
    Single { dim: String, value: String },
    /// Clients with both; `first.0 < second.0` by name.
    Pair {
        first: (String, String),
        second: (String, String),
    },
    /// Clients with exactly this full combination of configured dimensions
    /// (sorted by name).
    Finest(Vec<(String, String)>),
    /// Clients that reported `experiment = branch`.
    Branch { experiment: String, branch: String },
}

/// One sketch's identity: an activity date and a scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SketchKey {
    pub date: NaiveDate,
    pub scope: Scope,
}

impl SketchKey {
    /// Shorthand for the unfiltered rollup of a date.
    pub fn all(date: NaiveDate) -> Self {
        SketchKey {
            date,
            scope: Scope::All,
        }
    }

    /// The (experiment, branch, date) sketch.
    pub fn branch(date: NaiveDate, experiment: &str, branch: &str) -> Self {
        SketchKey {
            date,
            scope: Scope::Branch {
                experiment: experiment.into(),
                branch: branch.into(),
            },
        }
    }

    /// The value this sketch pins for `dim`, if it pins one.
    pub fn value_of(&self, dim: &str) -> Option<&str> {
        fn hit<'k>((d, v): &'k (String, String), dim: &str) -> Option<&'k str> {
            (d == dim).then_some(v.as_str())
        }
        match &self.scope {
            Scope::Single { dim: d, value } if d == dim => Some(value),
            Scope::Pair { first, second } => hit(first, dim).or_else(|| hit(second, dim)),
            Scope::Finest(pairs) => pairs.iter().find_map(|p| hit(p, dim)),
            _ => None,
        }
    }

    /// The key bytes (module docs).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(48);
        self.encode_into(&mut out);
        out
    }

    /// Appends the key bytes to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let w = KeyWriter::new(out, self.date);
        match &self.scope {
            Scope::All => w.tag(TAG_ALL),
            Scope::Single { dim, value } => w.tag(TAG_SINGLE).str(dim).str(value),
            Scope::Pair { first, second } => w
                .tag(TAG_PAIR)
                .str(&first.0)
                .str(&first.1)
                .str(&second.0)
                .str(&second.1),
            Scope::Finest(pairs) => {
                let mut w = w.tag(TAG_FINEST);
                for (d, v) in pairs {
                    w = w.str(d).str(v);
                }
                w
            }
            Scope::Branch { experiment, branch } => w.tag(TAG_BRANCH).str(experiment).str(branch),
        };
    }

    /// Inverse of [`SketchKey::encode`]; malformed bytes are an `Err`.
    pub fn decode(bytes: &[u8]) -> Result<SketchKey, SketchError> {
        let bad = |why: &str| SketchError::BadKey(format!("{why} in key {bytes:02x?}"));
        if bytes.len() < 6 {
            return Err(bad("too short"));
        }
        if bytes[0] != KEY_SPACE {
            return Err(bad("unknown key space"));
        }
        let raw = u32::from_be_bytes(bytes[1..5].try_into().expect("4 bytes"));
        let days = (raw ^ 0x8000_0000) as i32;
        let date = days
            .checked_add(DAYS_CE_TO_EPOCH)
            .and_then(NaiveDate::from_num_days_from_ce_opt)
            .ok_or_else(|| bad("date out of range"))?;
        let mut r = Reader { rest: &bytes[6..] };
        let scope = match bytes[5] {
            TAG_ALL => Scope::All,
            TAG_SINGLE => Scope::Single {
                dim: r.str().ok_or_else(|| bad("bad string"))?,
                value: r.str().ok_or_else(|| bad("bad string"))?,
            },
            TAG_PAIR => {
                let mut s = || r.str().ok_or_else(|| bad("bad string"));
                Scope::Pair {
                    first: (s()?, s()?),
                    second: (s()?, s()?),
                }
            }
            TAG_FINEST => {
                let mut pairs = Vec::new();
                while !r.rest.is_empty() {
                    let d = r.str().ok_or_else(|| bad("bad string"))?;
                    let v = r.str().ok_or_else(|| bad("bad string"))?;
                    pairs.push((d, v));
                }
                Scope::Finest(pairs)
            }
            TAG_BRANCH => Scope::Branch {
                experiment: r.str().ok_or_else(|| bad("bad string"))?,
                branch: r.str().ok_or_else(|| bad("bad string"))?,
            },
            _ => return Err(bad("unknown scope tag")),
        };
        if !r.rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(SketchKey { date, scope })
    }
}

impl fmt::Display for SketchKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.date)?;
        match &self.scope {
            Scope::All => write!(f, " all"),
            Scope::Single { dim, value } => write!(f, " {dim}={value:?}"),
            Scope::Pair { first, second } => {
                write!(f, " {}={:?} {}={:?}", first.0, first.1, second.0, second.1)
            }
            Scope::Finest(pairs) => pairs.iter().try_for_each(|(d, v)| write!(f, " {d}={v:?}")),
            Scope::Branch { experiment, branch } => {
                write!(f, " experiment {experiment} branch {branch}")
            }
        }
    }
}

/// `NaiveDate::num_days_from_ce` of 1970-01-01.
const DAYS_CE_TO_EPOCH: i32 = 719_163;

/// Key prefixes for the scans a query needs.
pub mod prefix {
    use super::*;

    /// Every sketch of a date.
    pub fn date(date: NaiveDate) -> Vec<u8> {
        let mut out = Vec::with_capacity(8);
        KeyWriter::new(&mut out, date);
        out
    }

    /// Every single-dimension sketch of `dim` on a date.
    pub fn single(date: NaiveDate, dim: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        KeyWriter::new(&mut out, date).tag(TAG_SINGLE).str(dim);
        out
    }

    /// Every pair sketch whose first dimension is `dim` (and, if given, whose
    /// first value is `value`).
    pub fn pair(date: NaiveDate, dim: &str, value: Option<&str>) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        let w = KeyWriter::new(&mut out, date).tag(TAG_PAIR).str(dim);
        if let Some(v) = value {
            w.str(v);
        }
        out
    }

    /// Every finest-grained sketch of a date.
    pub fn finest(date: NaiveDate) -> Vec<u8> {
        let mut out = Vec::with_capacity(8);
        KeyWriter::new(&mut out, date).tag(TAG_FINEST);
        out
    }

    /// Every branch sketch of an experiment on a date.
    pub fn experiment(date: NaiveDate, experiment: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        KeyWriter::new(&mut out, date)
            .tag(TAG_BRANCH)
            .str(experiment);
        out
    }
}

/// Every sketch one activity event updates, in key order: the all-clients
/// rollup, one per (dimension = value), one per pair of dimensions, and the
/// finest combination. `event` may omit dimensions or carry extra ones
/// (see [`Dimensions::values_of`]). `out` is cleared first.
pub fn keys_for_event(
    dims: &Dimensions,
    date: NaiveDate,
    event: &[(&str, &str)],
    out: &mut Vec<SketchKey>,
) {
    out.clear();
    let mut values = Vec::with_capacity(dims.0.len());
    dims.values_of(event, &mut values);
    let names = dims.names();
    let own = |i: usize| (names[i].clone(), values[i].to_string());
    out.push(SketchKey::all(date));
    for i in 0..names.len() {
        let (dim, value) = own(i);
        out.push(SketchKey {
            date,
            scope: Scope::Single { dim, value },
        });
    }
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            out.push(SketchKey {
                date,
                scope: Scope::Pair {
                    first: own(i),
                    second: own(j),
                },
            });
        }
    }
    out.push(SketchKey {
        date,
        scope: Scope::Finest((0..names.len()).map(own).collect()),
    });
}

/// The same keys as [`keys_for_event`], as bytes written into one reused
/// buffer and handed to `visit`: the allocation-free path of the write buffer.
/// `values` are in canonical order, as produced by [`Dimensions::values_of`].
pub(crate) fn for_each_event_key(
    dims: &Dimensions,
    date: NaiveDate,
    values: &[&str],
    buf: &mut Vec<u8>,
    mut visit: impl FnMut(&[u8]),
) {
    let names = dims.names();
    buf.clear();
    KeyWriter::new(buf, date).tag(TAG_ALL);
    visit(buf);
    for i in 0..names.len() {
        buf.clear();
        KeyWriter::new(buf, date)
            .tag(TAG_SINGLE)
            .str(&names[i])
            .str(values[i]);
        visit(buf);
    }
    for i in 0..names.len() {
        for j in i + 1..names.len() {
            buf.clear();
            KeyWriter::new(buf, date)
                .tag(TAG_PAIR)
                .str(&names[i])
                .str(values[i])
                .str(&names[j])
                .str(values[j]);
            visit(buf);
        }
    }
    write_finest_key(dims, date, values, buf);
    visit(buf);
}

/// The finest key of an event into `buf` (cleared first); `values` as in
/// [`for_each_event_key`].
pub(crate) fn write_finest_key(
    dims: &Dimensions,
    date: NaiveDate,
    values: &[&str],
    buf: &mut Vec<u8>,
) {
    buf.clear();
    let mut w = KeyWriter::new(buf, date).tag(TAG_FINEST);
    for (name, value) in dims.names().iter().zip(values) {
        w = w.str(name).str(value);
    }
}

/// Appends key parts to a byte buffer.
struct KeyWriter<'a>(&'a mut Vec<u8>);

impl<'a> KeyWriter<'a> {
    fn new(out: &'a mut Vec<u8>, date: NaiveDate) -> Self {
        let days = date.num_days_from_ce() - DAYS_CE_TO_EPOCH;
        out.push(KEY_SPACE);
        out.extend_from_slice(&((days as u32) ^ 0x8000_0000).to_be_bytes());
        KeyWriter(out)
    }

    fn tag(self, t: u8) -> Self {
        self.0.push(t);
        self
    }

    fn str(self, s: &str) -> Self {
        for &b in s.as_bytes() {
            self.0.push(b);
            if b == 0 {
                self.0.push(0xff);
            }
        }
        self.0.extend_from_slice(&[0, 1]);
        self
    }
}

/// The escaped string tokens of a key with scope tag `tag` (dimension,
/// value, dimension, value, ... for single, pair and finest keys), borrowed
/// from the key: lets scans filter without allocating. `None` for a key of
/// another tag.
pub(crate) fn scope_tokens(key: &[u8], tag: u8) -> Option<Tokens<'_>> {
    (key.len() >= 6 && key[0] == KEY_SPACE && key[5] == tag).then(|| Tokens { rest: &key[6..] })
}

/// The scope tag of keys at a query level.
pub(crate) fn level_tag(level: super::Level) -> u8 {
    match level {
        super::Level::All => TAG_ALL,
        super::Level::Single => TAG_SINGLE,
        super::Level::Pair => TAG_PAIR,
        super::Level::Finest => TAG_FINEST,
    }
}

/// See [`scope_tokens`]; yields an empty token then stops on malformed input.
pub(crate) struct Tokens<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let mut i = 0;
        while i + 1 < self.rest.len() {
            if self.rest[i] == 0 {
                if self.rest[i + 1] == 1 {
                    let tok = &self.rest[..i];
                    self.rest = &self.rest[i + 2..];
                    return Some(tok);
                }
                i += 2;
            } else {
                i += 1;
            }
        }
        self.rest = &[];
        Some(&[0xff]) // never equal to an escaped string token
    }
}

/// `s` as it appears inside a key, without its terminator.
pub(crate) fn escape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() + 2);
    KeyWriter(&mut out).str(s);
    out.truncate(out.len() - 2);
    out
}

/// Inverse of [`escape`].
pub(crate) fn unescape(tok: &[u8]) -> Option<String> {
    let mut with_end = tok.to_vec();
    with_end.extend_from_slice(&[0, 1]);
    Reader { rest: &with_end }.str()
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn str(&mut self) -> Option<String> {
        let mut s = Vec::new();
        let mut i = 0;
        loop {
            let b = *self.rest.get(i)?;
            if b != 0 {
                s.push(b);
                i += 1;
                continue;
            }
            match *self.rest.get(i + 1)? {
                0xff => {
                    s.push(0);
                    i += 2;
                }
                1 => {
                    self.rest = &self.rest[i + 2..];
                    return String::from_utf8(s).ok();
                }
                _ => return None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sketch::testutil::Rng;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn dimension_names_are_checked_and_sorted() {
        assert_eq!(
            Dimensions::default().names(),
            ["app_version", "channel", "country", "os"]
        );
        assert!(Dimensions::new(["OS"]).is_err());
        assert!(Dimensions::new(["os", "os"]).is_err());
        assert!(Dimensions::new((0..9).map(|i| format!("d{i}"))).is_err());
    }

    #[test]
    fn an_event_touches_rollups_and_its_finest_sketch() {
        let dims = Dimensions::default();
        let mut keys = Vec::new();
        keys_for_event(
            &dims,
            d("2026-11-02"),
            &[
                ("os", "Windows"),
                ("channel", "release"),
                ("country", "DE"),
                ("extra", "x"),
            ],
            &mut keys,
        );
        assert_eq!(keys.len(), 1 + 4 + 6 + 1);
        let shown: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        assert_eq!(shown[0], "2026-11-02 all");
        assert_eq!(shown[1], "2026-11-02 app_version=\"\"");
        assert_eq!(shown[4], "2026-11-02 os=\"Windows\"");
        assert_eq!(shown[5], "2026-11-02 app_version=\"\" channel=\"release\"");
        assert_eq!(
            shown[11],
            "2026-11-02 app_version=\"\" channel=\"release\" country=\"DE\" os=\"Windows\""
        );
        // The byte path yields the same keys, in the same (sorted) order.
        let mut values = Vec::new();
        dims.values_of(
            &[("os", "Windows"), ("channel", "release"), ("country", "DE")],
            &mut values,
        );
        let mut bytes = Vec::new();
        for_each_event_key(&dims, d("2026-11-02"), &values, &mut Vec::new(), |k| {
            bytes.push(k.to_vec())
        });
        let encoded: Vec<Vec<u8>> = keys.iter().map(SketchKey::encode).collect();
        assert_eq!(bytes, encoded);
        assert!(encoded.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary() {
        let long = "é".repeat(40); // 80 bytes
        let dims = Dimensions::new(["os"]).unwrap();
        let mut v = Vec::new();
        dims.values_of(&[("os", &long)], &mut v);
        assert_eq!(v[0].len(), 64);
    }

    #[test]
    fn encoding_round_trips_and_sorts_like_ord() {
        let mut rng = Rng::new(3);
        let strs = [
            "", "\0", "\0\0", "a", "a\0", "a\0b", "ab", "b", "\u{ff}", "é",
        ];
        let dates = [
            "1969-12-31",
            "1970-01-01",
            "2026-11-02",
            "2026-11-03",
            "0001-01-01",
            "9999-12-31",
        ];
        let mut keys = Vec::new();
        for _ in 0..2_000 {
            let date = d(dates[rng.below(dates.len() as u64) as usize]);
            let kind = rng.below(5);
            let parts = rng.below(4);
            let mut s = || strs[rng.below(strs.len() as u64) as usize].to_string();
            let scope = match kind {
                0 => Scope::All,
                1 => Scope::Single {
                    dim: s(),
                    value: s(),
                },
                2 => Scope::Pair {
                    first: (s(), s()),
                    second: (s(), s()),
                },
                3 => Scope::Finest((0..parts).map(|_| (s(), s())).collect()),
                _ => Scope::Branch {
                    experiment: s(),
                    branch: s(),
                },
            };
            keys.push(SketchKey { date, scope });
        }
        for a in &keys {
            assert_eq!(&SketchKey::decode(&a.encode()).unwrap(), a);
        }
        for w in keys.windows(2) {
            assert_eq!(
                w[0].cmp(&w[1]),
                w[0].encode().cmp(&w[1].encode()),
                "{} vs {}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn malformed_keys_are_errors() {
        let good = SketchKey {
            date: d("2026-11-02"),
            scope: Scope::Pair {
                first: ("os".into(), "Linux".into()),
                second: ("country".into(), "DE".into()),
            },
        }
        .encode();
        for len in 0..good.len() {
            assert!(
                SketchKey::decode(&good[..len]).is_err(),
                "truncated to {len}"
            );
        }
        for i in 0..good.len() {
            for v in [0u8, 1, 2, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] = v;
                let _ = SketchKey::decode(&bad); // must not panic
            }
        }
        assert!(SketchKey::decode(&[2, 0x80, 0, 0, 0, 1]).is_err());
        assert!(SketchKey::decode(&[1, 0xff, 0xff, 0xff, 0xff, 1]).is_err());
        assert!(SketchKey::decode(&[1, 0x80, 0, 0, 0, 9]).is_err());
    }

    #[test]
    fn key_tokens_walk_escaped_strings() {
        let key = SketchKey {
            date: d("2026-11-02"),
            scope: Scope::Finest(vec![("a".into(), "x\0y".into()), ("b".into(), "".into())]),
        }
        .encode();
        let toks: Vec<&[u8]> = scope_tokens(&key, TAG_FINEST).unwrap().collect();
        assert_eq!(toks, [&b"a"[..], &escape("x\0y"), b"b", b""]);
        assert_eq!(unescape(toks[1]).unwrap(), "x\0y");
        assert!(scope_tokens(&SketchKey::all(d("2026-11-02")).encode(), TAG_FINEST).is_none());
        let truncated = &key[..key.len() - 1];
        assert_eq!(
            scope_tokens(truncated, TAG_FINEST).unwrap().last().unwrap(),
            &[0xff]
        );
    }

    #[test]
    fn prefixes_select_what_they_name() {
        let date = d("2026-11-02");
        let single = SketchKey {
            date,
            scope: Scope::Single {
                dim: "os".into(),
                value: "Linux".into(),
            },
        }
        .encode();
        assert!(single.starts_with(&prefix::single(date, "os")));
        assert!(single.starts_with(&prefix::date(date)));
        assert!(!single.starts_with(&prefix::single(date, "o")));
        let br = SketchKey::branch(date, "exp-1", "control").encode();
        assert!(br.starts_with(&prefix::experiment(date, "exp-1")));
        assert!(!br.starts_with(&prefix::experiment(date, "exp")));
    }
}
