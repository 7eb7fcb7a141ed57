//! Per-client accumulators, and folding them into one row per client and window.
//!
//! Two records hold everything the windows need:
//! - [`DailyRecord`]: one per (client, UTC day) of telemetry, grouped by the experiment tags
//!   the events carried, with per-field sums in fixed point (so folding order never
//!   changes a bit of the result), counts and maxima;
//! - [`EnrollmentRecord`]: one per (experiment, client): first enrollment, exposure and
//!   unenrollment, with event counts.
//!
//! Both merge commutatively and associatively, so events may arrive in any order and in
//! any batch split, across topics, and the state is the same. Windows are computed at
//! materialization time from a client's daily records: cost grows with events, and
//! publishing a window never re-reads raw history.

use serde::{Deserialize, Serialize};

use crate::config::{Aggregation, Experiment, MetricValueType};
use crate::event::{Day, TelemetryEvent, Timestamp};
use crate::window::Window;

/// Metric sums are kept in units of 1e-9, exactly, in an i128.
pub const FIXED_POINT_SCALE: f64 = 1e9;

fn to_fixed(x: f64) -> i128 {
    (x * FIXED_POINT_SCALE).round() as i128
}

fn from_fixed(x: i128) -> f64 {
    x as f64 / FIXED_POINT_SCALE
}

/// Accumulator for one metric field of one data source on one day.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FieldAcc {
    /// Index into the state's field layout ([`crate::state::Layout`]).
    pub field: u16,
    pub sum: i128,
    pub count: u32,
    pub max: f64,
}

/// One data source's events of one day under one tag signature.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct SourceDay {
    /// Index into the state's data source layout.
    pub source: u16,
    pub events: u32,
    /// Sorted by field.
    pub fields: Vec<FieldAcc>,
}

/// Events of one day that carried the same experiment tags.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TagGroup {
    /// (experiment, reported branch) as layout indices, for configured experiments, sorted;
    /// a branch the config does not know is [`crate::state::UNKNOWN_BRANCH`].
    pub tags: Vec<(u16, u16)>,
    /// Sorted by source.
    pub sources: Vec<SourceDay>,
}

/// All of a client's telemetry on one UTC day.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DailyRecord {
    pub groups: Vec<TagGroup>,
}

impl DailyRecord {
    /// Folds one event; `tags` must be sorted and `fields` are (layout field index, value).
    pub fn add_event(&mut self, tags: &[(u16, u16)], source: u16, fields: &[(u16, f64)]) {
        let group = match self
            .groups
            .binary_search_by(|g| g.tags.as_slice().cmp(tags))
        {
            Ok(i) => &mut self.groups[i],
            Err(at) => {
                let g = TagGroup {
                    tags: tags.to_vec(),
                    sources: Vec::new(),
                };
                self.groups.insert(at, g);
                &mut self.groups[at]
            }
        };
        let sd = match group.sources.binary_search_by_key(&source, |s| s.source) {
            Ok(i) => &mut group.sources[i],
            Err(i) => {
                group.sources.insert(
                    i,
                    SourceDay {
                        source,
                        ..Default::default()
                    },
                );
                &mut group.sources[i]
            }
        };
        sd.events += 1;
        for &(field, value) in fields {
            let acc = match sd.fields.binary_search_by_key(&field, |f| f.field) {
                Ok(i) => &mut sd.fields[i],
                Err(i) => {
                    sd.fields.insert(
                        i,
                        FieldAcc {
                            field,
                            sum: 0,
                            count: 0,
                            max: f64::NEG_INFINITY,
                        },
                    );
                    &mut sd.fields[i]
                }
            };
            acc.sum += to_fixed(value);
            acc.count += 1;
            acc.max = acc.max.max(value);
        }
    }

