//! Rows of the statistics table from merged summaries (see the module doc of `stats` for the
//! definitions, edge cases and row order).

use super::summary::{replicate_mean, BootstrapPlan, BootstrapSummary, BranchMetricPlan};
use super::{CapMode, Comparison, StatisticKind, StatisticRow, StatsError};
use statrs::distribution::{Beta, ContinuousCDF};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Grid points of the empirical CDF.
pub const ECDF_POINTS: usize = 256;
/// Deciles 0.1 .. 0.9.
const DECILES: usize = 9;

/// Quantile of sorted values with linear interpolation (numpy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let h = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let lo = h.floor() as usize;
    let frac = h - lo as f64;
    if frac == 0.0 || lo + 1 >= sorted.len() {
        sorted[lo]
    } else {
        sorted[lo] + frac * (sorted[lo + 1] - sorted[lo])
    }
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

/// (lower, upper) percentiles of replicates for a central interval of width `ci`; None when
/// any replicate is non-finite.
fn interval(reps: &[f64], ci: f64) -> Option<(f64, f64)> {
    if reps.is_empty() || reps.iter().any(|x| !x.is_finite()) {
        return None;
    }
    let mut sorted = reps.to_vec();
    sorted.sort_unstable_by(f64::total_cmp);
    let a = (1.0 - ci) / 2.0;
    Some((percentile(&sorted, a), percentile(&sorted, 1.0 - a)))
}

/// [point, lower, upper] of replicates: their mean and central interval of width `ci`
/// (Jetstream's `mean` of a branch and `exp` of a comparison); all None when any
/// replicate is non-finite.
fn mean_and_interval(reps: &[f64], ci: f64) -> [Option<f64>; 3] {
    match interval(reps, ci) {
        Some((lo, hi)) => [Some(replicate_average(reps)), Some(lo), Some(hi)],
        None => [None; 3],
    }
}

/// Mean of replicates, anchored on the first so that equal replicates give that value exactly.
fn replicate_average(reps: &[f64]) -> f64 {
    let m0 = reps[0];
    m0 + reps.iter().map(|x| x - m0).sum::<f64>() / reps.len() as f64
}

struct RowMaker<'a> {
    segment: &'a str,
    metric: &'a str,
    statistic: &'a str,
    ci_width: f64,
    basis: &'a str,
}

impl RowMaker<'_> {
    fn row(
        &self,
        parameter: Option<f64>,
        branch: &str,
        cmp: Option<(Comparison, &str)>,
        v: [Option<f64>; 3],
    ) -> StatisticRow {
        StatisticRow {
            segment: self.segment.to_string(),
            metric: self.metric.to_string(),
            statistic: self.statistic.to_string(),
            parameter,
            branch: branch.to_string(),
            comparison: cmp.map(|c| c.0),
            comparison_to_branch: cmp.map(|c| c.1.to_string()),
            ci_width: self.ci_width,
            point: v[0].and_then(finite),
            lower: v[1].and_then(finite),
            upper: v[2].and_then(finite),
            analysis_basis: self.basis.to_string(),
        }
    }

    /// Branch rows (given) and comparison rows (from paired replicates) for one parameter.
    fn with_comparisons(
        &self,
        out: &mut Vec<StatisticRow>,
        parameter: Option<f64>,
        branches: &[String],
        own: &[[Option<f64>; 3]],
        reps: &[Option<Vec<f64>>],
    ) {
        for (a, name) in branches.iter().enumerate() {
            out.push(self.row(parameter, name, None, own[a]));
            for (r, rname) in branches.iter().enumerate() {
                if r == a {
                    continue;
                }
                for cmp in [Comparison::Difference, Comparison::RelativeUplift] {
                    let v = match (&reps[a], &reps[r]) {
                        (Some(x), Some(y)) => {
                            let paired: Vec<f64> = x
                                .iter()
                                .zip(y)
                                .map(|(f, rf)| match cmp {
                                    Comparison::Difference => f - rf,
                                    Comparison::RelativeUplift => f / rf - 1.0,
                                })
                                .collect();
                            // Point: the mean of the paired replicates, Jetstream's
                            // `exp` (mozanalysis `summarize_joint_samples`).
                            mean_and_interval(&paired, self.ci_width)
                        }
                        _ => [None; 3],
                    };
                    out.push(self.row(parameter, name, Some((cmp, rname)), v));
                }
            }
        }
    }
}

