//! Turning state into tables: enrollment, per-window aggregates and statistics.
//!
//! One pass over an experiment's enrollment records serves every window being
//! published: each client's daily records are read once, for the span the windows
//! cover, and folded into one row per window and analysis basis. Clients are processed
//! in client-id order, so rows and statistics do not depend on how the input was
//! partitioned or batched.

use std::collections::BTreeSet;

use chrono::{Datelike, NaiveDate};

use crate::aggregate::{aggregate_window, ExperimentPlan, WindowAggregate};
use crate::config::{AnalysisBasis, Experiment, MetricValueType, PipelineConfig};
use crate::event::{Day, Timestamp};
use crate::publish::{Column, ColumnType, DataSourceFlags, TableData, TableKind, Value};
use crate::state::{StateError, Store};
use crate::stats::{self, MetricSpec, MetricType, StatsOptions, WindowInput};
use crate::window::{enrollments_table, statistics_view, Window};

/// What to build for one experiment.
#[derive(Debug, Clone, Default)]
pub struct Due {
    pub windows: Vec<Window>,
    pub enrollments: bool,
}

/// A published window's size: its row count and the sum of every metric column of each
/// aggregate table. Late data is measured against it (`pipeline.republish_threshold`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSignature {
    /// Rows of the largest aggregate table (one per enrolled client).
    pub rows: u64,
    /// `(<aggregate table>.<metric>, sum)`, and `(<aggregate table>#rows, row count)`,
    /// in table and metric order.
    pub sums: Vec<(String, f64)>,
    /// Hash of every value of every table: tells a change the sums do not show (an
    /// exposure date, a flag), which counts as a change below any positive threshold.
    pub digest: u64,
}

impl WindowSignature {
    /// Adds one aggregate table of the window (of experiment `exp`).
    pub fn add_table(&mut self, exp: &Experiment, table: &TableData) {
        let metrics: Vec<(&str, usize)> = exp
            .metrics
            .iter()
            .filter_map(|m| {
                let col = table.columns.iter().position(|c| c.name == m.name)?;
                Some((m.name.as_str(), col))
            })
            .collect();
        let mut d = TableDigest::new(table.name.clone(), metrics.iter().map(|(m, _)| *m));
        let mut values = vec![0.0; metrics.len()];
        for row in &table.rows {
            for v in row {
                d.value(v);
            }
            for (x, &(_, col)) in values.iter_mut().zip(&metrics) {
                *x = match &row[col] {
                    Value::Float(x) => *x,
                    Value::Int(i) => *i as f64,
                    Value::Bool(b) => f64::from(u8::from(*b)),
                    _ => 0.0,
                };
            }
            d.end_row(&values);
        }
        self.add_digest(d);
    }

    /// Adds one aggregate table of the window, as a digest accumulated row by row.
    fn add_digest(&mut self, t: TableDigest) {
        self.rows = self.rows.max(t.rows);
        self.sums.push((format!("{}#rows", t.name), t.rows as f64));
        for (metric, sum) in t.sums {
            self.sums.push((format!("{}.{}", t.name, metric), sum));
        }
        let mut hasher = t.hasher;
        hasher.update(&t.buf);
        let table = hasher.digest().to_le_bytes();
        self.digest = xxhash_rust::xxh3::xxh3_64_with_seed(&table, self.digest);
    }

    /// The metrics whose sums it holds (the metric columns of the window's tables).
    pub fn metric_names(&self) -> BTreeSet<&str> {
        self.sums
            .iter()
            .filter_map(|(key, _)| key.split_once('.').map(|(_, metric)| metric))
            .collect()
    }

    /// The largest relative change from `self` (as published) to `now`: of the row counts
    /// and of each metric sum. A sum that moves away from zero, or a metric that appeared
    /// or vanished, is an infinite change; other changed values (same counts and sums) the
    /// smallest positive one, so that only a threshold of 0 publishes them at once.
    pub fn change(&self, now: &WindowSignature) -> f64 {
        fn rel(old: f64, new: f64) -> f64 {
            let d = (new - old).abs();
            if d <= 1e-9 * old.abs().max(1.0) {
                0.0
            } else if old == 0.0 {
                f64::INFINITY
            } else {
                d / old.abs()
            }
        }
        let mut worst = rel(self.rows as f64, now.rows as f64);
        if self.sums.len() != now.sums.len() {
            return f64::INFINITY;
        }
        for ((a, old), (b, new)) in self.sums.iter().zip(&now.sums) {
            if a != b {
                return f64::INFINITY;
            }
            worst = worst.max(rel(*old, *new));
        }
        if worst == 0.0 && self.digest != now.digest {
            return f64::MIN_POSITIVE;
        }
        worst
    }
}

