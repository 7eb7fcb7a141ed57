//! Statistics for one analysis window: Jetstream's statistics built from mergeable summaries.
//!
//! # Layout
//! - [`weights`]: Bayesian-bootstrap weights as a hash of (seed, client, replicate).
//! - [`exact`]: order-independent exact sums of f64 values.
//! - [`sketch`]: the mergeable quantile summary (log-linear histogram, bounded relative error).
//! - [`summary`]: the two mergeable per-partition summaries and the plan between them:
//!   [`DistributionSummary`] (phase 1: counts, sums, quantile sketches) → [`BootstrapPlan`]
//!   (caps, quantization, decile windows, derived from the merged phase 1) →
//!   [`BootstrapSummary`] (phase 2: exact integer replicate sums).
//! - [`finish`]: turns merged summaries into [`StatisticRow`]s.
//! - [`srm`]: sample ratio mismatch.
//!
//! # Two phases, and why
//! The capped mean needs each branch's 99.5th percentile before any replicate sum can be
//! formed, so a window is summarized twice: phase 1 over all partitions, merged, then phase 2
//! over all partitions with the plan derived from the merged phase 1, merged, then finished.
//! [`compute`] does both over one in-memory window. Every merge adds integers or combines
//! min/max, so any split of the clients, merged in any order, gives bit-identical rows.
//!
//! # Definitions (per segment, branch and metric; NULL and non-finite values are skipped)
//! - `mean`: values above the `1 - drop_highest` quantile of the (segment, branch) are capped
//!   at it (capped, not dropped). The quantile is read from the sketch: exact when the
//!   neighbouring order statistics are (small inputs, integers), else within 2^-10 relative;
//!   since the capped mean is monotone in the cap, it lies between the capped means at the
//!   exact cap · (1 ± 2^-10). Replicate r's mean is `Σ w(i,r) x_i / Σ w(i,r)` with the weights
//!   of [`weights`]; values enter as fixed-point numbers on a grid of `B · 2^-26`, where B is
//!   the largest |value| after capping over the branch's segments and mean variants (absolute
//!   error ≤ B · 2^-27, e.g. 1.5e-8 hours for a 10-hour cap; a `drop_highest = 0` mean next to
//!   a capped one makes B the uncapped maximum for both). Point = mean of replicate means,
//!   interval = percentiles (linear interpolation) of replicate means.
//!   That is [`CapMode::Fixed`], Jetstream's definition (`cap_mode = "fixed"`). Its intervals ignore
//!   the cap's own sampling variability, which matters for heavy tails: there, 95% intervals
//!   cover about 92% (calibration test; the influence of the estimated cap adds ~9% to the
//!   standard error for a lognormal(0, 1)). [`CapMode::PerReplicate`] re-estimates the cap in
//!   each replicate as the weighted quantile `min{x : F_r(x) >= 1 - drop_highest}` at bucket
//!   resolution (values in slots above the cap's bucket are replaced by the cap's bucket
//!   value; within 2^-9 relative of the exact weighted quantile) and covers 94-96%: it is
//!   the default (of the configuration and of [`StatsOptions`]), since the issue's
//!   calibration bound (93-97%) rules the fixed cap out for heavy tails.
//! - `binomial`: k = number of non-zero values, n = number of values; point (k+1)/(n+2),
//!   interval from Beta(k+1, n-k+1) quantiles; comparison replicates are Beta draws by inverse
//!   CDF at uniforms hashed from (seed, segment, metric, branch, replicate).
//! - `deciles`: point = the quantile from the sketch (numpy's linear interpolation; exact when
//!   the sketch is, else within 0.1% relative, see [`sketch`]); replicate r's decile is the
//!   weighted quantile `min{x : F_r(x) >= q}` with the same weights, read at bucket resolution
//!   in a window of ±(4σ + 2) ranks around the decile (σ = sqrt(q(1-q)n)); a replicate outside
//!   the window (probability about 6e-5) is clamped to its edge, which leaves the 2.5% and
//!   97.5% percentiles unchanged unless more than 2.5% of replicates are clamped.
//! - `count`: number of non-NULL values; `sum`: their exact sum rounded once. Point only.
//! - `empirical_cdf`: 256 grid points from the segment's min to max over all branches (one
//!   point when min = max); point = fraction of the branch's values <= x (a sketch bucket
//!   straddling x is counted by linear interpolation: error ≤ that bucket's share).
//! - `identity`/`count`: clients per segment and branch, 0 for an empty branch.
//! - Comparisons (`mean`, `binomial`, `deciles`) for every ordered pair (focus, reference):
//!   `difference` = focus - reference and `relative_uplift` = focus / reference - 1 over paired
//!   replicates; point = their mean (Jetstream's `exp`), interval = their percentiles.
//!
//! # Edge cases (documented outputs)
//! - Empty branch (no values): its rows and every comparison involving it have NULL point,
//!   lower and upper (count and sum are 0, identity count is 0).
//! - One client, or zero variance: every replicate equals the value, so point = lower = upper
//!   = the value (on the fixed-point grid); difference intervals collapse likewise.
//! - Reference mean 0 (or any replicate with reference 0): relative uplift is non-finite in a
//!   replicate, and a comparison row with any non-finite replicate has NULL point/lower/upper.
//! - Any other non-finite result (e.g. a sum beyond f64 range) becomes NULL.
//!
//! # Sizes
//! Phase 1 holds, per (segment, branch, metric), the non-empty sketch buckets (at most 512
//! per binary octave of values). Phase 2 holds per replicate and (segment, branch, metric):
//! one i128 per mean variant, one u64 of weight, one u64 per decile slot (buckets in the
//! decile windows plus gaps; ~250 per (branch, metric) for 500k continuous values per branch)
//! and, with per-replicate caps, one i128 per slot of the cap region. For the benchmark window
//! (1M clients, 10 metrics, 3 segments, 1,000 replicates) that is ~130 MB, mostly slots.
//!
//! # Row order (deterministic)
//! For each segment ("all", then configured order): identity count per branch; then for each
//! metric (config order), each statistic (config order), each parameter (ascending), each
//! branch (config order): the branch row, then for each other branch as reference (config
//! order) its `difference` row and its `relative_uplift` row.