    /// Adds another record of the same (client, day) into this one.
    pub fn merge(&mut self, other: &DailyRecord) {
        for og in &other.groups {
            let at = match self.groups.binary_search_by(|g| g.tags.cmp(&og.tags)) {
                Ok(i) => i,
                Err(i) => {
                    self.groups.insert(
                        i,
                        TagGroup {
                            tags: og.tags.clone(),
                            sources: Vec::new(),
                        },
                    );
                    i
                }
            };
            let g = &mut self.groups[at];
            for os in &og.sources {
                let si = match g.sources.binary_search_by_key(&os.source, |s| s.source) {
                    Ok(i) => i,
                    Err(i) => {
                        g.sources.insert(
                            i,
                            SourceDay {
                                source: os.source,
                                ..Default::default()
                            },
                        );
                        i
                    }
                };
                let s = &mut g.sources[si];
                s.events += os.events;
                for of in &os.fields {
                    match s.fields.binary_search_by_key(&of.field, |f| f.field) {
                        Ok(i) => {
                            let f = &mut s.fields[i];
                            f.sum += of.sum;
                            f.count += of.count;
                            f.max = f.max.max(of.max);
                        }
                        Err(i) => s.fields.insert(i, *of),
                    }
                }
            }
        }
    }
}

/// The first enrollment of a client in an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    pub branch: String,
    pub timestamp: i64,
    /// Enrollment dimensions (sorted), for segments and per-branch slicing.
    pub dimensions: Vec<(String, String)>,
}

/// A client's enrollment history in one experiment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    /// The earliest `enroll` within the enrollment period (ties broken by branch name).
    pub enrolled: Option<Enrolled>,
    /// `enroll` events within the enrollment period.
    pub num_enrollment_events: u32,
    pub first_exposure: Option<i64>,
    pub num_exposure_events: u32,
    pub first_unenrollment: Option<i64>,
    pub num_unenrollment_events: u32,
}

fn min_opt(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

impl EnrollmentRecord {
    /// Commutative, associative merge: the result does not depend on arrival order.
    pub fn merge(&mut self, o: &EnrollmentRecord) {
        if let Some(e) = &o.enrolled {
            let replace = match &self.enrolled {
                None => true,
                Some(cur) => (e.timestamp, &e.branch) < (cur.timestamp, &cur.branch),
            };
            if replace {
                self.enrolled = Some(e.clone());
            }
        }
        self.num_enrollment_events += o.num_enrollment_events;
        self.first_exposure = min_opt(self.first_exposure, o.first_exposure);
        self.num_exposure_events += o.num_exposure_events;
        self.first_unenrollment = min_opt(self.first_unenrollment, o.first_unenrollment);
        self.num_unenrollment_events += o.num_unenrollment_events;
    }

    pub fn enrollment_day(&self) -> Option<Day> {
        self.enrolled.as_ref().map(|e| Timestamp(e.timestamp).day())
    }
    pub fn exposure_day(&self) -> Option<Day> {
        self.first_exposure.map(|t| Timestamp(t).day())
    }
}

/// How one metric reads the daily records, resolved against the state layout.
#[derive(Debug, Clone)]
pub struct MetricPlan {
    pub source: u16,
    /// Layout field index; None counts events.
    pub field: Option<u16>,
    pub aggregation: Aggregation,
}

/// An experiment's metrics resolved to layout indices, built once per materialization.
#[derive(Debug, Clone)]
pub struct ExperimentPlan {
    /// The experiment's index in the layout's tag list.
    pub experiment_tag: u16,
    /// Layout branch index of each configured branch, in config order.
    pub branch_tags: Vec<u16>,
    pub metrics: Vec<MetricPlan>,
    /// Layout source index per data source flag pair, in [`Experiment::data_sources`] order.
    pub sources: Vec<u16>,
}

impl ExperimentPlan {
    pub fn new(exp: &Experiment, layout: &crate::state::Layout) -> Self {
        let metrics = exp
            .metrics
            .iter()
            .map(|m| MetricPlan {
                source: layout
                    .source_index(&m.data_source)
                    .expect("layout covers config"),
                field: m.field.as_ref().map(|f| {
                    layout
                        .field_index(&m.data_source, f)
                        .expect("layout covers config")
                }),
                aggregation: m.aggregation,
            })
            .collect();
        let sources = exp
            .data_sources()
            .iter()
            .map(|s| layout.source_index(s).expect("layout covers config"))
            .collect();
        let (experiment_tag, branch_tags) = layout.experiment_tags(exp);
        ExperimentPlan {
            experiment_tag,
            branch_tags,
            metrics,
            sources,
        }
    }
}

/// One client's values in one window.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WindowAggregate {
    /// One per metric; Int and Bool metrics are whole numbers (Bool as 0/1); None is NULL.
    pub values: Vec<Option<f64>>,
    /// (has_contradictory_branch, has_non_enrolled_data) per data source.
    pub flags: Vec<(bool, bool)>,
}