/// One aggregate table's share of a `WindowSignature`, accumulated row by row: its row
/// count, each metric's sum (in row order) and the hash of every value, each encoded as a
/// tag byte and its little-endian bytes. A window's digest chains its tables' digests.
/// (Until the measurement streamed rows, one hash ran through all of a window's tables:
/// a signature stored then differs in its digest only, which `change` takes as the
/// smallest change, so a window measured once after the upgrade is re-published only
/// under a threshold of 0.)
struct TableDigest {
    name: String,
    rows: u64,
    sums: Vec<(String, f64)>,
    hasher: xxhash_rust::xxh3::Xxh3,
    /// Values are encoded here and handed to the hasher a few KB at a time (an update
    /// per value costs more than the hashing); the digest is that of one byte stream.
    buf: Vec<u8>,
}

impl TableDigest {
    fn new<'a>(name: String, metrics: impl Iterator<Item = &'a str>) -> TableDigest {
        TableDigest {
            name,
            rows: 0,
            sums: metrics.map(|m| (m.to_owned(), 0.0)).collect(),
            hasher: xxhash_rust::xxh3::Xxh3::new(),
            buf: Vec::with_capacity(8192),
        }
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Null => self.null(),
            Value::Str(s) => self.str(s),
            Value::Int(i) => self.int(*i),
            Value::Float(x) | Value::Numeric(x) => self.float(*x),
            Value::Bool(b) => self.bool(*b),
            Value::Date(d) => self.date(*d),
        }
    }

    /// Ends a row whose metric values (in the order given to `new`) are `metrics`.
    fn end_row(&mut self, metrics: &[f64]) {
        self.rows += 1;
        for ((_, sum), x) in self.sums.iter_mut().zip(metrics) {
            *sum += x;
        }
        if self.buf.len() >= 4096 {
            self.hasher.update(&self.buf);
            self.buf.clear();
        }
    }
}

impl RowOut for TableDigest {
    fn null(&mut self) {
        self.buf.push(0);
    }
    fn str(&mut self, s: &str) {
        self.buf.push(1);
        self.buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, i: i64) {
        self.buf.push(2);
        self.buf.extend_from_slice(&i.to_le_bytes());
    }
    fn float(&mut self, x: f64) {
        self.buf.push(3);
        self.buf.extend_from_slice(&x.to_bits().to_le_bytes());
    }
    fn bool(&mut self, b: bool) {
        self.buf.extend_from_slice(&[4, u8::from(b)]);
    }
    fn date(&mut self, d: NaiveDate) {
        self.buf.push(5);
        self.buf
            .extend_from_slice(&d.num_days_from_ce().to_le_bytes());
    }
}

/// What a configuration change can alter in an experiment's enrollment table, as a hash:
/// its columns and the segment definitions that fill them. Stored with each publication
/// (`state::Store::shape`); a table published under another shape is published again.
pub fn enrollments_shape(exp: &Experiment) -> u64 {
    let mut h = columns_hash(&enrollments_schema(exp));
    segments_hash(exp, &mut h);
    h.digest()
}

/// The same for a window: its aggregate tables' columns, the definitions of the metrics
/// and segments that fill them, and each metric's statistics (the rows of its statistics
/// table).
pub fn window_shape(exp: &Experiment) -> u64 {
    let mut h = columns_hash(&aggregate_schema(exp));
    segments_hash(exp, &mut h);
    for m in &exp.metrics {
        let field = m.field.as_deref().unwrap_or("");
        let aggregation = format!("{:?}", m.aggregation);
        for text in [&m.name, &m.data_source, field, &aggregation] {
            hash_str(&mut h, text);
        }
    }
    h.update(&crate::state::encode(&metric_specs(exp)));
    h.digest()
}

fn hash_str(h: &mut xxhash_rust::xxh3::Xxh3, s: &str) {
    h.update(&(s.len() as u64).to_le_bytes());
    h.update(s.as_bytes());
}

fn columns_hash(columns: &[Column]) -> xxhash_rust::xxh3::Xxh3 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for c in columns {
        hash_str(&mut h, &c.name);
        h.update(&[c.kind as u8, u8::from(c.nullable)]);
    }
    h
}

