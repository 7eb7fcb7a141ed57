//! The driver shared by `replay` and `run`: fold, flush, and publish what is due.
//!
//! After each flush the pipeline compares the watermark with every window's completion
//! time. A window is published once complete. Late events mark a published window dirty;
//! the pipeline measures the dirty windows again, all together in one read of the state
//! and at most once per `late_check_interval` (each round costs a read of every enrolled
//! client, whatever the number of windows), and re-publishes at once those whose row count or any
//! metric sum moved by more than `republish_threshold` since publication. Smaller changes
//! wait in state: the first forced pass (`finalize`) after the window's look-back
//! (`late_lookback_days` after it completed) publishes them. The state a publication
//! reflects is made durable first, and a table is recorded as published only after the
//! sink confirmed it, so a crash in between just publishes it again (sinks replace tables).
//!
//! A configuration change can alter what published tables hold: a metric or segment added,
//! removed or redefined, a metric's statistics changed. Each window and enrollment table is stored
//! with the shape it was published with (`materialize::window_shape`); the first pass
//! after a start finds those whose shape differs from the config's and publishes them
//! again at once, replacing their tables.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::apply::Fold;
use crate::event::Timestamp;
use crate::materialize::{self, Due, WindowSignature};
use crate::publish::{PublishError, Sink, TableData, TableKind};
use crate::state::{PublishedRecord, StateError};
use crate::window::{self, enrollments_table, Window};

/// Windows materialized together at most (bounds memory when many are due at once).
const WINDOWS_PER_PASS: usize = 8;

/// What one publication pass did.
#[derive(Debug, Default, Clone)]
pub struct PublishReport {
    pub tables: usize,
    pub rows: usize,
    pub failures: Vec<String>,
}

impl PublishReport {
    /// Adds another pass's report to this one.
    pub fn absorb(&mut self, r: PublishReport) {
        self.tables += r.tables;
        self.rows += r.rows;
        self.failures.extend(r.failures);
    }
}

/// Where the pipeline's time went, for summaries and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct PhaseTimes {
    /// Writing folded batches to sled.
    pub flush: Duration,
    /// Merging delta-log segments before reading per-client state (the background
    /// compactor's time is not counted: it runs beside the fold).
    pub compact: Duration,
    /// Reading state and computing rows and statistics.
    pub materialize: Duration,
    /// The part of `materialize` spent measuring windows changed by late data.
    pub late: Duration,
    /// Handing tables to the sink.
    pub sink: Duration,
}

/// Fold plus sink.
pub struct Pipeline {
    pub fold: Fold,
    sink: Box<dyn Sink>,
    pub published_tables: u64,
    pub publish_failures: u64,
    pub times: PhaseTimes,
    /// Counters for `/metrics`, shared with the HTTP API (`Api::with_metrics`).
    pub metrics: Arc<crate::health::PipelineMetrics>,
    /// Current retry delay after transient sink failures (zero when healthy).
    backoff: Duration,
    /// No publication pass before this instant.
    backoff_until: Option<Instant>,
    /// Dirty windows measured against their published signature, by (experiment,
    /// statistics table): the late events counted then, and whether the change was above
    /// the threshold.
    late_measured: HashMap<(usize, String), (u64, bool)>,
    /// Least time between two rounds of measuring dirty windows (each round reads the
    /// state of every enrolled client once, for all the windows it measures):
    /// `late_check_secs`.
    pub late_check_interval: Duration,
    /// When the last round of measurements was (or the pipeline started).
    last_late_round: Instant,
    /// Per experiment, the published statistics and enrollment tables whose shape differs
    /// from the config's: published again as soon as a pass reaches them. Found at the
    /// first pass (None before).
    reshaped: Option<Vec<HashSet<String>>>,
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

impl Pipeline {
    pub fn new(fold: Fold, sink: Box<dyn Sink>) -> Self {
        let late_check_secs = fold.config().pipeline.late_check_secs;
        Pipeline {
            fold,
            sink,
            published_tables: 0,
            publish_failures: 0,
            times: PhaseTimes::default(),
            metrics: Arc::new(crate::health::PipelineMetrics::new()),
            backoff: Duration::ZERO,
            backoff_until: None,
            late_check_interval: Duration::from_secs(late_check_secs),
            late_measured: HashMap::new(),
            last_late_round: Instant::now(),
            reshaped: None,
        }
    }

