//! Tests across the module: hand-computed values, determinism and merging, agreement with a
//! straightforward implementation of the same definitions, and calibration by simulation.

use super::finish::percentile;
use super::weights::{client_key, weight_units, WEIGHT_SCALE};
use super::*;

/// splitmix64, for deterministic test data.
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// Owned columns of a window, lending a [`WindowInput`].
#[derive(Clone)]
pub(crate) struct Window {
    pub branches: Vec<String>,
    pub segments: Vec<String>,
    pub metrics: Vec<MetricSpec>,
    pub client_hash: Vec<u64>,
    pub branch: Vec<u16>,
    pub segment_bits: Vec<u64>,
    pub values: Vec<Vec<Option<f64>>>,
}

impl Window {
    fn new(branches: &[&str], segments: &[&str], metrics: Vec<MetricSpec>) -> Self {
        let nm = metrics.len();
        Self {
            branches: branches.iter().map(|s| s.to_string()).collect(),
            segments: segments.iter().map(|s| s.to_string()).collect(),
            metrics,
            client_hash: vec![],
            branch: vec![],
            segment_bits: vec![],
            values: vec![vec![]; nm],
        }
    }

    fn push(&mut self, hash: u64, branch: u16, bits: u64, values: &[Option<f64>]) {
        self.client_hash.push(hash);
        self.branch.push(branch);
        self.segment_bits.push(bits);
        for (m, v) in values.iter().enumerate() {
            self.values[m].push(*v);
        }
    }

    fn input(&self) -> WindowInput<'_> {
        WindowInput {
            analysis_basis: "enrollments",
            branches: &self.branches,
            segments: &self.segments,
            metrics: &self.metrics,
            client_hash: &self.client_hash,
            branch: &self.branch,
            segment_bits: &self.segment_bits,
            values: &self.values,
        }
    }

    /// The clients whose index satisfies `keep`.
    fn subset(&self, keep: impl Fn(usize) -> bool) -> Window {
        let idx: Vec<usize> = (0..self.client_hash.len()).filter(|&i| keep(i)).collect();
        let mut w = self.clone();
        w.client_hash = idx.iter().map(|&i| self.client_hash[i]).collect();
        w.branch = idx.iter().map(|&i| self.branch[i]).collect();
        w.segment_bits = idx.iter().map(|&i| self.segment_bits[i]).collect();
        w.values = self
            .values
            .iter()
            .map(|c| idx.iter().map(|&i| c[i]).collect())
            .collect();
        w
    }
}

fn metric(name: &str, t: MetricType, kinds: &[StatisticKind]) -> MetricSpec {
    MetricSpec {
        name: name.into(),
        metric_type: t,
        statistics: kinds.iter().map(|&k| StatisticSpec::new(k)).collect(),
    }
}

fn find<'a>(
    rows: &'a [StatisticRow],
    seg: &str,
    metric: &str,
    stat: &str,
    param: Option<f64>,
    branch: &str,
    cmp: Option<(Comparison, &str)>,
) -> &'a StatisticRow {
    rows.iter()
        .find(|r| {
            r.segment == seg
                && r.metric == metric
                && r.statistic == stat
                && r.parameter == param
                && r.branch == branch
                && r.comparison == cmp.map(|c| c.0)
                && r.comparison_to_branch.as_deref() == cmp.map(|c| c.1)
        })
        .unwrap_or_else(|| panic!("no row {seg} {metric} {stat} {param:?} {branch} {cmp:?}"))
}

/// Rows as bits, so that equality is bit-for-bit.
fn bits(rows: &[StatisticRow]) -> Vec<String> {
    let b = |x: Option<f64>| x.map(f64::to_bits);
    rows.iter()
        .map(|r| {
            format!(
                "{}|{}|{}|{:?}|{}|{:?}|{:?}|{}|{:?}|{:?}|{:?}|{}",
                r.segment,
                r.metric,
                r.statistic,
                b(r.parameter),
                r.branch,
                r.comparison,
                r.comparison_to_branch,
                r.ci_width.to_bits(),
                b(r.point),
                b(r.lower),
                b(r.upper),
                r.analysis_basis
            )
        })
        .collect()
}

const MEAN: StatisticKind = StatisticKind::Mean {
    drop_highest: DEFAULT_DROP_HIGHEST,
};

#[test]
fn hand_computed_counts_sums_deciles_and_identity() {
    let mut w = Window::new(
        &["control", "treatment", "empty"],
        &["windows"],
        vec![metric(
            "uri_count",
            MetricType::Numeric,
            &[
                StatisticKind::Count,
                StatisticKind::Sum,
                StatisticKind::Deciles,
                StatisticKind::EmpiricalCdf,
            ],
        )],
    );
    // control: 1..=10 (odd ones on windows); treatment: 2, 4, NULL, 8.
    for i in 1..=10 {
        w.push(i, 0, i % 2, &[Some(i as f64)]);
    }
    w.push(100, 1, 1, &[Some(2.0)]);
    w.push(101, 1, 0, &[Some(4.0)]);
    w.push(102, 1, 1, &[None]);
    w.push(103, 1, 1, &[Some(8.0)]);
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: 200,
            seed: 1,
            threads: 1,
            ..Default::default()
        },
    );
    let pt = |seg, stat, param, br| find(&rows, seg, "uri_count", stat, param, br, None).point;
    let id = |seg, br| find(&rows, seg, "identity", "count", None, br, None).point;
    assert_eq!(id("all", "control"), Some(10.0));
    assert_eq!(id("all", "treatment"), Some(4.0));
    assert_eq!(id("all", "empty"), Some(0.0));
    assert_eq!(id("windows", "control"), Some(5.0));
    assert_eq!(id("windows", "treatment"), Some(3.0));
    assert_eq!(pt("all", "count", None, "control"), Some(10.0));
    assert_eq!(pt("all", "count", None, "treatment"), Some(3.0));
    assert_eq!(pt("all", "count", None, "empty"), Some(0.0));
    assert_eq!(pt("all", "sum", None, "control"), Some(55.0));
    assert_eq!(pt("windows", "sum", None, "control"), Some(25.0));
    assert_eq!(pt("windows", "sum", None, "treatment"), Some(10.0));
    assert_eq!(pt("all", "sum", None, "empty"), Some(0.0));
    let r = find(&rows, "all", "uri_count", "sum", None, "control", None);
    assert_eq!(
        (r.lower, r.upper, r.comparison.is_none()),
        (None, None, true)
    );
    // numpy.quantile([1..10], q) = 1 + 9q; quantile([2, 4, 8], 0.5) = 4, 0.1 -> 2.4
    for d in 1..=9 {
        let q = d as f64 / 10.0;
        let p = pt("all", "deciles", Some(q), "control").unwrap();
        assert!((p - (1.0 + 9.0 * q)).abs() < 1e-12, "{q}: {p}");
    }
    assert_eq!(pt("all", "deciles", Some(0.5), "treatment"), Some(4.0));
    assert!((pt("all", "deciles", Some(0.1), "treatment").unwrap() - 2.4).abs() < 1e-12);
    // windows/control = 1, 3, 5, 7, 9: median 5.
    assert_eq!(pt("windows", "deciles", Some(0.5), "control"), Some(5.0));
    let empty = find(
        &rows,
        "all",
        "uri_count",
        "deciles",
        Some(0.5),
        "empty",
        None,
    );
    assert_eq!((empty.point, empty.lower, empty.upper), (None, None, None));
    let cmp = find(
        &rows,
        "all",
        "uri_count",
        "deciles",
        Some(0.5),
        "treatment",
        Some((Comparison::Difference, "empty")),
    );
    assert_eq!(cmp.point, None);
    // ECDF grid over all branches: min 1, max 10 → x_j = 1 + 9j/255; F_control(10) = 1.
    assert_eq!(pt("all", "empirical_cdf", Some(1.0), "control"), Some(0.1));
    assert_eq!(pt("all", "empirical_cdf", Some(10.0), "control"), Some(1.0));
    assert_eq!(
        pt("all", "empirical_cdf", Some(10.0), "treatment"),
        Some(1.0)
    );
    assert_eq!(
        pt("all", "empirical_cdf", Some(1.0), "treatment"),
        Some(0.0)
    );
    let grid: Vec<f64> = rows
        .iter()
        .filter(|r| r.statistic == "empirical_cdf" && r.segment == "all" && r.branch == "control")
        .map(|r| r.parameter.unwrap())
        .collect();
    assert_eq!(grid.len(), 256);
}

