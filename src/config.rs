//! Experiment and pipeline configuration (DESIGN.md section 4), read from TOML.
//!
//! A config is one TOML file or a directory of them. Each file may hold a `[pipeline]`
//! table (at most one file may) and any number of `[[experiment]]` tables. Loading never
//! stops at the first mistake: every problem is collected with its file, field and what
//! was expected, so `check-config` can print them all at once.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::NaiveDate;
use serde::Deserialize;

/// Data sources, metrics and dimensions every experiment gets unless it opts out.
pub const DEFAULT_DATA_SOURCE: &str = "main";

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}: {}",
            self.file.display(),
            self.field,
            self.message
        )
    }
}

/// All problems of a config; loading fails with this when there is at least one.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem(s)):\n{}", .0.len(), .0.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

/// The validated configuration the pipeline runs on.
#[derive(Debug, Clone)]
pub struct Config {
    pub pipeline: PipelineConfig,
    pub experiments: Vec<Experiment>,
}

/// Settings that are not per experiment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Events older than the newest seen by this much still land in open windows;
    /// the watermark trails the newest event time by it.
    pub allowed_lateness_hours: u32,
    /// Dimensions kept per client for segments and DAU slicing.
    pub dimensions: Vec<String>,
    /// Messages larger than this are rejected as `oversized` before decoding.
    pub max_message_bytes: usize,
    /// A published window is re-published at once when late data changed its row count
    /// or any metric's sum by more than this fraction (0: on any change).
    pub republish_threshold: f64,
    /// Days after a window completes during which smaller late changes wait in state;
    /// the first `finalize` after them publishes whatever changed.
    pub late_lookback_days: u32,
    /// Least time between two measurements of the same dirty window while late events
    /// keep arriving (each reads the window's state; the end of a replay always measures).
    pub late_check_secs: u64,
    /// Days after an experiment's results are final (its end date plus the look-back)
    /// before `finalize` drops its per-client state; sketches are kept.
    pub retention_days: u32,
    /// Memory sled may use to cache state pages (MiB). Materializing a window reads every
    /// enrolled client's record, through this cache.
    pub state_cache_mb: u64,
    /// Events folded in memory before one atomic sled batch is written.
    pub batch_events: usize,
    /// Longest time events wait in memory before their batch is written.
    pub batch_millis: u64,
    /// Bootstrap replicates for the statistics.
    pub replicates: usize,
    /// HyperLogLog precision of the activity sketches (4..=18; 12 gives ~1.6% error).
    pub sketch_precision: u8,
    /// Longest date range one HTTP query may span.
    pub max_query_days: u32,
    /// Most sketch reads one HTTP request may make (a 400 beyond): bounds its work
    /// whatever the mix of series length, window, filters and `group_by`.
    pub max_query_sketches: u64,
    /// HTTP queries whose blocking work may run at once; more wait for a slot.
    pub max_concurrent_queries: usize,
    /// How long a query waits for a slot before it is answered 503.
    pub query_wait_millis: u64,
    /// `POST /v1/experiments/{slug}/finalize` runs at most once per experiment this often.
    pub finalize_min_interval_secs: u64,
    /// Where the capped mean's cap comes from: re-estimated per bootstrap replicate
    /// (calibrated intervals, the default) or once per branch (Jetstream's definition).
    pub mean_cap: crate::stats::CapMode,
    pub kafka: KafkaConfig,
    /// Publish to BigQuery instead of local files (the `--bigquery` flags override it).
    pub bigquery: Option<BigQuerySettings>,
    /// A file holding the HTTP API's bearer token (absolute path; `SLIPSTREAM_TOKEN` wins).
    /// A path rather than the token, so the secret stays out of the config.
    pub token_file: Option<PathBuf>,
}

/// Where and how to publish to BigQuery.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BigQuerySettings {
    /// `PROJECT.DATASET`.
    pub target: String,
    /// Emulator endpoints (plain text, no credentials); unset for Google's.
    pub rest_url: Option<String>,
    pub grpc_url: Option<String>,
    /// Longest one table's publication may take before it is retried later (default 60).
    pub timeout_secs: Option<u64>,
}

impl PipelineConfig {
    /// The sketch layer's settings (validated when the config was loaded).
    pub fn sketch_config(&self) -> crate::sketch::SketchConfig {
        crate::sketch::SketchConfig {
            dimensions: crate::sketch::Dimensions::new(self.dimensions.iter()).expect("validated"),
            precision: crate::sketch::Precision::new(self.sketch_precision).expect("validated"),
            max_range_days: self.max_query_days,
            max_query_sketches: self.max_query_sketches,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            allowed_lateness_hours: 24,
            dimensions: ["os", "channel", "country", "app_version"]
                .map(String::from)
                .to_vec(),
            max_message_bytes: 1 << 20,
            republish_threshold: 0.01,
            late_lookback_days: 3,
            late_check_secs: 300,
            retention_days: 30,
            state_cache_mb: 256,
            batch_events: 50_000,
            batch_millis: 1_000,
            replicates: 1_000,
            mean_cap: crate::stats::CapMode::PerReplicate,
            sketch_precision: 12,
            max_query_days: 366,
            max_query_sketches: 500_000,
            max_concurrent_queries: 8,
            query_wait_millis: 500,
            finalize_min_interval_secs: 60,
            kafka: KafkaConfig::default(),
            bigquery: None,
            token_file: None,
        }
    }
}

