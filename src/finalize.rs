//! `finalize` (nightly) and `backfill`: what the stream alone cannot decide.
//!
//! `finalize` runs on the data directory while no `run` holds it (sled admits one process;
//! in Kubernetes the nightly job asks the running service over HTTP instead). It closes
//! every window the calendar says is complete, even when the stream went quiet, re-publishes
//! the windows that late data changed by more than the threshold, and every dirty window
//! whose look-back is over, retries failed publications, drops the per-client state of
//! experiments whose results are final once their retention is over, and records one
//! status per experiment and day, which the health endpoint reads. `backfill` recomputes
//! from an event archive or the brokers into a fresh data directory and re-publishes, for
//! a changed or added metric.

use chrono::NaiveDate;

use crate::event::{Day, Timestamp};
use crate::pipeline::{lookback_end, Pipeline, PublishReport};
use crate::state::StateError;
use crate::window::{self, enrollments_table};

/// One experiment's outcome for a date: `succeeded`, `succeeded, no data` or `failed: why`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub slug: String,
    pub date: NaiveDate,
    pub status: String,
    /// Set when this run dropped the experiment's per-client state (its results are
    /// final and its retention is over): the (enrollment, daily) records removed.
    pub dropped: Option<(u64, u64)>,
}

impl Status {
    pub fn failed(&self) -> bool {
        self.status.starts_with("failed")
    }
}

/// Publishes everything the calendar says is complete by the end of `date` and everything
/// dirty (of experiment `only`, or of all), then returns (and stores) one status per
/// experiment.
pub fn finalize(
    pipeline: &mut Pipeline,
    date: NaiveDate,
    only: Option<usize>,
) -> Result<(Vec<Status>, PublishReport), StateError> {
    let calendar = Timestamp::from_day(Day::from_date(date).plus(1));
    // Every partition is treated as idle: the newest event time seen counts too.
    let stream = pipeline.fold.watermark(Some(std::time::Duration::ZERO));
    let watermark = stream.map_or(calendar, |s| s.max(calendar));
    let report = pipeline.flush_and_publish_only(Some(watermark), true, only)?;
    pipeline.fold.compact_all()?; // enrollments are counted below
    let mut statuses = Vec::new();
    for (x, exp) in pipeline.fold.config().experiments.iter().enumerate() {
        if only.is_some_and(|o| o != x) {
            continue;
        }
        let published = pipeline.fold.published(Some(x));
        let lookback = pipeline.fold.config().pipeline.late_lookback_days;
        // (table, whether late changes must have been published by now)
        let mut due_tables: Vec<(String, bool)> = window::windows(exp)
            .iter()
            .filter(|w| w.complete_at(exp) <= watermark)
            .map(|w| {
                let over = lookback_end(exp, w, lookback) <= watermark;
                (w.statistics_table(exp), over)
            })
            .collect();
        if window::enrollment_closed_at(exp) <= watermark {
            due_tables.push((enrollments_table(exp), true));
        }
        let failure = due_tables
            .iter()
            .find_map(|(t, over)| match published.get(t) {
                None => Some(format!(
                "{t} was not published (the sink was unavailable; it is retried on the next run)"
            )),
                Some(r)
                    if r.published_at == 0
                        || r.permanent
                        || (r.late_events > 0 && (*over || r.failures > 0)) =>
                {
                    Some(format!(
                        "{t}: {}",
                        r.last_error
                            .clone()
                            .unwrap_or_else(|| "not published".into())
                    ))
                }
                Some(_) => None,
            });
        let enrolled = pipeline
            .fold
            .store()
            .enrollments(&exp.slug)
            .filter(|e| e.as_ref().is_ok_and(|e| e.record.enrolled.is_some()))
            .count();
        let status = match failure {
            Some(why) => format!("failed: {why}"),
            // Results final and per-client state dropped: nothing left to count.
            None if pipeline.fold.is_retired(x) => "succeeded".to_string(),
            None if enrolled == 0 => "succeeded, no data".to_string(),
            None => "succeeded".to_string(),
        };
        pipeline
            .fold
            .store()
            .set_finalize_status(&exp.slug, date, &status)?;
        statuses.push(Status {
            slug: exp.slug.clone(),
            date,
            status,
            dropped: None,
        });
    }
    pipeline.fold.store().flush()?;
    for (x, removed) in retire_final(pipeline, watermark, only)? {
        let slug = &pipeline.fold.config().experiments[x].slug;
        if let Some(s) = statuses.iter_mut().find(|s| &s.slug == slug) {
            s.dropped = Some(removed);
        }
    }
    Ok((statuses, report))
}

/// An experiment index and the (enrollment, daily) records dropped for it.
type Dropped = (usize, (u64, u64));

/// Drops the per-client state of every experiment (or of `only`) whose results are final
/// (every window and the enrollments published, no late change pending, every look-back
/// over) and whose retention (`pipeline.retention_days` after that) is over at
/// `watermark`. A drop a crash cut short is finished. Returns what was dropped.
fn retire_final(
    pipeline: &mut Pipeline,
    watermark: Timestamp,
    only: Option<usize>,
) -> Result<Vec<Dropped>, StateError> {
    let mut out = Vec::new();
    let unfinished = pipeline.fold.store().retired()?;
    let cfg = pipeline.fold.config().pipeline.clone();
    for x in 0..pipeline.fold.config().experiments.len() {
        if only.is_some_and(|o| o != x) {
            continue;
        }
        let exp = pipeline.fold.config().experiments[x].clone();
        let due = if pipeline.fold.is_retired(x) {
            unfinished.get(&exp.slug) == Some(&false)
        } else {
            let published = pipeline.fold.published(Some(x));
            let clean = |t: &str| {
                published
                    .get(t)
                    .is_some_and(|r| r.published_at > 0 && r.late_events == 0 && !r.permanent)
            };
            let windows = window::windows(&exp);
            let final_at = windows
                .iter()
                .map(|w| lookback_end(&exp, w, cfg.late_lookback_days))
                .max()
                .unwrap_or(Timestamp(i64::MIN));
            let expires = Timestamp(
                final_at
                    .0
                    .saturating_add(i64::from(cfg.retention_days) * 86_400_000_000),
            );
            watermark >= expires
                && clean(&enrollments_table(&exp))
                && windows.iter().all(|w| clean(&w.statistics_table(&exp)))
        };
        if due {
            let (enrollments, days) = pipeline.fold.retire(x)?;
            tracing::info!(experiment = %exp.slug, enrollments, daily_records = days, "results final and retention over: per-client state dropped (sketches kept)");
            out.push((x, (enrollments, days)));
        }
    }
    Ok(out)
}