fn segments_hash(exp: &Experiment, h: &mut xxhash_rust::xxh3::Xxh3) {
    for s in &exp.segments {
        hash_str(h, &s.name);
        hash_str(h, &s.expression);
    }
}

/// Columns of `enrollments_<slug>`.
pub fn enrollments_schema(exp: &Experiment) -> Vec<Column> {
    let mut cols = vec![
        Column::new("client_id", ColumnType::String, false),
        Column::new("branch", ColumnType::String, false),
        Column::new("enrollment_date", ColumnType::Date, false),
        Column::new("num_enrollment_events", ColumnType::Int64, false),
    ];
    cols.extend(
        exp.segments
            .iter()
            .map(|s| Column::new(&s.name, ColumnType::Bool, false)),
    );
    cols
}

/// Columns of `<slug>_<basis>_<period>_<index>`.
pub fn aggregate_schema(exp: &Experiment) -> Vec<Column> {
    let mut cols = vec![
        Column::new("client_id", ColumnType::String, false),
        Column::new("branch", ColumnType::String, false),
        Column::new("enrollment_date", ColumnType::Date, false),
        Column::new("exposure_date", ColumnType::Date, true),
        Column::new("num_enrollment_events", ColumnType::Int64, false),
        Column::new("num_exposure_events", ColumnType::Int64, false),
        Column::new("analysis_window_start", ColumnType::Int64, false),
        Column::new("analysis_window_end", ColumnType::Int64, false),
    ];
    for m in &exp.metrics {
        let kind = match m.aggregation.value_type() {
            MetricValueType::Float => ColumnType::Float64,
            MetricValueType::Int => ColumnType::Int64,
            MetricValueType::Bool => ColumnType::Bool,
        };
        cols.push(Column::new(&m.name, kind, true));
    }
    for ds in exp.data_sources() {
        cols.push(Column::new(
            format!("{ds}_has_contradictory_branch"),
            ColumnType::Bool,
            false,
        ));
        cols.push(Column::new(
            format!("{ds}_has_non_enrolled_data"),
            ColumnType::Bool,
            false,
        ));
    }
    cols.extend(
        exp.segments
            .iter()
            .map(|s| Column::new(&s.name, ColumnType::Bool, false)),
    );
    cols
}

/// Columns of `statistics_<slug>_<period>_<index>` (DESIGN.md section 5).
pub fn statistics_schema() -> Vec<Column> {
    use ColumnType::*;
    [
        ("segment", String, false),
        ("metric", String, false),
        ("statistic", String, false),
        ("parameter", Numeric, true),
        ("branch", String, false),
        ("comparison", String, true),
        ("comparison_to_branch", String, true),
        ("ci_width", Float64, true),
        ("point", Float64, true),
        ("lower", Float64, true),
        ("upper", Float64, true),
        ("analysis_basis", String, false),
    ]
    .into_iter()
    .map(|(n, k, null)| Column::new(n, k, null))
    .collect()
}

/// The statistics each metric gets: from config, or the defaults for its type.
pub fn metric_specs(exp: &Experiment) -> Vec<MetricSpec> {
    exp.metrics
        .iter()
        .map(|m| {
            let metric_type = if m.aggregation.value_type() == MetricValueType::Bool {
                MetricType::Boolean
            } else {
                MetricType::Numeric
            };
            let statistics = if m.statistics.is_empty() {
                stats::default_statistics(&m.name, metric_type)
            } else {
                m.statistics.clone()
            };
            MetricSpec {
                name: m.name.clone(),
                metric_type,
                statistics,
            }
        })
        .collect()
}

/// Columns of `activity_sketches_YYYYMMDD`: one row per stored sketch of the day.
pub fn sketches_schema() -> Vec<Column> {
    use ColumnType::*;
    [
        ("activity_date", Date, false),
        ("scope", String, false),
        ("dimensions", String, false),
        ("experiment", String, true),
        ("branch", String, true),
        ("estimate", Float64, false),
        ("format_version", Int64, false),
        ("precision", Int64, false),
        ("sketch", String, false),
    ]
    .into_iter()
    .map(|(n, k, null)| Column::new(n, k, null))
    .collect()
}

