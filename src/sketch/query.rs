//! Counting queries: pick the sketches that cover a segment, union them.
//!
//! The planner answers from the coarsest sketches that pin every dimension
//! a query names (filtered or grouped): none → the all-clients rollup, one →
//! single-dimension rollups, two → pair rollups, more → the finest sketches
//! of each date. Those are read by point reads of every combination of the
//! filter values with the day's values of the other dimensions (known from
//! the single rollups) when there are at most 4096 such combinations, else by
//! a scan of the day's finest sketches matched on their key bytes. Rollups
//! hold exactly the union of the finest sketches they cover, so every level
//! gives the same bytes, hence the same estimate. Only unions, never
//! intersections: the error stays the one of a single sketch.
//!
//! Semantics: a client counts for a segment when one of its events in the
//! range carried all the filter values (not when different events did).

use std::cell::Cell;
use std::collections::BTreeMap;

use chrono::{Days, NaiveDate};

use super::hll::{CountAnswer, Precision, Sketch};
use super::key::{
    escape, level_tag, prefix, scope_tokens, truncate, unescape, write_finest_key, Dimensions,
    Scope, SketchKey,
};
use super::union::Union;
use super::SketchError;

/// Callback of [`SketchSource::scan_prefix`]: `(key, value)`, stop on `Err`.
pub type Visit<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), SketchError> + 'a;

/// Where sketches live: an ordered byte map (sled in the service, a BTreeMap
/// in tests). It knows nothing of the sketch format, so a second format
/// (e.g. ZetaSketch) needs no change here.
pub trait SketchSource {
    /// The bytes stored under `key`.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SketchError>;
    /// Calls `visit(key, value)` for every entry whose key starts with
    /// `prefix`, in key order, stopping at the first error.
    fn scan_prefix(&self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), SketchError>;
}

/// In-memory [`SketchSource`], for tests and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct MemorySource {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl MemorySource {
    /// Stores already encoded key and sketch bytes.
    pub fn insert_raw(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.map.insert(key, value);
    }

    /// Stores a sketch under a key.
    pub fn insert(&mut self, key: &SketchKey, sketch: &mut Sketch) {
        self.map.insert(key.encode(), sketch.to_bytes());
    }

    /// Number of stored sketches.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes of stored keys and values whose key starts with `prefix`.
    pub fn bytes_under(&self, prefix: &[u8]) -> usize {
        self.map
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| k.len() + v.len())
            .sum()
    }
}

impl SketchSource for MemorySource {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SketchError> {
        Ok(self.map.get(key).cloned())
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), SketchError> {
        for (k, v) in self.map.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            visit(k, v)?;
        }
        Ok(())
    }
}

/// A [`SketchSource`] that refuses to read more than `limit` times (each point
/// read, each scan and each entry a scan visits is one read), so that the work
/// of one request stays bounded whatever its range, window, grouping and
/// filters: the reads, not the dates, are what a query costs.
pub struct Metered<'a> {
    src: &'a dyn SketchSource,
    limit: u64,
    used: Cell<u64>,
}

impl<'a> Metered<'a> {
    /// Reads of `src`, at most `limit` of them.
    pub fn new(src: &'a dyn SketchSource, limit: u64) -> Self {
        Metered {
            src,
            limit,
            used: Cell::new(0),
        }
    }

    /// Reads made so far.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    fn spend(&self) -> Result<(), SketchError> {
        let used = self.used.get() + 1;
        if used > self.limit {
            return Err(SketchError::OverBudget { limit: self.limit });
        }
        self.used.set(used);
        Ok(())
    }
}

impl SketchSource for Metered<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, SketchError> {
        self.spend()?;
        self.src.get(key)
    }

    fn scan_prefix(&self, prefix: &[u8], visit: &mut Visit<'_>) -> Result<(), SketchError> {
        self.spend()?;
        self.src.scan_prefix(prefix, &mut |k, v| {
            self.spend()?;
            visit(k, v)
        })
    }
}

/// Limits and layout shared by the write path and queries.
#[derive(Clone, Debug, PartialEq)]
pub struct SketchConfig {
    /// Dimensions that get rollups and finest sketches.
    pub dimensions: Dimensions,
    /// Precision of new sketches; stored ones of another precision are refused.
    pub precision: Precision,
    /// Longest date range a query may span (bounds the work per request).
    pub max_range_days: u32,
    /// Most reads one request may make through a [`Metered`] source (a long
    /// series with `group_by` reads many sketches per date).
    pub max_query_sketches: u64,
}