#[test]
fn ecdf_on_integer_grid_is_exact() {
    let mut w = Window::new(
        &["control"],
        &[],
        vec![metric(
            "days_of_use",
            MetricType::Numeric,
            &[StatisticKind::EmpiricalCdf],
        )],
    );
    for i in 0..256u64 {
        w.push(i, 0, 0, &[Some(i as f64)]);
    }
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: 10,
            seed: 1,
            threads: 1,
            ..Default::default()
        },
    );
    let ecdf: Vec<_> = rows
        .iter()
        .filter(|r| r.statistic == "empirical_cdf")
        .collect();
    assert_eq!(ecdf.len(), 256);
    for (j, r) in ecdf.iter().enumerate() {
        assert_eq!(r.parameter, Some(j as f64));
        assert_eq!(r.point, Some((j + 1) as f64 / 256.0));
    }
}

#[test]
fn binomial_matches_published_beta_intervals() {
    let mut w = Window::new(
        &["a", "b"],
        &[],
        vec![metric(
            "retained",
            MetricType::Boolean,
            &[StatisticKind::Binomial],
        )],
    );
    for i in 0..10 {
        w.push(i, 0, 0, &[Some(0.0)]); // a: 0 of 10
        w.push(100 + i, 1, 0, &[Some((i < 5) as u8 as f64)]); // b: 5 of 10
    }
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: 1000,
            seed: 3,
            threads: 1,
            ..Default::default()
        },
    );
    let a = find(&rows, "all", "retained", "binomial", None, "a", None);
    // Beta(1, 11): closed form quantile 1 - (1 - p)^(1/11); 95% interval [0.0022990, 0.2849142].
    assert_eq!(a.point, Some(1.0 / 12.0));
    assert!((a.lower.unwrap() - (1.0 - 0.975f64.powf(1.0 / 11.0))).abs() < 1e-9);
    assert!((a.upper.unwrap() - (1.0 - 0.025f64.powf(1.0 / 11.0))).abs() < 1e-9);
    assert!(
        (a.lower.unwrap() - 0.002_299_0).abs() < 1e-7
            && (a.upper.unwrap() - 0.284_914_2).abs() < 1e-7
    );
    // Beta(6, 6): qbeta(0.025, 6, 6) = 0.2337936 (R), symmetric upper 0.7662064.
    let b = find(&rows, "all", "retained", "binomial", None, "b", None);
    assert_eq!(b.point, Some(0.5));
    assert!(
        (b.lower.unwrap() - 0.233_793_6).abs() < 1e-6,
        "{:?}",
        b.lower
    );
    assert!(
        (b.upper.unwrap() - 0.766_206_4).abs() < 1e-6,
        "{:?}",
        b.upper
    );
    // Independent check: P(Beta(a, b) <= x) = P(Binomial(a + b - 1, x) >= a).
    let binom_tail = |n: u64, k: u64, p: f64| -> f64 {
        (k..=n)
            .map(|j| {
                statrs::function::factorial::binomial(n, j)
                    * p.powi(j as i32)
                    * (1.0 - p).powi((n - j) as i32)
            })
            .sum()
    };
    assert!((binom_tail(11, 6, b.lower.unwrap()) - 0.025).abs() < 1e-9);
    assert!((binom_tail(11, 1, a.upper.unwrap()) - 0.975).abs() < 1e-9);
    // Comparison b - a by draws: centred near E[b] - E[a] = 0.5 - 1/12.
    let d = find(
        &rows,
        "all",
        "retained",
        "binomial",
        None,
        "b",
        Some((Comparison::Difference, "a")),
    );
    assert!((d.point.unwrap() - 0.41).abs() < 0.03, "{:?}", d.point);
    assert!(d.lower.unwrap() > 0.0 && d.upper.unwrap() < 0.8);
    let e = find(
        &rows,
        "all",
        "retained",
        "binomial",
        None,
        "a",
        Some((Comparison::RelativeUplift, "b")),
    );
    assert!(e.point.unwrap() < 0.0);
}