/// Value of the sketch bucket with `key` in a segment's sketch (midpoint unless exact).
fn bucket_representative(sketch: &super::sketch::QuantileSketch, key: i32) -> f64 {
    let bk = sketch.buckets();
    let i = bk.partition_point(|x| x.key < key).min(bk.len() - 1);
    let x = &bk[i];
    if x.min == x.max {
        x.min
    } else {
        x.min + (x.max - x.min) * 0.5
    }
}

/// Replicate means of (segment, branch, metric) for mean variant `v`; None when no values.
fn mean_replicates(
    plan: &BootstrapPlan,
    boot: &BootstrapSummary,
    p: &BranchMetricPlan,
    (s, b, m): (usize, usize, usize),
    v: usize,
) -> Option<Vec<f64>> {
    let (sum_row, w_row, slot_row) = p.rows(s);
    let sums = boot.sums(sum_row + v);
    let ws = boot.wsum(w_row);
    let ns = plan.dist.layout.n_segments();
    let window = match plan.cap_mode {
        CapMode::PerReplicate => p.cap_windows[v * ns + s],
        CapMode::Fixed => None,
    };
    let Some((first, last)) = window else {
        return sums
            .iter()
            .zip(&ws)
            .map(|(&s, &w)| replicate_mean(s, w, p.scale))
            .collect();
    };
    // Per replicate: the cap is the weighted (1 - d) quantile, read in the cap window; values
    // in slots above the cap's slot are replaced by it: S - Σ_above w·x + cap · Σ_above w.
    let q = 1.0 - p.variants[v];
    let sketch = &plan.dist.group(s, b, m).sketch;
    let start = p.cap_start as usize;
    let ncap = p.n_cap_slots();
    let slots = boot.slots(slot_row, p.slot_starts.len());
    let wx = boot.wx(p.wx_row(s), ncap);
    let mut out = Vec::with_capacity(sums.len());
    let mut above = vec![0u64; ncap + 1];
    for r in 0..sums.len() {
        let w = ws[r];
        if w == 0 {
            return None;
        }
        let target = q * w as f64;
        // above[i]: weight in cap-region slots start + i and higher.
        for u in (0..ncap).rev() {
            above[u] = above[u + 1] + slots[r][start + u];
        }
        let mut pick = last as usize;
        for u in first as usize..=last as usize {
            if (w - above[u - start + 1]) as f64 >= target {
                pick = u;
                break;
            }
        }
        let cap = bucket_representative(sketch, p.slot_starts[pick]);
        let cap_q = (cap.min(p.precap) * p.scale).round() as i128;
        let wx_above: i128 = wx[r][pick - start + 1..].iter().sum();
        let w_above = above[pick - start + 1] as i128;
        out.push(replicate_mean(
            sums[r] - wx_above + cap_q * w_above,
            w,
            p.scale,
        )?);
    }
    Some(out)
}