impl Default for SketchConfig {
    fn default() -> Self {
        SketchConfig {
            dimensions: Dimensions::default(),
            precision: Precision::DEFAULT,
            max_range_days: 366,
            max_query_sketches: 500_000,
        }
    }
}

/// A segment and a date range to count distinct clients over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    /// First activity date, inclusive.
    pub start: NaiveDate,
    /// Last activity date, inclusive.
    pub end: NaiveDate,
    /// `dimension = value` conditions, all of which must hold.
    pub filters: Vec<(String, String)>,
    /// Dimensions to split the answer by (at most 2).
    pub group_by: Vec<String>,
}

impl Query {
    /// The `days` days ending at `end` (1: DAU, 7: WAU, 28: MAU).
    pub fn window(end: NaiveDate, days: u32) -> Query {
        let start = end
            .checked_sub_days(Days::new(u64::from(days.max(1) - 1)))
            .unwrap_or(NaiveDate::MIN);
        Query {
            start,
            end,
            filters: Vec::new(),
            group_by: Vec::new(),
        }
    }

    /// Daily active clients.
    pub fn dau(date: NaiveDate) -> Query {
        Self::window(date, 1)
    }

    /// Clients active in the 7 days ending at `date`.
    pub fn wau(date: NaiveDate) -> Query {
        Self::window(date, 7)
    }

    /// Clients active in the 28 days ending at `date`.
    pub fn mau(date: NaiveDate) -> Query {
        Self::window(date, 28)
    }

    /// Adds a `dim = value` filter.
    pub fn filter(mut self, dim: &str, value: &str) -> Query {
        self.filters.push((dim.into(), value.into()));
        self
    }

    /// Adds a group-by dimension.
    pub fn group(mut self, dim: &str) -> Query {
        self.group_by.push(dim.into());
        self
    }
}

/// Sketch granularity a plan reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    All,
    Single,
    Pair,
    Finest,
}

/// One read of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// A point read of one key.
    Get(Vec<u8>),
    /// A prefix scan; entries are then filtered by value.
    Scan(Vec<u8>),
}

/// What a query reads: per date, one read, and which keys of it count.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Granularity used.
    pub level: Level,
    /// One read per date of the range, in date order.
    pub reads: Vec<Read>,
    filters: Vec<(String, String)>,
    group_by: Vec<String>,
    precision: Precision,
    dims: Dimensions,
    start: NaiveDate,
    /// Finest level: a day whose candidate combinations (the product of the
    /// unfiltered dimensions' values that day) are at most this many is read
    /// by point reads; larger ones by a scan of all the day's finest sketches.
    pub(crate) max_point_reads: usize,
}

/// See [`Plan::max_point_reads`]: a point read costs a few times a scanned key.
const MAX_POINT_READS: usize = 4096;

/// One group of a `group_by` answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// `(dimension, value)` per group-by dimension, in the query's order.
    pub values: Vec<(String, String)>,
    /// Distinct clients of this group over the range.
    pub answer: CountAnswer,
}

/// Validates a query and chooses its sketches.
pub fn plan(cfg: &SketchConfig, q: &Query) -> Result<Plan, SketchError> {
    let level = match q.filters.len() + q.group_by.len() {
        0 => Level::All,
        1 => Level::Single,
        2 => Level::Pair,
        _ => Level::Finest,
    };
    plan_at(cfg, q, level)
}