#[derive(Clone, Copy, Default)]
struct MetricAcc {
    sum: i128,
    count: u64,
    max: f64,
    any: bool,
    days: u32,
    active_today: bool,
}

/// Folds a client's daily records into one window's values.
///
/// `branch_tag` is the client's enrolled branch as a layout index
/// ([`ExperimentPlan::branch_tags`]); `days` are the client's records sorted by day. Days counted are
/// `basis_start + window.start ..= basis_start + window.end`; on the enrollment day itself,
/// only events tagged with the experiment count (as Jetstream does).
pub fn aggregate_window(
    plan: &ExperimentPlan,
    branch_tag: u16,
    enrollment_day: Day,
    basis_start: Day,
    window: &Window,
    days: &[(Day, DailyRecord)],
    out: &mut WindowAggregate,
) {
    let first = basis_start.plus(i64::from(window.start));
    let last = basis_start.plus(i64::from(window.end));
    let mut accs = vec![
        MetricAcc {
            max: f64::NEG_INFINITY,
            ..Default::default()
        };
        plan.metrics.len()
    ];
    out.flags.clear();
    out.flags.resize(plan.sources.len(), (false, false));
    let lo = days.partition_point(|(d, _)| *d < first);
    for (day, record) in days[lo..].iter().take_while(|(d, _)| *d <= last) {
        for a in accs.iter_mut() {
            a.active_today = false;
        }
        for group in &record.groups {
            let tag = group
                .tags
                .iter()
                .find(|(x, _)| *x == plan.experiment_tag)
                .map(|(_, b)| *b);
            if *day == enrollment_day && tag.is_none() {
                continue;
            }
            for sd in &group.sources {
                if let Some(fi) = plan.sources.iter().position(|s| *s == sd.source) {
                    let f = &mut out.flags[fi];
                    match tag {
                        Some(b) if b != branch_tag => f.0 = true,
                        None => f.1 = true,
                        _ => {}
                    }
                }
                for (mp, acc) in plan.metrics.iter().zip(accs.iter_mut()) {
                    if mp.source != sd.source {
                        continue;
                    }
                    match mp.field {
                        None => {
                            acc.count += u64::from(sd.events);
                            acc.any |= sd.events > 0;
                            acc.active_today |= sd.events > 0;
                        }
                        Some(field) => {
                            if let Ok(i) = sd.fields.binary_search_by_key(&field, |f| f.field) {
                                let f = &sd.fields[i];
                                acc.sum += f.sum;
                                acc.count += u64::from(f.count);
                                acc.max = acc.max.max(f.max);
                                acc.any |= f.max > 0.0;
                                acc.active_today |= f.max > 0.0;
                            }
                        }
                    }
                }
            }
        }
        for a in accs.iter_mut() {
            a.days += u32::from(a.active_today);
        }
    }
    out.values.clear();
    out.values.extend(
        plan.metrics
            .iter()
            .zip(&accs)
            .map(|(mp, a)| match mp.aggregation {
                Aggregation::Sum => Some(from_fixed(a.sum)),
                Aggregation::Count => Some(a.count as f64),
                Aggregation::Max => (a.count > 0).then_some(a.max),
                Aggregation::Mean => (a.count > 0).then(|| from_fixed(a.sum) / a.count as f64),
                Aggregation::Any => Some(if a.any { 1.0 } else { 0.0 }),
                Aggregation::Days => Some(f64::from(a.days)),
            }),
    );
}

/// The column type of a metric's value, for table schemas.
pub fn metric_type(a: Aggregation) -> MetricValueType {
    a.value_type()
}