/// Replicate deciles of (segment, branch, metric) as [decile][replicate]; None when no values.
fn decile_replicates(
    plan: &BootstrapPlan,
    boot: &BootstrapSummary,
    p: &BranchMetricPlan,
    s: usize,
    b: usize,
    m: usize,
) -> Option<Vec<Vec<f64>>> {
    let sketch = &plan.dist.group(s, b, m).sketch;
    if sketch.count() == 0 {
        return None;
    }
    let bk = sketch.buckets();
    let value_of = |slot: u32| {
        let key = p.slot_starts[slot as usize];
        let i = bk.partition_point(|x| x.key < key).min(bk.len() - 1);
        let x = &bk[i];
        if x.min == x.max {
            x.min
        } else {
            x.min + (x.max - x.min) * 0.5
        }
    };
    let (_, _, slot_row) = p.rows(s);
    let per_rep = boot.slots(slot_row, p.slot_starts.len());
    let mut out: Vec<Vec<f64>> = (0..DECILES)
        .map(|_| Vec::with_capacity(per_rep.len()))
        .collect();
    for slots in &per_rep {
        let total: u64 = slots.iter().sum();
        let mut prefix = Vec::with_capacity(slots.len() + 1);
        let mut acc = 0u64;
        prefix.push(0);
        for &x in slots {
            acc += x;
            prefix.push(acc);
        }
        for (d, col) in out.iter_mut().enumerate() {
            let target = (d + 1) as f64 / 10.0 * total as f64;
            let (first, last) = p.windows[s * DECILES + d];
            let mut pick = last;
            for u in first..=last {
                if prefix[u as usize + 1] as f64 >= target {
                    pick = u;
                    break;
                }
            }
            col.push(value_of(pick));
        }
    }
    Some(out)
}

/// Uniform in (0, 1) for binomial draw r of (segment, metric, branch).
fn draw_uniform(seed: u64, s: usize, m: usize, b: usize, r: usize) -> f64 {
    let mut bytes = [0u8; 32];
    for (i, x) in [s as u64, m as u64, b as u64, r as u64].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&x.to_le_bytes());
    }
    let h = xxh3_64_with_seed(&bytes, seed ^ 0x6269_6e6f_6d69_616c);
    ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// All rows of the window, in the documented order.
