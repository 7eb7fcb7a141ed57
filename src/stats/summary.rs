//! The mergeable per-partition summaries and the plan that links the two phases.
//!
//! Phase 1, [`DistributionSummary`]: per (segment, branch, metric) a quantile sketch, an exact
//! sum and the count of non-zero values; per (segment, branch) the number of clients.
//! [`BootstrapPlan`] derives from the merged phase 1 what the bootstrap needs: the caps of the
//! capped means, a fixed-point scale per (branch, metric), and the windows of sketch buckets
//! around each decile. Phase 2, [`BootstrapSummary`]: per replicate, exact integer sums of
//! weight × capped value, of weights, and of weights per decile-window bucket.
//!
//! Exactness: a weight is an integer below 2^21 units and a value an integer below 2^26 units
//! in magnitude, so a product is exact in f64 and a block of 16 products sums exactly in f64;
//! blocks go to i64, and i64 to i128 every 2048 blocks. All merges add integers. Hence the
//! result does not depend on how clients are split into partitions or in which order summaries
//! are merged.
//!
//! Speed: clients are grouped into cells (branch × exact segment membership), so each client's
//! weights are drawn once per replicate and each (client, metric, replicate) costs one
//! multiply-add for the means and one add for the deciles, whatever the number of segments; a
//! cell's totals are then added to every segment that contains it. Capping differs between
//! segments, so cells sum values capped at the largest cap of the branch, and each segment
//! subtracts `w · (x - cap)` for the few clients above its own cap. Replicates are processed in
//! chunks of 128 (cache-resident accumulators), chunks spread over threads.

use super::exact::ExactSum;
use super::sketch::{bucket_key, QuantileSketch};
use super::weights::{client_key, fill_generic};
use super::{CapMode, MetricSpec, StatisticKind, StatsError, StatsOptions, WindowInput};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Replicates per chunk.
pub const CHUNK: usize = 128;
/// Products summed in f64 before moving to integers (16 × 2^47 = 2^51).
const BLOCK: usize = 16;
/// Blocks summed in i64 before moving to i128 (2048 × 2^51 = 2^62).
const BLOCKS_PER_I64: usize = 2048;
/// Largest |value| in fixed-point units.
const VALUE_BITS: i32 = 26;
/// Half-width of a decile window in standard deviations of the rank.
const WINDOW_SIGMAS: f64 = 4.0;

/// The configuration that summaries must share to be merged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub branches: Vec<String>,
    /// Configured segments (without the implicit "all").
    pub segments: Vec<String>,
    pub metrics: Vec<MetricSpec>,
}

impl Layout {
    fn of(input: &WindowInput) -> Self {
        Self {
            branches: input.branches.to_vec(),
            segments: input.segments.to_vec(),
            metrics: input.metrics.to_vec(),
        }
    }

    /// Segments including "all" (index 0).
    pub fn n_segments(&self) -> usize {
        self.segments.len() + 1
    }

    /// Name of output segment s ("all" for 0).
    pub fn segment_name(&self, s: usize) -> &str {
        if s == 0 {
            "all"
        } else {
            &self.segments[s - 1]
        }
    }

    /// Index of group (segment, branch, metric).
    pub fn group(&self, s: usize, b: usize, m: usize) -> usize {
        (s * self.branches.len() + b) * self.metrics.len() + m
    }

    fn n_groups(&self) -> usize {
        self.n_segments() * self.branches.len() * self.metrics.len()
    }
}

/// Phase-1 summary of one (segment, branch, metric).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupDistribution {
    pub sketch: QuantileSketch,
    pub sum: ExactSum,
    /// Values different from 0 (the binomial's successes).
    pub nonzero: u64,
}

impl GroupDistribution {
    fn merge(&mut self, o: &GroupDistribution) {
        self.sketch.merge(&o.sketch);
        self.sum.merge(&o.sum);
        self.nonzero += o.nonzero;
    }
}

/// Phase 1: mergeable distribution summary of a subset of a window's clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DistributionSummary {
    pub layout: Layout,
    /// Clients per (segment, branch).
    identity: Vec<u64>,
    groups: Vec<GroupDistribution>,
}

/// Clients grouped by (branch, segment bits).
struct Cells {
    /// Client indices, sorted by cell then index.
    order: Vec<u32>,
    /// (branch, output segments containing the cell, range in `order`).
    cells: Vec<(usize, Vec<usize>, std::ops::Range<usize>)>,
}

