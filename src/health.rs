//! Experiment health and published results, read from the store for the HTTP API.
//!
//! Plain functions over [`Store`]: enrollment, exposure and unenrollment counts per branch
//! (scanned from the enrollment records), the sample ratio mismatch test, the state of every
//! analysis window (from the publication records and the watermark), live DAU per branch
//! event-time lag, consumer lag per partition (from the running consumer) and, per data
//! source, the clients with contradictory branches or untagged data. Each finding becomes a
//! [`Check`] with a status and a one-line reason. Everything here is aggregate: no function
//! returns a client id.
//!
//! The published statistics rows are kept in sled under `S<slug>\0<table>` (one NDJSON
//! document per table, the columns of DESIGN.md section 5), written by the pipeline after
//! the sink confirmed the table; [`statistics_rows`] reads them back as the views would.
//! The same write stores the window's per-data-source flag counts under `Q<slug>\0<table>`
//! (counted while its aggregate rows were built, so health never rescans clients).

use std::collections::BTreeMap;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    TextEncoder,
};
use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, Experiment, Period};
use crate::event::{Day, RejectReason, Timestamp};
use crate::publish::{local::RowWriter, DataSourceFlags, TableData, TableKind};
use crate::sketch::{self, CountAnswer, SketchConfig, SketchError};
use crate::state::{PublishedRecord, StateError, Store};
use crate::stats::srm::{sample_ratio_mismatch, Srm};
use crate::window::{self, Window};

/// SRM p-values below this raise an alert (the threshold experimentation platforms use).
pub const SRM_ALERT_P: f64 = 0.001;

/// Unenrolled share of enrolled clients above which the unenrollment check warns.
const UNENROLLED_WARN_SHARE: f64 = 0.05;

/// Share of a window's clients with a contradictory branch (in any data source) above
/// which the data source check warns, and above which it alerts: a few clients switching
/// branches is normal noise, more means tagging or enrollment is broken.
pub const CONTRADICTORY_WARN_SHARE: f64 = 0.01;
pub const CONTRADICTORY_ALERT_SHARE: f64 = 0.05;

/// Total consumer lag (messages, all partitions) up to which the consumer counts as caught
/// up, and up to which it only warns (about 1 s and 10 s of folding at the measured
/// ~100,000 events/s); beyond, it alerts.
pub const CONSUMER_LAG_OK_MESSAGES: i64 = 100_000;
pub const CONSUMER_LAG_WARN_MESSAGES: i64 = 1_000_000;

/// A lag measurement older than this warns: the consume loop is stuck or busy.
const CONSUMER_LAG_STALE_MICROS: i64 = 300_000_000;

/// Event-time lag (micros) up to which the stream counts as live.
const LAG_OK_MICROS: i64 = 3_600_000_000;

const MICROS_PER_HOUR: i64 = 3_600_000_000;

/// Errors reading health; both sources of failure say where they came from.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Sketch(#[from] SketchError),
}

/// How worrying a check is; ordered so that the worst of several is their maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Alert,
}

/// One named finding with a one-line reason a person can act on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub reason: String,
}

/// Counts of one branch, from the enrollment records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BranchCounts {
    pub branch: String,
    /// Configured share (normalized over the branches).
    pub expected_share: f64,
    pub enrolled: u64,
    /// Enrolled clients with at least one exposure.
    pub exposed: u64,
    /// `exposed / enrolled` (0 when nobody enrolled).
    pub exposure_rate: f64,
    /// Enrolled clients with at least one unenrollment.
    pub unenrolled: u64,
    /// Exposure and unenrollment events in total (for volume, not clients).
    pub exposure_events: u64,
    pub unenrollment_events: u64,
}

/// Enrolled clients per branch (config order) on one enrollment date.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EnrollmentDay {
    pub date: String,
    /// In the order of the experiment's branches.
    pub enrolled: Vec<u64>,
}

/// What the enrollment records say about an experiment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EnrollmentSummary {
    pub branches: Vec<BranchCounts>,
    pub by_day: Vec<EnrollmentDay>,
    /// Records with exposures or unenrollments but no enrollment in the period.
    pub not_enrolled_records: u64,
}

impl EnrollmentSummary {
    pub fn enrolled_total(&self) -> u64 {
        self.branches.iter().map(|b| b.enrolled).sum()
    }
}

/// Scans the experiment's enrollment records once and counts per branch and per day.
pub fn enrollment_summary(
    store: &Store,
    exp: &Experiment,
) -> Result<EnrollmentSummary, StateError> {
    let ratio_sum: f64 = exp.branches.iter().map(|b| b.ratio).sum();
    let mut branches: Vec<BranchCounts> = exp
        .branches
        .iter()
        .map(|b| BranchCounts {
            branch: b.name.clone(),
            expected_share: if ratio_sum > 0.0 {
                b.ratio / ratio_sum
            } else {
                0.0
            },
            enrolled: 0,
            exposed: 0,
            exposure_rate: 0.0,
            unenrolled: 0,
            exposure_events: 0,
            unenrollment_events: 0,
        })
        .collect();
    let mut by_day: BTreeMap<Day, Vec<u64>> = BTreeMap::new();
    let mut not_enrolled_records = 0;
    for entry in store.enrollments(&exp.slug) {
        let rec = entry?.record;
        let (Some(enrolled), Some(day)) = (&rec.enrolled, rec.enrollment_day()) else {
            not_enrolled_records += 1;
            continue;
        };
        // The fold rejects unknown branches, so this only misses after a config change.
        let Some(b) = exp.branch_index(&enrolled.branch) else {
            not_enrolled_records += 1;
            continue;
        };
        let c = &mut branches[b];
        c.enrolled += 1;
        c.exposed += u64::from(rec.first_exposure.is_some());
        c.unenrolled += u64::from(rec.first_unenrollment.is_some());
        c.exposure_events += u64::from(rec.num_exposure_events);
        c.unenrollment_events += u64::from(rec.num_unenrollment_events);
        by_day
            .entry(day)
            .or_insert_with(|| vec![0; exp.branches.len()])[b] += 1;
    }
    for c in &mut branches {
        c.exposure_rate = if c.enrolled > 0 {
            c.exposed as f64 / c.enrolled as f64
        } else {
            0.0
        };
    }
    Ok(EnrollmentSummary {
        branches,
        by_day: by_day
            .into_iter()
            .map(|(d, enrolled)| EnrollmentDay {
                date: d.to_string(),
                enrolled,
            })
            .collect(),
        not_enrolled_records,
    })
}

/// The SRM test with its verdict.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SrmVerdict {
    #[serde(flatten)]
    pub test: Srm,
    /// `p_value < SRM_ALERT_P`.
    pub mismatch: bool,
    pub threshold: f64,
}