/// Topics and their encodings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub enrollments_topic: String,
    pub telemetry_topic: String,
    pub enrollments_format: Format,
    pub telemetry_format: Format,
    pub group_id: String,
    /// A partition that delivered nothing for this long does not hold the watermark back.
    pub idle_partition_millis: u64,
    /// Topic that receives every rejected message (original key and payload, the reason in
    /// a header), delivered before the offsets that passed it are stored. None: only counted.
    pub dead_letter_topic: Option<String>,
    /// Consumer-group session timeout: how soon a dead member's partitions move to the
    /// others (and, on tansu, about twice the wait for a new member's first assignment).
    pub session_timeout_ms: u32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            enrollments_topic: "enrollments".into(),
            telemetry_topic: "telemetry".into(),
            enrollments_format: Format::Json,
            telemetry_format: Format::Json,
            group_id: "slipstream".into(),
            idle_partition_millis: 10_000,
            dead_letter_topic: None,
            session_timeout_ms: 6000,
        }
    }
}

/// Encoding of a topic's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Protobuf,
}

/// Analysis periods (DESIGN.md section 4); names as they appear in table names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Day,
    Week,
    Days28,
    Overall,
}

impl Period {
    pub fn table_name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Days28 => "days28",
            Period::Overall => "overall",
        }
    }
    /// Name of the statistics view that unions this period's tables.
    pub fn view_name(self) -> &'static str {
        match self {
            Period::Day => "daily",
            Period::Week => "weekly",
            Period::Days28 => "days28",
            Period::Overall => "overall",
        }
    }
    pub const ALL: [Period; 4] = [Period::Day, Period::Week, Period::Days28, Period::Overall];
}

/// Whose clock a window counts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnalysisBasis {
    /// Every enrolled client, from its enrollment day.
    Enrollments,
    /// Only exposed clients, from their first exposure day.
    Exposures,
}

impl AnalysisBasis {
    pub fn name(self) -> &'static str {
        match self {
            AnalysisBasis::Enrollments => "enrollments",
            AnalysisBasis::Exposures => "exposures",
        }
    }
}

/// How a metric folds a client's events in a window into one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Sum of the field (FLOAT64; 0 without events).
    Sum,
    /// Events carrying the field, or all events of the data source without a field (INT64).
    Count,
    /// Largest value of the field (FLOAT64; NULL without events).
    Max,
    /// Mean of the field over events carrying it (FLOAT64; NULL without events).
    Mean,
    /// Any event with the field > 0, or any event at all without a field (BOOL).
    Any,
    /// Days with an event with the field > 0, or with any event without a field (INT64).
    Days,
}

/// BigQuery-style column type of a metric's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricValueType {
    Float,
    Int,
    Bool,
}

impl Aggregation {
    pub fn value_type(self) -> MetricValueType {
        match self {
            Aggregation::Sum | Aggregation::Max | Aggregation::Mean => MetricValueType::Float,
            Aggregation::Count | Aggregation::Days => MetricValueType::Int,
            Aggregation::Any => MetricValueType::Bool,
        }
    }
}

/// One metric of an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub data_source: String,
    /// Key in the telemetry event's `metrics` object; None counts events.
    pub field: Option<String>,
    pub aggregation: Aggregation,
    /// Statistics from config (empty: defaults by metric type).
    pub statistics: Vec<crate::stats::StatisticSpec>,
}

/// A branch and its share of enrollment (for the sample-ratio-mismatch test).
#[derive(Debug, Clone, PartialEq)]
pub struct Branch {
    pub name: String,
    pub ratio: f64,
}

/// A boolean per client decided from its enrollment dimensions, e.g. `os = "Windows"`.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub name: String,
    pub expression: String,
    /// Conjunction of clauses: every clause must hold.
    pub clauses: Vec<SegmentClause>,
}

/// One `dimension <op> value` test.
#[derive(Debug, Clone, PartialEq)]
pub enum SegmentClause {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
}

impl Segment {
    /// Whether a client with these enrollment dimensions is in the segment.
    pub fn matches<'a>(&self, dims: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.clauses.iter().all(|c| match c {
            SegmentClause::Equals(d, v) => dims(d) == Some(v.as_str()),
            SegmentClause::NotEquals(d, v) => dims(d) != Some(v.as_str()),
            SegmentClause::In(d, vs) => dims(d).is_some_and(|x| vs.iter().any(|v| v == x)),
        })
    }
}

/// A validated experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub slug: String,
    pub branches: Vec<Branch>,
    pub reference_branch: String,
    pub enrollment_start: NaiveDate,
    /// Days of enrollment, at least 1.
    pub enrollment_period: u32,
    /// Telemetry after this date is outside every window.
    pub end_date: NaiveDate,
    pub analysis_bases: Vec<AnalysisBasis>,
    pub periods: Vec<Period>,
    pub segments: Vec<Segment>,
    pub metrics: Vec<Metric>,
    /// Seeds the bootstrap weights, so results do not depend on processing order.
    pub seed: u64,
}