pub mod exact;
pub mod finish;
pub mod sketch;
pub mod srm;
pub mod summary;
pub mod weights;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use srm::{sample_ratio_mismatch, Srm};
pub use summary::{BootstrapPlan, BootstrapSummary, DistributionSummary};

/// Which statistic, as it appears in the `statistic` column.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum StatisticKind {
    /// Bayesian-bootstrap mean after capping values above the `1 - drop_highest` quantile.
    Mean { drop_highest: f64 },
    /// Beta-posterior proportion of non-zero values.
    Binomial,
    /// The 0.1 .. 0.9 quantiles, with bootstrap intervals.
    Deciles,
    /// Number of non-NULL values.
    Count,
    /// Sum of the values.
    Sum,
    /// F(x) on a 256-point grid.
    EmpiricalCdf,
}

impl StatisticKind {
    /// The name in the `statistic` column.
    pub fn name(&self) -> &'static str {
        match self {
            StatisticKind::Mean { .. } => "mean",
            StatisticKind::Binomial => "binomial",
            StatisticKind::Deciles => "deciles",
            StatisticKind::Count => "count",
            StatisticKind::Sum => "sum",
            StatisticKind::EmpiricalCdf => "empirical_cdf",
        }
    }
}

/// One statistic to publish for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatisticSpec {
    pub kind: StatisticKind,
    /// Width of the central interval, 0.95 by default.
    pub ci_width: f64,
}

impl StatisticSpec {
    /// A statistic with the default 0.95 interval.
    pub fn new(kind: StatisticKind) -> Self {
        Self {
            kind,
            ci_width: 0.95,
        }
    }
}

/// Jetstream's default cap: the top 0.5% is capped at the 99.5th percentile.
pub const DEFAULT_DROP_HIGHEST: f64 = 0.005;

/// Whether values are numbers or booleans (0/1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetricType {
    Numeric,
    Boolean,
}

/// A metric and the statistics published for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricSpec {
    pub name: String,
    pub metric_type: MetricType,
    pub statistics: Vec<StatisticSpec>,
}

/// Defaults by metric type: Boolean -> binomial; Numeric -> mean, deciles; a metric named
/// `days_of_use` also empirical_cdf.
pub fn default_statistics(name: &str, t: MetricType) -> Vec<StatisticSpec> {
    let mut v = match t {
        MetricType::Boolean => vec![StatisticSpec::new(StatisticKind::Binomial)],
        MetricType::Numeric => vec![
            StatisticSpec::new(StatisticKind::Mean {
                drop_highest: DEFAULT_DROP_HIGHEST,
            }),
            StatisticSpec::new(StatisticKind::Deciles),
        ],
    };
    if name == "days_of_use" {
        v.push(StatisticSpec::new(StatisticKind::EmpiricalCdf));
    }
    v
}

/// One window's per-client aggregates, columnar. Row i is one client.
#[derive(Clone, Copy, Debug)]
pub struct WindowInput<'a> {
    pub analysis_basis: &'a str,
    /// Configured branches, in config order.
    pub branches: &'a [String],
    /// Configured segment names; "all" is implicit and always first in the output.
    pub segments: &'a [String],
    pub metrics: &'a [MetricSpec],
    /// Stable 64-bit hash of client_id (the caller computes it); seeds the client's weights.
    pub client_hash: &'a [u64],
    /// Index into `branches`.
    pub branch: &'a [u16],
    /// Bit s set = client in `segments[s]`.
    pub segment_bits: &'a [u64],
    /// `values[m][i]`: metric m of client i (bool as 0/1); None = NULL, skipped.
    pub values: &'a [Vec<Option<f64>>],
}