fn cells_of(input: &WindowInput) -> Cells {
    let mut order: Vec<u32> = (0..input.len() as u32).collect();
    order.sort_unstable_by_key(|&i| (input.branch[i as usize], input.segment_bits[i as usize], i));
    let mut cells = Vec::new();
    let mut start = 0;
    while start < order.len() {
        let i = order[start] as usize;
        let key = (input.branch[i], input.segment_bits[i]);
        let mut end = start + 1;
        while end < order.len() {
            let j = order[end] as usize;
            if (input.branch[j], input.segment_bits[j]) != key {
                break;
            }
            end += 1;
        }
        let segs = std::iter::once(0)
            .chain(
                (0..input.segments.len())
                    .filter(|s| key.1 >> s & 1 == 1)
                    .map(|s| s + 1),
            )
            .collect();
        cells.push((key.0 as usize, segs, start..end));
        start = end;
    }
    Cells { order, cells }
}

/// The value of metric m for client i, if usable (NULL and non-finite values are skipped).
#[inline]
fn value(input: &WindowInput, m: usize, i: usize) -> Option<f64> {
    input.values[m][i].filter(|x| x.is_finite())
}

impl DistributionSummary {
    /// Summarizes the clients of `input` (all of a window, or one partition of it).
    pub fn from_input(input: &WindowInput) -> Result<Self, StatsError> {
        input.validate()?;
        let layout = Layout::of(input);
        let nb = layout.branches.len();
        let mut identity = vec![0u64; layout.n_segments() * nb];
        let mut groups = vec![GroupDistribution::default(); layout.n_groups()];
        let cells = cells_of(input);
        for (b, segs, range) in &cells.cells {
            for &s in segs {
                identity[s * nb + b] += range.len() as u64;
            }
        }
        // Metrics are independent: two threads take every other metric.
        let nm = layout.metrics.len();
        let per_metric = |m: usize| {
            let mut out = vec![GroupDistribution::default(); layout.n_segments() * nb];
            let mut buf = Vec::new();
            for (b, segs, range) in &cells.cells {
                buf.clear();
                let mut g = GroupDistribution::default();
                for &i in &cells.order[range.clone()] {
                    if let Some(x) = value(input, m, i as usize) {
                        buf.push(x);
                        g.sum.add(x);
                        g.nonzero += (x != 0.0) as u64;
                    }
                }
                g.sketch = QuantileSketch::from_values(&mut buf);
                for &s in segs {
                    out[s * nb + b].merge(&g);
                }
            }
            out
        };
        let results: Vec<(usize, Vec<GroupDistribution>)> = std::thread::scope(|sc| {
            let other = sc.spawn(|| {
                (1..nm)
                    .step_by(2)
                    .map(|m| (m, per_metric(m)))
                    .collect::<Vec<_>>()
            });
            let mut mine: Vec<_> = (0..nm).step_by(2).map(|m| (m, per_metric(m))).collect();
            mine.extend(other.join().expect("phase-1 worker panicked"));
            mine
        });
        for (m, out) in results {
            for s in 0..layout.n_segments() {
                for b in 0..nb {
                    groups[layout.group(s, b, m)] = out[s * nb + b].clone();
                }
            }
        }
        Ok(Self {
            layout,
            identity,
            groups,
        })
    }

    /// Adds another partition's summary.
    pub fn merge(&mut self, other: &DistributionSummary) -> Result<(), StatsError> {
        if self.layout != other.layout {
            return Err(StatsError::LayoutMismatch);
        }
        for (a, b) in self.identity.iter_mut().zip(&other.identity) {
            *a += b;
        }
        for (a, b) in self.groups.iter_mut().zip(&other.groups) {
            a.merge(b);
        }
        Ok(())
    }

    /// Clients in (segment, branch).
    pub fn identity(&self, s: usize, b: usize) -> u64 {
        self.identity[s * self.layout.branches.len() + b]
    }

    /// Phase-1 summary of (segment, branch, metric).
    pub fn group(&self, s: usize, b: usize, m: usize) -> &GroupDistribution {
        &self.groups[self.layout.group(s, b, m)]
    }
}