impl Experiment {
    /// Last day a client can enroll (inclusive).
    pub fn last_enrollment_date(&self) -> NaiveDate {
        self.enrollment_start + chrono::Days::new(u64::from(self.enrollment_period) - 1)
    }
    /// Days every client completes: from the last enrollment date to the end date.
    pub fn analysis_length_days(&self) -> u32 {
        (self.end_date - self.last_enrollment_date())
            .num_days()
            .max(0) as u32
    }
    /// Slug as it appears in table names: non-alphanumerics become `_`.
    pub fn table_slug(&self) -> String {
        normalize_slug(&self.slug)
    }
    pub fn branch_index(&self, name: &str) -> Option<usize> {
        self.branches.iter().position(|b| b.name == name)
    }
    /// Data sources used by the metrics, sorted and unique (the flag columns follow it).
    pub fn data_sources(&self) -> Vec<String> {
        let set: BTreeSet<&str> = self
            .metrics
            .iter()
            .map(|m| m.data_source.as_str())
            .collect();
        set.into_iter().map(String::from).collect()
    }
}

/// Slug normalization for table names.
pub fn normalize_slug(slug: &str) -> String {
    slug.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// Metrics every experiment gets (config adds to them or overrides one by name).
pub fn default_metrics() -> Vec<Metric> {
    let m = |name: &str, field: Option<&str>, aggregation| Metric {
        name: name.into(),
        data_source: DEFAULT_DATA_SOURCE.into(),
        field: field.map(String::from),
        aggregation,
        statistics: Vec::new(),
    };
    vec![
        m("active_hours", Some("active_hours"), Aggregation::Sum),
        m("uri_count", Some("uri_count"), Aggregation::Sum),
        m("search_count", Some("search_count"), Aggregation::Sum),
        m("days_of_use", None, Aggregation::Days),
        m("retained", None, Aggregation::Any),
    ]
}

// ---- raw (file) shapes ---------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    pipeline: Option<PipelineConfig>,
    #[serde(default)]
    experiment: Vec<RawExperiment>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExperiment {
    slug: Option<String>,
    branches: Option<Vec<RawBranch>>,
    reference_branch: Option<String>,
    enrollment_start: Option<String>,
    enrollment_period: Option<i64>,
    end_date: Option<String>,
    analysis_bases: Option<Vec<AnalysisBasis>>,
    periods: Option<Vec<Period>>,
    #[serde(default)]
    segments: Vec<RawSegment>,
    #[serde(default)]
    metrics: Vec<RawMetric>,
    #[serde(default = "yes")]
    default_metrics: bool,
    seed: Option<u64>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawBranch {
    Name(String),
    Weighted { name: String, ratio: Option<f64> },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    name: String,
    #[serde(rename = "where")]
    expression: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    data_source: Option<String>,
    field: Option<String>,
    aggregation: Aggregation,
    #[serde(default)]
    statistics: Vec<RawStatistic>,
}

/// `"mean"`, or `{ kind = "mean", ci_width = 0.9, drop_highest = 0.01 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawStatistic {
    Name(String),
    Table(RawStatisticTable),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatisticTable {
    kind: String,
    ci_width: Option<f64>,
    drop_highest: Option<f64>,
}

/// Validates one statistic of a metric.
fn statistic_spec(raw: &RawStatistic) -> Result<crate::stats::StatisticSpec, String> {
    use crate::stats::{StatisticKind, StatisticSpec};
    let (kind, ci_width, drop_highest) = match raw {
        RawStatistic::Name(n) => (n.as_str(), None, None),
        RawStatistic::Table(t) => (t.kind.as_str(), t.ci_width, t.drop_highest),
    };
    let drop = drop_highest.unwrap_or(crate::stats::DEFAULT_DROP_HIGHEST);
    if !(0.0..0.5).contains(&drop) {
        return Err(format!(
            "drop_highest {drop}; expected a fraction in 0..0.5"
        ));
    }
    let kind = match kind {
        "mean" => StatisticKind::Mean { drop_highest: drop },
        "binomial" => StatisticKind::Binomial,
        "deciles" => StatisticKind::Deciles,
        "count" => StatisticKind::Count,
        "sum" => StatisticKind::Sum,
        "empirical_cdf" => StatisticKind::EmpiricalCdf,
        other => {
            return Err(format!(
                "`{other}` is unknown; expected one of {STATISTICS:?}"
            ))
        }
    };
    if drop_highest.is_some() && !matches!(kind, StatisticKind::Mean { .. }) {
        return Err("drop_highest applies to `mean` only".into());
    }
    let mut spec = StatisticSpec::new(kind);
    if let Some(w) = ci_width {
        if !(w > 0.0 && w < 1.0) {
            return Err(format!(
                "ci_width {w}; expected a fraction strictly between 0 and 1, e.g. 0.95"
            ));
        }
        spec.ci_width = w;
    }
    Ok(spec)
}

/// Statistic names accepted in a metric's `statistics` list.
pub const STATISTICS: [&str; 6] = [
    "mean",
    "binomial",
    "deciles",
    "count",
    "sum",
    "empirical_cdf",
];

/// Loads and validates a config file or a directory of `*.toml` files.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let mut problems = Vec::new();
    let files = match config_files(path) {
        Ok(f) => f,
        Err(p) => return Err(ConfigErrors(vec![p])),
    };
    let mut pipeline: Option<(PathBuf, PipelineConfig)> = None;
    let mut experiments: Vec<Experiment> = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(problem(&file, "(file)", format!("cannot read: {e}")));
                continue;
            }
        };
        let raw: RawFile = match toml::from_str(&text) {
            Ok(r) => r,
            Err(e) => {
                problems.push(problem(&file, "(syntax)", toml_error(&e)));
                continue;
            }
        };
        if let Some(p) = raw.pipeline {
            if let Some((first, _)) = &pipeline {
                problems.push(problem(
                    &file,
                    "pipeline",
                    format!(
                        "a [pipeline] table is already set in {}; expected at most one",
                        first.display()
                    ),
                ));
            } else {
                validate_pipeline(&file, &p, &mut problems);
                pipeline = Some((file.clone(), p));
            }
        }
        for (i, raw) in raw.experiment.into_iter().enumerate() {
            let at = format!("experiment[{i}]");
            if let Some(exp) = validate_experiment(&file, &at, raw, &mut problems) {
                if experiments
                    .iter()
                    .any(|e| e.table_slug() == exp.table_slug())
                {
                    problems.push(problem(
                        &file,
                        &format!("{at}.slug"),
                        format!("`{}` is defined twice (or collides after normalization); expected unique slugs", exp.slug),
                    ));
                } else {
                    experiments.push(exp);
                }
            }
        }
    }
    if experiments.is_empty() && problems.is_empty() {
        problems.push(problem(
            path,
            "experiment",
            "no [[experiment]] defined; expected at least one".into(),
        ));
    }
    if !problems.is_empty() {
        return Err(ConfigErrors(problems));
    }
    Ok(Config {
        pipeline: pipeline.map(|(_, p)| p).unwrap_or_default(),
        experiments,
    })
}