/// SRM against the configured ratios; None when it cannot be computed (see
/// [`sample_ratio_mismatch`]).
pub fn srm(exp: &Experiment, summary: &EnrollmentSummary) -> Option<SrmVerdict> {
    let observed: Vec<u64> = summary.branches.iter().map(|b| b.enrolled).collect();
    let ratios: Vec<f64> = exp.branches.iter().map(|b| b.ratio).collect();
    sample_ratio_mismatch(&observed, &ratios).map(|test| SrmVerdict {
        mismatch: test.p_value < SRM_ALERT_P,
        threshold: SRM_ALERT_P,
        test,
    })
}

/// Where a window is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WindowPhase {
    /// Some enrolled client's span of it is not over yet.
    Open,
    /// Over for everyone, not published yet.
    Complete,
    Published,
    /// Published, and late events touched it since.
    Dirty,
    /// The last publication attempt failed.
    Failed,
}

/// One window's state, as `/health` reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowState {
    pub table: String,
    pub period: &'static str,
    pub index: u32,
    /// Days after enrollment, inclusive.
    pub start: u32,
    pub end: u32,
    pub state: WindowPhase,
    /// When the window is complete for every client (RFC 3339).
    pub complete_at: String,
    pub published_at: Option<String>,
    pub rows: u64,
    pub late_events: u64,
    pub failures: u32,
    pub last_error: Option<String>,
    /// The last failure was permanent: not retried until `finalize`.
    pub permanent: bool,
}

fn rfc3339(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The phase of a window from its publication record and the watermark.
pub fn window_phase(
    rec: Option<&PublishedRecord>,
    complete_at: Timestamp,
    watermark: Option<Timestamp>,
) -> WindowPhase {
    match rec {
        Some(r) if r.failures > 0 => WindowPhase::Failed,
        Some(r) if r.published_at > 0 && r.late_events > 0 => WindowPhase::Dirty,
        Some(r) if r.published_at > 0 => WindowPhase::Published,
        _ if watermark.is_some_and(|w| w >= complete_at) => WindowPhase::Complete,
        _ => WindowPhase::Open,
    }
}

/// Every window of the experiment with its state.
pub fn window_states(
    exp: &Experiment,
    published: &BTreeMap<String, PublishedRecord>,
    watermark: Option<Timestamp>,
) -> Vec<WindowState> {
    window::windows(exp)
        .into_iter()
        .map(|w: Window| {
            let table = w.statistics_table(exp);
            let rec = published.get(&table);
            let complete_at = w.complete_at(exp);
            let r = rec.cloned().unwrap_or_default();
            WindowState {
                state: window_phase(rec, complete_at, watermark),
                period: w.period.view_name(),
                index: w.index,
                start: w.start,
                end: w.end,
                complete_at: rfc3339(complete_at.0),
                published_at: (r.published_at > 0).then(|| rfc3339(r.published_at)),
                rows: r.rows,
                late_events: r.late_events,
                failures: r.failures,
                last_error: r.last_error,
                permanent: r.permanent,
                table,
            }
        })
        .collect()
}

/// Newest event time per (source, partition), as the fold persisted it (`T` keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventTimes(pub Vec<(String, i32, i64)>);

impl EventTimes {
    /// Reads the event times of every source (Kafka topics, replayed files).
    pub fn read(store: &Store) -> Result<EventTimes, StateError> {
        Ok(EventTimes(store.all_event_times()?))
    }

    fn valid(&self) -> impl Iterator<Item = i64> + Clone + '_ {
        self.0.iter().map(|(_, _, t)| *t).filter(|t| *t != i64::MIN)
    }

    pub fn newest(&self) -> Option<Timestamp> {
        self.valid().max().map(Timestamp)
    }

    /// The watermark as the fold computes it without idleness: the oldest partition's
    /// newest event, minus the allowed lateness.
    pub fn watermark(&self, allowed_lateness_hours: u32) -> Option<Timestamp> {
        let oldest = self.valid().min()?;
        Some(Timestamp(
            oldest - i64::from(allowed_lateness_hours) * MICROS_PER_HOUR,
        ))
    }
}

/// Distinct clients per branch on one date (by the branch their telemetry reported).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BranchDau {
    pub branch: String,
    pub estimate: f64,
    pub standard_error: f64,
    pub lower: f64,
    pub upper: f64,
}

/// DAU per branch on `date`, in config order (zero for branches without activity).
pub fn branch_dau(
    sketch_cfg: &SketchConfig,
    store: &Store,
    exp: &Experiment,
    date: chrono::NaiveDate,
) -> Result<Vec<BranchDau>, SketchError> {
    Ok(branch_counts(sketch_cfg, store, exp, date, date)?
        .into_iter()
        .map(|(name, a)| BranchDau {
            branch: name.to_string(),
            estimate: a.estimate.round(),
            standard_error: a.standard_error,
            lower: a.lower,
            upper: a.upper,
        })
        .collect())
}

/// Distinct clients per branch over `start..=end`, in config order (zero without activity).
fn branch_counts<'e>(
    sketch_cfg: &SketchConfig,
    store: &Store,
    exp: &'e Experiment,
    start: chrono::NaiveDate,
    end: chrono::NaiveDate,
) -> Result<Vec<(&'e str, CountAnswer)>, SketchError> {
    let found = sketch::experiment_branches(sketch_cfg, store, &exp.slug, start, end)?;
    Ok(exp
        .branches
        .iter()
        .map(|b| {
            let a = found
                .iter()
                .find(|(n, _)| *n == b.name)
                .map(|(_, a)| *a)
                .unwrap_or(CountAnswer::new(0.0, 0.0));
            (b.name.as_str(), a)
        })
        .collect())
}

/// Days of the MAU window: the 28 days ending at the date.
pub const MAU_DAYS: u32 = 28;

/// One day of a branch's engagement: distinct clients that day, over the 28 days ending
/// that day (both by the branch their telemetry reported), and their ratio.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BranchActivity {
    pub branch: String,
    pub dau: CountAnswer,
    pub mau: CountAnswer,
    /// DAU/MAU with its delta-method interval; None while MAU is zero.
    pub dau_per_mau: Option<CountAnswer>,
}

/// DAU, MAU and DAU/MAU per branch (config order) for every date of `start..=end`, from the
/// per-branch HyperLogLog sketches. The MAU window is shortened to `max_query_days` when
/// that is set below 28.
pub fn branch_activity(
    sketch_cfg: &SketchConfig,
    store: &Store,
    exp: &Experiment,
    start: chrono::NaiveDate,
    end: chrono::NaiveDate,
) -> Result<Vec<(chrono::NaiveDate, Vec<BranchActivity>)>, SketchError> {
    let window = MAU_DAYS.min(sketch_cfg.max_range_days).max(1);
    let mut out = Vec::new();
    let mut date = start;
    while date <= end {
        let first = date - chrono::Days::new(u64::from(window - 1));
        let dau = branch_counts(sketch_cfg, store, exp, date, date)?;
        let mau = branch_counts(sketch_cfg, store, exp, first, date)?;
        let day = dau
            .into_iter()
            .zip(mau)
            .map(|((name, d), (_, m))| BranchActivity {
                branch: name.to_string(),
                dau_per_mau: d.ratio(&m),
                // Counts are whole clients, as the counting endpoints answer them.
                dau: CountAnswer {
                    estimate: d.estimate.round(),
                    ..d
                },
                mau: CountAnswer {
                    estimate: m.estimate.round(),
                    ..m
                },
            })
            .collect();
        out.push((date, day));
        date = date + chrono::Days::new(1);
    }
    Ok(out)
}