/// [`plan`] at a chosen granularity: the natural one, or `Finest`, which
/// gives the same answers at a higher cost (tests compare the two).
pub fn plan_at(cfg: &SketchConfig, q: &Query, level: Level) -> Result<Plan, SketchError> {
    let bad = |m: String| Err(SketchError::BadQuery(m));
    if q.start > q.end {
        return bad(format!("start {} is after end {}", q.start, q.end));
    }
    let days = (q.end - q.start).num_days() + 1;
    if days > i64::from(cfg.max_range_days) {
        return bad(format!(
            "range of {days} days is longer than the maximum of {}",
            cfg.max_range_days
        ));
    }
    let known = |d: &str| cfg.dimensions.contains(d);
    let expected = cfg.dimensions.names().join(", ");
    for (i, (d, _)) in q.filters.iter().enumerate() {
        if !known(d) {
            return bad(format!(
                "unknown dimension {d:?} in filter; expected one of {expected}"
            ));
        }
        if q.filters[..i].iter().any(|(e, _)| e == d) {
            return bad(format!(
                "dimension {d:?} is filtered twice; give one value per dimension"
            ));
        }
    }
    if q.group_by.len() > 2 {
        return bad(format!(
            "group_by names {} dimensions; at most 2 are allowed",
            q.group_by.len()
        ));
    }
    for (i, g) in q.group_by.iter().enumerate() {
        if !known(g) {
            return bad(format!(
                "unknown dimension {g:?} in group_by; expected one of {expected}"
            ));
        }
        if q.group_by[..i].contains(g) {
            return bad(format!("dimension {g:?} appears twice in group_by"));
        }
        if q.filters.iter().any(|(d, _)| d == g) {
            return bad(format!("dimension {g:?} is both filtered and grouped by"));
        }
    }
    let named = q.filters.len() + q.group_by.len();
    let natural = [Level::All, Level::Single, Level::Pair, Level::Finest][named.min(3)];
    if level != natural && level != Level::Finest {
        return bad(format!(
            "a query on {named} dimensions reads {natural:?} or Finest sketches, not {level:?}"
        ));
    }

    // Values are cut like stored ones, so a long value still finds its sketches.
    let filters: Vec<(String, String)> = q
        .filters
        .iter()
        .map(|(d, v)| (d.clone(), truncate(v).to_string()))
        .collect();
    // Dimensions the query names, each with its value when filtered, sorted
    // by name: the order they take inside keys.
    let mut pinned: Vec<(&str, Option<&str>)> = filters
        .iter()
        .map(|(d, v)| (d.as_str(), Some(v.as_str())))
        .chain(q.group_by.iter().map(|g| (g.as_str(), None)))
        .collect();
    pinned.sort();

    let reads = (0..days as u64)
        .map(|i| {
            let date = q.start + Days::new(i);
            read_for(date, level, &pinned)
        })
        .collect();
    Ok(Plan {
        level,
        reads,
        filters,
        group_by: q.group_by.clone(),
        precision: cfg.precision,
        dims: cfg.dimensions.clone(),
        start: q.start,
        max_point_reads: MAX_POINT_READS,
    })
}

/// The tightest read of one date at `level` for the named dimensions.
fn read_for(date: NaiveDate, level: Level, pinned: &[(&str, Option<&str>)]) -> Read {
    let own = |d: &str, v: &str| (d.to_string(), v.to_string());
    match (level, pinned) {
        (Level::All, []) => Read::Get(SketchKey::all(date).encode()),
        (Level::Single, [(d, Some(v))]) => Read::Get(
            SketchKey {
                date,
                scope: Scope::Single {
                    dim: d.to_string(),
                    value: v.to_string(),
                },
            }
            .encode(),
        ),
        (Level::Single, [(d, None)]) => Read::Scan(prefix::single(date, d)),
        (Level::Pair, [(a, Some(x)), (b, Some(y))]) => Read::Get(
            SketchKey {
                date,
                scope: Scope::Pair {
                    first: own(a, x),
                    second: own(b, y),
                },
            }
            .encode(),
        ),
        (Level::Pair, [(a, x), _]) => Read::Scan(prefix::pair(date, a, *x)),
        _ => Read::Scan(prefix::finest(date)),
    }
}

impl Plan {
    /// Runs the reads, keeping each sketch whose key matches every filter,
    /// merged per group (one empty-named group without group_by).
    fn run(
        &self,
        src: &dyn SketchSource,
    ) -> Result<BTreeMap<Vec<(String, String)>, Union>, SketchError> {
        let mut groups: BTreeMap<Vec<(String, String)>, Union> = BTreeMap::new();
        for (day, read) in self.reads.iter().enumerate() {
            match read {
                Read::Get(k) => {
                    if let Some(bytes) = src.get(k)? {
                        self.add(&mut groups, Vec::new(), &bytes)?;
                    }
                }
                Read::Scan(p) if self.level == Level::Finest => {
                    let date = self.start + Days::new(day as u64);
                    if !self.point_read_finest(src, date, &mut groups)? {
                        self.scan_matching(src, p, &mut groups)?
                    }
                }
                Read::Scan(p) => self.scan_matching(src, p, &mut groups)?,
            }
        }
        Ok(groups)
    }