#[test]
fn capping_at_the_99_5th_percentile() {
    let mut w = Window::new(
        &["control"],
        &[],
        vec![metric("active_hours", MetricType::Numeric, &[MEAN])],
    );
    // 199 ones and one 1000: quantile(0.995) = x[198] + 0.005 (x[199] - x[198]) = 5.995.
    for i in 0..199 {
        w.push(i, 0, 0, &[Some(1.0)]);
    }
    w.push(199, 0, 0, &[Some(1000.0)]);
    let opts = StatsOptions {
        replicates: 500,
        seed: 9,
        threads: 1,
        cap_mode: CapMode::Fixed, // the cap of Jetstream's definition, computed once
    };
    let dist = DistributionSummary::from_input(&w.input()).unwrap();
    let plan = BootstrapPlan::new(dist, &opts);
    let p = plan.metric_plan(0, 0).unwrap();
    assert!((p.precap - 5.995).abs() < 1e-9, "{}", p.precap);
    let rows = compute(&w.input(), &opts);
    let r = find(&rows, "all", "active_hours", "mean", None, "control", None);
    // The same bootstrap over the capped values, computed directly.
    let capped: Vec<(u64, f64)> = (0..200)
        .map(|i| (i, if i == 199 { 5.995 } else { 1.0 }))
        .collect();
    let reps = reference_mean_replicates(&capped, 9, 500);
    let point = reps.iter().sum::<f64>() / reps.len() as f64;
    assert!(
        (r.point.unwrap() - point).abs() < 1e-9,
        "{:?} vs {point}",
        r.point
    );
    // Uncapped, the mean would be near 5.995 only by chance: check that it is near 1.025.
    assert!((r.point.unwrap() - (199.0 + 5.995) / 200.0).abs() < 0.03);
}

#[test]
fn edge_cases_one_client_zero_variance_reference_zero() {
    let mut w = Window::new(
        &["a", "b", "c", "d"],
        &[],
        vec![metric("x", MetricType::Numeric, &[MEAN])],
    );
    w.push(1, 0, 0, &[Some(3.5)]); // a: one client
    for i in 0..50 {
        w.push(10 + i, 1, 0, &[Some(2.25)]); // b: zero variance
        w.push(100 + i, 2, 0, &[Some(0.0)]); // c: all zero
    }
    // d: empty
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: 100,
            seed: 5,
            threads: 1,
            ..Default::default()
        },
    );
    let g = |br, cmp| {
        let r = find(&rows, "all", "x", "mean", None, br, cmp);
        (r.point, r.lower, r.upper)
    };
    assert_eq!(g("a", None), (Some(3.5), Some(3.5), Some(3.5)));
    assert_eq!(g("b", None), (Some(2.25), Some(2.25), Some(2.25)));
    assert_eq!(g("c", None), (Some(0.0), Some(0.0), Some(0.0)));
    assert_eq!(g("d", None), (None, None, None));
    assert_eq!(
        g("a", Some((Comparison::Difference, "b"))),
        (Some(1.25), Some(1.25), Some(1.25))
    );
    assert_eq!(
        g("a", Some((Comparison::RelativeUplift, "b"))),
        (
            Some(3.5 / 2.25 - 1.0),
            Some(3.5 / 2.25 - 1.0),
            Some(3.5 / 2.25 - 1.0)
        )
    );
    // Reference mean 0: relative uplift is NULL, the difference is fine.
    assert_eq!(
        g("a", Some((Comparison::RelativeUplift, "c"))),
        (None, None, None)
    );
    assert_eq!(
        g("a", Some((Comparison::Difference, "c"))),
        (Some(3.5), Some(3.5), Some(3.5))
    );
    assert_eq!(
        g("c", Some((Comparison::Difference, "d"))),
        (None, None, None)
    );
    assert_eq!(
        g("d", Some((Comparison::Difference, "a"))),
        (None, None, None)
    );
    // Every ordered pair: 4 branches x (1 + 3 x 2) rows.
    assert_eq!(rows.iter().filter(|r| r.metric == "x").count(), 4 * 7);
}

#[test]
fn row_order_is_as_documented() {
    let mut w = Window::new(
        &["control", "treatment"],
        &["s1"],
        vec![
            metric("x", MetricType::Numeric, &[MEAN, StatisticKind::Count]),
            metric("y", MetricType::Boolean, &[StatisticKind::Binomial]),
        ],
    );
    for i in 0..20 {
        w.push(
            i,
            (i % 2) as u16,
            (i % 3 == 0) as u64,
            &[Some(i as f64), Some((i % 5 == 0) as u8 as f64)],
        );
    }
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: 50,
            seed: 1,
            threads: 1,
            ..Default::default()
        },
    );
    let keys: Vec<String> = rows
        .iter()
        .take(13)
        .map(|r| {
            format!(
                "{} {} {} {} {:?} {:?}",
                r.segment,
                r.metric,
                r.statistic,
                r.branch,
                r.comparison.map(|c| c.name()),
                r.comparison_to_branch
            )
        })
        .collect();
    assert_eq!(
        keys,
        vec![
            "all identity count control None None",
            "all identity count treatment None None",
            "all x mean control None None",
            "all x mean control Some(\"difference\") Some(\"treatment\")",
            "all x mean control Some(\"relative_uplift\") Some(\"treatment\")",
            "all x mean treatment None None",
            "all x mean treatment Some(\"difference\") Some(\"control\")",
            "all x mean treatment Some(\"relative_uplift\") Some(\"control\")",
            "all x count control None None",
            "all x count treatment None None",
            "all y binomial control None None",
            "all y binomial control Some(\"difference\") Some(\"treatment\")",
            "all y binomial control Some(\"relative_uplift\") Some(\"treatment\")",
        ]
    );
    assert_eq!(rows.len(), 2 * (2 + 6 + 2 + 6));
    assert_eq!(rows[16].segment, "s1");
}

/// A window with every statistic, nulls, several segments and heavy tails.
fn rich_window(n: usize, seed: u64) -> Window {
    let mut w = Window::new(
        &["control", "treatment", "other"],
        &["windows", "release", "new"],
        vec![
            MetricSpec {
                name: "active_hours".into(),
                metric_type: MetricType::Numeric,
                statistics: default_statistics("active_hours", MetricType::Numeric),
            },
            MetricSpec {
                name: "days_of_use".into(),
                metric_type: MetricType::Numeric,
                statistics: default_statistics("days_of_use", MetricType::Numeric),
            },
            MetricSpec {
                name: "retained".into(),
                metric_type: MetricType::Boolean,
                statistics: default_statistics("retained", MetricType::Boolean),
            },
            metric(
                "revenue",
                MetricType::Numeric,
                &[
                    StatisticKind::Mean { drop_highest: 0.0 },
                    StatisticKind::Mean { drop_highest: 0.05 },
                    StatisticKind::Sum,
                    StatisticKind::Count,
                ],
            ),
        ],
    );
    let mut rng = Rng(seed);
    for _ in 0..n {
        let h = rng.next();
        let b = (rng.next() % 3) as u16;
        let bits = rng.next() & 7;
        let ah = if rng.uniform() < 0.3 {
            0.0
        } else {
            (rng.normal() * 1.3).exp()
        };
        let du = (rng.uniform() * 29.0).floor();
        let ret = (rng.uniform() < 0.6) as u8 as f64;
        let rev = -10.0 + 5.0 / rng.uniform().powf(0.7);
        let null = rng.uniform() < 0.05;
        w.push(
            h,
            b,
            bits,
            &[
                Some(ah),
                if null { None } else { Some(du) },
                Some(ret),
                Some(rev),
            ],
        );
    }
    w
}