/// The whole health report of one experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Health {
    pub experiment: String,
    /// The worst status of the checks.
    pub status: Status,
    pub checks: Vec<Check>,
    /// Results final and per-client state dropped by `finalize` (retention): enrollment
    /// counts, SRM and exposure are no longer computed.
    pub per_client_state_dropped: bool,
    pub enrolled_total: u64,
    pub branches: Vec<BranchCounts>,
    pub enrollment_by_day: Vec<EnrollmentDay>,
    pub srm: Option<SrmVerdict>,
    pub windows: Vec<WindowState>,
    pub last_published_at: Option<String>,
    pub newest_event_time: Option<String>,
    pub watermark: Option<String>,
    pub event_time_lag_seconds: Option<f64>,
    /// Live DAU per branch on the newest event's date.
    pub dau_date: Option<String>,
    pub dau: Vec<BranchDau>,
    /// Clients with contradictory branches and untagged data per data source, from the
    /// latest published window that has the counts (None before any).
    pub data_sources: Option<DataSourceReport>,
    /// Messages behind per partition, from the consumer of this process (None under
    /// `serve`, which runs none; see `not_reported`).
    pub consumer_lag: Option<ConsumerLag>,
    /// What this report does not cover, so nobody reads its absence as "fine".
    pub not_reported: Vec<&'static str>,
}

/// Inputs of [`checks`] that come from the clock and the stream rather than the records.
pub struct Live {
    pub now_micros: i64,
    pub event_times: EventTimes,
    pub allowed_lateness_hours: u32,
    /// The running consumer's last lag measurement (None: this process runs no consumer).
    pub consumer_lag: Option<ConsumerLag>,
}

/// One data source's flag counts in one analysis basis, with the shares of clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSourceCounts {
    #[serde(flatten)]
    pub counts: DataSourceFlags,
    /// `contradictory_branch / clients` (0 without clients).
    pub contradictory_share: f64,
    /// `non_enrolled_data / clients` (0 without clients).
    pub non_enrolled_share: f64,
}

impl DataSourceCounts {
    fn new(counts: DataSourceFlags) -> Self {
        let share = |n: u64| {
            if counts.clients > 0 {
                n as f64 / counts.clients as f64
            } else {
                0.0
            }
        };
        DataSourceCounts {
            contradictory_share: share(counts.contradictory_branch),
            non_enrolled_share: share(counts.non_enrolled_data),
            counts,
        }
    }
}

/// The per-data-source counts of one published window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DataSourceReport {
    /// The window's statistics table, and its span in days after enrollment.
    pub table: String,
    pub period: &'static str,
    pub index: u32,
    pub start: u32,
    pub end: u32,
    pub published_at: Option<String>,
    /// One entry per (analysis basis, data source).
    pub sources: Vec<DataSourceCounts>,
}

/// The sled key of a published window's per-data-source flag counts.
pub fn data_sources_key(slug: &str, table: &str) -> Vec<u8> {
    [b"Q", slug.as_bytes(), b"\0", table.as_bytes()].concat()
}

/// The counts of the latest window of the longest period published so far (say the
/// overall window once out, else the newest week): the widest recent view. Windows
/// published before the counts existed have none until their next publication.
pub fn data_source_report(
    store: &Store,
    exp: &Experiment,
    published: &BTreeMap<String, PublishedRecord>,
) -> Result<Option<DataSourceReport>, StateError> {
    let mut candidates: Vec<(Window, String, i64)> = window::windows(exp)
        .into_iter()
        .filter_map(|w| {
            let table = w.statistics_table(exp);
            let at = published.get(&table).map(|r| r.published_at)?;
            (at > 0).then_some((w, table, at))
        })
        .collect();
    candidates.sort_by_key(|(w, _, _)| std::cmp::Reverse((w.period, w.index)));
    for (w, table, at) in candidates {
        let key = data_sources_key(&exp.slug, &table);
        let Some(bytes) = store.get_raw(&key)? else {
            continue;
        };
        let flags: Vec<DataSourceFlags> =
            serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                key: String::from_utf8_lossy(&key).into_owned(),
                detail: e.to_string(),
            })?;
        return Ok(Some(DataSourceReport {
            table,
            period: w.period.view_name(),
            index: w.index,
            start: w.start,
            end: w.end,
            published_at: Some(rfc3339(at)),
            sources: flags.into_iter().map(DataSourceCounts::new).collect(),
        }));
    }
    Ok(None)
}

/// Messages behind the high watermark on one assigned partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub lag_messages: i64,
}

/// The running consumer's lag, as last measured (every few seconds by `run`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ConsumerLag {
    /// When (RFC 3339); None until the first measurement.
    pub measured_at: Option<String>,
    #[serde(skip)]
    pub measured_micros: Option<i64>,
    pub total_messages: i64,
    /// Assigned partitions at the measurement, by topic and partition.
    pub partitions: Vec<PartitionLag>,
}