    /// Reads the finest sketches of one day that can match by point reads:
    /// every combination of the filter values with the values each other
    /// dimension takes that day (from its single-dimension rollups). Returns
    /// false, having read nothing, when there are too many combinations.
    fn point_read_finest(
        &self,
        src: &dyn SketchSource,
        date: NaiveDate,
        groups: &mut BTreeMap<Vec<(String, String)>, Union>,
    ) -> Result<bool, SketchError> {
        let names = self.dims.names();
        let mut choices: Vec<Vec<String>> = Vec::with_capacity(names.len());
        let mut product = 1usize;
        for name in names {
            if let Some((_, v)) = self.filters.iter().find(|(d, _)| d == name) {
                choices.push(vec![v.clone()]);
                continue;
            }
            let mut values = Vec::new();
            src.scan_prefix(&prefix::single(date, name), &mut |k, _| {
                if let Scope::Single { value, .. } = SketchKey::decode(k)?.scope {
                    values.push(value);
                }
                Ok(())
            })?;
            product = product.saturating_mul(values.len());
            if product > self.max_point_reads {
                return Ok(false);
            }
            choices.push(values);
        }
        if product == 0 {
            return Ok(true);
        }
        let group_at: Vec<usize> = self
            .group_by
            .iter()
            .map(|g| {
                names
                    .iter()
                    .position(|n| n == g)
                    .expect("planner checked group_by")
            })
            .collect();
        let mut pick = vec![0usize; names.len()];
        let mut key = Vec::with_capacity(64);
        loop {
            let values: Vec<&str> = pick
                .iter()
                .zip(&choices)
                .map(|(&i, c)| c[i].as_str())
                .collect();
            write_finest_key(&self.dims, date, &values, &mut key);
            if let Some(bytes) = src.get(&key)? {
                let label = group_at
                    .iter()
                    .zip(&self.group_by)
                    .map(|(&i, g)| (g.clone(), values[i].to_string()))
                    .collect();
                self.add(groups, label, &bytes)?;
            }
            // Next combination (odometer over the choices).
            let mut d = names.len();
            loop {
                if d == 0 {
                    return Ok(true);
                }
                d -= 1;
                pick[d] += 1;
                if pick[d] < choices[d].len() {
                    break;
                }
                pick[d] = 0;
            }
        }
    }

    /// The sketches under `prefix` whose keys match the filters, grouped.
    /// Keys are matched on their escaped tokens, without allocating: the
    /// finest fallback may scan every combination of a day.
    fn scan_matching(
        &self,
        src: &dyn SketchSource,
        prefix: &[u8],
        groups: &mut BTreeMap<Vec<(String, String)>, Union>,
    ) -> Result<(), SketchError> {
        let filters: Vec<(Vec<u8>, Vec<u8>)> = self
            .filters
            .iter()
            .map(|(d, v)| (escape(d), escape(v)))
            .collect();
        let group_dims: Vec<Vec<u8>> = self.group_by.iter().map(|g| escape(g)).collect();
        let tag = level_tag(self.level);
        src.scan_prefix(prefix, &mut |k, v| {
            let Some(mut tokens) = scope_tokens(k, tag) else {
                return Err(SketchError::BadKey(format!(
                    "expected a {:?} key, found {k:02x?}",
                    self.level
                )));
            };
            let mut matched = 0;
            // group_by has at most 2 dimensions (checked by the planner).
            let mut found: [Option<&[u8]>; 2] = [None, None];
            while let Some(dim) = tokens.next() {
                let value = tokens.next().unwrap_or(&[0xff]);
                for (fd, fv) in &filters {
                    if dim == fd.as_slice() {
                        if value != fv.as_slice() {
                            return Ok(());
                        }
                        matched += 1;
                    }
                }
                for (slot, g) in found.iter_mut().zip(&group_dims) {
                    if dim == g.as_slice() {
                        *slot = Some(value);
                    }
                }
            }
            if matched != filters.len() {
                return Ok(());
            }
            let mut label = Vec::with_capacity(group_dims.len());
            for (slot, g) in found.iter().zip(&self.group_by) {
                let Some(raw) = slot else { return Ok(()) };
                let value = unescape(raw)
                    .ok_or_else(|| SketchError::BadKey(format!("bad value in key {k:02x?}")))?;
                label.push((g.clone(), value));
            }
            self.add(groups, label, v)
        })
    }