    /// Published windows and enrollment tables whose stored shape differs from the one the
    /// config gives them now, per experiment: one read per published window.
    fn find_reshaped(&self) -> Result<Vec<HashSet<String>>, StateError> {
        let store = self.fold.store();
        let mut out = Vec::new();
        for (x, exp) in self.fold.config().experiments.iter().enumerate() {
            let mut reshaped = HashSet::new();
            if self.fold.is_retired(x) {
                out.push(reshaped); // never published again
                continue;
            }
            let published = self.fold.published(Some(x));
            let metrics: BTreeSet<&str> = exp.metrics.iter().map(|m| m.name.as_str()).collect();
            let window_shape = materialize::window_shape(exp);
            let tables = window::windows(exp)
                .into_iter()
                .map(|w| (w.statistics_table(exp), window_shape, true))
                .chain([(
                    enrollments_table(exp),
                    materialize::enrollments_shape(exp),
                    false,
                )]);
            for (table, shape, is_window) in tables {
                if published.get(&table).is_none_or(|r| r.published_at == 0) {
                    continue;
                }
                let changed = match store.shape(&exp.slug, &table)? {
                    Some(stored) => stored != shape,
                    // Published before shapes were kept: a window's signature names its
                    // metrics; an enrollment table is taken as it is.
                    None if is_window => store
                        .signature(&exp.slug, &table)?
                        .is_some_and(|sig| sig.metric_names() != metrics),
                    None => false,
                };
                if changed {
                    reshaped.insert(table);
                }
            }
            if !reshaped.is_empty() {
                tracing::info!(
                    experiment = %exp.slug,
                    tables = reshaped.len(),
                    "the configuration changed the metrics, segments or statistics of published tables: publishing them again"
                );
            }
            out.push(reshaped);
        }
        Ok(out)
    }

    /// Whether experiment `x`'s published `table` must be published again because the
    /// config changed its shape.
    fn is_reshaped(&self, x: usize, table: &str) -> bool {
        self.reshaped.as_ref().is_some_and(|r| r[x].contains(table))
    }

    /// Merges the delta log into per-client records (before materializing from them).
    pub fn compact(&mut self) -> Result<(), StateError> {
        let started = Instant::now();
        self.fold.sync()?;
        self.times.flush += started.elapsed();
        let started = Instant::now();
        self.fold.compact_all()?;
        self.times.compact += started.elapsed();
        Ok(())
    }

    pub fn sink_description(&self) -> String {
        self.sink.describe()
    }

    /// Whether a publication record says a table that is not a window (enrollments,
    /// activity sketches) needs (re)publishing: once `ready`, again when `reshaped`, and
    /// again when late events touched more than the threshold of its rows (any, when
    /// `force`d). A table whose last failure was permanent waits for a forced pass
    /// (`finalize`).
    fn needs(
        &self,
        rec: Option<&PublishedRecord>,
        ready: bool,
        force: bool,
        reshaped: bool,
    ) -> bool {
        let threshold = self.fold.config().pipeline.republish_threshold;
        match rec {
            None => ready,
            Some(r) if r.permanent => force && ready,
            Some(r) if r.published_at == 0 => ready, // only failures so far
            Some(_) if reshaped => ready,
            Some(r) => {
                r.late_events > 0 && (force || r.late_events as f64 > threshold * r.rows as f64)
            }
        }
    }