impl WindowInput<'_> {
    /// Number of clients.
    pub fn len(&self) -> usize {
        self.client_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.client_hash.is_empty()
    }

    /// Checks that the columns agree with each other and with the configuration.
    pub fn validate(&self) -> Result<(), StatsError> {
        let n = self.len();
        if self.branch.len() != n || self.segment_bits.len() != n {
            return Err(StatsError::ColumnLength {
                column: "branch/segment_bits".into(),
                expected: n,
            });
        }
        if self.values.len() != self.metrics.len() {
            return Err(StatsError::MetricCount {
                values: self.values.len(),
                metrics: self.metrics.len(),
            });
        }
        for (m, v) in self.values.iter().enumerate() {
            if v.len() != n {
                return Err(StatsError::ColumnLength {
                    column: self.metrics[m].name.clone(),
                    expected: n,
                });
            }
        }
        if self.segments.len() > 63 {
            return Err(StatsError::TooManySegments(self.segments.len()));
        }
        if self.branches.is_empty() || self.branches.len() > u16::MAX as usize {
            return Err(StatsError::BranchCount(self.branches.len()));
        }
        if let Some(&b) = self
            .branch
            .iter()
            .find(|&&b| b as usize >= self.branches.len())
        {
            return Err(StatsError::BranchIndex {
                index: b,
                branches: self.branches.len(),
            });
        }
        let mask = if self.segments.is_empty() {
            0
        } else {
            u64::MAX >> (64 - self.segments.len())
        };
        if self.segment_bits.iter().any(|&s| s & !mask != 0) {
            return Err(StatsError::SegmentBits {
                segments: self.segments.len(),
            });
        }
        Ok(())
    }
}

/// Input that cannot be analysed, with what was expected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsError {
    #[error("column {column} has the wrong length: expected one value per client ({expected})")]
    ColumnLength { column: String, expected: usize },
    #[error("{values} value columns for {metrics} metrics: expected one column per metric")]
    MetricCount { values: usize, metrics: usize },
    #[error("{0} segments: at most 63 are supported")]
    TooManySegments(usize),
    #[error("{0} branches: expected between 1 and 65535")]
    BranchCount(usize),
    #[error("branch index {index} out of range: {branches} branches are configured")]
    BranchIndex { index: u16, branches: usize },
    #[error("segment bits beyond the {segments} configured segments")]
    SegmentBits { segments: usize },
    #[error(
        "summaries of different layouts (branches, segments, metrics or replicates) cannot be merged"
    )]
    LayoutMismatch,
}

/// Options of a statistics run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsOptions {
    /// Bootstrap replicates (Jetstream uses 10,000; 1,000 here by default).
    pub replicates: usize,
    /// Experiment seed: the same seed gives the same weights, hence the same rows.
    pub seed: u64,
    /// Worker threads for the bootstrap (1 = on the calling thread).
    pub threads: usize,
    /// Where the capped mean's cap is estimated (see [`CapMode`]).
    pub cap_mode: CapMode,
}

/// Where the cap of a capped mean comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CapMode {
    /// Jetstream's definition: the cap is the branch's quantile, computed once; replicates
    /// reweight the capped values. The interval ignores the cap's own sampling variability,
    /// so it is too narrow for heavy tails (95% intervals cover ~92%; see the calibration test).
    Fixed,
    /// The default: the cap is re-estimated in every replicate as the weighted
    /// `1 - drop_highest` quantile (at sketch-bucket resolution), so the interval accounts
    /// for the cap's variability and is calibrated for heavy tails too (94-96% coverage).
    /// The point is the mean of these replicate means.
    #[default]
    PerReplicate,
}

impl Default for StatsOptions {
    fn default() -> Self {
        Self {
            replicates: 1000,
            seed: 0,
            threads: 2,
            cap_mode: CapMode::default(),
        }
    }
}

/// Kind of a comparison row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Comparison {
    Difference,
    RelativeUplift,
}

impl Comparison {
    /// The name in the `comparison` column.
    pub fn name(&self) -> &'static str {
        match self {
            Comparison::Difference => "difference",
            Comparison::RelativeUplift => "relative_uplift",
        }
    }
}

/// One row of `statistics_<slug>_<period>_<index>` (DESIGN.md section 5). Non-finite values
/// never appear: they are None.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatisticRow {
    pub segment: String,
    pub metric: String,
    pub statistic: String,
    pub parameter: Option<f64>,
    pub branch: String,
    pub comparison: Option<Comparison>,
    pub comparison_to_branch: Option<String>,
    pub ci_width: f64,
    pub point: Option<f64>,
    pub lower: Option<f64>,
    pub upper: Option<f64>,
    pub analysis_basis: String,
}

/// All statistics of one window, in the documented row order. Panics on invalid input (see
/// [`WindowInput::validate`]; use [`try_compute`] to get the error instead).
pub fn compute(input: &WindowInput, opts: &StatsOptions) -> Vec<StatisticRow> {
    try_compute(input, opts).unwrap_or_else(|e| panic!("invalid statistics input: {e}"))
}

/// [`compute`] returning invalid input as an error.
pub fn try_compute(
    input: &WindowInput,
    opts: &StatsOptions,
) -> Result<Vec<StatisticRow>, StatsError> {
    let dist = DistributionSummary::from_input(input)?;
    let plan = BootstrapPlan::new(dist, opts);
    let boot = BootstrapSummary::from_input(input, &plan)?;
    finish::rows(&plan, &boot, input.analysis_basis)
}