/// What the bootstrap of one (branch, metric) needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BranchMetricPlan {
    /// Distinct `drop_highest` of the metric's means, in spec order.
    pub variants: Vec<f64>,
    pub deciles: bool,
    /// Values are first capped at this (the largest cap over variants and segments).
    pub precap: f64,
    /// Fixed-point units per 1.0 (a power of two).
    pub scale: f64,
    /// Quantized cap per (variant, segment); +inf for an empty segment.
    pub caps_q: Vec<f64>,
    /// Start keys of the decile slots: windows are single sketch buckets, gaps are ranges.
    pub slot_starts: Vec<i32>,
    /// Per (segment, decile 1..=9): first and last slot of the window (inclusive).
    pub windows: Vec<(u32, u32)>,
    /// [`CapMode::PerReplicate`]: per (variant, segment) the slots where a replicate's cap
    /// may fall (None for `drop_highest = 0` or an empty segment).
    pub cap_windows: Vec<Option<(u32, u32)>>,
    /// First slot of the cap region: clients at or above it carry Σ w·x per slot.
    pub cap_start: u32,
    /// Whether slot weights are needed (deciles or per-replicate caps).
    pub slotted: bool,
    /// First row of this (branch, metric) in the chunk arrays, per segment.
    sum_row: Vec<usize>,
    w_row: Vec<usize>,
    slot_row: Vec<usize>,
    wx_row: Vec<usize>,
}

impl BranchMetricPlan {
    fn slot_of(&self, x: f64) -> u32 {
        let key = bucket_key(x);
        (self.slot_starts.partition_point(|&st| st <= key) - 1) as u32
    }

    /// Rows (sums, weights, slots) of segment s.
    pub fn rows(&self, s: usize) -> (usize, usize, usize) {
        (self.sum_row[s], self.w_row[s], self.slot_row[s])
    }

    /// First Σ w·x row (one per slot from `cap_start`) of segment s.
    pub fn wx_row(&self, s: usize) -> usize {
        self.wx_row[s]
    }

    /// Slots from `cap_start` to the top (0 without per-replicate caps).
    pub fn n_cap_slots(&self) -> usize {
        self.slot_starts
            .len()
            .saturating_sub(self.cap_start as usize)
    }
}

/// The bootstrap's parameters, derived deterministically from the merged phase-1 summary.
/// Every partition's phase 2 must use the same plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootstrapPlan {
    pub dist: DistributionSummary,
    pub replicates: usize,
    pub seed: u64,
    pub threads: usize,
    pub cap_mode: CapMode,
    /// Per (branch, metric); None when the metric has no mean or deciles or the branch no values.
    pub metric_plans: Vec<Option<BranchMetricPlan>>,
    n_sum_rows: usize,
    n_w_rows: usize,
    n_slot_rows: usize,
    n_wx_rows: usize,
    /// Hash of everything a phase-2 summary depends on, checked on merge.
    fingerprint: u64,
}

/// 2^e as f64, for e in the normal exponent range.
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e.clamp(-1022, 1023) + 1023) as u64) << 52)
}

/// Smallest t with |b| <= 2^t, from the bits (no libm, so identical everywhere).
fn ceil_log2(b: f64) -> i32 {
    let bits = b.abs().to_bits();
    let biased = (bits >> 52) as i32;
    if biased == 0 {
        return -1022;
    }
    let e = biased - 1023;
    if bits & ((1u64 << 52) - 1) == 0 {
        e
    } else {
        e + 1
    }
}

