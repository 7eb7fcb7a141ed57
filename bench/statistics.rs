//! Statistics of one window: 1,000,000 clients, 10 metrics, 2 branches, 3 segments, 1,000
//! replicates. Data are generated deterministically; prints the time of each phase.
//! Run: `cargo bench --bench statistics` (optionally `-- CLIENTS REPLICATES THREADS [fixed]`;
//! `fixed` selects Jetstream's fixed cap instead of the default per-replicate cap).
//! Under `cargo test` (no `--bench` argument) it returns at once.

use slipstream::stats::{
    default_statistics, finish, BootstrapPlan, BootstrapSummary, CapMode, DistributionSummary,
    MetricSpec, MetricType, StatsOptions, WindowInput,
};
use std::time::Instant;

/// splitmix64: a deterministic stream of uniforms for the synthetic data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn uniform(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs bench targets too: nothing heavy there.
    }
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let n = args.first().copied().unwrap_or(1_000_000);
    let replicates = args.get(1).copied().unwrap_or(1000);
    let threads = args.get(2).copied().unwrap_or(2);

    let numeric = [
        "active_hours",
        "uri_count",
        "search_count",
        "days_of_use",
        "tab_count",
        "page_load_ms",
        "bookmarks",
        "scroll_px",
    ];
    let boolean = ["retained", "is_default_browser"];
    let metrics: Vec<MetricSpec> = numeric
        .iter()
        .map(|&m| (m, MetricType::Numeric))
        .chain(boolean.iter().map(|&m| (m, MetricType::Boolean)))
        .map(|(name, t)| MetricSpec {
            name: name.into(),
            metric_type: t,
            statistics: default_statistics(name, t),
        })
        .collect();
    let branches = vec!["control".to_string(), "treatment".to_string()];
    let segments = vec![
        "windows".to_string(),
        "release".to_string(),
        "new_users".to_string(),
    ];

    let mut rng = Rng(42);
    let client_hash: Vec<u64> = (0..n).map(|_| rng.next()).collect();
    let branch: Vec<u16> = (0..n).map(|_| (rng.next() & 1) as u16).collect();
    let segment_bits: Vec<u64> = (0..n)
        .map(|_| {
            ((rng.uniform() < 0.7) as u64)
                | ((rng.uniform() < 0.8) as u64) << 1
                | ((rng.uniform() < 0.2) as u64) << 2
        })
        .collect();
    let mut values: Vec<Vec<Option<f64>>> = Vec::new();
    for m in 0..metrics.len() {
        let col = (0..n)
            .map(|_| {
                if rng.uniform() < 0.01 {
                    return None;
                }
                Some(match m {
                    0 => {
                        if rng.uniform() < 0.3 {
                            0.0
                        } else {
                            (rng.normal() * 1.2).exp()
                        }
                    } // zero-inflated lognormal
                    1 => (rng.normal() * 1.5 + 3.0).exp().floor(),
                    2 => (-rng.uniform().ln() * 2.0).floor(),
                    3 => (rng.uniform() * 29.0).floor(),
                    4 => (rng.normal() * 3.0 + 10.0).max(1.0).round(),
                    5 => 100.0 / rng.uniform().powf(1.0 / 1.5), // pareto
                    6 => rng.normal() * 50.0 + 200.0,
                    7 => -rng.uniform().ln() * 1e4,
                    _ => (rng.uniform() < 0.6) as u8 as f64,
                })
            })
            .collect();
        values.push(col);
    }
    let input = WindowInput {
        analysis_basis: "enrollments",
        branches: &branches,
        segments: &segments,
        metrics: &metrics,
        client_hash: &client_hash,
        branch: &branch,
        segment_bits: &segment_bits,
        values: &values,
    };
    let cap_mode = if std::env::args().any(|a| a == "fixed") {
        CapMode::Fixed
    } else {
        CapMode::PerReplicate
    };
    let opts = StatsOptions {
        replicates,
        seed: 12345,
        threads,
        cap_mode,
    };
    println!(
        "clients {n}, metrics {}, branches 2, segments 3, replicates {replicates}, threads {threads}, {cap_mode:?} cap",
        metrics.len()
    );

    let t0 = Instant::now();
    let dist = DistributionSummary::from_input(&input).unwrap();
    let t1 = Instant::now();
    let plan = BootstrapPlan::new(dist, &opts);
    let t2 = Instant::now();
    let boot = BootstrapSummary::from_input(&input, &plan).unwrap();
    let t3 = Instant::now();
    let rows = finish::rows(&plan, &boot, "enrollments").unwrap();
    let t4 = Instant::now();
    println!(
        "phase 1 (distribution summary): {:8.3} s",
        (t1 - t0).as_secs_f64()
    );
    println!(
        "plan:                           {:8.3} s",
        (t2 - t1).as_secs_f64()
    );
    println!(
        "phase 2 (bootstrap sums):       {:8.3} s",
        (t3 - t2).as_secs_f64()
    );
    println!(
        "finish (rows):                  {:8.3} s",
        (t4 - t3).as_secs_f64()
    );
    println!(
        "total:                          {:8.3} s  ({} rows)",
        (t4 - t0).as_secs_f64(),
        rows.len()
    );
    let slots: usize = plan
        .metric_plans
        .iter()
        .flatten()
        .map(|p| p.slot_starts.len())
        .sum();
    println!("decile slots over (branch, metric): {slots}");
    let r = rows
        .iter()
        .find(|r| {
            r.metric == "active_hours"
                && r.statistic == "mean"
                && r.segment == "all"
                && r.comparison.is_none()
        })
        .unwrap();
    println!(
        "e.g. {} {} {} {}: point {:?} [{:?}, {:?}]",
        r.segment, r.metric, r.statistic, r.branch, r.point, r.lower, r.upper
    );
}