fn config_files(path: &Path) -> Result<Vec<PathBuf>, ConfigProblem> {
    let meta = std::fs::metadata(path).map_err(|e| {
        problem(
            path,
            "(file)",
            format!("cannot read: {e}; expected a TOML file or a directory of them"),
        )
    })?;
    if !meta.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| problem(path, "(directory)", format!("cannot list: {e}")))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(problem(
            path,
            "(directory)",
            "holds no *.toml file; expected at least one".into(),
        ));
    }
    Ok(files)
}

fn problem(file: &Path, field: &str, message: String) -> ConfigProblem {
    ConfigProblem {
        file: file.to_path_buf(),
        field: field.to_string(),
        message,
    }
}

fn toml_error(e: &toml::de::Error) -> String {
    // The toml crate's Display already names the line, column and the expected value.
    e.to_string().trim_end().replace('\n', "\n    ")
}

fn validate_pipeline(file: &Path, p: &PipelineConfig, problems: &mut Vec<ConfigProblem>) {
    if !(0.0..=1.0).contains(&p.republish_threshold) {
        problems.push(problem(
            file,
            "pipeline.republish_threshold",
            format!(
                "{} is out of range; expected a fraction in 0..=1",
                p.republish_threshold
            ),
        ));
    }
    if !(16..=1 << 20).contains(&p.state_cache_mb) {
        problems.push(problem(
            file,
            "pipeline.state_cache_mb",
            format!("{}; expected 16 to 1048576 (MiB)", p.state_cache_mb),
        ));
    }
    if p.batch_events == 0 {
        problems.push(problem(
            file,
            "pipeline.batch_events",
            "0; expected at least 1".into(),
        ));
    }
    if p.max_message_bytes < 64 {
        problems.push(problem(
            file,
            "pipeline.max_message_bytes",
            format!("{}; expected at least 64", p.max_message_bytes),
        ));
    }
    if p.replicates < 10 || p.replicates > 100_000 {
        problems.push(problem(
            file,
            "pipeline.replicates",
            format!("{}; expected 10..=100000", p.replicates),
        ));
    }
    if let Err(e) = crate::sketch::Precision::new(p.sketch_precision) {
        problems.push(problem(
            file,
            "pipeline.sketch_precision",
            format!("{e}; expected 4..=18 (12 is the default)"),
        ));
    }
    if let Err(e) = crate::sketch::Dimensions::new(p.dimensions.iter()) {
        problems.push(problem(file, "pipeline.dimensions", format!("{e}")));
    }
    if !(1..=3660).contains(&p.max_query_days) {
        problems.push(problem(
            file,
            "pipeline.max_query_days",
            format!("{}; expected 1..=3660", p.max_query_days),
        ));
    }
    if !(100..=1_000_000_000).contains(&p.max_query_sketches) {
        problems.push(problem(
            file,
            "pipeline.max_query_sketches",
            format!(
                "{}; expected 100..=1000000000 (500000 is the default)",
                p.max_query_sketches
            ),
        ));
    }
    if !(1..=1024).contains(&p.max_concurrent_queries) {
        problems.push(problem(
            file,
            "pipeline.max_concurrent_queries",
            format!(
                "{}; expected 1..=1024 (8 is the default)",
                p.max_concurrent_queries
            ),
        ));
    }
    if p.query_wait_millis > 30_000 {
        problems.push(problem(
            file,
            "pipeline.query_wait_millis",
            format!(
                "{}; expected 0..=30000 (a wait past the 30 s request timeout is never used)",
                p.query_wait_millis
            ),
        ));
    }
    if !(1000..=300_000).contains(&p.kafka.session_timeout_ms) {
        problems.push(problem(
            file,
            "pipeline.kafka.session_timeout_ms",
            format!(
                "{}; expected 1000..=300000 (milliseconds; 6000 is the default)",
                p.kafka.session_timeout_ms
            ),
        ));
    }
    if let Some(t) = &p.kafka.dead_letter_topic {
        let k = &p.kafka;
        if let Err(why) = check_topic_name(t) {
            problems.push(problem(
                file,
                "pipeline.kafka.dead_letter_topic",
                format!("{t:?} {why}"),
            ));
        } else if *t == k.enrollments_topic || *t == k.telemetry_topic {
            problems.push(problem(
                file,
                "pipeline.kafka.dead_letter_topic",
                format!("{t:?} is also an input topic; expected a topic of its own (rejects would be read again)"),
            ));
        }
    }
    let mut seen = BTreeSet::new();
    for d in &p.dimensions {
        if d.is_empty() || !seen.insert(d) {
            problems.push(problem(
                file,
                "pipeline.dimensions",
                format!("`{d}` is empty or repeated; expected distinct names"),
            ));
        }
    }
    if let Some(Err(e)) = p.token_file.as_deref().map(crate::http::read_token_file) {
        problems.push(problem(file, "pipeline.token_file", e));
    }
}