#[test]
fn same_input_twice_and_any_thread_count_give_identical_rows() {
    let w = rich_window(3000, 11);
    let a = compute(
        &w.input(),
        &StatsOptions {
            replicates: 300,
            seed: 4,
            threads: 1,
            ..Default::default()
        },
    );
    let b = compute(
        &w.input(),
        &StatsOptions {
            replicates: 300,
            seed: 4,
            threads: 2,
            ..Default::default()
        },
    );
    let c = compute(
        &w.input(),
        &StatsOptions {
            replicates: 300,
            seed: 4,
            threads: 3,
            ..Default::default()
        },
    );
    assert_eq!(bits(&a), bits(&b));
    assert_eq!(bits(&a), bits(&c));
    // A different seed changes the bootstrap.
    let d = compute(
        &w.input(),
        &StatsOptions {
            replicates: 300,
            seed: 5,
            threads: 1,
            ..Default::default()
        },
    );
    assert_ne!(bits(&a), bits(&d));
    // No non-finite value anywhere, and the expected statistics are all present.
    assert!(a.iter().all(|r| {
        [r.point, r.lower, r.upper]
            .iter()
            .flatten()
            .all(|x| x.is_finite())
    }));
    for s in [
        "mean",
        "deciles",
        "binomial",
        "empirical_cdf",
        "sum",
        "count",
    ] {
        assert!(a.iter().any(|r| r.statistic == s), "{s}");
    }
}

#[test]
fn partitions_merged_in_any_order_equal_one_pass() {
    for cap_mode in [CapMode::Fixed, CapMode::PerReplicate] {
        partitions_merged_equal_one_pass(cap_mode);
    }
}

fn partitions_merged_equal_one_pass(cap_mode: CapMode) {
    let w = rich_window(4000, 12);
    let opts = StatsOptions {
        replicates: 200,
        seed: 8,
        threads: 1,
        cap_mode,
    };
    let one = compute(&w.input(), &opts);
    // Two-thread single pass gives the same rows too.
    let two = compute(&w.input(), &StatsOptions { threads: 2, ..opts });
    assert_eq!(bits(&one), bits(&two));
    let mut rng = Rng(99);
    let part: Vec<usize> = (0..w.client_hash.len())
        .map(|_| (rng.next() % 3) as usize)
        .collect();
    let parts: Vec<Window> = (0..3).map(|p| w.subset(|i| part[i] == p)).collect();
    for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
        // Phase 1: summarize each partition, merge in this order.
        let mut dist = DistributionSummary::from_input(&parts[order[0]].input()).unwrap();
        for &p in &order[1..] {
            dist.merge(&DistributionSummary::from_input(&parts[p].input()).unwrap())
                .unwrap();
        }
        let plan = BootstrapPlan::new(dist, &opts);
        // Phase 2 likewise, merging in the reverse order.
        let mut boot = BootstrapSummary::from_input(&parts[order[2]].input(), &plan).unwrap();
        for &p in order[..2].iter().rev() {
            boot.merge(&BootstrapSummary::from_input(&parts[p].input(), &plan).unwrap())
                .unwrap();
        }
        let rows = finish::rows(&plan, &boot, "enrollments").unwrap();
        assert_eq!(bits(&rows), bits(&one), "{cap_mode:?} order {order:?}");
    }
    // A summary made with another plan is refused.
    let other = BootstrapPlan::new(
        DistributionSummary::from_input(&parts[0].input()).unwrap(),
        &opts,
    );
    let mut b0 = BootstrapSummary::from_input(&parts[0].input(), &other).unwrap();
    let plan = BootstrapPlan::new(DistributionSummary::from_input(&w.input()).unwrap(), &opts);
    let b1 = BootstrapSummary::from_input(&parts[1].input(), &plan).unwrap();
    assert_eq!(b0.merge(&b1), Err(StatsError::LayoutMismatch));
}