/// One day's activity sketches as a table: scope (`all`, `dimension`, `pair`,
/// `combination`, `branch`), its dimension values as a JSON object, and the sketch bytes
/// (format documented in the `sketch` module) in base64, so the same unions can be done
/// outside the service.
pub fn sketch_table(store: &Store, day: Day) -> Result<TableData, StateError> {
    use crate::sketch::{key::prefix, Scope, Sketch, SketchKey, SketchSource};
    let date = day.date();
    let mut rows = Vec::new();
    let corrupt = |detail: String| StateError::Corrupt {
        key: format!("sketch of {date}"),
        detail,
    };
    let mut failure = None;
    store
        .scan_prefix(&prefix::date(date), &mut |k, v| {
            let key = SketchKey::decode(k)?;
            let mut sketch = Sketch::from_bytes(v)?;
            let pairs = |p: &[(std::string::String, std::string::String)]| {
                serde_json::to_string(
                    &p.iter()
                        .map(|(d, v)| (d.clone(), v.clone()))
                        .collect::<std::collections::BTreeMap<_, _>>(),
                )
                .unwrap_or_default()
            };
            let (scope, dims, exp, branch) = match &key.scope {
                Scope::All => ("all", "{}".to_string(), Value::Null, Value::Null),
                Scope::Single { dim, value } => (
                    "dimension",
                    pairs(&[(dim.clone(), value.clone())]),
                    Value::Null,
                    Value::Null,
                ),
                Scope::Pair { first, second } => (
                    "pair",
                    pairs(&[first.clone(), second.clone()]),
                    Value::Null,
                    Value::Null,
                ),
                Scope::Finest(all) => ("combination", pairs(all), Value::Null, Value::Null),
                Scope::Branch { experiment, branch } => (
                    "branch",
                    "{}".to_string(),
                    Value::Str(experiment.clone()),
                    Value::Str(branch.clone()),
                ),
            };
            rows.push(vec![
                Value::Date(date),
                Value::Str(scope.into()),
                Value::Str(dims),
                exp,
                branch,
                Value::Float(sketch.estimate()),
                Value::Int(1),
                Value::Int(i64::from(sketch.precision().get())),
                Value::Str(sketch.to_base64()),
            ]);
            Ok(())
        })
        .unwrap_or_else(|e| failure = Some(e));
    if let Some(e) = failure {
        return Err(corrupt(e.to_string()));
    }
    Ok(TableData {
        name: crate::window::activity_sketches_table(day),
        kind: TableKind::Sketches,
        columns: sketches_schema(),
        rows,
    })
}

/// Statistics input of one (window, basis), filled client by client.
#[derive(Default)]
struct Columns {
    client_hash: Vec<u64>,
    branch: Vec<u16>,
    segment_bits: Vec<u64>,
    values: Vec<Vec<Option<f64>>>,
    /// Clients with (a contradictory branch, untagged data) per data source.
    flagged: Vec<(u64, u64)>,
}

fn date(d: Day) -> NaiveDate {
    d.date()
}

/// One enrolled client as the scan of an experiment's state sees it.
struct Client<'a> {
    id: &'a str,
    branch_name: &'a str,
    branch: usize,
    enrollment_day: Day,
    /// The raw exposure day (the `exposure_date` column), before clamping to the
    /// enrollment period.
    exposure_date: Option<NaiveDate>,
    num_enrollment_events: u32,
    num_exposure_events: u32,
    segs: &'a [bool],
    segment_bits: u64,
    hash: u64,
}