/// Turns the findings into checks (pure: unit-tested with exact reasons).
pub fn checks(
    exp: &Experiment,
    summary: &EnrollmentSummary,
    srm: Option<&SrmVerdict>,
    windows: &[WindowState],
    data_sources: Option<&DataSourceReport>,
    live: &Live,
) -> Vec<Check> {
    let mut out = Vec::new();
    let today = Timestamp(live.now_micros).day().date();
    let total = summary.enrolled_total();
    out.push(if total > 0 {
        Check {
            name: "enrollment",
            status: Status::Ok,
            reason: format!("{total} clients enrolled"),
        }
    } else if today < exp.enrollment_start {
        Check {
            name: "enrollment",
            status: Status::Ok,
            reason: format!("enrollment starts on {}", exp.enrollment_start),
        }
    } else {
        Check {
            name: "enrollment",
            status: Status::Warn,
            reason: "no client has enrolled yet; check that enrollment events arrive".into(),
        }
    });
    out.push(match srm {
        Some(s) if s.mismatch => Check {
            name: "sample_ratio",
            status: Status::Alert,
            reason: format!("sample ratio mismatch: p = {:.2e} < {SRM_ALERT_P}; enrolled {} against configured ratios {:?}; results are suspect until the cause is found", s.test.p_value, counts(summary), exp.branches.iter().map(|b| b.ratio).collect::<Vec<_>>()),
        },
        Some(s) => Check {
            name: "sample_ratio",
            status: Status::Ok,
            reason: format!("enrolled {} match the configured ratios (p = {:.3})", counts(summary), s.test.p_value),
        },
        None => Check {
            name: "sample_ratio",
            status: Status::Warn,
            reason: "not computable yet: needs two or more branches and enrolled clients".into(),
        },
    });
    let exposed: u64 = summary.branches.iter().map(|b| b.exposed).sum();
    let unexposed: Vec<&str> = summary
        .branches
        .iter()
        .filter(|b| b.enrolled > 0 && b.exposed == 0)
        .map(|b| b.branch.as_str())
        .collect();
    out.push(if exposed > 0 && !unexposed.is_empty() {
        Check {
            name: "exposure",
            status: Status::Warn,
            reason: format!("branches {unexposed:?} have no exposed client while others do"),
        }
    } else {
        Check {
            name: "exposure",
            status: Status::Ok,
            reason: format!(
                "exposure rates {}",
                summary
                    .branches
                    .iter()
                    .map(|b| format!("{} {:.1}%", b.branch, 100.0 * b.exposure_rate))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    });
    let unenrolled: u64 = summary.branches.iter().map(|b| b.unenrolled).sum();
    let share = if total > 0 {
        unenrolled as f64 / total as f64
    } else {
        0.0
    };
    out.push(Check {
        name: "unenrollment",
        status: if share > UNENROLLED_WARN_SHARE {
            Status::Warn
        } else {
            Status::Ok
        },
        reason: format!(
            "{unenrolled} of {total} enrolled clients unenrolled ({:.1}%; warns above {:.0}%)",
            100.0 * share,
            100.0 * UNENROLLED_WARN_SHARE
        ),
    });
    out.push(windows_check(windows));
    out.push(data_sources_check(data_sources));
    if let Some(lag) = &live.consumer_lag {
        out.push(consumer_lag_check(lag, live.now_micros));
    }
    let newest = live.event_times.newest();
    out.push(match newest {
        None => Check {
            name: "event_time_lag",
            status: Status::Warn,
            reason: "no event time recorded for the configured sources yet".into(),
        },
        Some(_) if today > exp.end_date => Check {
            name: "event_time_lag",
            status: Status::Ok,
            reason: format!("the experiment ended on {}; no more events expected", exp.end_date),
        },
        Some(t) => {
            let lag = live.now_micros - t.0;
            let lateness = i64::from(live.allowed_lateness_hours) * MICROS_PER_HOUR;
            let status = if lag <= LAG_OK_MICROS {
                Status::Ok
            } else if lag <= lateness {
                Status::Warn
            } else {
                Status::Alert
            };
            Check {
                name: "event_time_lag",
                status,
                reason: format!(
                    "newest event is {:.1} h behind the wall clock (ok up to 1 h, alert beyond the allowed lateness of {} h)",
                    lag as f64 / MICROS_PER_HOUR as f64,
                    live.allowed_lateness_hours
                ),
            }
        }
    });
    out
}

fn counts(summary: &EnrollmentSummary) -> String {
    summary
        .branches
        .iter()
        .map(|b| format!("{} {}", b.branch, b.enrolled))
        .collect::<Vec<_>>()
        .join(", ")
}

fn percent(share: f64) -> String {
    format!("{:.1}%", 100.0 * share)
}

/// Warns or alerts on the worst share of contradictory clients over data sources and
/// bases. Untagged data is reported but does not raise the status: clients that unenrolled
/// or whose pings lost the annotation send it legitimately (Jetstream only reports it too).
fn data_sources_check(report: Option<&DataSourceReport>) -> Check {
    let thresholds = format!(
        "warns above {:.0}%, alerts above {:.0}% contradictory",
        100.0 * CONTRADICTORY_WARN_SHARE,
        100.0 * CONTRADICTORY_ALERT_SHARE
    );
    let Some(r) = report else {
        return Check {
            name: "data_sources",
            status: Status::Ok,
            reason: "no published window has per-data-source counts yet; they are counted when a window's statistics publish".into(),
        };
    };
    let by =
        |f: fn(&DataSourceCounts) -> f64| r.sources.iter().max_by(|a, b| f(a).total_cmp(&f(b)));
    let (Some(worst), Some(untagged)) =
        (by(|c| c.contradictory_share), by(|c| c.non_enrolled_share))
    else {
        return Check {
            name: "data_sources",
            status: Status::Ok,
            reason: format!("{}: no data source configured", r.table),
        };
    };
    let status = if worst.contradictory_share > CONTRADICTORY_ALERT_SHARE {
        Status::Alert
    } else if worst.contradictory_share > CONTRADICTORY_WARN_SHARE {
        Status::Warn
    } else {
        Status::Ok
    };
    let c = &worst.counts;
    let u = &untagged.counts;
    Check {
        name: "data_sources",
        status,
        reason: format!(
            "{} (days {}-{}): {} of {} clients ({}) reported a contradictory branch in `{}` ({} basis; {thresholds}); most untagged: {} clients ({}) in `{}` ({} basis)",
            r.table,
            r.start,
            r.end,
            c.contradictory_branch,
            c.clients,
            percent(worst.contradictory_share),
            c.data_source,
            c.analysis_basis,
            u.non_enrolled_data,
            percent(untagged.non_enrolled_share),
            u.data_source,
            u.analysis_basis,
        ),
    }
}

/// Ok, warn or alert by the total lag; warns while nothing is measured or assigned, or
/// when the last measurement is old.
fn consumer_lag_check(lag: &ConsumerLag, now_micros: i64) -> Check {
    let check = |status, reason| Check {
        name: "consumer_lag",
        status,
        reason,
    };
    let Some(at) = lag.measured_micros else {
        return check(
            Status::Warn,
            "not measured yet: the consumer has just started".into(),
        );
    };
    if lag.partitions.is_empty() {
        return check(
            Status::Warn,
            "no partition is assigned to this consumer (yet)".into(),
        );
    }
    let age = now_micros - at;
    if age > CONSUMER_LAG_STALE_MICROS {
        return check(
            Status::Warn,
            format!(
                "last measured {} s ago: the consume loop is stuck or busy publishing",
                age / 1_000_000
            ),
        );
    }
    let worst = lag
        .partitions
        .iter()
        .max_by_key(|p| p.lag_messages)
        .expect("not empty");
    let total = lag.total_messages;
    let status = if total <= CONSUMER_LAG_OK_MESSAGES {
        Status::Ok
    } else if total <= CONSUMER_LAG_WARN_MESSAGES {
        Status::Warn
    } else {
        Status::Alert
    };
    check(
        status,
        format!(
            "{total} messages behind on {} partitions (most: {}/{} with {}); ok up to {CONSUMER_LAG_OK_MESSAGES}, alert above {CONSUMER_LAG_WARN_MESSAGES}",
            lag.partitions.len(),
            worst.topic,
            worst.partition,
            worst.lag_messages
        ),
    )
}

fn windows_check(windows: &[WindowState]) -> Check {
    let n = |p: WindowPhase| windows.iter().filter(|w| w.state == p).count();
    let failed: Vec<&WindowState> = windows
        .iter()
        .filter(|w| w.state == WindowPhase::Failed)
        .collect();
    let summary = format!(
        "{} published, {} dirty, {} complete awaiting publication, {} open, {} failed",
        n(WindowPhase::Published),
        n(WindowPhase::Dirty),
        n(WindowPhase::Complete),
        n(WindowPhase::Open),
        failed.len()
    );
    match failed.first() {
        Some(w) => Check {
            name: "windows",
            status: if failed.iter().any(|w| w.permanent) {
                Status::Alert
            } else {
                Status::Warn
            },
            reason: format!(
                "{summary}; {} failed: {}",
                w.table,
                w.last_error.as_deref().unwrap_or("no reason recorded")
            ),
        },
        None => Check {
            name: "windows",
            status: Status::Ok,
            reason: summary,
        },
    }
}

/// Computes the health of one experiment from the store.
pub fn health(
    store: &Store,
    sketch_cfg: &SketchConfig,
    exp: &Experiment,
    live: &Live,
) -> Result<Health, HealthError> {
    let summary = enrollment_summary(store, exp)?;
    let srm = srm(exp, &summary);
    let published = store.published(&exp.slug)?;
    let watermark = live.event_times.watermark(live.allowed_lateness_hours);
    let windows = window_states(exp, &published, watermark);
    let last_published = published
        .values()
        .map(|r| r.published_at)
        .filter(|t| *t > 0)
        .max();
    let newest = live.event_times.newest();
    let dau_date = newest.map(|t| t.day().date());
    let dau = match dau_date {
        Some(d) => branch_dau(sketch_cfg, store, exp, d)?,
        None => Vec::new(),
    };
    let data_sources = data_source_report(store, exp, &published)?;
    let dropped = store.retired()?.contains_key(&exp.slug);
    let checks = if dropped {
        vec![
            Check {
                name: "retention",
                status: Status::Ok,
                reason: "results final; finalize dropped the per-client state after `retention_days` (published statistics and DAU/MAU stay)".into(),
            },
            windows_check(&windows),
        ]
    } else {
        checks(
            exp,
            &summary,
            srm.as_ref(),
            &windows,
            data_sources.as_ref(),
            live,
        )
    };
    Ok(Health {
        per_client_state_dropped: dropped,
        experiment: exp.slug.clone(),
        status: checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok),
        checks,
        enrolled_total: summary.enrolled_total(),
        branches: summary.branches,
        enrollment_by_day: summary.by_day,
        srm,
        windows,
        last_published_at: last_published.map(rfc3339),
        newest_event_time: newest.map(|t| rfc3339(t.0)),
        watermark: watermark.map(|t| rfc3339(t.0)),
        event_time_lag_seconds: newest.map(|t| (live.now_micros - t.0) as f64 / 1e6),
        dau_date: dau_date.map(|d| d.to_string()),
        dau,
        data_sources,
        consumer_lag: live.consumer_lag.clone(),
        not_reported: if live.consumer_lag.is_some() {
            vec![]
        } else {
            vec!["consumer lag per partition: this process runs no consumer (`slipstream serve`); `run --listen` reports it here and at /metrics"]
        },
    })
}

/// The sled key of a published statistics table's rows.
pub fn statistics_key(slug: &str, table: &str) -> Vec<u8> {
    [b"S", slug.as_bytes(), b"\0", table.as_bytes()].concat()
}

/// A statistics table's rows as stored: NDJSON in the local sink's encoding.
pub fn statistics_value(table: &TableData) -> Vec<u8> {
    let mut out = Vec::new();
    let rows = RowWriter::new(table);
    for row in &table.rows {
        rows.write(&mut out, row)
            .expect("writing to memory cannot fail");
    }
    out
}

/// Stores a published statistics table's rows (replacing the previous ones), and with them
/// its window's per-data-source flag counts (JSON).
pub fn store_statistics(store: &Store, slug: &str, table: &TableData) -> Result<(), StateError> {
    let mut batch = sled::Batch::default();
    batch.insert(statistics_key(slug, &table.name), statistics_value(table));
    if let TableKind::Statistics { data_sources, .. } = &table.kind {
        let json = serde_json::to_vec(data_sources).expect("plain structs serialize");
        batch.insert(data_sources_key(slug, &table.name), json);
    }
    store.apply(batch)
}

/// The period a `period=` parameter names: a view name (`weekly`) or a table name (`week`).
pub fn parse_period(s: &str) -> Option<Period> {
    Period::ALL
        .into_iter()
        .find(|p| p.view_name() == s || p.table_name() == s)
}

/// Columns a statistics query may filter on, with an exact match.
pub const STATISTICS_FILTERS: [&str; 6] = [
    "metric",
    "segment",
    "statistic",
    "branch",
    "comparison",
    "analysis_basis",
];

/// The published rows of a period's statistics tables, with `window_index` added as in the
/// `statistics_<slug>_<period>` views, in window order, filtered by exact column values.
pub fn statistics_rows(
    store: &Store,
    exp: &Experiment,
    period: Period,
    filters: &[(String, String)],
) -> Result<Vec<Value>, StateError> {
    let mut out = Vec::new();
    for w in window::windows(exp)
        .into_iter()
        .filter(|w| w.period == period)
    {
        let key = statistics_key(&exp.slug, &w.statistics_table(exp));
        let Some(bytes) = store.get_raw(&key)? else {
            continue;
        };
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut row: serde_json::Map<String, Value> =
                serde_json::from_slice(line).map_err(|e| StateError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    detail: e.to_string(),
                })?;
            let keep = filters
                .iter()
                .all(|(k, v)| row.get(k).and_then(Value::as_str) == Some(v.as_str()));
            if keep {
                row.insert("window_index".into(), Value::from(w.index));
                out.push(Value::Object(row));
            }
        }
    }
    Ok(out)
}