impl BootstrapPlan {
    /// Plans phase 2 from the merged phase-1 summary of the whole window.
    pub fn new(dist: DistributionSummary, opts: &StatsOptions) -> Self {
        let layout = &dist.layout;
        let (nb, nm, ns) = (
            layout.branches.len(),
            layout.metrics.len(),
            layout.n_segments(),
        );
        let mut plans = Vec::with_capacity(nb * nm);
        let (mut n_sum_rows, mut n_w_rows, mut n_slot_rows, mut n_wx_rows) = (0, 0, 0, 0);
        let per_replicate = opts.cap_mode == CapMode::PerReplicate;
        for b in 0..nb {
            for (m, spec) in layout.metrics.iter().enumerate() {
                let mut variants: Vec<f64> = Vec::new();
                let mut deciles = false;
                for st in &spec.statistics {
                    match st.kind {
                        StatisticKind::Mean { drop_highest } => {
                            let d = drop_highest.clamp(0.0, 1.0);
                            if !variants.iter().any(|v| v.to_bits() == d.to_bits()) {
                                variants.push(d);
                            }
                        }
                        StatisticKind::Deciles => deciles = true,
                        _ => {}
                    }
                }
                let all = &dist.group(0, b, m).sketch;
                if (variants.is_empty() && !deciles) || all.count() == 0 {
                    plans.push(None);
                    continue;
                }
                let mut caps = vec![f64::INFINITY; variants.len() * ns];
                let mut precap = f64::NEG_INFINITY;
                for (v, d) in variants.iter().enumerate() {
                    for s in 0..ns {
                        if let Some(c) = dist.group(s, b, m).sketch.quantile(1.0 - d) {
                            caps[v * ns + s] = c;
                            precap = precap.max(c);
                        }
                    }
                }
                if variants.is_empty() {
                    precap = all.max().unwrap();
                }
                // Per-replicate caps: (quantile, segment) per (variant, segment).
                let cap_quantiles: Vec<Option<(f64, usize)>> = if per_replicate {
                    let mut v = Vec::new();
                    for &d in &variants {
                        for s in 0..ns {
                            let some = d > 0.0 && dist.group(s, b, m).sketch.count() > 0;
                            v.push(some.then_some((1.0 - d, s)));
                        }
                    }
                    v
                } else {
                    vec![]
                };
                if per_replicate {
                    // Values above every cap window are capped in every replicate: pre-cap at
                    // the largest value of the highest window (or the maximum for d = 0).
                    precap = f64::NEG_INFINITY;
                    for (i, w) in cap_quantiles.iter().enumerate() {
                        let sk = &dist.group(i % ns, b, m).sketch;
                        match w {
                            Some((q, _)) => {
                                let (_, hi) = rank_window(sk.count(), *q);
                                let (ib, _) = sk.locate(hi);
                                precap = precap.max(sk.buckets()[ib].max);
                            }
                            None => {
                                if let Some(x) = sk.max() {
                                    precap = precap.max(x);
                                }
                            }
                        }
                    }
                    if variants.is_empty() {
                        precap = all.max().unwrap();
                    }
                }
                let bound = precap.abs().max(all.min().unwrap().abs());
                let scale = if bound == 0.0 {
                    1.0
                } else {
                    pow2(VALUE_BITS - ceil_log2(bound))
                };
                let caps_q = caps
                    .iter()
                    .map(|&c| {
                        if c.is_finite() {
                            (c * scale).round()
                        } else {
                            c
                        }
                    })
                    .collect();
                let deciles_q: Vec<f64> = if deciles {
                    (1..=9).map(|d| d as f64 / 10.0).collect()
                } else {
                    vec![]
                };
                let (slot_starts, windows, cap_windows) =
                    quantile_slots(&dist, b, m, &deciles_q, &cap_quantiles);
                let cap_start = cap_windows
                    .iter()
                    .flatten()
                    .map(|w| w.0)
                    .min()
                    .unwrap_or(u32::MAX);
                let slotted = deciles || cap_start != u32::MAX;
                let nslots = slot_starts.len();
                let mut p = BranchMetricPlan {
                    variants,
                    deciles,
                    precap,
                    scale,
                    caps_q,
                    slot_starts,
                    windows,
                    cap_windows,
                    cap_start,
                    slotted,
                    sum_row: vec![],
                    w_row: vec![],
                    slot_row: vec![],
                    wx_row: vec![],
                };
                let ncap = p.n_cap_slots();
                for _ in 0..ns {
                    p.sum_row.push(n_sum_rows);
                    n_sum_rows += p.variants.len();
                    p.w_row.push(n_w_rows);
                    n_w_rows += 1;
                    p.slot_row.push(n_slot_rows);
                    n_slot_rows += if slotted { nslots } else { 0 };
                    p.wx_row.push(n_wx_rows);
                    n_wx_rows += ncap;
                }
                plans.push(Some(p));
            }
        }
        let mut plan = Self {
            dist,
            replicates: opts.replicates,
            seed: opts.seed,
            threads: opts.threads.max(1),
            cap_mode: opts.cap_mode,
            metric_plans: plans,
            n_sum_rows,
            n_w_rows,
            n_slot_rows,
            n_wx_rows,
            fingerprint: 0,
        };
        plan.fingerprint = plan.compute_fingerprint();
        plan
    }