/// Reads every enrolled client of `exp` once, in client-id order: `on_client` sees each
/// client, `on_row` each (window, basis) row of it (the table index is
/// `window index * bases + basis index`; clients without an exposure have no
/// exposures-basis row). Each client's daily records are read once, for the span the
/// windows cover.
fn scan(
    exp: &Experiment,
    store: &Store,
    windows: &[Window],
    mut on_client: impl FnMut(&Client<'_>),
    mut on_row: impl FnMut(usize, &Client<'_>, &Window, &WindowAggregate),
) -> Result<(), StateError> {
    let plan = ExperimentPlan::new(exp, store.layout());
    let last_enrollment = Day::from_date(exp.last_enrollment_date());
    let bases = &exp.analysis_bases;
    let mut entries = Vec::new();
    for e in store.enrollments(&exp.slug) {
        let e = e?;
        if e.record.enrolled.is_some() {
            entries.push(e);
        }
    }
    entries.sort_by(|a, b| a.client_id.cmp(&b.client_id));

    let (lo, hi) = windows.iter().fold((u32::MAX, 0), |(lo, hi), w| {
        (lo.min(w.start), hi.max(w.end))
    });
    let mut days = Vec::new();
    let mut agg = WindowAggregate::default();
    let mut segs = Vec::with_capacity(exp.segments.len());
    for entry in &entries {
        let rec = &entry.record;
        let enrolled = rec.enrolled.as_ref().expect("filtered above");
        let Some(branch) = exp.branch_index(&enrolled.branch) else {
            continue;
        };
        let enrollment_day = Timestamp(enrolled.timestamp).day();
        let dims = |d: &str| {
            enrolled
                .dimensions
                .iter()
                .find(|(k, _)| k == d)
                .map(|(_, v)| v.as_str())
        };
        segs.clear();
        segs.extend(exp.segments.iter().map(|s| s.matches(dims)));
        let segment_bits = segs
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &m)| acc | (u64::from(m) << i));
        // Exposures count within the enrollment period, from the enrollment day on.
        let exposure_day = rec
            .exposure_day()
            .filter(|d| *d <= last_enrollment)
            .map(|d| d.max(enrollment_day));
        let client = Client {
            id: &entry.client_id,
            branch_name: &enrolled.branch,
            branch,
            enrollment_day,
            exposure_date: rec.exposure_day().map(date),
            num_enrollment_events: rec.num_enrollment_events,
            num_exposure_events: rec.num_exposure_events,
            segs: &segs,
            segment_bits,
            hash: xxhash_rust::xxh3::xxh3_64(entry.client_id.as_bytes()),
        };
        on_client(&client);
        if windows.is_empty() {
            continue;
        }
        let last_start = exposure_day.unwrap_or(enrollment_day).max(enrollment_day);
        store.client_days(
            entry.partition,
            &entry.client_id,
            enrollment_day.plus(i64::from(lo)),
            last_start.plus(i64::from(hi)),
            &mut days,
        )?;
        for (wi, w) in windows.iter().enumerate() {
            for (bi, &basis) in bases.iter().enumerate() {
                let start = match basis {
                    AnalysisBasis::Enrollments => enrollment_day,
                    AnalysisBasis::Exposures => match exposure_day {
                        Some(d) => d,
                        None => continue,
                    },
                };
                aggregate_window(
                    &plan,
                    plan.branch_tags[branch],
                    enrollment_day,
                    start,
                    w,
                    &days,
                    &mut agg,
                );
                on_row(wi * bases.len() + bi, &client, w, &agg);
            }
        }
    }
    Ok(())
}

/// Where the cells of a row go: a table's row of values, or a signature's digest.
trait RowOut {
    fn null(&mut self);
    fn str(&mut self, s: &str);
    fn int(&mut self, i: i64);
    fn float(&mut self, x: f64);
    fn bool(&mut self, b: bool);
    fn date(&mut self, d: NaiveDate);
}

impl RowOut for Vec<Value> {
    fn null(&mut self) {
        self.push(Value::Null);
    }
    fn str(&mut self, s: &str) {
        self.push(Value::Str(s.to_owned()));
    }
    fn int(&mut self, i: i64) {
        self.push(Value::Int(i));
    }
    fn float(&mut self, x: f64) {
        self.push(Value::Float(x));
    }
    fn bool(&mut self, b: bool) {
        self.push(Value::Bool(b));
    }
    fn date(&mut self, d: NaiveDate) {
        self.push(Value::Date(d));
    }
}

/// The cells of a client's row in a window's aggregate table (`aggregate_schema`).
fn aggregate_row(
    out: &mut impl RowOut,
    exp: &Experiment,
    c: &Client<'_>,
    w: &Window,
    agg: &WindowAggregate,
) {
    out.str(c.id);
    out.str(c.branch_name);
    out.date(date(c.enrollment_day));
    match c.exposure_date {
        Some(d) => out.date(d),
        None => out.null(),
    }
    out.int(i64::from(c.num_enrollment_events));
    out.int(i64::from(c.num_exposure_events));
    out.int(i64::from(w.start));
    out.int(i64::from(w.end));
    for (m, v) in exp.metrics.iter().zip(&agg.values) {
        match (m.aggregation.value_type(), v) {
            (_, None) => out.null(),
            (MetricValueType::Float, Some(x)) => out.float(*x),
            (MetricValueType::Int, Some(x)) => out.int(*x as i64),
            (MetricValueType::Bool, Some(x)) => out.bool(*x != 0.0),
        }
    }
    for &(contradictory, non_enrolled) in &agg.flags {
        out.bool(contradictory);
        out.bool(non_enrolled);
    }
    for &s in c.segs {
        out.bool(s);
    }
}