pub fn rows(
    plan: &BootstrapPlan,
    boot: &BootstrapSummary,
    basis: &str,
) -> Result<Vec<StatisticRow>, StatsError> {
    if !boot.matches(plan) {
        return Err(StatsError::LayoutMismatch);
    }
    let dist = &plan.dist;
    let layout = &dist.layout;
    let branches = &layout.branches;
    let nb = branches.len();
    let mut out = Vec::new();
    for s in 0..layout.n_segments() {
        let segment = layout.segment_name(s);
        let ident = RowMaker {
            segment,
            metric: "identity",
            statistic: "count",
            ci_width: 0.95,
            basis,
        };
        for (b, name) in branches.iter().enumerate() {
            out.push(ident.row(
                None,
                name,
                None,
                [Some(dist.identity(s, b) as f64), None, None],
            ));
        }
        for (m, spec) in layout.metrics.iter().enumerate() {
            for st in &spec.statistics {
                let rm = RowMaker {
                    segment,
                    metric: &spec.name,
                    statistic: st.kind.name(),
                    ci_width: st.ci_width,
                    basis,
                };
                let ci = st.ci_width;
                match st.kind {
                    StatisticKind::Mean { drop_highest } => {
                        let d = drop_highest.clamp(0.0, 1.0);
                        let reps: Vec<Option<Vec<f64>>> = (0..nb)
                            .map(|b| {
                                let p = plan.metric_plan(b, m)?;
                                let v =
                                    p.variants.iter().position(|x| x.to_bits() == d.to_bits())?;
                                mean_replicates(plan, boot, p, (s, b, m), v)
                            })
                            .collect();
                        let own: Vec<[Option<f64>; 3]> = reps
                            .iter()
                            .map(|r| r.as_ref().map_or([None; 3], |r| mean_and_interval(r, ci)))
                            .collect();
                        rm.with_comparisons(&mut out, None, branches, &own, &reps);
                    }
                    StatisticKind::Binomial => {
                        let mut own = Vec::new();
                        let mut reps = Vec::new();
                        for b in 0..nb {
                            let g = dist.group(s, b, m);
                            let (n, k) = (g.sketch.count(), g.nonzero);
                            let beta = (n > 0)
                                .then(|| Beta::new((k + 1) as f64, (n - k + 1) as f64).ok())
                                .flatten();
                            match beta {
                                Some(beta) => {
                                    let a = (1.0 - ci) / 2.0;
                                    own.push([
                                        Some((k + 1) as f64 / (n + 2) as f64),
                                        Some(beta.inverse_cdf(a)),
                                        Some(beta.inverse_cdf(1.0 - a)),
                                    ]);
                                    reps.push(Some(
                                        (0..plan.replicates)
                                            .map(|r| {
                                                beta.inverse_cdf(draw_uniform(
                                                    plan.seed, s, m, b, r,
                                                ))
                                            })
                                            .collect(),
                                    ));
                                }
                                None => {
                                    own.push([None; 3]);
                                    reps.push(None);
                                }
                            }
                        }
                        rm.with_comparisons(&mut out, None, branches, &own, &reps);
                    }
                    StatisticKind::Deciles => {
                        let per_branch: Vec<Option<Vec<Vec<f64>>>> = (0..nb)
                            .map(|b| {
                                decile_replicates(plan, boot, plan.metric_plan(b, m)?, s, b, m)
                            })
                            .collect();
                        for d in 0..DECILES {
                            let q = (d + 1) as f64 / 10.0;
                            let reps: Vec<Option<Vec<f64>>> = per_branch
                                .iter()
                                .map(|x| x.as_ref().map(|x| x[d].clone()))
                                .collect();
                            let own: Vec<[Option<f64>; 3]> = (0..nb)
                                .map(|b| {
                                    match (
                                        dist.group(s, b, m).sketch.quantile(q),
                                        reps[b].as_ref().and_then(|r| interval(r, ci)),
                                    ) {
                                        (Some(pt), Some((lo, hi))) => {
                                            [Some(pt), Some(lo), Some(hi)]
                                        }
                                        (pt, _) => [pt, None, None],
                                    }
                                })
                                .collect();
                            rm.with_comparisons(&mut out, Some(q), branches, &own, &reps);
                        }
                    }
                    StatisticKind::Count | StatisticKind::Sum => {
                        for (b, name) in branches.iter().enumerate() {
                            let g = dist.group(s, b, m);
                            let point = match st.kind {
                                StatisticKind::Count => g.sketch.count() as f64,
                                _ => g.sum.value(),
                            };
                            out.push(rm.row(None, name, None, [Some(point), None, None]));
                        }
                    }
                    StatisticKind::EmpiricalCdf => {
                        let sketches: Vec<_> =
                            (0..nb).map(|b| &dist.group(s, b, m).sketch).collect();
                        let lo = sketches
                            .iter()
                            .filter_map(|k| k.min())
                            .min_by(f64::total_cmp);
                        let hi = sketches
                            .iter()
                            .filter_map(|k| k.max())
                            .max_by(f64::total_cmp);
                        let (Some(lo), Some(hi)) = (lo, hi) else {
                            continue;
                        };
                        let grid: Vec<f64> = if lo == hi {
                            vec![lo]
                        } else {
                            (0..ECDF_POINTS)
                                .map(|j| {
                                    let t = j as f64 / (ECDF_POINTS - 1) as f64;
                                    if j + 1 == ECDF_POINTS {
                                        hi
                                    } else if (hi - lo).is_finite() {
                                        lo + (hi - lo) * t
                                    } else {
                                        // A range wider than f64 (e.g. -1e308 .. 1e308).
                                        lo * (1.0 - t) + hi * t
                                    }
                                })
                                .collect()
                        };
                        for x in grid {
                            for (b, name) in branches.iter().enumerate() {
                                out.push(rm.row(
                                    Some(x),
                                    name,
                                    None,
                                    [sketches[b].cdf(x), None, None],
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}