    fn compute_fingerprint(&self) -> u64 {
        let mut bytes: Vec<u8> = Vec::new();
        bytes.extend((self.replicates as u64).to_le_bytes());
        bytes.extend(self.seed.to_le_bytes());
        bytes.push(self.cap_mode as u8);
        for p in self.metric_plans.iter() {
            match p {
                None => bytes.push(0),
                Some(p) => {
                    bytes.push(1);
                    for x in p
                        .variants
                        .iter()
                        .chain(&p.caps_q)
                        .chain([&p.precap, &p.scale])
                    {
                        bytes.extend(x.to_bits().to_le_bytes());
                    }
                    for k in &p.slot_starts {
                        bytes.extend(k.to_le_bytes());
                    }
                }
            }
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }

    /// Plan of (branch, metric).
    pub fn metric_plan(&self, b: usize, m: usize) -> Option<&BranchMetricPlan> {
        self.metric_plans[b * self.dist.layout.metrics.len() + m].as_ref()
    }
}

/// Ranks (0-based, inclusive) within ±(4σ + 2) of the q-quantile of n values, σ = sqrt(q(1-q)n).
fn rank_window(n: u64, q: f64) -> (u64, u64) {
    let h = q * (n - 1) as f64;
    let half = WINDOW_SIGMAS * (q * (1.0 - q) * n as f64).sqrt() + 2.0;
    (
        (h - half).floor().max(0.0) as u64,
        ((h + half).ceil() as u64).min(n - 1),
    )
}

/// Window slots: per (segment, decile) and per (variant, segment) cap.
type Windows = (Vec<i32>, Vec<(u32, u32)>, Vec<Option<(u32, u32)>>);

/// Slots for (branch, metric): single sketch buckets in the union over segments of the rank
/// windows around each decile and each per-replicate cap, and gaps between them. Returns the
/// slot start keys and, per (segment, decile) and per (variant, segment) cap, window slots.
fn quantile_slots(
    dist: &DistributionSummary,
    b: usize,
    m: usize,
    deciles: &[f64],
    caps: &[Option<(f64, usize)>],
) -> Windows {
    let ns = dist.layout.n_segments();
    let mut keys = Vec::new();
    let mut window_keys = |s: usize, q: f64| -> Option<(i32, i32)> {
        let sk = &dist.group(s, b, m).sketch;
        if sk.count() == 0 {
            return None;
        }
        let (lo, hi) = rank_window(sk.count(), q);
        let (ilo, _) = sk.locate(lo);
        let (ihi, _) = sk.locate(hi);
        let bk = sk.buckets();
        keys.extend(bk[ilo..=ihi].iter().map(|x| x.key));
        Some((bk[ilo].key, bk[ihi].key))
    };
    let mut dec_keys = vec![None; ns * 9];
    for s in 0..ns {
        for (d, &q) in deciles.iter().enumerate() {
            dec_keys[s * 9 + d] = window_keys(s, q);
        }
    }
    let cap_keys: Vec<Option<(i32, i32)>> = caps
        .iter()
        .map(|c| c.and_then(|(q, s)| window_keys(s, q)))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut starts = Vec::with_capacity(2 * keys.len() + 1);
    let mut cursor = i32::MIN;
    for &k in &keys {
        if k > cursor {
            starts.push(cursor);
        }
        starts.push(k);
        cursor = k + 1;
    }
    starts.push(cursor);
    let slot = |key: i32| (starts.partition_point(|&st| st <= key) - 1) as u32;
    let windows = dec_keys
        .iter()
        .map(|w| w.map_or((0, 0), |(a, z)| (slot(a), slot(z))))
        .collect();
    let cap_windows = cap_keys
        .iter()
        .map(|w| w.map(|(a, z)| (slot(a), slot(z))))
        .collect();
    (starts, windows, cap_windows)
}

/// Phase-2 sums for replicates `start .. start + len`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Chunk {
    start: usize,
    len: usize,
    /// Per sum row: Σ w·x (capped, in units²).
    sums: Vec<i128>,
    /// Per weight row: Σ w over non-NULL values.
    wsum: Vec<u64>,
    /// Per slot row: Σ w of the values in the slot.
    slots: Vec<u64>,
    /// Per cap-region slot row: Σ w·x (pre-capped, in units²).
    wx: Vec<i128>,
}

/// Phase 2: mergeable bootstrap sums of a subset of a window's clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BootstrapSummary {
    fingerprint: u64,
    chunks: Vec<Chunk>,
}