    /// What is due for experiment `x` at this watermark, and the dirty windows whose
    /// change must be measured to decide.
    fn due(&self, x: usize, watermark: Option<Timestamp>, force: bool) -> (Due, Vec<Window>) {
        let exp = &self.fold.config().experiments[x];
        let lookback = self.fold.config().pipeline.late_lookback_days;
        let published = self.fold.published(Some(x));
        let reached = |t: Timestamp| watermark.is_some_and(|w| w >= t);
        let mut due = Due::default();
        let mut measure = Vec::new();
        for w in window::windows(exp) {
            let ready = reached(w.complete_at(exp));
            let table = w.statistics_table(exp);
            let (publish, measure_it) = match published.get(&table) {
                None => (ready, false),
                Some(r) if r.permanent => (force && ready, false),
                Some(r) if r.published_at == 0 => (ready, false), // only failures so far
                Some(_) if self.is_reshaped(x, &table) => (ready, false),
                Some(r) if r.late_events == 0 => (false, false),
                // Dirty: everything once the look-back is over (forced), else by measure.
                Some(_) if force && reached(lookback_end(exp, &w, lookback)) => (true, false),
                Some(_) => (false, true),
            };
            if publish {
                due.windows.push(w);
            } else if measure_it {
                measure.push(w);
            }
        }
        let table = enrollments_table(exp);
        let closed = reached(window::enrollment_closed_at(exp));
        due.enrollments = self.needs(
            published.get(&table),
            closed,
            force,
            self.is_reshaped(x, &table),
        );
        (due, measure)
    }

    /// Measures dirty windows of experiment `x` against what was published and returns
    /// those whose row count or a metric sum moved by more than the threshold (and those
    /// found so before, not yet re-published). Windows are measured only in a `round`, and
    /// again only when more late events arrived.
    fn measure_late(
        &mut self,
        x: usize,
        candidates: Vec<Window>,
        round: bool,
    ) -> Result<Vec<Window>, StateError> {
        let exp = self.fold.config().experiments[x].clone();
        let threshold = self.fold.config().pipeline.republish_threshold;
        let mut above = Vec::new();
        let mut todo = Vec::new();
        for w in candidates {
            let table = w.statistics_table(&exp);
            let late = self
                .fold
                .published(Some(x))
                .get(&table)
                .map_or(0, |r| r.late_events);
            match self.late_measured.get(&(x, table)) {
                Some(&(_, true)) => above.push(w),
                Some(&(n, false)) if n == late => {} // nothing new since
                _ if round => todo.push((w, late)),
                _ => {} // waits for the next round
            }
        }
        if todo.is_empty() {
            return Ok(above);
        }
        // One read of the state serves every dirty window: rows are hashed and summed as
        // they are computed, so no table is held and the windows need no chunking.
        self.compact()?;
        let started = Instant::now();
        let windows: Vec<Window> = todo.iter().map(|(w, _)| *w).collect();
        let signatures = materialize::signatures(&exp, self.fold.store(), &windows)?;
        self.times.materialize += started.elapsed();
        self.times.late += started.elapsed();
        for (&(w, late), current) in todo.iter().zip(&signatures) {
            let table = w.statistics_table(&exp);
            let change = match self.fold.store().signature(&exp.slug, &table)? {
                Some(published) => published.change(current),
                None => f64::INFINITY, // published before signatures were kept
            };
            let is_above = change > threshold;
            tracing::info!(
                table,
                late_events = late,
                change,
                threshold,
                republish = is_above,
                "measured a window changed by late data"
            );
            self.late_measured.insert((x, table), (late, is_above));
            if is_above {
                above.push(w);
            }
        }
        Ok(above)
    }

    /// Flushes the fold, makes it durable, and publishes everything due. `force`
    /// re-publishes every dirty window regardless of the threshold.
    pub fn flush_and_publish(
        &mut self,
        watermark: Option<Timestamp>,
        force: bool,
    ) -> Result<PublishReport, StateError> {
        self.flush_and_publish_only(watermark, force, None)
    }