/// Kafka's rule for topic names: 1..=249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn check_topic_name(t: &str) -> Result<(), &'static str> {
    if t.is_empty() || t.len() > 249 || t == "." || t == ".." {
        return Err("is not a valid topic name; expected 1 to 249 characters, not `.` or `..`");
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("is not a valid topic name; expected only letters, digits, `.`, `_` and `-`");
    }
    Ok(())
}

fn parse_date(
    file: &Path,
    field: &str,
    v: Option<&str>,
    problems: &mut Vec<ConfigProblem>,
) -> Option<NaiveDate> {
    match v {
        None => {
            problems.push(problem(
                file,
                field,
                "missing; expected a date like \"2026-11-01\"".into(),
            ));
            None
        }
        // Exactly YYYY-MM-DD: chrono also takes `+262142-12-31`, where date arithmetic
        // (`NaiveDate + Days`, `Day::date`) overflows and panics.
        Some(s) => match NaiveDate::parse_from_str(s, "%Y-%m-%d") {
            Ok(d) if s.len() == 10 => Some(d),
            _ => {
                problems.push(problem(
                    file,
                    field,
                    format!("\"{s}\" is not a date; expected YYYY-MM-DD"),
                ));
                None
            }
        },
    }
}

fn validate_experiment(
    file: &Path,
    at: &str,
    raw: RawExperiment,
    problems: &mut Vec<ConfigProblem>,
) -> Option<Experiment> {
    let before = problems.len();
    let slug = match raw.slug {
        Some(s) if !s.is_empty() && s.len() <= 200 => s,
        Some(s) => {
            problems.push(problem(
                file,
                &format!("{at}.slug"),
                format!("\"{s}\" is empty or longer than 200 characters"),
            ));
            String::new()
        }
        None => {
            problems.push(problem(
                file,
                &format!("{at}.slug"),
                "missing; expected the experiment slug, e.g. \"bug-12345-slug\"".into(),
            ));
            String::new()
        }
    };
    let at = if slug.is_empty() {
        at.to_string()
    } else {
        format!("{at} ({slug})")
    };
    let branches: Vec<Branch> = raw
        .branches
        .unwrap_or_default()
        .into_iter()
        .map(|b| match b {
            RawBranch::Name(name) => Branch { name, ratio: 1.0 },
            RawBranch::Weighted { name, ratio } => Branch {
                name,
                ratio: ratio.unwrap_or(1.0),
            },
        })
        .collect();
    if branches.len() < 2 {
        problems.push(problem(
            file,
            &format!("{at}.branches"),
            format!(
                "{} branch(es); expected at least two, e.g. [\"control\", \"treatment\"]",
                branches.len()
            ),
        ));
    }
    let mut names = BTreeSet::new();
    for b in &branches {
        if b.name.is_empty() || !names.insert(b.name.as_str()) {
            problems.push(problem(
                file,
                &format!("{at}.branches"),
                format!(
                    "branch `{}` is empty or repeated; expected distinct names",
                    b.name
                ),
            ));
        }
        if !(b.ratio.is_finite() && b.ratio > 0.0) {
            problems.push(problem(
                file,
                &format!("{at}.branches"),
                format!(
                    "branch `{}` has ratio {}; expected a positive number",
                    b.name, b.ratio
                ),
            ));
        }
    }
    let reference_branch = raw.reference_branch.unwrap_or_else(|| "control".into());
    if !branches.is_empty() && !names.contains(reference_branch.as_str()) {
        problems.push(problem(
            file,
            &format!("{at}.reference_branch"),
            format!(
                "`{reference_branch}` is not a branch; expected one of {:?}",
                names
            ),
        ));
    }
    let start = parse_date(
        file,
        &format!("{at}.enrollment_start"),
        raw.enrollment_start.as_deref(),
        problems,
    );
    let end = parse_date(
        file,
        &format!("{at}.end_date"),
        raw.end_date.as_deref(),
        problems,
    );
    let period = match raw.enrollment_period {
        Some(p) if (1..=365).contains(&p) => p as u32,
        Some(p) => {
            problems.push(problem(
                file,
                &format!("{at}.enrollment_period"),
                format!("{p}; expected a number of days in 1..=365"),
            ));
            1
        }
        None => {
            problems.push(problem(
                file,
                &format!("{at}.enrollment_period"),
                "missing; expected a number of days, e.g. 7".into(),
            ));
            1
        }
    };
    if let (Some(s), Some(e)) = (start, end) {
        let last = s
            .checked_add_days(chrono::Days::new(u64::from(period) - 1))
            .unwrap_or(NaiveDate::MAX);
        if e <= last {
            problems.push(problem(
                file,
                &format!("{at}.end_date"),
                format!(
                    "{e} is not after the last enrollment date {last}; expected a later end date"
                ),
            ));
        } else if (e - last).num_days() > 366 {
            problems.push(problem(
                file,
                &format!("{at}.end_date"),
                format!("{e} is more than a year after enrollment; expected at most 366 days"),
            ));
        }
    }
    let analysis_bases = dedup(
        raw.analysis_bases
            .unwrap_or_else(|| vec![AnalysisBasis::Enrollments]),
    );
    if analysis_bases.is_empty() {
        problems.push(problem(
            file,
            &format!("{at}.analysis_bases"),
            "empty; expected [\"enrollments\"] and/or \"exposures\"".into(),
        ));
    }
    let periods = dedup(
        raw.periods
            .unwrap_or_else(|| vec![Period::Day, Period::Week, Period::Overall]),
    );
    if periods.is_empty() {
        problems.push(problem(
            file,
            &format!("{at}.periods"),
            "empty; expected some of \"day\", \"week\", \"days28\", \"overall\"".into(),
        ));
    }
    let mut segments = Vec::new();
    for (i, s) in raw.segments.into_iter().enumerate() {
        let field = format!("{at}.segments[{i}]");
        if s.name.is_empty()
            || s.name == "all"
            || segments.iter().any(|x: &Segment| x.name == s.name)
        {
            problems.push(problem(
                file,
                &format!("{field}.name"),
                format!("`{}` is empty, reserved (\"all\") or repeated", s.name),
            ));
        }
        match parse_segment(&s.expression) {
            Ok(clauses) => segments.push(Segment {
                name: s.name,
                expression: s.expression,
                clauses,
            }),
            Err(why) => problems.push(problem(file, &format!("{field}.where"), why)),
        }
    }
    let mut metrics = if raw.default_metrics {
        default_metrics()
    } else {
        Vec::new()
    };
    for (i, m) in raw.metrics.into_iter().enumerate() {
        let field = format!("{at}.metrics[{i}]");
        if m.name.is_empty()
            || !m
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || m.name.starts_with(|c: char| c.is_ascii_digit())
        {
            problems.push(problem(
                file,
                &format!("{field}.name"),
                format!(
                    "`{}` is not a column name; expected letters, digits and _",
                    m.name
                ),
            ));
        }
        let mut statistics = Vec::new();
        for (i, s) in m.statistics.iter().enumerate() {
            match statistic_spec(s) {
                Ok(spec) => statistics.push(spec),
                Err(why) => problems.push(problem(file, &format!("{field}.statistics[{i}]"), why)),
            }
        }
        let needs_field = matches!(
            m.aggregation,
            Aggregation::Sum | Aggregation::Max | Aggregation::Mean
        );
        if needs_field && m.field.is_none() {
            problems.push(problem(
                file,
                &format!("{field}.field"),
                format!(
                    "missing; aggregation {:?} needs the `metrics` key to read",
                    m.aggregation
                ),
            ));
        }
        let metric = Metric {
            name: m.name,
            data_source: m.data_source.unwrap_or_else(|| DEFAULT_DATA_SOURCE.into()),
            field: m.field,
            aggregation: m.aggregation,
            statistics,
        };
        if let Some(existing) = metrics.iter_mut().find(|x| x.name == metric.name) {
            *existing = metric; // config overrides a default of the same name
        } else {
            metrics.push(metric);
        }
    }
    if metrics.is_empty() {
        problems.push(problem(
            file,
            &format!("{at}.metrics"),
            "no metrics (default_metrics = false and none listed); expected at least one".into(),
        ));
    }
    let reserved = [
        "client_id",
        "branch",
        "enrollment_date",
        "exposure_date",
        "num_enrollment_events",
        "num_exposure_events",
        "analysis_window_start",
        "analysis_window_end",
    ];
    for m in &metrics {
        if reserved.contains(&m.name.as_str()) || segments.iter().any(|s| s.name == m.name) {
            problems.push(problem(
                file,
                &format!("{at}.metrics"),
                format!(
                    "metric `{}` collides with another column; expected a distinct name",
                    m.name
                ),
            ));
        }
    }
    if problems.len() > before {
        return None;
    }
    let seed = raw
        .seed
        .unwrap_or_else(|| xxhash_rust::xxh3::xxh3_64(slug.as_bytes()));
    Some(Experiment {
        slug,
        branches,
        reference_branch,
        enrollment_start: start?,
        enrollment_period: period,
        end_date: end?,
        analysis_bases,
        periods,
        segments,
        metrics,
        seed,
    })
}