/// Client data prepared for the kernel, in cell order.
struct Prepared {
    keys: Vec<u64>,
    /// [client][metric] capped value in units; NaN for NULL or an unplanned metric.
    xq: Vec<f64>,
    /// [client][metric] decile slot.
    slot: Vec<u32>,
}

impl BootstrapSummary {
    /// Sums the replicates of the clients of `input` (all of a window, or one partition).
    pub fn from_input(input: &WindowInput, plan: &BootstrapPlan) -> Result<Self, StatsError> {
        input.validate()?;
        if Layout::of(input) != plan.dist.layout {
            return Err(StatsError::LayoutMismatch);
        }
        let cells = cells_of(input);
        let nm = input.metrics.len();
        let n = input.len();
        let mut prep = Prepared {
            keys: vec![0; n],
            xq: vec![f64::NAN; n * nm],
            slot: vec![0; n * nm],
        };
        for (k, &i) in cells.order.iter().enumerate() {
            let i = i as usize;
            prep.keys[k] = client_key(plan.seed, input.client_hash[i]);
            let b = input.branch[i] as usize;
            for m in 0..nm {
                let (Some(p), Some(x)) = (plan.metric_plan(b, m), value(input, m, i)) else {
                    continue;
                };
                prep.xq[k * nm + m] = (x.min(p.precap) * p.scale).round();
                if p.slotted {
                    prep.slot[k * nm + m] = p.slot_of(x);
                }
            }
        }
        let n_chunks = plan.replicates.div_ceil(CHUNK);
        let next = AtomicUsize::new(0);
        let done: Mutex<Vec<Option<Chunk>>> = Mutex::new(vec![None; n_chunks]);
        let work = || {
            // One set of accumulators per thread, reused by every cell of every chunk.
            let mut scratch = Scratch::default();
            loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= n_chunks {
                    break;
                }
                let start = c * CHUNK;
                let chunk = run_chunk(
                    plan,
                    &cells,
                    &prep,
                    nm,
                    (start, CHUNK.min(plan.replicates - start)),
                    &mut scratch,
                );
                done.lock().unwrap()[c] = Some(chunk);
            }
        };
        std::thread::scope(|sc| {
            for _ in 1..plan.threads.min(n_chunks.max(1)) {
                sc.spawn(work);
            }
            work();
        });
        let chunks = done
            .into_inner()
            .unwrap()
            .into_iter()
            .map(Option::unwrap)
            .collect();
        Ok(Self {
            fingerprint: plan.fingerprint,
            chunks,
        })
    }

    /// Adds another partition's sums (computed with the same plan).
    pub fn merge(&mut self, other: &BootstrapSummary) -> Result<(), StatsError> {
        if self.fingerprint != other.fingerprint || self.chunks.len() != other.chunks.len() {
            return Err(StatsError::LayoutMismatch);
        }
        for (a, b) in self.chunks.iter_mut().zip(&other.chunks) {
            a.sums.iter_mut().zip(&b.sums).for_each(|(x, y)| *x += y);
            a.wsum.iter_mut().zip(&b.wsum).for_each(|(x, y)| *x += y);
            a.slots.iter_mut().zip(&b.slots).for_each(|(x, y)| *x += y);
            a.wx.iter_mut().zip(&b.wx).for_each(|(x, y)| *x += y);
        }
        Ok(())
    }

    /// Whether this summary was computed with `plan`.
    pub fn matches(&self, plan: &BootstrapPlan) -> bool {
        self.fingerprint == plan.fingerprint
    }

    /// Replicate values of a sum row.
    pub(crate) fn sums(&self, row: usize) -> Vec<i128> {
        self.chunks
            .iter()
            .flat_map(|c| c.sums[row * c.len..(row + 1) * c.len].iter().copied())
            .collect()
    }

    pub(crate) fn wsum(&self, row: usize) -> Vec<u64> {
        self.chunks
            .iter()
            .flat_map(|c| c.wsum[row * c.len..(row + 1) * c.len].iter().copied())
            .collect()
    }

    /// Slot weights of `nslots` rows from `row`, as [replicate][slot].
    pub(crate) fn slots(&self, row: usize, nslots: usize) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        for c in &self.chunks {
            for j in 0..c.len {
                out.push(
                    (0..nslots)
                        .map(|u| c.slots[(row + u) * c.len + j])
                        .collect(),
                );
            }
        }
        out
    }

    /// Σ w·x of `n` cap-region rows from `row`, as [replicate][slot].
    pub(crate) fn wx(&self, row: usize, n: usize) -> Vec<Vec<i128>> {
        let mut out = Vec::new();
        for c in &self.chunks {
            for j in 0..c.len {
                out.push((0..n).map(|u| c.wx[(row + u) * c.len + j]).collect());
            }
        }
        out
    }
}