/// The signatures of windows of `exp` as they are in the store now: what building their
/// aggregate tables and adding them to a `WindowSignature` gives, without the tables
/// (each row is hashed and summed as it is computed). One read of every client's state
/// serves all the windows, however many; this is how late changes are measured.
pub fn signatures(
    exp: &Experiment,
    store: &Store,
    windows: &[Window],
) -> Result<Vec<WindowSignature>, StateError> {
    let bases = &exp.analysis_bases;
    let mut digests: Vec<TableDigest> = windows
        .iter()
        .flat_map(|w| {
            bases.iter().map(|&b| {
                let names = exp.metrics.iter().map(|m| m.name.as_str());
                TableDigest::new(w.aggregate_table(exp, b), names)
            })
        })
        .collect();
    let mut sums = vec![0.0; exp.metrics.len()];
    scan(
        exp,
        store,
        windows,
        |_| {},
        |t, client, w, agg| {
            let d = &mut digests[t];
            aggregate_row(d, exp, client, w, agg);
            for ((m, v), s) in exp.metrics.iter().zip(&agg.values).zip(&mut sums) {
                *s = match (m.aggregation.value_type(), v) {
                    (_, None) => 0.0,
                    (MetricValueType::Float, Some(x)) => *x,
                    (MetricValueType::Int, Some(x)) => (*x as i64) as f64,
                    (MetricValueType::Bool, Some(x)) => f64::from(u8::from(*x != 0.0)),
                };
            }
            d.end_row(&sums);
        },
    )?;
    let mut out = Vec::with_capacity(windows.len());
    let mut digests = digests.into_iter();
    for _ in windows {
        let mut sig = WindowSignature::default();
        for _ in bases {
            sig.add_digest(digests.next().expect("one per window and basis"));
        }
        out.push(sig);
    }
    Ok(out)
}

/// Builds the due tables of one experiment from the store.
pub fn build(
    exp: &Experiment,
    store: &Store,
    due: &Due,
    pipeline: &PipelineConfig,
) -> Result<Vec<TableData>, StateError> {
    let bases = &exp.analysis_bases;
    let nw = due.windows.len();
    let agg_cols = aggregate_schema(exp);
    let mut aggregates: Vec<TableData> = Vec::with_capacity(nw * bases.len());
    let mut columns: Vec<Columns> = Vec::with_capacity(nw * bases.len());
    for w in &due.windows {
        for &b in bases {
            aggregates.push(TableData {
                name: w.aggregate_table(exp, b),
                kind: TableKind::Aggregates,
                columns: agg_cols.clone(),
                rows: Vec::new(),
            });
            columns.push(Columns {
                values: vec![Vec::new(); exp.metrics.len()],
                flagged: vec![(0, 0); exp.data_sources().len()],
                ..Default::default()
            });
        }
    }
    let mut enrollments = TableData {
        name: enrollments_table(exp),
        kind: TableKind::Enrollments,
        columns: enrollments_schema(exp),
        rows: Vec::new(),
    };
    scan(
        exp,
        store,
        &due.windows,
        |c| {
            if due.enrollments {
                let mut row = Vec::with_capacity(4 + c.segs.len());
                row.str(c.id);
                row.str(c.branch_name);
                row.date(date(c.enrollment_day));
                row.int(i64::from(c.num_enrollment_events));
                row.extend(c.segs.iter().map(|&s| Value::Bool(s)));
                enrollments.rows.push(row);
            }
        },
        |t, client, w, agg| {
            let mut row = Vec::with_capacity(agg_cols.len());
            aggregate_row(&mut row, exp, client, w, agg);
            aggregates[t].rows.push(row);
            let c = &mut columns[t];
            c.client_hash.push(client.hash);
            c.branch.push(client.branch as u16);
            c.segment_bits.push(client.segment_bits);
            for (col, v) in c.values.iter_mut().zip(&agg.values) {
                col.push(*v);
            }
            for (n, &(contradictory, non_enrolled)) in c.flagged.iter_mut().zip(&agg.flags) {
                n.0 += u64::from(contradictory);
                n.1 += u64::from(non_enrolled);
            }
        },
    )?;

    let specs = metric_specs(exp);
    let branches: Vec<String> = exp.branches.iter().map(|b| b.name.clone()).collect();
    let segments: Vec<String> = exp.segments.iter().map(|s| s.name.clone()).collect();
    let sources = exp.data_sources();
    let opts = StatsOptions {
        replicates: pipeline.replicates,
        seed: exp.seed,
        threads: 2,
        cap_mode: pipeline.mean_cap,
    };
    let mut out = Vec::new();
    if due.enrollments {
        out.push(enrollments);
    }
    let mut aggregates = aggregates.into_iter();
    for (wi, w) in due.windows.iter().enumerate() {
        let mut stat_rows = Vec::new();
        let mut data_sources = Vec::new();
        for (bi, &basis) in bases.iter().enumerate() {
            let c = &columns[wi * bases.len() + bi];
            for (source, &(contradictory, non_enrolled)) in sources.iter().zip(&c.flagged) {
                data_sources.push(DataSourceFlags {
                    analysis_basis: basis.name().into(),
                    data_source: source.clone(),
                    clients: c.client_hash.len() as u64,
                    contradictory_branch: contradictory,
                    non_enrolled_data: non_enrolled,
                });
            }
            let input = WindowInput {
                analysis_basis: basis.name(),
                branches: &branches,
                segments: &segments,
                metrics: &specs,
                client_hash: &c.client_hash,
                branch: &c.branch,
                segment_bits: &c.segment_bits,
                values: &c.values,
            };
            stat_rows.extend(stats::compute(&input, &opts));
            out.push(aggregates.next().expect("one table per window and basis"));
        }
        out.push(TableData {
            name: w.statistics_table(exp),
            kind: TableKind::Statistics {
                view: statistics_view(exp, w.period),
                window_index: w.index,
                data_sources,
            },
            columns: statistics_schema(),
            rows: stat_rows.into_iter().map(statistic_row).collect(),
        });
    }
    Ok(out)
}