fn dedup<T: Ord + Copy>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

/// Parses `os = "Windows" and channel != "beta" and country in ["DE", "FR"]`.
pub fn parse_segment(expr: &str) -> Result<Vec<SegmentClause>, String> {
    let expected = "expected clauses like `os = \"Windows\"`, `channel != \"beta\"` or `country in [\"DE\", \"FR\"]` joined by `and`";
    let mut clauses = Vec::new();
    for part in split_and(expr) {
        let part = part.trim();
        let clause = if let Some((d, v)) = part.split_once("!=") {
            SegmentClause::NotEquals(ident(d)?, quoted(v)?)
        } else if let Some((d, v)) = part.split_once('=') {
            SegmentClause::Equals(ident(d)?, quoted(v)?)
        } else if let Some(idx) = part.find(" in ") {
            let (d, rest) = part.split_at(idx);
            let list = rest[4..].trim();
            let inner = list
                .strip_prefix('[')
                .and_then(|l| l.strip_suffix(']'))
                .ok_or_else(|| format!("`{part}`: the list must be in [ ]; {expected}"))?;
            let values = inner
                .split(',')
                .map(quoted)
                .collect::<Result<Vec<_>, _>>()?;
            SegmentClause::In(ident(d)?, values)
        } else {
            return Err(format!("`{part}` is not a clause; {expected}"));
        };
        clauses.push(clause);
    }
    if clauses.is_empty() {
        return Err(format!("empty; {expected}"));
    }
    Ok(clauses)
}

