//! `finalize` (nightly) and `backfill`: what the stream alone cannot decide.
//!
//! `finalize` runs on the data directory while no `run` holds it (sled admits one process;
//! in Kubernetes the nightly job asks the running service over HTTP instead). It closes
//! every window the calendar says is complete, even when the stream went quiet, re-publishes
//! every window that late data made dirty (whatever the threshold), retries failed
//! publications, and records one status per experiment and day, which the health endpoint
//! reads. `backfill` recomputes from an event archive into a fresh data directory and
//! re-publishes, for a changed or added metric.

use chrono::NaiveDate;

use crate::event::{Day, Timestamp};
use crate::pipeline::{Pipeline, PublishReport};
use crate::state::StateError;
use crate::window::{self, enrollments_table};

/// One experiment's outcome for a date: `succeeded`, `succeeded, no data` or `failed: why`.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub slug: String,
    pub date: NaiveDate,
    pub status: String,
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
    let mut statuses = Vec::new();
    for (x, exp) in pipeline.fold.config().experiments.iter().enumerate() {
        if only.is_some_and(|o| o != x) {
            continue;
        }
        let published = pipeline.fold.published(Some(x));
        let mut due_tables: Vec<String> = window::windows(exp)
            .iter()
            .filter(|w| w.complete_at(exp) <= watermark)
            .map(|w| w.statistics_table(exp))
            .collect();
        if window::enrollment_closed_at(exp) <= watermark {
            due_tables.push(enrollments_table(exp));
        }
        let failure = due_tables.iter().find_map(|t| match published.get(t) {
            None => Some(format!(
                "{t} was not published (the sink was unavailable; it is retried on the next run)"
            )),
            Some(r) if r.published_at == 0 || r.permanent || r.late_events > 0 => Some(format!(
                "{t}: {}",
                r.last_error
                    .clone()
                    .unwrap_or_else(|| "not published".into())
            )),
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
        });
    }
    pipeline.fold.store().flush()?;
    Ok((statuses, report))
}