#[inline(always)]
fn add_to(acc: &mut [f64], w: &[f64]) {
    for (a, &x) in acc.iter_mut().zip(w) {
        *a += x;
    }
}

#[inline(always)]
fn axpy(acc: &mut [f64], w: &[f64], x: f64) {
    for (a, &y) in acc.iter_mut().zip(w) {
        *a += y * x;
    }
}

/// Moves exact f64 block sums into i64 accumulators.
#[inline(always)]
fn flush_block(blk: &mut [f64], acc: &mut [i64]) {
    // |b| < 2^51 is an integer: adding 1.5 · 2^52 puts it in the low mantissa bits exactly.
    const MAGIC: f64 = 6_755_399_441_055_744.0;
    for (b, a) in blk.iter_mut().zip(acc.iter_mut()) {
        *a += ((*b + MAGIC).to_bits() as i64).wrapping_sub(MAGIC.to_bits() as i64);
        *b = 0.0;
    }
}

/// Tests set this to run the baseline (SSE2) kernel and compare it with the vectorized ones.
#[cfg(test)]
pub(crate) static FORCE_BASELINE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// A kernel thread's accumulators for one cell, kept between cells and chunks: fresh
/// zeroed buffers each time cost more in page faults than the kernel's own work.
#[derive(Default)]
struct Scratch {
    w: Vec<f64>,
    blk: Vec<f64>,
    s64: Vec<i64>,
    s128: Vec<i128>,
    wall: Vec<f64>,
    wnull: Vec<f64>,
    slotacc: Vec<f64>,
}

/// `v` as `n` zeros, reusing its allocation.
fn zeroed<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    v.clear();
    v.resize(n, T::default());
    v
}