    /// [`Pipeline::flush_and_publish`] for one experiment only (`Some(x)`: its tables,
    /// not the activity sketches), or for everything (`None`).
    pub fn flush_and_publish_only(
        &mut self,
        watermark: Option<Timestamp>,
        force: bool,
        only: Option<usize>,
    ) -> Result<PublishReport, StateError> {
        let started = Instant::now();
        // The batch is written beside the fold; whatever reads state below waits for it.
        self.fold.flush_async()?;
        let took = started.elapsed();
        self.times.flush += took;
        self.metrics.record_flush(&self.fold.stats);
        let mut report = PublishReport::default();
        if self.reshaped.is_none() {
            self.reshaped = Some(self.find_reshaped()?);
        }
        if self.backoff_until.is_some_and(|t| Instant::now() < t) {
            return Ok(report); // the sink is down: keep folding, publish later
        }
        let now = Instant::now();
        let round = force || now.duration_since(self.last_late_round) >= self.late_check_interval;
        if round {
            self.last_late_round = now;
        }
        for x in 0..self.fold.config().experiments.len() {
            if only.is_some_and(|o| o != x) || self.fold.is_retired(x) {
                continue;
            }
            let (mut due, measure) = self.due(x, watermark, force);
            if !measure.is_empty() {
                due.windows.extend(self.measure_late(x, measure, round)?);
            }
            if due.windows.is_empty() && !due.enrollments {
                continue;
            }
            self.fold.sync()?;
            self.fold.store().flush()?; // durable before anything leaves the process
            let mut chunks: Vec<Due> = due
                .windows
                .chunks(WINDOWS_PER_PASS)
                .map(|c| Due {
                    windows: c.to_vec(),
                    ..Default::default()
                })
                .collect();
            match chunks.first_mut() {
                Some(first) => first.enrollments = due.enrollments,
                None => chunks.push(Due {
                    enrollments: due.enrollments,
                    ..Default::default()
                }),
            }
            for chunk in chunks {
                if !self.publish_chunk(x, &chunk, &mut report)? {
                    return Ok(report);
                }
            }
        }
        if only.is_none() {
            self.publish_sketch_days(watermark, force, &mut report)?;
        }
        Ok(report)
    }

    fn publish_chunk(
        &mut self,
        x: usize,
        due: &Due,
        report: &mut PublishReport,
    ) -> Result<bool, StateError> {
        let exp = self.fold.config().experiments[x].clone();
        self.compact()?;
        let started = Instant::now();
        let tables =
            materialize::build(&exp, self.fold.store(), due, &self.fold.config().pipeline)?;
        self.times.materialize += started.elapsed();
        // Aggregate tables precede their statistics table, whose record decides whether
        // the window counts as published: a window is published only when all are. An
        // aggregate table that failed for good parks its window like a failed statistics
        // table: the statistics record keeps the cause until a forced pass retries it.
        let mut window_failed: Option<String> = None;
        let mut rows_of_window = 0u64;
        let mut signature = WindowSignature::default();
        for table in &tables {
            if let TableKind::Aggregates = table.kind {
                signature.add_table(&exp, table);
            }
            let outcome = match (&table.kind, &window_failed) {
                (TableKind::Aggregates, Some(_)) => continue,
                (TableKind::Statistics { .. }, Some(why)) => {
                    let e = PublishError::Permanent {
                        table: table.name.clone(),
                        detail: format!("not published because of a {why}"),
                    };
                    self.record_failure(Some(x), &table.name, e, report)?;
                    Outcome::Failed(String::new())
                }
                (TableKind::Statistics { .. }, None) => {
                    let sig = std::mem::take(&mut signature);
                    self.late_measured.remove(&(x, table.name.clone()));
                    self.publish_one(Some(x), table, rows_of_window, Some(&sig), report)?
                }
                _ => self.publish_one(Some(x), table, table.rows.len() as u64, None, report)?,
            };
            match outcome {
                Outcome::Backoff => return Ok(false),
                Outcome::Failed(why) if matches!(table.kind, TableKind::Aggregates) => {
                    window_failed = Some(why)
                }
                _ => {}
            }
            match table.kind {
                TableKind::Aggregates => {
                    rows_of_window = rows_of_window.max(table.rows.len() as u64)
                }
                TableKind::Statistics { .. } => {
                    window_failed = None;
                    rows_of_window = 0;
                    signature = WindowSignature::default();
                }
                TableKind::Enrollments | TableKind::Sketches => {}
            }
        }
        tracing::info!(experiment = %exp.slug, windows = due.windows.len(), enrollments = due.enrollments, tables = tables.len(), elapsed = ?started.elapsed(), "published");
        Ok(true)
    }