/// Extracts (layout field index, value) for the fields the layout knows, from an event.
pub fn event_fields(
    layout: &crate::state::Layout,
    source: u16,
    ev: &TelemetryEvent<'_>,
    out: &mut Vec<(u16, f64)>,
) {
    out.clear();
    for (name, value) in &ev.metrics {
        if let Some(i) = layout.field_index_by_source(source, name) {
            out.push((i, *value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Period;

    fn plan() -> ExperimentPlan {
        ExperimentPlan {
            experiment_tag: 0,
            branch_tags: vec![0, 1],
            metrics: vec![
                MetricPlan {
                    source: 0,
                    field: Some(0),
                    aggregation: Aggregation::Sum,
                },
                MetricPlan {
                    source: 0,
                    field: None,
                    aggregation: Aggregation::Days,
                },
                MetricPlan {
                    source: 0,
                    field: None,
                    aggregation: Aggregation::Any,
                },
                MetricPlan {
                    source: 0,
                    field: Some(0),
                    aggregation: Aggregation::Mean,
                },
                MetricPlan {
                    source: 0,
                    field: Some(0),
                    aggregation: Aggregation::Max,
                },
                MetricPlan {
                    source: 0,
                    field: None,
                    aggregation: Aggregation::Count,
                },
            ],
            sources: vec![0],
        }
    }

    #[test]
    fn fixed_point_sums_are_order_independent() {
        let vals = [0.1, 0.2, 0.3, 1e6 + 0.7, 3.3];
        let mut a = DailyRecord::default();
        for v in vals {
            a.add_event(&[], 0, &[(0, v)]);
        }
        let (mut b, mut c) = (DailyRecord::default(), DailyRecord::default());
        for v in vals.iter().rev().take(2) {
            b.add_event(&[], 0, &[(0, *v)]);
        }
        for v in vals.iter().take(3) {
            c.add_event(&[], 0, &[(0, *v)]);
        }
        c.merge(&b);
        assert_eq!(a, c);
    }

    #[test]
    fn enrollment_merge_is_order_independent() {
        let r = |branch: &str, ts: i64, n: u32| EnrollmentRecord {
            enrolled: Some(Enrolled {
                branch: branch.into(),
                timestamp: ts,
                dimensions: vec![],
            }),
            num_enrollment_events: n,
            ..Default::default()
        };
        let (mut x, mut y) = (r("treatment", 20, 1), r("control", 10, 1));
        let (x0, y0) = (x.clone(), y.clone());
        x.merge(&y0);
        y.merge(&x0);
        assert_eq!(x, y);
        assert_eq!(x.enrolled.unwrap().branch, "control");
        assert_eq!(y.num_enrollment_events, 2);
    }

    #[test]
    fn window_values_and_enrollment_day_rule() {
        let e = Day(100);
        let w = Window {
            period: Period::Week,
            index: 1,
            start: 0,
            end: 6,
        };
        let mut d0 = DailyRecord::default();
        d0.add_event(&[(0, 1)], 0, &[(0, 1.0)]); // tagged: counts
        d0.add_event(&[], 0, &[(0, 10.0)]); // untagged on enrollment day: ignored
        let mut d6 = DailyRecord::default();
        d6.add_event(&[(0, 0)], 0, &[(0, 2.5)]); // contradictory
        d6.add_event(&[], 0, &[(0, 0.0)]); // untagged after day 0: counts, flags
        let mut d7 = DailyRecord::default();
        d7.add_event(&[(0, 1)], 0, &[(0, 100.0)]); // day 7: outside week 1
        let days = vec![(e, d0), (e.plus(6), d6), (e.plus(7), d7)];
        let mut out = WindowAggregate::default();
        aggregate_window(&plan(), 1, e, e, &w, &days, &mut out);
        assert_eq!(
            out.values,
            vec![
                Some(3.5),
                Some(2.0),
                Some(1.0),
                Some(3.5 / 3.0),
                Some(2.5),
                Some(3.0)
            ]
        );
        assert_eq!(out.flags, vec![(true, true)]);
        let empty = Window {
            period: Period::Day,
            index: 3,
            start: 2,
            end: 2,
        };
        aggregate_window(&plan(), 1, e, e, &empty, &days, &mut out);
        assert_eq!(
            out.values,
            vec![Some(0.0), Some(0.0), Some(0.0), None, None, Some(0.0)]
        );
        assert_eq!(out.flags, vec![(false, false)]);
    }
}