#[test]
fn invalid_input_is_an_error() {
    let mut w = Window::new(
        &["a"],
        &["s"],
        vec![metric("x", MetricType::Numeric, &[MEAN])],
    );
    w.push(1, 0, 0, &[Some(1.0)]);
    let mut bad = w.clone();
    bad.branch[0] = 3;
    assert!(matches!(
        try_compute(&bad.input(), &StatsOptions::default()),
        Err(StatsError::BranchIndex { .. })
    ));
    let mut bad = w.clone();
    bad.segment_bits[0] = 2;
    assert!(matches!(
        try_compute(&bad.input(), &StatsOptions::default()),
        Err(StatsError::SegmentBits { .. })
    ));
    let mut bad = w.clone();
    bad.values[0].push(None);
    assert!(matches!(
        try_compute(&bad.input(), &StatsOptions::default()),
        Err(StatsError::ColumnLength { .. })
    ));
    // A range wider than f64 still gives a finite ECDF grid.
    let mut wide = Window::new(
        &["a"],
        &[],
        vec![metric(
            "x",
            MetricType::Numeric,
            &[StatisticKind::EmpiricalCdf, StatisticKind::Sum],
        )],
    );
    wide.push(1, 0, 0, &[Some(-1e308)]);
    wide.push(2, 0, 0, &[Some(1e308)]);
    wide.push(3, 0, 0, &[Some(1e308)]);
    let rows = compute(&wide.input(), &StatsOptions::default());
    assert!(rows.iter().all(|r| r.parameter.is_none_or(f64::is_finite)));
    assert_eq!(
        rows.iter()
            .filter(|r| r.statistic == "empirical_cdf")
            .count(),
        256
    );
    // The exact sum is 1e308; overflowing sums become NULL.
    assert_eq!(
        find(&rows, "all", "x", "sum", None, "a", None).point,
        Some(1e308)
    );
    wide.push(4, 0, 0, &[Some(1e308)]);
    wide.push(5, 0, 0, &[Some(1e308)]);
    let rows = compute(&wide.input(), &StatsOptions::default());
    assert_eq!(find(&rows, "all", "x", "sum", None, "a", None).point, None);
    // Non-finite values are skipped like NULL.
    let mut nf = w.clone();
    nf.push(2, 0, 0, &[Some(f64::NAN)]);
    nf.push(3, 0, 1, &[Some(f64::INFINITY)]);
    let rows = compute(
        &nf.input(),
        &StatsOptions {
            replicates: 20,
            seed: 0,
            threads: 1,
            ..Default::default()
        },
    );
    assert_eq!(
        find(&rows, "all", "x", "mean", None, "a", None).point,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------
// Independent implementation: the definitions applied directly to sorted raw values.

/// numpy.quantile (linear) of sorted values.
fn np_quantile(sorted: &[f64], q: f64) -> f64 {
    percentile(sorted, q)
}

/// Bayesian-bootstrap replicate means of (client hash, value) pairs, in plain f64.
fn reference_mean_replicates(clients: &[(u64, f64)], seed: u64, replicates: usize) -> Vec<f64> {
    let keys: Vec<u64> = clients.iter().map(|c| client_key(seed, c.0)).collect();
    (0..replicates)
        .map(|r| {
            let (mut sw, mut swx) = (0.0, 0.0);
            for (k, c) in keys.iter().zip(clients) {
                let w = weight_units(*k, r as u32) as f64 / WEIGHT_SCALE;
                sw += w;
                swx += w * c.1;
            }
            swx / sw
        })
        .collect()
}

/// Weighted quantile min{x : F_r(x) >= q} per replicate.
fn reference_decile_replicates(
    clients: &[(u64, f64)],
    seed: u64,
    replicates: usize,
    q: f64,
) -> Vec<f64> {
    let mut sorted = clients.to_vec();
    sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
    let keys: Vec<u64> = sorted.iter().map(|c| client_key(seed, c.0)).collect();
    (0..replicates)
        .map(|r| {
            let ws: Vec<f64> = keys
                .iter()
                .map(|&k| weight_units(k, r as u32) as f64)
                .collect();
            let total: f64 = ws.iter().sum();
            let mut acc = 0.0;
            for (w, c) in ws.iter().zip(&sorted) {
                acc += w;
                if acc >= q * total {
                    return c.1;
                }
            }
            sorted.last().unwrap().1
        })
        .collect()
}

fn ci(reps: &[f64], width: f64) -> (f64, f64) {
    let mut s = reps.to_vec();
    s.sort_by(f64::total_cmp);
    (
        percentile(&s, (1.0 - width) / 2.0),
        percentile(&s, (1.0 + width) / 2.0),
    )
}

#[test]
fn agrees_with_a_straightforward_implementation() {
    let w = rich_window(3000, 21);
    let (seed, reps) = (6, 400);
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: reps,
            seed,
            threads: 2,
            cap_mode: CapMode::Fixed, // Jetstream's definition, as written out below
        },
    );
    let close = |a: f64, b: f64, tol: f64| (a - b).abs() <= tol * b.abs().max(1e-9);
    for (s, seg) in ["all", "windows", "release", "new"].iter().enumerate() {
        let in_seg = |i: usize| s == 0 || w.segment_bits[i] >> (s - 1) & 1 == 1;
        let mut by_branch: Vec<Vec<Vec<(u64, f64)>>> = vec![vec![vec![]; 3]; 4];
        for i in 0..w.client_hash.len() {
            if !in_seg(i) {
                continue;
            }
            for (col, groups) in w.values.iter().zip(by_branch.iter_mut()) {
                if let Some(x) = col[i] {
                    groups[w.branch[i] as usize].push((w.client_hash[i], x));
                }
            }
        }
        let mut mean_reps: Vec<Vec<f64>> = vec![];
        for (b, br) in w.branches.iter().enumerate() {
            // Capped mean of active_hours.
            let data = &by_branch[0][b];
            let mut sorted: Vec<f64> = data.iter().map(|c| c.1).collect();
            sorted.sort_by(f64::total_cmp);
            let cap = np_quantile(&sorted, 0.995);
            let capped: Vec<(u64, f64)> = data.iter().map(|&(h, x)| (h, x.min(cap))).collect();
            let r = reference_mean_replicates(&capped, seed, reps);
            let row = find(&rows, seg, "active_hours", "mean", None, br, None);
            let (lo, hi) = ci(&r, 0.95);
            let point = r.iter().sum::<f64>() / r.len() as f64;
            // Values enter on a 2^-26 grid of the cap: agreement to ~1e-7 relative.
            assert!(
                close(row.point.unwrap(), point, 1e-7),
                "{seg} {br}: {:?} vs {point}",
                row.point
            );
            assert!(close(row.lower.unwrap(), lo, 1e-7) && close(row.upper.unwrap(), hi, 1e-7));
            mean_reps.push(r);
            // Deciles: points exact up to the sketch's 2^-10 relative bound, intervals likewise.
            let du: Vec<(u64, f64)> = by_branch[1][b].clone();
            let mut dus: Vec<f64> = du.iter().map(|c| c.1).collect();
            dus.sort_by(f64::total_cmp);
            let ahs = sorted;
            for d in [1, 5, 9] {
                let q = d as f64 / 10.0;
                let row = find(&rows, seg, "days_of_use", "deciles", Some(q), br, None);
                assert_eq!(row.point, Some(np_quantile(&dus, q)), "integers are exact");
                let (lo, hi) = ci(&reference_decile_replicates(&du, seed, reps, q), 0.95);
                assert_eq!(
                    (row.lower, row.upper),
                    (Some(lo), Some(hi)),
                    "{seg} {br} {q}"
                );
                let row = find(&rows, seg, "active_hours", "deciles", Some(q), br, None);
                let truth = np_quantile(&ahs, q);
                assert!(
                    close(row.point.unwrap(), truth, 1.0 / 1024.0),
                    "{:?} vs {truth}",
                    row.point
                );
                let (lo, hi) = ci(
                    &reference_decile_replicates(&by_branch[0][b], seed, reps, q),
                    0.95,
                );
                assert!(
                    close(row.lower.unwrap(), lo, 1.0 / 512.0)
                        && close(row.upper.unwrap(), hi, 1.0 / 512.0),
                    "{seg} {br} {q}: {:?} vs {lo} {hi}",
                    (row.lower, row.upper)
                );
            }
            // Binomial point is exact.
            let k = by_branch[2][b].iter().filter(|c| c.1 != 0.0).count() as f64;
            let n = by_branch[2][b].len() as f64;
            assert_eq!(
                find(&rows, seg, "retained", "binomial", None, br, None).point,
                Some((k + 1.0) / (n + 2.0))
            );
            // Sum and count are exact; uncapped mean (drop_highest = 0) agrees.
            let rev = &by_branch[3][b];
            let exact: f64 = {
                let mut e = exact::ExactSum::default();
                rev.iter().for_each(|c| e.add(c.1));
                e.value()
            };
            assert_eq!(
                find(&rows, seg, "revenue", "sum", None, br, None).point,
                Some(exact)
            );
            assert!(close(exact, rev.iter().map(|c| c.1).sum::<f64>(), 1e-12));
            assert_eq!(
                find(&rows, seg, "revenue", "count", None, br, None).point,
                Some(rev.len() as f64)
            );
            let r0 = reference_mean_replicates(rev, seed, reps);
            let rows0: Vec<&StatisticRow> = rows
                .iter()
                .filter(|r| {
                    r.segment == *seg
                        && r.metric == "revenue"
                        && r.statistic == "mean"
                        && r.branch == *br
                        && r.comparison.is_none()
                })
                .collect();
            assert_eq!(rows0.len(), 2);
            let mut rs: Vec<f64> = rev.iter().map(|c| c.1).collect();
            rs.sort_by(f64::total_cmp);
            // Both variants share one grid, set by the uncapped maximum B: error <= B · 2^-27.
            let bound = rs.last().unwrap().abs().max(rs[0].abs()) * 2f64.powi(-26);
            assert!(
                (rows0[0].point.unwrap() - r0.iter().sum::<f64>() / reps as f64).abs() <= bound
            );
            let cap = np_quantile(&rs, 0.95);
            // The cap comes from the sketch (within 2^-10 relative of the exact quantile) and
            // the capped mean is monotone in the cap: it lies between the two bracketing means.
            let capped_mean = |c: f64| {
                let r = reference_mean_replicates(
                    &rev.iter().map(|&(h, x)| (h, x.min(c))).collect::<Vec<_>>(),
                    seed,
                    reps,
                );
                r.iter().sum::<f64>() / reps as f64
            };
            let (lo, hi) = (
                capped_mean(cap - cap.abs() / 1024.0),
                capped_mean(cap + cap.abs() / 1024.0),
            );
            let p5 = rows0[1].point.unwrap();
            assert!(
                lo - bound <= p5 && p5 <= hi + bound,
                "{seg} {br}: {p5} not in [{lo}, {hi}]"
            );
        }
        // Comparisons from paired replicates.
        let diff: Vec<f64> = mean_reps[1]
            .iter()
            .zip(&mean_reps[0])
            .map(|(a, b)| a - b)
            .collect();
        let rel: Vec<f64> = mean_reps[1]
            .iter()
            .zip(&mean_reps[0])
            .map(|(a, b)| a / b - 1.0)
            .collect();
        let row = find(
            &rows,
            seg,
            "active_hours",
            "mean",
            None,
            "treatment",
            Some((Comparison::Difference, "control")),
        );
        let (lo, hi) = ci(&diff, 0.95);
        let scale = mean_reps[0][0];
        assert!(
            (row.lower.unwrap() - lo).abs() < 1e-6 * scale
                && (row.upper.unwrap() - hi).abs() < 1e-6 * scale
        );
        // Point: the mean of the paired replicates (Jetstream's `exp`), not their median.
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        assert!((row.point.unwrap() - mean(&diff)).abs() < 1e-6 * scale);
        let row = find(
            &rows,
            seg,
            "active_hours",
            "mean",
            None,
            "treatment",
            Some((Comparison::RelativeUplift, "control")),
        );
        let (lo, hi) = ci(&rel, 0.95);
        assert!((row.lower.unwrap() - lo).abs() < 1e-6 && (row.upper.unwrap() - hi).abs() < 1e-6);
        assert!((row.point.unwrap() - mean(&rel)).abs() < 1e-6);
    }
}