fn split_and(expr: &str) -> Vec<&str> {
    // Values are quoted, so " and " inside quotes would be rare; split outside quotes only.
    let mut parts = Vec::new();
    let (mut start, mut in_quote) = (0, false);
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_quote = !in_quote,
            b' ' if !in_quote && expr[i..].starts_with(" and ") => {
                parts.push(&expr[start..i]);
                i += 5;
                start = i;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    if !expr[start..].trim().is_empty() {
        parts.push(&expr[start..]);
    }
    parts
}

fn ident(s: &str) -> Result<String, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a dimension name; expected letters, digits and _"
        ))
    }
}

fn quoted(s: &str) -> Result<String, String> {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .map(String::from)
        .ok_or_else(|| format!("`{s}` is not a quoted value; expected \"...\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const GOOD: &str = r#"
[[experiment]]
slug = "bug-1-slug"
branches = ["control", { name = "treatment", ratio = 1.0 }]
enrollment_start = "2026-11-01"
enrollment_period = 7
end_date = "2026-12-06"
segments = [{ name = "windows", where = 'os = "Windows"' }]
metrics = [{ name = "tabs", field = "tab_count", aggregation = "max" }]
"#;

    #[test]
    fn good_config_gets_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = load(&write(dir.path(), "a.toml", GOOD)).unwrap();
        let e = &cfg.experiments[0];
        assert_eq!(e.reference_branch, "control");
        assert_eq!(
            e.last_enrollment_date(),
            NaiveDate::from_ymd_opt(2026, 11, 7).unwrap()
        );
        assert_eq!(e.analysis_length_days(), 29);
        assert_eq!(e.metrics.len(), 6);
        assert_eq!(e.table_slug(), "bug_1_slug");
        assert_eq!(e.periods, vec![Period::Day, Period::Week, Period::Overall]);
        assert_eq!(cfg.pipeline.allowed_lateness_hours, 24);
    }

    #[test]
    fn dead_letter_topic_must_be_a_valid_topic_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let with = |topic: &str| {
            let text = format!("[pipeline.kafka]\ndead_letter_topic = {topic:?}\n{GOOD}");
            load(&write(dir.path(), "dl.toml", &text))
        };
        let cfg = with("rejects").unwrap();
        assert_eq!(
            cfg.pipeline.kafka.dead_letter_topic.as_deref(),
            Some("rejects")
        );
        for (bad, needle) in [
            ("", "1 to 249"),
            ("..", "1 to 249"),
            ("a b", "only letters"),
            ("telemetry", "also an input topic"),
        ] {
            let err = with(bad).unwrap_err();
            assert!(
                err.0
                    .iter()
                    .any(|p| p.field == "pipeline.kafka.dead_letter_topic"
                        && p.message.contains(needle)),
                "{bad:?}: {err}"
            );
        }
        let cfg = load(&write(dir.path(), "dl.toml", GOOD)).unwrap();
        assert_eq!(cfg.pipeline.kafka.dead_letter_topic, None);
    }

    #[test]
    fn http_query_limits_are_validated() {
        let dir = tempfile::tempdir().unwrap();
        let with = |line: &str| {
            let text = format!("[pipeline]\n{line}\n{GOOD}");
            load(&write(dir.path(), "q.toml", &text))
        };
        let cfg = with("max_query_sketches = 1000").unwrap();
        assert_eq!(cfg.pipeline.sketch_config().max_query_sketches, 1000);
        for (line, field, needle) in [
            (
                "max_query_sketches = 10",
                "max_query_sketches",
                "100..=1000000000",
            ),
            (
                "max_concurrent_queries = 0",
                "max_concurrent_queries",
                "1..=1024",
            ),
            (
                "query_wait_millis = 60000",
                "query_wait_millis",
                "0..=30000",
            ),
        ] {
            let err = with(line).unwrap_err();
            assert!(
                err.0
                    .iter()
                    .any(|p| p.field == format!("pipeline.{field}") && p.message.contains(needle)),
                "{line}: {err}"
            );
        }
        let cfg = with("max_concurrent_queries = 2\nquery_wait_millis = 0").unwrap();
        assert_eq!(
            (
                cfg.pipeline.max_concurrent_queries,
                cfg.pipeline.query_wait_millis
            ),
            (2, 0)
        );
    }

    #[test]
    fn every_problem_is_reported_with_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let bad = r#"
[[experiment]]
slug = "x"
branches = ["control"]
reference_branch = "nope"
enrollment_start = "2026-13-01"
enrollment_period = 0
end_date = "2026-12-06"
segments = [{ name = "w", where = 'os ~ "Windows"' }]
metrics = [{ name = "bad name", aggregation = "sum", statistics = ["median"] }]
"#;
        let file = write(dir.path(), "bad.toml", bad);
        let err = load(&file).unwrap_err();
        let fields: Vec<&str> = err.0.iter().map(|p| p.field.as_str()).collect();
        for f in [
            "branches",
            "reference_branch",
            "enrollment_start",
            "enrollment_period",
            "segments[0].where",
            "metrics[0].name",
            "metrics[0].statistics[0]",
        ] {
            assert!(
                fields.iter().any(|x| x.ends_with(f)),
                "missing {f} in {fields:?}"
            );
        }
        assert!(err.0.iter().all(|p| p.file == file));
    }

    #[test]
    fn unknown_keys_and_syntax_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "t.toml",
            "[[experiment]]\nslug = \"a\"\nbranchez = []\n",
        );
        let msg = load(&file).unwrap_err().to_string();
        assert!(msg.contains("branchez") && msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn statistics_by_name_or_with_ci_width() {
        let dir = tempfile::tempdir().unwrap();
        let text = GOOD.replace(
            r#"aggregation = "max" }"#,
            r#"aggregation = "max", statistics = ["count", { kind = "mean", ci_width = 0.9, drop_highest = 0.01 }] }"#,
        );
        let cfg = load(&write(dir.path(), "a.toml", &text)).unwrap();
        let m = cfg.experiments[0]
            .metrics
            .iter()
            .find(|m| m.name == "tabs")
            .unwrap();
        assert_eq!(m.statistics.len(), 2);
        assert_eq!(m.statistics[1].ci_width, 0.9);
        assert_eq!(
            m.statistics[1].kind,
            crate::stats::StatisticKind::Mean { drop_highest: 0.01 }
        );
        let bad = GOOD.replace(
            r#"aggregation = "max" }"#,
            r#"aggregation = "max", statistics = [{ kind = "sum", ci_width = 1.5 }] }"#,
        );
        let err = load(&write(dir.path(), "b.toml", &bad))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("statistics[0]") && err.contains("ci_width 1.5"),
            "{err}"
        );
    }

    #[test]
    fn segments_parse_and_match() {
        let c =
            parse_segment(r#"os = "Windows" and country in ["DE", "FR"] and channel != "beta""#)
                .unwrap();
        let seg = Segment {
            name: "s".into(),
            expression: String::new(),
            clauses: c,
        };
        let dims = |os: &'static str, country: &'static str| {
            move |d: &str| match d {
                "os" => Some(os),
                "country" => Some(country),
                _ => None,
            }
        };
        assert!(seg.matches(dims("Windows", "DE")));
        assert!(!seg.matches(dims("Linux", "DE")));
        assert!(!seg.matches(dims("Windows", "US")));
    }

    #[test]
    fn directory_of_files_and_duplicate_slug() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.toml", GOOD);
        write(dir.path(), "b.toml", GOOD);
        let err = load(dir.path()).unwrap_err();
        assert!(err.to_string().contains("defined twice"), "{err}");
    }
}