/// Operational counters of the running pipeline (`run`, `replay`): shared through an
/// `Arc` by the pipeline, which updates them, and the HTTP API, which exposes them at
/// `/metrics`. `serve` has none; what sled records durably is read at scrape time.
pub struct PipelineMetrics {
    registry: prometheus::Registry,
    /// Events folded into state since the process started.
    pub events_folded: IntCounter,
    /// Rejected events by reason since the process started.
    pub events_rejected: IntCounterVec,
    /// Time the state writer took to apply one folded batch (state and offsets) to sled.
    pub batch_commit_seconds: Histogram,
    /// Sink calls, successful publications and failures by kind (transient, permanent).
    pub publish_attempts: IntCounter,
    pub tables_published: IntCounter,
    pub publish_failures: IntCounterVec,
    /// Messages behind the high watermark, per topic partition (set by the Kafka source
    /// through [`PipelineMetrics::record_consumer_lag`]).
    pub consumer_lag: IntGaugeVec,
    /// The same measurement for the health report, with its time.
    lag: std::sync::Mutex<ConsumerLag>,
    /// Dead letters by outcome: `delivered`, `retried` (a failed attempt, sent again) and
    /// `dropped` (refused for good by the broker).
    pub dead_letters: IntCounterVec,
    /// What `record_flush` saw last, to turn the fold's running totals into increments.
    seen: std::sync::Mutex<Seen>,
}