// ---------------------------------------------------------------------------------------
// Calibration: A/A experiments from known distributions; 95% intervals should cover the
// truth 93-97% of the time. For capped means the truth is the population mean capped at the
// population 99.5th percentile.

mod calibration {
    use super::*;
    use statrs::distribution::{ContinuousCDF, Normal};

    const P995: f64 = 0.995;

    fn phi() -> Normal {
        Normal::new(0.0, 1.0).unwrap()
    }

    /// Capped mean of LN(mu, sigma) mixed with a point mass `zero` at 0.
    fn capped_lognormal(mu: f64, sigma: f64, zero: f64) -> f64 {
        let f = (P995 - zero) / (1.0 - zero);
        let z = phi().inverse_cdf(f);
        let c = (mu + sigma * z).exp();
        (1.0 - zero) * ((mu + sigma * sigma / 2.0).exp() * phi().cdf(z - sigma) + c * (1.0 - f))
    }

    struct Dist {
        name: &'static str,
        draw: fn(&mut Rng) -> f64,
        truth: f64,
    }

    fn dists() -> Vec<Dist> {
        let z = phi().inverse_cdf(P995);
        let normal_truth = P995 * 10.0
            - 2.0 * (-z * z / 2.0).exp() / (std::f64::consts::TAU).sqrt()
            + (1.0 - P995) * (10.0 + 2.0 * z);
        let alpha: f64 = 3.0;
        let c = (1.0 - P995).powf(-1.0 / alpha);
        let pareto_truth = alpha / (alpha - 1.0) * (1.0 - c.powf(1.0 - alpha)) + c * (1.0 - P995);
        vec![
            Dist {
                name: "normal(10, 2)",
                draw: |r| 10.0 + 2.0 * r.normal(),
                truth: normal_truth,
            },
            Dist {
                name: "lognormal(0, 1)",
                draw: |r| r.normal().exp(),
                truth: capped_lognormal(0.0, 1.0, 0.0),
            },
            Dist {
                name: "pareto(1, 3)",
                draw: |r| r.uniform().powf(-1.0 / 3.0),
                truth: pareto_truth,
            },
            Dist {
                name: "zero-inflated 40% + lognormal(0.5, 1.2)",
                draw: |r| {
                    if r.uniform() < 0.4 {
                        0.0
                    } else {
                        (0.5 + 1.2 * r.normal()).exp()
                    }
                },
                truth: capped_lognormal(0.5, 1.2, 0.4),
            },
        ]
    }