    fn add(
        &self,
        groups: &mut BTreeMap<Vec<(String, String)>, Union>,
        label: Vec<(String, String)>,
        bytes: &[u8],
    ) -> Result<(), SketchError> {
        match groups.get_mut(&label) {
            Some(acc) => acc.add_bytes(bytes),
            None => {
                let mut acc = Union::new(self.precision);
                acc.add_bytes(bytes)?;
                groups.insert(label, acc);
                Ok(())
            }
        }
    }
}

/// The union of the query's sketches (what `GET /v1/sketch` serves). An
/// empty sketch when nothing matched. Ignores `group_by`.
pub fn union_sketch(
    cfg: &SketchConfig,
    src: &dyn SketchSource,
    q: &Query,
) -> Result<Sketch, SketchError> {
    let q = Query {
        group_by: Vec::new(),
        ..q.clone()
    };
    union_with(src, &plan(cfg, &q)?)
}

/// Runs a plan made by [`plan`] or [`plan_at`] without grouping.
pub fn union_with(src: &dyn SketchSource, plan: &Plan) -> Result<Sketch, SketchError> {
    let mut groups = plan.run(src)?;
    // Without group_by every read lands in the one empty-labelled group.
    debug_assert!(groups.len() <= 1);
    Ok(groups
        .pop_first()
        .map_or_else(|| Sketch::new(plan.precision), |(_, u)| u.finish()))
}

/// Distinct clients of the query's segment over its range.
pub fn count(
    cfg: &SketchConfig,
    src: &dyn SketchSource,
    q: &Query,
) -> Result<CountAnswer, SketchError> {
    Ok(union_sketch(cfg, src, q)?.answer())
}

/// One answer per combination of the `group_by` dimensions' values seen in
/// the range, sorted by values. Values absent from an event are
/// [`super::MISSING_VALUE`].
pub fn group_by(
    cfg: &SketchConfig,
    src: &dyn SketchSource,
    q: &Query,
) -> Result<Vec<Group>, SketchError> {
    if q.group_by.is_empty() {
        return Err(SketchError::BadQuery(
            "group_by needs at least one dimension".into(),
        ));
    }
    group_by_with(src, &plan(cfg, q)?)
}

/// Runs a plan made by [`plan`] or [`plan_at`] with grouping.
pub fn group_by_with(src: &dyn SketchSource, plan: &Plan) -> Result<Vec<Group>, SketchError> {
    Ok(plan
        .run(src)?
        .into_iter()
        .map(|(values, u)| Group {
            values,
            answer: u.finish().answer(),
        })
        .collect())
}

/// Distinct clients per branch of an experiment over `start..=end`, sorted
/// by branch name.
pub fn experiment_branches(
    cfg: &SketchConfig,
    src: &dyn SketchSource,
    experiment: &str,
    start: NaiveDate,
    end: NaiveDate,
) -> Result<Vec<(String, CountAnswer)>, SketchError> {
    // Reuse the range checks of an ordinary query.
    let q = Query {
        start,
        end,
        filters: Vec::new(),
        group_by: Vec::new(),
    };
    let days = plan(cfg, &q)?.reads.len() as u64;
    let mut branches: BTreeMap<String, Union> = BTreeMap::new();
    for i in 0..days {
        let date = start + Days::new(i);
        src.scan_prefix(&prefix::experiment(date, experiment), &mut |k, v| {
            let key = SketchKey::decode(k)?;
            let Scope::Branch { branch, .. } = key.scope else {
                return Ok(());
            };
            branches
                .entry(branch)
                .or_insert_with(|| Union::new(cfg.precision))
                .add_bytes(v)
        })?;
    }
    Ok(branches
        .into_iter()
        .map(|(b, u)| (b, u.finish().answer()))
        .collect())
}