fn run_chunk(
    plan: &BootstrapPlan,
    cells: &Cells,
    prep: &Prepared,
    nm: usize,
    range: (usize, usize),
    scratch: &mut Scratch,
) -> Chunk {
    #[cfg(test)]
    if FORCE_BASELINE.load(Ordering::Relaxed) {
        return run_chunk_generic(plan, cells, prep, nm, range, scratch);
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: the CPU supports these features, checked just above.
        return unsafe { run_chunk_avx512(plan, cells, prep, nm, range, scratch) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { run_chunk_avx2(plan, cells, prep, nm, range, scratch) };
    }
    run_chunk_generic(plan, cells, prep, nm, range, scratch)
}

/// The same kernel compiled for AVX-512 (identical results: no fused operations are used).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw")]
fn run_chunk_avx512(
    plan: &BootstrapPlan,
    cells: &Cells,
    prep: &Prepared,
    nm: usize,
    range: (usize, usize),
    scratch: &mut Scratch,
) -> Chunk {
    run_chunk_generic(plan, cells, prep, nm, range, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn run_chunk_avx2(
    plan: &BootstrapPlan,
    cells: &Cells,
    prep: &Prepared,
    nm: usize,
    range: (usize, usize),
    scratch: &mut Scratch,
) -> Chunk {
    run_chunk_generic(plan, cells, prep, nm, range, scratch)
}

/// The kernel: one chunk of replicates over all clients, cell by cell.
#[inline(always)]
fn run_chunk_generic(
    plan: &BootstrapPlan,
    cells: &Cells,
    prep: &Prepared,
    nm: usize,
    (start, len): (usize, usize),
    scratch: &mut Scratch,
) -> Chunk {
    let mut chunk = Chunk {
        start,
        len,
        sums: vec![0; plan.n_sum_rows * len],
        wsum: vec![0; plan.n_w_rows * len],
        slots: vec![0; plan.n_slot_rows * len],
        wx: vec![0; plan.n_wx_rows * len],
    };
    let ns = plan.dist.layout.n_segments();
    let Scratch {
        w,
        blk,
        s64,
        s128,
        wall,
        wnull,
        slotacc,
    } = scratch;
    let w = zeroed(w, len);
    for (b, segs, range) in &cells.cells {
        let b = *b;
        // Planned metrics of this branch, with their slot offsets in the cell's slot table.
        let mut planned: Vec<(usize, &BranchMetricPlan, usize)> = Vec::new();
        let mut nslot_rows = 0;
        for m in 0..nm {
            if let Some(p) = plan.metric_plan(b, m) {
                planned.push((m, p, nslot_rows));
                if p.slotted {
                    nslot_rows += p.slot_starts.len();
                }
            }
        }
        if planned.is_empty() {
            continue;
        }
        let np = planned.len();
        let blk = zeroed(blk, np * len);
        let s64 = zeroed(s64, np * len);
        let s128 = zeroed(s128, np * len);
        let wall = zeroed(wall, len);
        let wnull = zeroed(wnull, np * len);
        let slotacc = zeroed(slotacc, nslot_rows * len);
        let (mut in_block, mut blocks) = (0, 0);
        for k in range.clone() {
            fill_generic(prep.keys[k], start as u32, w);
            add_to(wall, w);
            for (j, &(m, p, soff)) in planned.iter().enumerate() {
                let x = prep.xq[k * nm + m];
                if x.is_nan() {
                    add_to(&mut wnull[j * len..(j + 1) * len], w);
                    continue;
                }
                if !p.variants.is_empty() {
                    axpy(&mut blk[j * len..(j + 1) * len], w, x);
                    let fixed = plan.cap_mode == CapMode::Fixed;
                    for v in 0..p.variants.len() * fixed as usize {
                        for &s in segs {
                            let c = p.caps_q[v * ns + s];
                            if x > c {
                                let d = x - c;
                                let row = p.sum_row[s] + v;
                                for (acc, &wr) in chunk.sums[row * len..(row + 1) * len]
                                    .iter_mut()
                                    .zip(w.iter())
                                {
                                    *acc -= (wr * d) as i64 as i128;
                                }
                            }
                        }
                    }
                }
                let slot = prep.slot[k * nm + m];
                if p.deciles || (p.slotted && slot >= p.cap_start) {
                    let u = soff + slot as usize;
                    add_to(&mut slotacc[u * len..(u + 1) * len], w);
                }
                if slot >= p.cap_start {
                    // Near or above a per-replicate cap: Σ w·x per slot, exactly.
                    for &s in segs {
                        let row = p.wx_row[s] + (slot - p.cap_start) as usize;
                        for (acc, &wr) in chunk.wx[row * len..(row + 1) * len]
                            .iter_mut()
                            .zip(w.iter())
                        {
                            *acc += (wr * x) as i64 as i128;
                        }
                    }
                }
            }
            in_block += 1;
            if in_block == BLOCK {
                in_block = 0;
                flush_block(blk, s64);
                blocks += 1;
                if blocks == BLOCKS_PER_I64 {
                    blocks = 0;
                    for (a, b) in s128.iter_mut().zip(s64.iter_mut()) {
                        *a += *b as i128;
                        *b = 0;
                    }
                }
            }
        }
        flush_block(blk, s64);
        for (a, b) in s128.iter_mut().zip(s64.iter()) {
            *a += *b as i128;
        }
        for (j, &(_, p, soff)) in planned.iter().enumerate() {
            for &s in segs {
                for v in 0..p.variants.len() {
                    let row = p.sum_row[s] + v;
                    for (a, &x) in chunk.sums[row * len..(row + 1) * len]
                        .iter_mut()
                        .zip(&s128[j * len..])
                    {
                        *a += x;
                    }
                }
                let row = p.w_row[s];
                for r in 0..len {
                    chunk.wsum[row * len + r] += (wall[r] - wnull[j * len + r]) as u64;
                }
                if p.slotted {
                    let rows = p.slot_starts.len();
                    let dst = &mut chunk.slots[p.slot_row[s] * len..(p.slot_row[s] + rows) * len];
                    for (a, &x) in dst
                        .iter_mut()
                        .zip(&slotacc[soff * len..(soff + rows) * len])
                    {
                        *a += x as u64;
                    }
                }
            }
        }
    }
    chunk
}

/// Mean of replicate r in value units: S / W / scale, exact when W divides S.
pub(crate) fn replicate_mean(s: i128, w: u64, scale: f64) -> Option<f64> {
    if w == 0 {
        return None;
    }
    let w = w as i128;
    let q = s.div_euclid(w);
    let r = s.rem_euclid(w);
    let units = q as f64 + r as f64 / w as f64;
    Some(units / scale)
}