fn opt_float(v: Option<f64>) -> Value {
    v.filter(|x| x.is_finite())
        .map_or(Value::Null, Value::Float)
}

fn statistic_row(r: stats::StatisticRow) -> Vec<Value> {
    vec![
        Value::Str(r.segment),
        Value::Str(r.metric),
        Value::Str(r.statistic),
        // NUMERIC holds 9 decimals: round here so every sink publishes the same value.
        r.parameter
            .filter(|x| x.is_finite())
            .map_or(Value::Null, |x| Value::Numeric((x * 1e9).round() / 1e9)),
        Value::Str(r.branch),
        r.comparison
            .map_or(Value::Null, |c| Value::Str(c.name().into())),
        r.comparison_to_branch.map_or(Value::Null, Value::Str),
        Value::Float(r.ci_width),
        opt_float(r.point),
        opt_float(r.lower),
        opt_float(r.upper),
        Value::Str(r.analysis_basis),
    ]
}

#[cfg(test)]
mod signature_tests {
    use super::WindowSignature;

    fn sig(rows: u64, sums: &[(&str, f64)]) -> WindowSignature {
        WindowSignature {
            rows,
            sums: sums.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            digest: 7,
        }
    }

    #[test]
    fn change_is_the_largest_relative_move_of_rows_or_any_sum() {
        let old = sig(100, &[("t.a", 50.0), ("t.b", 10.0)]);
        assert_eq!(old.change(&old), 0.0);
        assert!((old.change(&sig(101, &[("t.a", 50.0), ("t.b", 10.0)])) - 0.01).abs() < 1e-12);
        assert!((old.change(&sig(100, &[("t.a", 50.0), ("t.b", 10.5)])) - 0.05).abs() < 1e-12);
        assert!((old.change(&sig(100, &[("t.a", 49.0), ("t.b", 10.0)])) - 0.02).abs() < 1e-12);
        // Away from zero, or a metric added or removed: infinitely large.
        let zero = sig(100, &[("t.a", 0.0)]);
        assert_eq!(zero.change(&sig(100, &[("t.a", 1e-3)])), f64::INFINITY);
        assert_eq!(old.change(&sig(100, &[("t.a", 50.0)])), f64::INFINITY);
        assert_eq!(
            old.change(&sig(100, &[("t.a", 50.0), ("t.c", 10.0)])),
            f64::INFINITY
        );
        // Same counts and sums but other values: the smallest change there is.
        let mut other = old.clone();
        other.digest = 8;
        assert_eq!(old.change(&other), f64::MIN_POSITIVE);
        assert!(old.change(&other) > 0.0 && old.change(&other) < 1e-300);
        // Float noise in a recomputed sum is no change.
        assert_eq!(
            old.change(&sig(100, &[("t.a", 50.0 + 1e-12), ("t.b", 10.0)])),
            0.0
        );
    }