/// The fold's running totals as [`PipelineMetrics::record_flush`] last saw them.
#[derive(Default)]
struct Seen {
    folded: u64,
    rejected: [u64; RejectReason::ALL.len()],
    /// Batches applied by the state writer.
    flushes: u64,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl PipelineMetrics {
    pub fn new() -> PipelineMetrics {
        let registry = prometheus::Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric names are unique");
        };
        let events_folded = IntCounter::new(
            "slipstream_events_folded_total",
            "Events folded into state by this process.",
        )
        .expect("valid metric");
        let events_rejected = IntCounterVec::new(
            Opts::new(
                "slipstream_events_rejected_total",
                "Events rejected by this process, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let batch_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "slipstream_batch_commit_seconds",
                "Time to write one folded batch with its offsets to sled.",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 14).expect("valid buckets")),
        )
        .expect("valid metric");
        let publish_attempts = IntCounter::new(
            "slipstream_publish_attempts_total",
            "Tables handed to the sink.",
        )
        .expect("valid metric");
        let tables_published = IntCounter::new(
            "slipstream_tables_published_total",
            "Tables the sink confirmed.",
        )
        .expect("valid metric");
        let publish_failures = IntCounterVec::new(
            Opts::new(
                "slipstream_publish_failures_total",
                "Failed publications by kind (transient ones are retried).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let consumer_lag = IntGaugeVec::new(
            Opts::new(
                "slipstream_consumer_lag_messages",
                "Messages between the consumed offset and the high watermark.",
            ),
            &["topic", "partition"],
        )
        .expect("valid metric");
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "slipstream_dead_letters_total",
                "Rejected messages written to the dead-letter topic, by outcome (delivered, retried, dropped).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        reg(Box::new(dead_letters.clone()));
        reg(Box::new(events_folded.clone()));
        reg(Box::new(events_rejected.clone()));
        reg(Box::new(batch_commit_seconds.clone()));
        reg(Box::new(publish_attempts.clone()));
        reg(Box::new(tables_published.clone()));
        reg(Box::new(publish_failures.clone()));
        reg(Box::new(consumer_lag.clone()));
        PipelineMetrics {
            registry,
            events_folded,
            events_rejected,
            batch_commit_seconds,
            publish_attempts,
            tables_published,
            publish_failures,
            consumer_lag,
            lag: Default::default(),
            dead_letters,
            seen: Default::default(),
        }
    }

