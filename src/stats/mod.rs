//! Statistics over one window's per-client aggregates (DESIGN.md sections 5 and 6).
//!
//! This first version computes the exact statistics: `count` and `sum` per metric,
//! segment and branch, plus the `identity`/`count` row of clients per branch. The
//! bootstrap statistics (mean, binomial, deciles, empirical CDF, comparisons) come with
//! the statistics engine, behind this same interface.

/// Which statistic, as it appears in the `statistic` column.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatisticKind {
    Mean { drop_highest: f64 },
    Binomial,
    Deciles,
    Count,
    Sum,
    EmpiricalCdf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StatisticSpec {
    pub kind: StatisticKind,
    pub ci_width: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Numeric,
    Boolean,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MetricSpec {
    pub name: String,
    pub metric_type: MetricType,
    pub statistics: Vec<StatisticSpec>,
}

/// Statistics a metric gets when its config names none.
pub fn default_statistics(_name: &str, _t: MetricType) -> Vec<StatisticSpec> {
    vec![
        StatisticSpec {
            kind: StatisticKind::Count,
            ci_width: 0.95,
        },
        StatisticSpec {
            kind: StatisticKind::Sum,
            ci_width: 0.95,
        },
    ]
}

/// One window's per-client aggregates, columnar; row i is one client.
pub struct WindowInput<'a> {
    pub analysis_basis: &'a str,
    pub branches: &'a [String],
    pub segments: &'a [String],
    pub metrics: &'a [MetricSpec],
    pub client_hash: &'a [u64],
    pub branch: &'a [u16],
    pub segment_bits: &'a [u64],
    pub values: &'a [Vec<Option<f64>>],
}

pub struct StatsOptions {
    pub replicates: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    Difference,
    RelativeUplift,
}

impl Comparison {
    pub fn as_str(self) -> &'static str {
        match self {
            Comparison::Difference => "difference",
            Comparison::RelativeUplift => "relative_uplift",
        }
    }
}

/// One row of a statistics table; non-finite values are None.
#[derive(Debug, Clone, PartialEq)]
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

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// Rows for every segment ("all" first), then metric, then statistic, then branch.
pub fn compute(input: &WindowInput, _opts: &StatsOptions) -> Vec<StatisticRow> {
    let nb = input.branches.len();
    let mut rows = Vec::new();
    let segments: Vec<(&str, Option<usize>)> = std::iter::once(("all", None))
        .chain(
            input
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| (s.as_str(), Some(i))),
        )
        .collect();
    for (segment, bit) in segments {
        let member = |i: usize| bit.is_none_or(|b| input.segment_bits[i] & (1 << b) != 0);
        let row = |metric: &str, statistic: &str, branch: usize, point: Option<f64>| StatisticRow {
            segment: segment.to_string(),
            metric: metric.to_string(),
            statistic: statistic.to_string(),
            parameter: None,
            branch: input.branches[branch].clone(),
            comparison: None,
            comparison_to_branch: None,
            ci_width: 0.95,
            point,
            lower: None,
            upper: None,
            analysis_basis: input.analysis_basis.to_string(),
        };
        let mut clients = vec![0u64; nb];
        for (i, &b) in input.branch.iter().enumerate() {
            if member(i) {
                clients[b as usize] += 1;
            }
        }
        for (b, &n) in clients.iter().enumerate() {
            rows.push(row("identity", "count", b, Some(n as f64)));
        }
        for (m, spec) in input.metrics.iter().enumerate() {
            let (mut count, mut sum) = (vec![0u64; nb], vec![0f64; nb]);
            for (i, v) in input.values[m].iter().enumerate() {
                if let (Some(v), true) = (v, member(i)) {
                    let b = input.branch[i] as usize;
                    count[b] += 1;
                    sum[b] += v;
                }
            }
            for st in &spec.statistics {
                let (name, vals): (&str, Vec<Option<f64>>) = match st.kind {
                    StatisticKind::Count => {
                        ("count", count.iter().map(|&c| Some(c as f64)).collect())
                    }
                    StatisticKind::Sum => ("sum", sum.iter().map(|&s| finite(s)).collect()),
                    _ => continue,
                };
                for (b, v) in vals.into_iter().enumerate() {
                    rows.push(row(&spec.name, name, b, v));
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sums_by_segment_and_branch() {
        let branches = ["control".to_string(), "treatment".to_string()];
        let segments = ["win".to_string()];
        let metrics = [MetricSpec {
            name: "x".into(),
            metric_type: MetricType::Numeric,
            statistics: default_statistics("x", MetricType::Numeric),
        }];
        let values = [vec![Some(1.0), Some(2.0), None, Some(4.0)]];
        let input = WindowInput {
            analysis_basis: "enrollments",
            branches: &branches,
            segments: &segments,
            metrics: &metrics,
            client_hash: &[1, 2, 3, 4],
            branch: &[0, 1, 1, 1],
            segment_bits: &[1, 0, 1, 1],
            values: &values,
        };
        let rows = compute(
            &input,
            &StatsOptions {
                replicates: 10,
                seed: 1,
            },
        );
        let get = |seg: &str, metric: &str, stat: &str, branch: &str| {
            rows.iter()
                .find(|r| {
                    r.segment == seg
                        && r.metric == metric
                        && r.statistic == stat
                        && r.branch == branch
                })
                .unwrap()
                .point
        };
        assert_eq!(get("all", "identity", "count", "treatment"), Some(3.0));
        assert_eq!(get("all", "x", "count", "treatment"), Some(2.0));
        assert_eq!(get("all", "x", "sum", "treatment"), Some(6.0));
        assert_eq!(get("win", "identity", "count", "treatment"), Some(2.0));
        assert_eq!(get("win", "x", "sum", "treatment"), Some(4.0));
        assert_eq!(get("win", "x", "sum", "control"), Some(1.0));
        assert_eq!(rows.len(), 2 * (2 + 4));
    }
}