    /// The digest is pinned: a table's is the hash of each value as a tag byte and its
    /// little-endian bytes, in row order, and a window's chains its tables' digests.
    #[test]
    fn digest_hashes_each_value_as_tagged_bytes() {
        use crate::publish::{TableData, TableKind, Value};
        use chrono::{Datelike, NaiveDate};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/examples/experiment.toml"
        );
        let cfg = crate::config::load(std::path::Path::new(path)).unwrap();
        let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
        let table = TableData {
            name: "t".into(),
            kind: TableKind::Aggregates,
            columns: vec![],
            rows: vec![vec![
                Value::Null,
                Value::Str("ab".into()),
                Value::Int(-3),
                Value::Float(1.5),
                Value::Bool(true),
                Value::Date(day),
                Value::Numeric(0.25),
            ]],
        };
        let mut s = WindowSignature::default();
        s.add_table(&cfg.experiments[0], &table);
        let mut bytes = vec![0u8, 1];
        bytes.extend(2u64.to_le_bytes());
        bytes.extend(b"ab");
        bytes.push(2);
        bytes.extend((-3i64).to_le_bytes());
        bytes.push(3);
        bytes.extend(1.5f64.to_bits().to_le_bytes());
        bytes.extend([4, 1, 5]);
        bytes.extend(day.num_days_from_ce().to_le_bytes());
        bytes.push(3);
        bytes.extend(0.25f64.to_bits().to_le_bytes());
        let chained = |table: &[u8]| {
            let t = xxhash_rust::xxh3::xxh3_64(table).to_le_bytes();
            xxhash_rust::xxh3::xxh3_64_with_seed(&t, 0)
        };
        assert_eq!(s.digest, chained(&bytes));
        assert_eq!(s.rows, 1);
        // Many rows, hashed a few KB at a time: the digest of the whole byte stream.
        let many = TableData {
            rows: vec![table.rows[0].clone(); 1000],
            ..table.clone()
        };
        let mut s = WindowSignature::default();
        s.add_table(&cfg.experiments[0], &many);
        assert_eq!(s.digest, chained(&bytes.repeat(1000)));
        // A second table chains onto the first.
        let first = s.digest;
        s.add_table(&cfg.experiments[0], &table);
        let t = xxhash_rust::xxh3::xxh3_64(&bytes).to_le_bytes();
        assert_eq!(s.digest, xxhash_rust::xxh3::xxh3_64_with_seed(&t, first));
        assert_eq!(s.rows, 1000);
    }

    #[test]
    fn metric_names_are_those_of_the_sums() {
        let s = sig(
            3,
            &[("t#rows", 3.0), ("t.a", 1.0), ("u.a", 2.0), ("u.b", 0.0)],
        );
        assert_eq!(s.metric_names().into_iter().collect::<Vec<_>>(), ["a", "b"]);
    }

    /// What changes a published table's shape, and what does not.
    #[test]
    fn shapes_follow_columns_metrics_segments_and_statistics() {
        use super::{enrollments_shape, window_shape};
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/examples/experiment.toml"
        );
        let exp = crate::config::load(std::path::Path::new(path))
            .unwrap()
            .experiments[0]
            .clone();
        let (window, enrollments) = (window_shape(&exp), enrollments_shape(&exp));
        let mut other = exp.clone();
        other.end_date = other.end_date + chrono::Days::new(7);
        other.seed += 1;
        assert_eq!(window_shape(&other), window);
        assert_eq!(enrollments_shape(&other), enrollments);

        let mut fewer = exp.clone();
        fewer.metrics.pop();
        assert_ne!(window_shape(&fewer), window);
        assert_eq!(enrollments_shape(&fewer), enrollments);

        let mut statistics = exp.clone();
        statistics.metrics[0].statistics = vec![crate::stats::StatisticSpec::new(
            crate::stats::StatisticKind::Count,
        )];
        assert_ne!(window_shape(&statistics), window);

        let mut redefined = exp.clone();
        redefined.metrics[0].aggregation = crate::config::Aggregation::Max;
        assert_ne!(window_shape(&redefined), window);

        let mut segments = exp.clone();
        segments.segments.pop();
        assert_ne!(window_shape(&segments), window);
        assert_ne!(enrollments_shape(&segments), enrollments);
        let mut segments = exp.clone();
        segments.segments[0].expression = "os = \"Linux\"".into();
        assert_ne!(window_shape(&segments), window);
        assert_ne!(enrollments_shape(&segments), enrollments);
    }
}