    /// Records the consumer lag of the assigned partitions, (topic, partition, messages
    /// behind), measured at `now_micros`: for `/metrics` and the health report.
    pub fn record_consumer_lag(&self, lags: Vec<(String, i32, i64)>, now_micros: i64) {
        let mut partitions: Vec<PartitionLag> = lags
            .into_iter()
            .map(|(topic, partition, lag)| PartitionLag {
                topic,
                partition,
                lag_messages: lag.max(0),
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        for p in &partitions {
            self.consumer_lag
                .with_label_values(&[p.topic.as_str(), &p.partition.to_string()])
                .set(p.lag_messages);
        }
        let mut lag = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        *lag = ConsumerLag {
            measured_at: Some(rfc3339(now_micros)),
            measured_micros: Some(now_micros),
            total_messages: partitions.iter().map(|p| p.lag_messages).sum(),
            partitions,
        };
    }

    /// The last consumer lag measurement (empty before the first).
    pub fn consumer_lag(&self) -> ConsumerLag {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Adds one round of dead-letter deliveries.
    pub fn record_dead_letters(&self, r: crate::ingest::kafka::DeadLetterReport) {
        for (outcome, n) in [
            ("delivered", r.delivered),
            ("retried", r.retried),
            ("dropped", r.dropped),
        ] {
            if n > 0 {
                self.dead_letters.with_label_values(&[outcome]).inc_by(n);
            }
        }
    }

    /// Records a flush from the fold's running totals: events folded and rejected, and the
    /// write time of a batch the state writer applied since the last call (batches are
    /// written beside the fold, so the one just handed over is counted next time).
    pub fn record_flush(&self, stats: &crate::apply::FoldStats) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if stats.flushes > seen.flushes {
            self.batch_commit_seconds
                .observe(stats.last_flush.as_secs_f64());
        }
        self.events_folded
            .inc_by(stats.folded.saturating_sub(seen.folded));
        for (i, r) in RejectReason::ALL.iter().enumerate() {
            let d = stats.rejected[i].saturating_sub(seen.rejected[i]);
            if d > 0 {
                self.events_rejected
                    .with_label_values(&[r.as_str()])
                    .inc_by(d);
            }
        }
        *seen = Seen {
            folded: stats.folded,
            rejected: stats.rejected,
            flushes: stats.flushes,
        };
    }
}

/// Everything `/metrics` exposes, in the Prometheus text format: the process's pipeline
/// counters (when it runs one) and what sled holds (durable reject totals, publication
/// records, window states, sketch count, size on disk, event times).
pub fn render_metrics(
    store: &Store,
    cfg: &Config,
    live: &Live,
    ready: bool,
    pipeline: Option<&PipelineMetrics>,
) -> Result<String, HealthError> {
    let registry = prometheus::Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        let g = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(g.clone()))
            .expect("unique names");
        g
    };
    let counter = |name: &str, help: &str, labels: &[&str]| {
        let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
        registry
            .register(Box::new(c.clone()))
            .expect("unique names");
        c
    };
    let single = |name: &str, help: &str, v: f64| {
        let g = Gauge::new(name, help).expect("valid metric");
        g.set(v);
        registry.register(Box::new(g)).expect("unique names");
    };
    let rejected = counter(
        "slipstream_rejected_events_stored_total",
        "Rejected events by reason, as durably counted in the state (all runs).",
        &["reason"],
    );
    for (r, n) in store.rejects()? {
        rejected.with_label_values(&[r.as_str()]).inc_by(n);
    }
    let tables = gauge(
        "slipstream_published_tables",
        "Tables with a successful publication on record.",
        &["experiment"],
    );
    let failing = gauge(
        "slipstream_failing_tables",
        "Tables whose last publication attempt failed.",
        &["experiment"],
    );
    let windows = gauge(
        "slipstream_windows",
        "Analysis windows by state.",
        &["experiment", "state"],
    );
    let last = gauge(
        "slipstream_last_publication_timestamp_seconds",
        "Wall clock of the last successful publication.",
        &["experiment"],
    );
    let watermark = live.event_times.watermark(live.allowed_lateness_hours);
    for exp in &cfg.experiments {
        let published = store.published(&exp.slug)?;
        let slug = exp.slug.as_str();
        let ok = published.values().filter(|r| r.published_at > 0).count();
        tables.with_label_values(&[slug]).set(ok as f64);
        let bad = published.values().filter(|r| r.failures > 0).count();
        failing.with_label_values(&[slug]).set(bad as f64);
        if let Some(t) = published
            .values()
            .map(|r| r.published_at)
            .filter(|t| *t > 0)
            .max()
        {
            last.with_label_values(&[slug]).set(t as f64 / 1e6);
        }
        let states = window_states(exp, &published, watermark);
        for phase in ["open", "complete", "published", "dirty", "failed"] {
            let n = states
                .iter()
                .filter(|w| serde_json::to_value(w.state).ok() == Some(Value::from(phase)))
                .count();
            windows.with_label_values(&[slug, phase]).set(n as f64);
        }
    }
    let mut sketches = 0u64;
    crate::sketch::SketchSource::scan_prefix(store, b"", &mut |_, _| {
        sketches += 1;
        Ok(())
    })?;
    single(
        "slipstream_sketches",
        "Activity sketches stored.",
        sketches as f64,
    );
    single(
        "slipstream_state_size_bytes",
        "Size of the sled state on disk.",
        store.size_on_disk() as f64,
    );
    single(
        "slipstream_ready",
        "1 once the state is open (and the consumer assigned).",
        if ready { 1.0 } else { 0.0 },
    );
    if let Some(t) = live.event_times.newest() {
        single(
            "slipstream_newest_event_timestamp_seconds",
            "Event time of the newest event folded.",
            t.0 as f64 / 1e6,
        );
        single(
            "slipstream_event_time_lag_seconds",
            "Wall clock minus the newest event time.",
            (live.now_micros - t.0) as f64 / 1e6,
        );
    }
    let mut families = registry.gather();
    if let Some(p) = pipeline {
        families.extend(p.registry.gather());
    }
    let mut out = String::new();
    TextEncoder::new()
        .encode_utf8(&families, &mut out)
        .map_err(|e| {
            HealthError::State(StateError::Corrupt {
                key: "metrics".into(),
                detail: e.to_string(),
            })
        })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AnalysisBasis, Branch};
    use chrono::NaiveDate;

    fn exp() -> Experiment {
        Experiment {
            slug: "h".into(),
            branches: vec![
                Branch {
                    name: "control".into(),
                    ratio: 1.0,
                },
                Branch {
                    name: "treatment".into(),
                    ratio: 1.0,
                },
            ],
            reference_branch: "control".into(),
            enrollment_start: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
            enrollment_period: 7,
            end_date: NaiveDate::from_ymd_opt(2026, 11, 23).unwrap(),
            analysis_bases: vec![AnalysisBasis::Enrollments],
            periods: vec![Period::Week],
            segments: vec![],
            metrics: vec![],
            seed: 1,
        }
    }

    fn summary(enrolled: [u64; 2], exposed: [u64; 2], unenrolled: [u64; 2]) -> EnrollmentSummary {
        let e = exp();
        EnrollmentSummary {
            branches: (0..2)
                .map(|i| BranchCounts {
                    branch: e.branches[i].name.clone(),
                    expected_share: 0.5,
                    enrolled: enrolled[i],
                    exposed: exposed[i],
                    exposure_rate: exposed[i] as f64 / enrolled[i].max(1) as f64,
                    unenrolled: unenrolled[i],
                    exposure_events: 0,
                    unenrollment_events: 0,
                })
                .collect(),
            by_day: vec![],
            not_enrolled_records: 0,
        }
    }

    fn micros(date: &str, hour: i64) -> i64 {
        let d = NaiveDate::parse_from_str(date, "%Y-%m-%d").unwrap();
        Timestamp::from_day(Day::from_date(d)).0 + hour * MICROS_PER_HOUR
    }

    fn live(now: i64, newest: Option<i64>) -> Live {
        Live {
            now_micros: now,
            event_times: EventTimes(newest.map(|t| ("t".into(), 0, t)).into_iter().collect()),
            allowed_lateness_hours: 24,
            consumer_lag: None,
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn srm_alerts_below_the_threshold_only() {
        let e = exp();
        // 520 vs 480: p = 0.206, fine.
        let s = summary([520, 480], [0, 0], [0, 0]);
        let v = srm(&e, &s).unwrap();
        assert!(!v.mismatch);
        let now = micros("2026-11-05", 12);
        let c = checks(&e, &s, Some(&v), &[], None, &live(now, Some(now)));
        assert_eq!(find(&c, "sample_ratio").status, Status::Ok);
        // 600 vs 400: χ² = 40, p ≈ 2.5e-10.
        let s = summary([600, 400], [0, 0], [0, 0]);
        let v = srm(&e, &s).unwrap();
        assert!(v.mismatch && v.test.p_value < 1e-9);
        let c = checks(&e, &s, Some(&v), &[], None, &live(now, Some(now)));
        let check = find(&c, "sample_ratio");
        assert_eq!(check.status, Status::Alert);
        assert!(
            check.reason.contains("control 600, treatment 400"),
            "{}",
            check.reason
        );
    }

    #[test]
    fn lag_exposure_and_unenrollment_checks() {
        let e = exp();
        let now = micros("2026-11-05", 12);
        let s = summary([100, 100], [50, 0], [3, 20]);
        let c = checks(
            &e,
            &s,
            None,
            &[],
            None,
            &live(now, Some(now - 2 * MICROS_PER_HOUR)),
        );
        assert_eq!(find(&c, "event_time_lag").status, Status::Warn);
        assert!(find(&c, "event_time_lag")
            .reason
            .starts_with("newest event is 2.0 h"));
        assert_eq!(find(&c, "exposure").status, Status::Warn);
        assert_eq!(find(&c, "unenrollment").status, Status::Warn); // 23 of 200
        assert_eq!(find(&c, "sample_ratio").status, Status::Warn); // not computed
        let c = checks(
            &e,
            &s,
            None,
            &[],
            None,
            &live(now, Some(now - 30 * MICROS_PER_HOUR)),
        );
        assert_eq!(find(&c, "event_time_lag").status, Status::Alert);
        let c = checks(&e, &s, None, &[], None, &live(now, None));
        assert_eq!(find(&c, "event_time_lag").status, Status::Warn);
        // After the end date, lag no longer matters.
        let later = micros("2026-12-01", 0);
        let c = checks(&e, &s, None, &[], None, &live(later, Some(now)));
        assert_eq!(find(&c, "event_time_lag").status, Status::Ok);
    }

    fn report(flags: &[(&str, u64, u64, u64)]) -> DataSourceReport {
        DataSourceReport {
            table: "statistics_h_week_2".into(),
            period: "weekly",
            index: 2,
            start: 7,
            end: 13,
            published_at: None,
            sources: flags
                .iter()
                .map(|&(source, clients, c, n)| {
                    DataSourceCounts::new(DataSourceFlags {
                        analysis_basis: "enrollments".into(),
                        data_source: source.into(),
                        clients,
                        contradictory_branch: c,
                        non_enrolled_data: n,
                    })
                })
                .collect(),
        }
    }

    #[test]
    fn data_source_check_follows_the_worst_contradictory_share() {
        assert_eq!(data_sources_check(None).status, Status::Ok);
        // 10 of 1000 is 1.0%: not above the warning threshold.
        let c = data_sources_check(Some(&report(&[
            ("main", 1000, 10, 400),
            ("events", 1000, 0, 0),
        ])));
        assert_eq!(c.status, Status::Ok, "{}", c.reason);
        assert_eq!(
            c.reason,
            "statistics_h_week_2 (days 7-13): 10 of 1000 clients (1.0%) reported a contradictory branch in `main` (enrollments basis; warns above 1%, alerts above 5% contradictory); most untagged: 400 clients (40.0%) in `main` (enrollments basis)"
        );
        let c = data_sources_check(Some(&report(&[
            ("main", 1000, 11, 0),
            ("events", 1000, 30, 0),
        ])));
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.reason
                .contains("30 of 1000 clients (3.0%) reported a contradictory branch in `events`"),
            "{}",
            c.reason
        );
        let c = data_sources_check(Some(&report(&[("main", 1000, 51, 0)])));
        assert_eq!(c.status, Status::Alert);
        // Untagged data alone never raises the status; no clients is no share.
        let c = data_sources_check(Some(&report(&[("main", 1000, 0, 1000), ("x", 0, 0, 0)])));
        assert_eq!(c.status, Status::Ok);
    }

    #[test]
    fn consumer_lag_check_by_total_lag_and_age() {
        let m = PipelineMetrics::new();
        let now = micros("2026-11-05", 12);
        assert_eq!(
            consumer_lag_check(&m.consumer_lag(), now).status,
            Status::Warn
        );
        m.record_consumer_lag(vec![], now);
        let c = consumer_lag_check(&m.consumer_lag(), now);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (
                Status::Warn,
                "no partition is assigned to this consumer (yet)"
            )
        );
        m.record_consumer_lag(
            vec![
                ("tel".into(), 1, 60_000),
                ("enr".into(), 0, 5),
                ("tel".into(), 0, -3),
            ],
            now,
        );
        let lag = m.consumer_lag();
        assert_eq!(lag.total_messages, 60_005);
        assert_eq!(lag.measured_at.as_deref(), Some("2026-11-05T12:00:00Z"));
        let order: Vec<(&str, i32, i64)> = lag
            .partitions
            .iter()
            .map(|p| (p.topic.as_str(), p.partition, p.lag_messages))
            .collect();
        assert_eq!(order, [("enr", 0, 5), ("tel", 0, 0), ("tel", 1, 60_000)]);
        let c = consumer_lag_check(&lag, now + 1_000_000);
        assert_eq!(c.status, Status::Ok);
        assert_eq!(
            c.reason,
            "60005 messages behind on 3 partitions (most: tel/1 with 60000); ok up to 100000, alert above 1000000"
        );
        assert_eq!(
            m.consumer_lag.with_label_values(&["tel", "1"]).get(),
            60_000
        );
        m.record_consumer_lag(vec![("tel".into(), 0, 500_000)], now);
        assert_eq!(
            consumer_lag_check(&m.consumer_lag(), now).status,
            Status::Warn
        );
        m.record_consumer_lag(vec![("tel".into(), 0, 1_000_001)], now);
        assert_eq!(
            consumer_lag_check(&m.consumer_lag(), now).status,
            Status::Alert
        );
        // A stale measurement warns whatever it said.
        m.record_consumer_lag(vec![("tel".into(), 0, 0)], now);
        let c = consumer_lag_check(&m.consumer_lag(), now + 301_000_000);
        assert_eq!(c.status, Status::Warn);
        assert!(
            c.reason.starts_with("last measured 301 s ago"),
            "{}",
            c.reason
        );
    }

    #[test]
    fn window_phases_follow_records_and_watermark() {
        let e = exp();
        // Weeks 1 and 2 complete at 2026-11-14 and 2026-11-21 (last enrollment 11-07).
        let mut published = BTreeMap::new();
        published.insert(
            "statistics_h_week_1".to_string(),
            PublishedRecord {
                rows: 10,
                published_at: micros("2026-11-15", 1),
                late_events: 2,
                ..Default::default()
            },
        );
        let wm = Some(Timestamp(micros("2026-11-16", 0)));
        let w = window_states(&e, &published, wm);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].state, WindowPhase::Dirty);
        assert_eq!(w[0].published_at.as_deref(), Some("2026-11-15T01:00:00Z"));
        assert_eq!(w[1].state, WindowPhase::Open);
        assert_eq!(w[1].complete_at, "2026-11-21T00:00:00Z");
        let w = window_states(&e, &published, Some(Timestamp(micros("2026-11-21", 0))));
        assert_eq!(w[1].state, WindowPhase::Complete);
        published.insert(
            "statistics_h_week_2".to_string(),
            PublishedRecord {
                failures: 1,
                last_error: Some("permanent error publishing x: denied".into()),
                permanent: true,
                ..Default::default()
            },
        );
        let w = window_states(&e, &published, None);
        assert_eq!(w[1].state, WindowPhase::Failed);
        let c = windows_check(&w);
        assert_eq!(c.status, Status::Alert);
        assert_eq!(
            c.reason,
            "0 published, 1 dirty, 0 complete awaiting publication, 0 open, 1 failed; statistics_h_week_2 failed: permanent error publishing x: denied"
        );
    }

    #[test]
    fn watermark_is_the_oldest_partition_minus_lateness() {
        let t = EventTimes(vec![
            ("a".into(), 0, 10 * MICROS_PER_HOUR),
            ("a".into(), 1, 30 * MICROS_PER_HOUR),
            ("b".into(), 0, i64::MIN),
        ]);
        assert_eq!(t.newest(), Some(Timestamp(30 * MICROS_PER_HOUR)));
        assert_eq!(t.watermark(2), Some(Timestamp(8 * MICROS_PER_HOUR)));
        assert_eq!(EventTimes::default().watermark(2), None);
    }

    #[test]
    fn pipeline_metrics_turn_running_totals_into_increments() {
        let m = PipelineMetrics::new();
        let mut stats = crate::apply::FoldStats {
            folded: 10,
            ..Default::default()
        };
        stats.rejected[0] = 2;
        m.record_flush(&stats); // the first batch handed over, not written yet
        assert_eq!(m.batch_commit_seconds.get_sample_count(), 0);
        stats.folded = 25;
        stats.rejected[0] = 5;
        stats.flushes = 1;
        stats.last_flush = std::time::Duration::from_millis(3);
        m.record_flush(&stats);
        m.record_flush(&stats); // no new write: no new sample
        assert_eq!(m.events_folded.get(), 25);
        let r = RejectReason::ALL[0].as_str();
        assert_eq!(m.events_rejected.with_label_values(&[r]).get(), 5);
        assert_eq!(m.batch_commit_seconds.get_sample_count(), 1);
        assert!((m.batch_commit_seconds.get_sample_sum() - 0.003).abs() < 1e-9);
    }

    #[test]
    fn periods_parse_by_view_or_table_name() {
        assert_eq!(parse_period("weekly"), Some(Period::Week));
        assert_eq!(parse_period("week"), Some(Period::Week));
        assert_eq!(parse_period("overall"), Some(Period::Overall));
        assert_eq!(parse_period("monthly"), None);
    }
}