    /// Coverage per (metric, kind) over `sims` A/A experiments with `n` clients per branch.
    pub fn run(sims: usize, n: usize, replicates: usize, cap_mode: CapMode) -> Vec<(String, f64)> {
        let dists = dists();
        let p_true = 0.3;
        let mut metrics: Vec<MetricSpec> = dists
            .iter()
            .map(|d| metric(d.name, MetricType::Numeric, &[MEAN]))
            .collect();
        metrics.push(metric(
            "binomial p=0.3",
            MetricType::Boolean,
            &[StatisticKind::Binomial],
        ));
        let kinds = ["branch", "difference", "relative_uplift"];
        let mut hits = vec![[0usize; 3]; metrics.len()];
        let mut trials = vec![[0usize; 3]; metrics.len()];
        let mut rng = Rng(2026);
        for sim in 0..sims {
            let mut w = Window::new(&["control", "treatment"], &[], metrics.clone());
            for i in 0..2 * n {
                let mut vals: Vec<Option<f64>> =
                    dists.iter().map(|d| Some((d.draw)(&mut rng))).collect();
                vals.push(Some((rng.uniform() < p_true) as u8 as f64));
                w.push(rng.next(), (i % 2) as u16, 0, &vals);
            }
            let rows = compute(
                &w.input(),
                &StatsOptions {
                    replicates,
                    seed: sim as u64,
                    threads: 1,
                    cap_mode,
                },
            );
            for (m, spec) in metrics.iter().enumerate() {
                let stat = spec.statistics[0].kind.name();
                let truth = if m < dists.len() {
                    dists[m].truth
                } else {
                    p_true
                };
                for br in ["control", "treatment"] {
                    let r = find(&rows, "all", &spec.name, stat, None, br, None);
                    hits[m][0] += (r.lower.unwrap() <= truth && truth <= r.upper.unwrap()) as usize;
                    trials[m][0] += 1;
                }
                for (k, cmp) in [(1, Comparison::Difference), (2, Comparison::RelativeUplift)] {
                    let r = find(
                        &rows,
                        "all",
                        &spec.name,
                        stat,
                        None,
                        "treatment",
                        Some((cmp, "control")),
                    );
                    hits[m][k] += (r.lower.unwrap() <= 0.0 && 0.0 <= r.upper.unwrap()) as usize;
                    trials[m][k] += 1;
                }
            }
        }
        let mut out = Vec::new();
        for (m, spec) in metrics.iter().enumerate() {
            for k in 0..3 {
                out.push((
                    format!("{} {}", spec.name, kinds[k]),
                    hits[m][k] as f64 / trials[m][k] as f64,
                ));
            }
        }
        out
    }
}

/// Runs the calibration and checks every coverage against `band`, except heavy-tailed means
/// under [`CapMode::Fixed`], which only have to reach `fixed_heavy_floor` (see [`CapMode`]).
fn check_calibration(
    sims: usize,
    n: usize,
    mode: CapMode,
    band: (f64, f64),
    fixed_heavy_floor: f64,
) {
    let cov = calibration::run(sims, n, 1000, mode);
    for (name, c) in &cov {
        println!("{mode:?} coverage {name}: {:.1}%", 100.0 * c);
    }
    for (name, c) in &cov {
        let heavy = !name.starts_with("normal") && !name.starts_with("binomial");
        let lo = if heavy && mode == CapMode::Fixed {
            fixed_heavy_floor
        } else {
            band.0
        };
        assert!(*c >= lo && *c <= band.1, "{mode:?} {name}: coverage {c}");
    }
}

fn env(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Calibration with per-replicate caps: 2,000 A/A experiments of 1,000 clients per branch;
/// 95% intervals cover 93-97% for every distribution. Unoptimized it takes minutes, so it runs
/// with `cargo test --release` (about 30 s; `CALIBRATION_SIMS` / `CALIBRATION_CLIENTS` change
/// the size, `--nocapture` prints the coverage table).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow unoptimized: runs with cargo test --release"
)]
fn calibration_per_replicate_cap() {
    let (sims, n) = (
        env("CALIBRATION_SIMS", 2000),
        env("CALIBRATION_CLIENTS", 1000),
    );
    check_calibration(sims, n, CapMode::PerReplicate, (0.93, 0.97), 0.0);
}

/// Calibration with Jetstream's fixed cap: normal and binomial within 93-97%; heavy-tailed
/// capped means are known to fall short (about 92%, see [`CapMode::Fixed`]), checked at 90%.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "slow unoptimized: runs with cargo test --release"
)]
fn calibration_fixed_cap() {
    let (sims, n) = (
        env("CALIBRATION_SIMS", 2000),
        env("CALIBRATION_CLIENTS", 1000),
    );
    check_calibration(sims, n, CapMode::Fixed, (0.93, 0.97), 0.90);
}

#[test]
fn per_replicate_cap_hand_computed() {
    // 199 ones and one 1000: in replicate r the weighted 99.5th percentile is 1 when the last
    // client's share of weight is at most 0.005 (all values capped to 1), else 1000 (nothing
    // capped).
    let mut w = Window::new(
        &["control"],
        &[],
        vec![metric("active_hours", MetricType::Numeric, &[MEAN])],
    );
    for i in 0..200 {
        w.push(i, 0, 0, &[Some(if i == 199 { 1000.0 } else { 1.0 })]);
    }
    let opts = StatsOptions {
        replicates: 300,
        seed: 2,
        threads: 1,
        cap_mode: CapMode::PerReplicate,
    };
    let rows = compute(&w.input(), &opts);
    let row = find(&rows, "all", "active_hours", "mean", None, "control", None);
    let keys: Vec<u64> = (0..200).map(|i| client_key(2, i)).collect();
    let reps: Vec<f64> = (0..300u32)
        .map(|r| {
            let ws: Vec<f64> = keys.iter().map(|&k| weight_units(k, r) as f64).collect();
            let total: f64 = ws.iter().sum();
            if ws[199] / total <= 0.005 {
                1.0
            } else {
                (total - ws[199] + 1000.0 * ws[199]) / total
            }
        })
        .collect();
    let point = reps.iter().sum::<f64>() / 300.0;
    assert!(
        (row.point.unwrap() - point).abs() < 1e-9,
        "{:?} vs {point}",
        row.point
    );
    let (lo, hi) = ci(&reps, 0.95);
    assert!((row.lower.unwrap() - lo).abs() < 1e-9 && (row.upper.unwrap() - hi).abs() < 1e-9);
    assert!(reps.contains(&1.0) && reps.iter().any(|&x| x > 2.0));
}