    /// Publishes each day's activity sketches once the watermark has passed the day, and
    /// again when late events touched it.
    fn publish_sketch_days(
        &mut self,
        watermark: Option<Timestamp>,
        force: bool,
        report: &mut PublishReport,
    ) -> Result<bool, StateError> {
        for day in self.fold.store().activity_days()? {
            let name = window::activity_sketches_table(day);
            let ready = watermark.is_some_and(|w| w >= Timestamp::from_day(day.plus(1)));
            let rec = self.fold.published(None).get(&name);
            if !self.needs(rec, ready, force, false) {
                continue;
            }
            self.fold.sync()?;
            self.fold.store().flush()?;
            let started = Instant::now();
            let table = materialize::sketch_table(self.fold.store(), day)?;
            self.times.materialize += started.elapsed();
            if let Outcome::Backoff =
                self.publish_one(None, &table, table.rows.len() as u64, None, report)?
            {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Hands one table to the sink and records the outcome (owner: experiment index, or
    /// None for global tables), with the window's signature for a statistics table. A
    /// transient failure starts the backoff.
    fn publish_one(
        &mut self,
        owner: Option<usize>,
        table: &TableData,
        rows: u64,
        signature: Option<&WindowSignature>,
        report: &mut PublishReport,
    ) -> Result<Outcome, StateError> {
        let started = Instant::now();
        self.metrics.publish_attempts.inc();
        let result = self.sink.publish(table);
        self.times.sink += started.elapsed();
        match result {
            Ok(()) => {
                // The HTTP API serves a window's statistics rows from sled: stored before
                // the record that marks the window published.
                if let (TableKind::Statistics { .. }, Some(x)) = (&table.kind, owner) {
                    let slug = &self.fold.config().experiments[x].slug;
                    crate::health::store_statistics(self.fold.store(), slug, table)?;
                    // What the sink now holds, before the record that clears the late marks.
                    if let Some(sig) = signature {
                        self.fold.store().set_signature(slug, &table.name, sig)?;
                    }
                }
                // The shape the sink now holds, likewise before the record.
                if let Some(x) = owner {
                    let exp = &self.fold.config().experiments[x];
                    let shape = match table.kind {
                        TableKind::Statistics { .. } => Some(materialize::window_shape(exp)),
                        TableKind::Enrollments => Some(materialize::enrollments_shape(exp)),
                        TableKind::Aggregates | TableKind::Sketches => None,
                    };
                    if let Some(shape) = shape {
                        self.fold.store().set_shape(&exp.slug, &table.name, shape)?;
                        if let Some(r) = self.reshaped.as_mut() {
                            r[x].remove(&table.name);
                        }
                    }
                }
                self.metrics.tables_published.inc();
                report.tables += 1;
                report.rows += table.rows.len();
                self.published_tables += 1;
                self.backoff = Duration::ZERO;
                let rec = PublishedRecord {
                    rows,
                    published_at: now_micros(),
                    ..Default::default()
                };
                self.fold.set_published(owner, &table.name, rec)?;
                Ok(Outcome::Published)
            }
            Err(e) => {
                let permanent = matches!(e, PublishError::Permanent { .. });
                let why = e.to_string();
                self.record_failure(owner, &table.name, e, report)?;
                if permanent {
                    return Ok(Outcome::Failed(why));
                }
                // The sink is down or overloaded: stop this pass and back off (capped,
                // with jitter); folding goes on meanwhile.
                self.backoff = (self.backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                let jitter = rand::random_range(0.8..1.2);
                self.backoff_until = Some(Instant::now() + self.backoff.mul_f64(jitter));
                tracing::warn!(backoff = ?self.backoff, "sink unavailable: publishing again after the backoff");
                Ok(Outcome::Backoff)
            }
        }
    }

    fn record_failure(
        &mut self,
        owner: Option<usize>,
        table: &str,
        e: PublishError,
        report: &mut PublishReport,
    ) -> Result<(), StateError> {
        self.publish_failures += 1;
        let kind = match e {
            PublishError::Permanent { .. } => "permanent",
            PublishError::Transient { .. } => "transient",
        };
        self.metrics
            .publish_failures
            .with_label_values(&[kind])
            .inc();
        tracing::error!(table, error = %e, "publication failed");
        report.failures.push(e.to_string());
        let mut rec = self
            .fold
            .published(owner)
            .get(table)
            .cloned()
            .unwrap_or_default();
        rec.failures += 1;
        rec.permanent = matches!(e, PublishError::Permanent { .. });
        rec.last_error = Some(e.to_string());
        self.fold.set_published(owner, table, rec)
    }
}

/// What became of one table's publication.
enum Outcome {
    Published,
    /// Failed permanently (the error, naming the table and the cause), or not attempted
    /// because its window failed.
    Failed(String),
    /// Failed transiently: the pass stops and the pipeline backs off.
    Backoff,
}

/// When a window's look-back ends: `days` after it completed. Until then, late changes
/// below the threshold wait in state.
pub fn lookback_end(exp: &crate::config::Experiment, w: &Window, days: u32) -> Timestamp {
    Timestamp(w.complete_at(exp).0 + i64::from(days) * 86_400_000_000)
}

/// Longest wait between publication attempts while the sink fails.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How often a long-running loop should flush, from config.
pub fn batch_interval(fold: &Fold) -> Duration {
    Duration::from_millis(fold.config().pipeline.batch_millis)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::health::{window_states, WindowPhase};

    const CONFIG: &str = r#"
[pipeline]
replicates = 20

[[experiment]]
slug = "parked"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 1
end_date = "2026-11-04"
periods = ["day", "overall"]

[[experiment]]
slug = "healthy"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 1
end_date = "2026-11-04"
periods = ["day", "overall"]
"#;

    /// Refuses the aggregate tables of experiment `parked` for good while `refuse` is
    /// set, as BigQuery refuses a table it may not write; records every call.
    struct Refusing {
        calls: Arc<Mutex<Vec<String>>>,
        refuse: Arc<AtomicBool>,
    }

    impl Sink for Refusing {
        fn publish(&mut self, table: &TableData) -> Result<(), PublishError> {
            self.calls.lock().unwrap().push(table.name.clone());
            if self.refuse.load(Ordering::Relaxed) && table.name.starts_with("parked_") {
                return Err(PublishError::Permanent {
                    table: table.name.clone(),
                    detail: "HTTP 403 (accessDenied): access denied".into(),
                });
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "refusing".into()
        }
    }

    fn events() -> String {
        let mut lines = Vec::new();
        for (i, branch) in ["control", "treatment", "control", "treatment"]
            .iter()
            .enumerate()
        {
            for slug in ["parked", "healthy"] {
                lines.push(format!(
                    r#"{{"client_id":"c{i}","experiment":"{slug}","branch":"{branch}","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}}"#
                ));
            }
            for day in 1..=3 {
                lines.push(format!(
                    r#"{{"client_id":"c{i}","submission_timestamp":"2026-11-0{day}T12:00:00Z","experiments":{{"parked":"{branch}","healthy":"{branch}"}},"metrics":{{"active_hours":{i}.5}}}}"#
                ));
            }
        }
        lines.join("\n")
    }

    /// The late-change measurement streams rows into signatures: it must give exactly
    /// what building each window's aggregate tables and adding them gives, for all
    /// windows in one pass, and see a late event.
    #[test]
    fn streamed_signatures_equal_those_of_the_built_tables() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/examples/experiment.toml"
        );
        let mut cfg = crate::config::load(std::path::Path::new(path)).unwrap();
        cfg.pipeline.replicates = 10;
        let exp = cfg.experiments[0].clone();
        let mut events = Vec::new();
        let opts = crate::generate::GenerateOptions {
            clients: 300,
            ..Default::default()
        };
        crate::generate::generate(&cfg, &opts, &mut events).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = crate::state::Store::open(&dir.path().join("state"), &cfg).unwrap();
        let mut fold = Fold::new(cfg.clone(), store, &["file:e"]).unwrap();
        for line in events.split(|&b| b == b'\n') {
            if let Ok(ev) = crate::event::decode_json(line, crate::event::Kind::Any, 1 << 20) {
                fold.apply("file:e", 0, &ev);
            }
        }
        let sink = Refusing {
            calls: Arc::default(),
            refuse: Arc::default(),
        };
        fold.flush().unwrap();
        let mut pipeline = Pipeline::new(fold, Box::new(sink));
        pipeline.compact().unwrap();
        let windows = window::windows(&exp);
        assert!(windows.len() > 10, "{}", windows.len());
        let built = |pipeline: &Pipeline, w: Window| {
            let due = Due {
                windows: vec![w],
                enrollments: false,
            };
            let tables =
                materialize::build(&exp, pipeline.fold.store(), &due, &cfg.pipeline).unwrap();
            let mut sig = WindowSignature::default();
            for t in tables
                .iter()
                .filter(|t| matches!(t.kind, TableKind::Aggregates))
            {
                sig.add_table(&exp, t);
            }
            sig
        };
        let streamed = materialize::signatures(&exp, pipeline.fold.store(), &windows).unwrap();
        assert_eq!(streamed.len(), windows.len());
        for (w, sig) in windows.iter().zip(&streamed) {
            assert_eq!(*sig, built(&pipeline, *w), "{w:?}");
            assert!(sig.rows > 250, "{w:?}: {}", sig.rows);
            assert_eq!(sig.sums.len(), 2 * (1 + exp.metrics.len()));
        }

        // One late event of a client moves the overall window's signature (its digest
        // and the sum of active_hours) and leaves a window it does not touch alone.
        use crate::config::Period;
        let overall = *windows
            .iter()
            .find(|w| w.period == Period::Overall)
            .unwrap();
        let day_1 = *windows
            .iter()
            .find(|w| w.period == Period::Day && w.index == 1)
            .unwrap();
        let entry = pipeline
            .fold
            .store()
            .enrollments(&exp.slug)
            .map(|e| e.unwrap())
            .find(|e| e.record.enrolled.is_some())
            .unwrap();
        let enrolled = entry.record.enrolled.unwrap();
        // The client's fourth day: in its overall window, not in its day 1.
        let day = Timestamp(enrolled.timestamp).day().plus(3).date();
        let line = format!(
            r#"{{"client_id":"{}","submission_timestamp":"{day}T01:00:00Z","experiments":{{"{}":"{}"}},"metrics":{{"active_hours":1000.0}}}}"#,
            entry.client_id, exp.slug, enrolled.branch
        );
        let ev =
            crate::event::decode_json(line.as_bytes(), crate::event::Kind::Any, 1 << 20).unwrap();
        assert!(pipeline.fold.apply("file:e", 0, &ev).is_none());
        pipeline.fold.flush().unwrap();
        pipeline.compact().unwrap();
        let after =
            materialize::signatures(&exp, pipeline.fold.store(), &[day_1, overall]).unwrap();
        let before_overall = &streamed[windows.iter().position(|w| *w == overall).unwrap()];
        let before_day_1 = &streamed[windows.iter().position(|w| *w == day_1).unwrap()];
        assert_eq!(after[0], *before_day_1);
        assert_ne!(after[1].digest, before_overall.digest);
        assert!(before_overall.change(&after[1]) > 0.0);
        assert_eq!(after[1], built(&pipeline, overall));
    }

    #[test]
    fn a_permanently_failing_aggregate_table_parks_its_window_until_a_forced_pass() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("c.toml");
        std::fs::write(&cfg_path, CONFIG).unwrap();
        let cfg = crate::config::load(&cfg_path).unwrap();
        let store = crate::state::Store::open(&dir.path().join("state"), &cfg).unwrap();
        let mut fold = Fold::new(cfg.clone(), store, &["file:e"]).unwrap();
        for line in events().lines() {
            let ev = crate::event::decode_json(line.as_bytes(), crate::event::Kind::Any, 1 << 20)
                .unwrap();
            assert!(fold.apply("file:e", 0, &ev).is_none(), "{line}");
        }
        let calls = Arc::new(Mutex::new(Vec::new()));
        let refuse = Arc::new(AtomicBool::new(true));
        let sink = Refusing {
            calls: calls.clone(),
            refuse: refuse.clone(),
        };
        let mut pipeline = Pipeline::new(fold, Box::new(sink));
        let (parked, healthy) = (&cfg.experiments[0], &cfg.experiments[1]);
        let all = window::windows(parked);
        let attempts = |name: &str| calls.lock().unwrap().iter().filter(|c| *c == name).count();

        // The first window completes: the parked experiment's fails, the other publishes.
        let first = Some(all[0].complete_at(parked));
        let report = pipeline.flush_and_publish(first, false).unwrap();
        assert!(!report.failures.is_empty());
        assert_eq!(attempts("parked_enrollments_day_1"), 1);
        assert_eq!(attempts("statistics_healthy_day_1"), 1);

        // Later passes: the other experiment publishes its later windows; the parked
        // window is not rebuilt nor resent, and each later window of the parked
        // experiment is tried once.
        let end = Some(Timestamp(
            all.iter().map(|w| w.complete_at(parked).0).max().unwrap(),
        ));
        for _ in 0..3 {
            pipeline.flush_and_publish(end, false).unwrap();
        }
        for w in &all {
            assert_eq!(attempts(&w.statistics_table(healthy)), 1, "{w:?}");
            assert_eq!(
                attempts(&w.aggregate_table(parked, crate::config::AnalysisBasis::Enrollments)),
                1,
                "{w:?} of the parked experiment was sent again without a forced pass"
            );
            assert_eq!(attempts(&w.statistics_table(parked)), 0, "{w:?}");
        }
        // The cause and the failing table are kept, in the record and in health.
        let states = window_states(parked, pipeline.fold.published(Some(0)), end);
        for s in &states {
            assert_eq!(s.state, WindowPhase::Failed, "{s:?}");
            assert!(s.permanent, "{s:?}");
            let why = s.last_error.as_deref().unwrap();
            assert!(
                why.contains(&s.table.replace("statistics_parked", "parked_enrollments"))
                    && why.contains("access denied"),
                "{why}"
            );
        }
        let healthy_states = window_states(healthy, pipeline.fold.published(Some(1)), end);
        assert!(healthy_states
            .iter()
            .all(|s| s.state == WindowPhase::Published));

        // A forced pass (`finalize`) retries the parked windows; once they go through,
        // they are published.
        refuse.store(false, Ordering::Relaxed);
        pipeline.flush_and_publish(end, true).unwrap();
        for w in &all {
            assert_eq!(attempts(&w.statistics_table(parked)), 1, "{w:?}");
            assert_eq!(attempts(&w.statistics_table(healthy)), 1, "{w:?}");
        }
        let states = window_states(parked, pipeline.fold.published(Some(0)), end);
        assert!(states.iter().all(|s| s.state == WindowPhase::Published));
    }
}
