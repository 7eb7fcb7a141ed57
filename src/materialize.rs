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
    /// Build the windows' aggregate tables only, no statistics (to measure late changes).
    pub aggregates_only: bool,
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
        self.rows = self.rows.max(table.rows.len() as u64);
        self.sums
            .push((format!("{}#rows", table.name), table.rows.len() as f64));
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(self.digest);
        // The streaming hash sees one byte stream, however it is split: the values are
        // encoded into a buffer handed over a few KB at a time (an update per value costs
        // more than the hashing), with the same digest as one update per value.
        let mut buf: Vec<u8> = Vec::with_capacity(8192);
        for row in &table.rows {
            for v in row {
                match v {
                    Value::Null => buf.push(0),
                    Value::Str(s) => {
                        buf.push(1);
                        buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
                        buf.extend_from_slice(s.as_bytes());
                    }
                    Value::Int(i) => {
                        buf.push(2);
                        buf.extend_from_slice(&i.to_le_bytes());
                    }
                    Value::Float(x) | Value::Numeric(x) => {
                        buf.push(3);
                        buf.extend_from_slice(&x.to_bits().to_le_bytes());
                    }
                    Value::Bool(b) => buf.extend_from_slice(&[4, u8::from(*b)]),
                    Value::Date(d) => {
                        buf.push(5);
                        buf.extend_from_slice(&d.num_days_from_ce().to_le_bytes());
                    }
                }
            }
            if buf.len() >= 4096 {
                h.update(&buf);
                buf.clear();
            }
        }
        h.update(&buf);
        self.digest = h.digest();
        for m in &exp.metrics {
            let Some(col) = table.columns.iter().position(|c| c.name == m.name) else {
                continue;
            };
            let sum: f64 = table
                .rows
                .iter()
                .map(|r| match &r[col] {
                    Value::Float(x) => *x,
                    Value::Int(i) => *i as f64,
                    Value::Bool(b) => f64::from(u8::from(*b)),
                    _ => 0.0,
                })
                .sum();
            self.sums.push((format!("{}.{}", table.name, m.name), sum));
        }
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

/// Builds the due tables of one experiment from the store.
pub fn build(
    exp: &Experiment,
    store: &Store,
    due: &Due,
    pipeline: &PipelineConfig,
) -> Result<Vec<TableData>, StateError> {
    let plan = ExperimentPlan::new(exp, store.layout());
    let last_enrollment = Day::from_date(exp.last_enrollment_date());
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

    let mut entries = Vec::new();
    for e in store.enrollments(&exp.slug) {
        let e = e?;
        if e.record.enrolled.is_some() {
            entries.push(e);
        }
    }
    entries.sort_by(|a, b| a.client_id.cmp(&b.client_id));

    let (lo, hi) = due.windows.iter().fold((u32::MAX, 0), |(lo, hi), w| {
        (lo.min(w.start), hi.max(w.end))
    });
    let mut days = Vec::new();
    let mut agg = WindowAggregate::default();
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
        let segs: Vec<bool> = exp.segments.iter().map(|s| s.matches(dims)).collect();
        let segment_bits = segs
            .iter()
            .enumerate()
            .fold(0u64, |acc, (i, &m)| acc | (u64::from(m) << i));
        // Exposures count within the enrollment period, from the enrollment day on.
        let exposure_day = rec
            .exposure_day()
            .filter(|d| *d <= last_enrollment)
            .map(|d| d.max(enrollment_day));
        let exposure_value = rec
            .exposure_day()
            .map(date)
            .map_or(Value::Null, Value::Date);
        if due.enrollments {
            let mut row = vec![
                Value::Str(entry.client_id.clone()),
                Value::Str(enrolled.branch.clone()),
                Value::Date(date(enrollment_day)),
                Value::Int(i64::from(rec.num_enrollment_events)),
            ];
            row.extend(segs.iter().map(|&s| Value::Bool(s)));
            enrollments.rows.push(row);
        }
        if nw == 0 {
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
        let client_hash = xxhash_rust::xxh3::xxh3_64(entry.client_id.as_bytes());
        for (wi, w) in due.windows.iter().enumerate() {
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
                let t = wi * bases.len() + bi;
                let mut row = Vec::with_capacity(agg_cols.len());
                row.extend([
                    Value::Str(entry.client_id.clone()),
                    Value::Str(enrolled.branch.clone()),
                    Value::Date(date(enrollment_day)),
                    exposure_value.clone(),
                    Value::Int(i64::from(rec.num_enrollment_events)),
                    Value::Int(i64::from(rec.num_exposure_events)),
                    Value::Int(i64::from(w.start)),
                    Value::Int(i64::from(w.end)),
                ]);
                for (m, v) in exp.metrics.iter().zip(&agg.values) {
                    row.push(match (m.aggregation.value_type(), v) {
                        (_, None) => Value::Null,
                        (MetricValueType::Float, Some(x)) => Value::Float(*x),
                        (MetricValueType::Int, Some(x)) => Value::Int(*x as i64),
                        (MetricValueType::Bool, Some(x)) => Value::Bool(*x != 0.0),
                    });
                }
                for &(contradictory, non_enrolled) in &agg.flags {
                    row.push(Value::Bool(contradictory));
                    row.push(Value::Bool(non_enrolled));
                }
                row.extend(segs.iter().map(|&s| Value::Bool(s)));
                aggregates[t].rows.push(row);
                if due.aggregates_only {
                    continue; // no statistics: their inputs are not needed
                }
                let c = &mut columns[t];
                c.client_hash.push(client_hash);
                c.branch.push(branch as u16);
                c.segment_bits.push(segment_bits);
                for (col, v) in c.values.iter_mut().zip(&agg.values) {
                    col.push(*v);
                }
                for (n, &(contradictory, non_enrolled)) in c.flagged.iter_mut().zip(&agg.flags) {
                    n.0 += u64::from(contradictory);
                    n.1 += u64::from(non_enrolled);
                }
            }
        }
    }

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
    if due.aggregates_only {
        out.extend(aggregates);
        return Ok(out);
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

    /// Signatures stored by earlier versions stay comparable: the digest is the hash of
    /// each value as a tag byte and its little-endian bytes, in row order.
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
        assert_eq!(s.digest, xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, 0));
        assert_eq!(s.rows, 1);
        // Many rows, hashed a few KB at a time: the digest of the whole byte stream.
        let many = TableData {
            rows: vec![table.rows[0].clone(); 1000],
            ..table
        };
        let mut s = WindowSignature::default();
        s.add_table(&cfg.experiments[0], &many);
        assert_eq!(
            s.digest,
            xxhash_rust::xxh3::xxh3_64_with_seed(&bytes.repeat(1000), 0)
        );
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