/// (client hash, value) pairs.
type Clients = Vec<(u64, f64)>;

#[test]
fn per_replicate_cap_agrees_with_a_straightforward_implementation() {
    let w = rich_window(3000, 31);
    let (seed, reps) = (13, 200);
    let rows = compute(
        &w.input(),
        &StatsOptions {
            replicates: reps,
            seed,
            threads: 2,
            cap_mode: CapMode::PerReplicate,
        },
    );
    // Per replicate: cap at the weighted quantile min{x : F_r(x) >= q}, then the weighted mean.
    // The engine reads the cap at sketch-bucket resolution (2^-9 relative), so its replicate
    // means lie between those with the exact cap scaled by 1 -/+ 2^-9.
    let reference = |clients: &[(u64, f64)], q: f64, stretch: f64| -> f64 {
        let mut sorted = clients.to_vec();
        sorted.sort_by(|a, b| a.1.total_cmp(&b.1));
        let keys: Vec<u64> = sorted.iter().map(|c| client_key(seed, c.0)).collect();
        let means: Vec<f64> = (0..reps as u32)
            .map(|r| {
                let ws: Vec<f64> = keys.iter().map(|&k| weight_units(k, r) as f64).collect();
                let total: f64 = ws.iter().sum();
                let mut acc = 0.0;
                let mut cap = sorted.last().unwrap().1;
                for (wi, c) in ws.iter().zip(&sorted) {
                    acc += wi;
                    if acc >= q * total {
                        cap = c.1;
                        break;
                    }
                }
                let cap = cap * stretch;
                ws.iter()
                    .zip(&sorted)
                    .map(|(wi, c)| wi * c.1.min(cap))
                    .sum::<f64>()
                    / total
            })
            .collect();
        means.iter().sum::<f64>() / means.len() as f64
    };
    for (s, seg) in ["all", "windows", "release", "new"].iter().enumerate() {
        for (b, br) in w.branches.iter().enumerate() {
            let (ah, rev): (Clients, Clients) = (0..w.client_hash.len())
                .filter(|&i| {
                    w.branch[i] as usize == b && (s == 0 || w.segment_bits[i] >> (s - 1) & 1 == 1)
                })
                .map(|i| {
                    (
                        (w.client_hash[i], w.values[0][i].unwrap()),
                        (w.client_hash[i], w.values[3][i].unwrap()),
                    )
                })
                .unzip();
            let p = find(&rows, seg, "active_hours", "mean", None, br, None)
                .point
                .unwrap();
            let (lo, hi) = (
                reference(&ah, 0.995, 1.0 - 1.0 / 512.0),
                reference(&ah, 0.995, 1.0 + 1.0 / 512.0),
            );
            assert!(
                lo - 1e-9 <= p && p <= hi + 1e-9,
                "{seg} {br}: {p} not in [{lo}, {hi}]"
            );
            // revenue's 5% cap sits beside an uncapped mean, which sets the fixed-point grid.
            let bound = rev.iter().map(|c| c.1.abs()).fold(0.0, f64::max) * 2f64.powi(-26);
            let p5 = rows
                .iter()
                .filter(|r| {
                    r.segment == *seg
                        && r.metric == "revenue"
                        && r.statistic == "mean"
                        && r.branch == *br
                        && r.comparison.is_none()
                })
                .nth(1)
                .unwrap()
                .point
                .unwrap();
            let (lo, hi) = (
                reference(&rev, 0.95, 1.0 - 1.0 / 512.0),
                reference(&rev, 0.95, 1.0 + 1.0 / 512.0),
            );
            assert!(
                lo - bound <= p5 && p5 <= hi + bound,
                "{seg} {br}: {p5} not in [{lo}, {hi}]"
            );
        }
    }
}

#[test]
fn vectorized_and_baseline_kernels_give_identical_rows() {
    let w = rich_window(2000, 41);
    for cap_mode in [CapMode::Fixed, CapMode::PerReplicate] {
        let opts = StatsOptions {
            replicates: 150,
            seed: 3,
            threads: 1,
            cap_mode,
        };
        let fast = compute(&w.input(), &opts);
        // Other tests running meanwhile may take the baseline path too: it gives the same bits.
        summary::FORCE_BASELINE.store(true, std::sync::atomic::Ordering::Relaxed);
        let baseline = compute(&w.input(), &opts);
        summary::FORCE_BASELINE.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(bits(&fast), bits(&baseline));
    }
}

#[test]
fn a_narrower_ci_width_narrows_every_interval_and_keeps_the_points() {
    let wide = rich_window(3000, 21);
    let mut narrow = wide.clone();
    for m in &mut narrow.metrics {
        for s in &mut m.statistics {
            s.ci_width = 0.8;
        }
    }
    let opts = StatsOptions {
        replicates: 400,
        seed: 5,
        threads: 1,
        cap_mode: CapMode::default(),
    };
    let a = compute(&wide.input(), &opts);
    let b = compute(&narrow.input(), &opts);
    assert_eq!(a.len(), b.len());
    let mut narrowed = 0;
    for (x, y) in a.iter().zip(&b) {
        let key = |r: &StatisticRow| {
            (
                r.segment.clone(),
                r.metric.clone(),
                r.statistic.clone(),
                r.parameter.map(f64::to_bits),
                r.branch.clone(),
                r.comparison,
                r.comparison_to_branch.clone(),
            )
        };
        assert_eq!(key(x), key(y));
        if x.metric == "identity" {
            continue; // clients per branch: not a configured statistic
        }
        assert_eq!((x.ci_width, y.ci_width), (0.95, 0.8), "{:?}", key(x));
        // The same replicates: the same points, and percentiles further in.
        assert_eq!(x.point.map(f64::to_bits), y.point.map(f64::to_bits));
        if let (Some(xl), Some(xu), Some(yl), Some(yu)) = (x.lower, x.upper, y.lower, y.upper) {
            assert!(
                xl <= yl && yu <= xu,
                "{:?}: {xl}..{xu} vs {yl}..{yu}",
                key(x)
            );
            if yu - yl < xu - xl {
                narrowed += 1;
            }
        }
    }
    // Every non-degenerate bootstrap or Beta interval is strictly narrower.
    assert!(narrowed > 100, "only {narrowed} intervals narrowed");
}
