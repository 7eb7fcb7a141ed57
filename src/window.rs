//! Analysis windows (DESIGN.md section 4): which exist for an experiment, their table
//! names, and when each is complete.
//!
//! Days are counted from each client's own enrollment day (or first exposure day for the
//! `exposures` basis). A window is complete when every enrolled client's span of it is
//! over: when the watermark has passed the last enrollment date plus the window's last day.

use crate::config::{AnalysisBasis, Experiment, Period};
use crate::event::{Day, Timestamp};

/// One analysis window: days `start..=end` after each client's enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Window {
    pub period: Period,
    /// 1-based, as in table names.
    pub index: u32,
    pub start: u32,
    pub end: u32,
}

impl Window {
    /// `<slug>_<basis>_<period>_<index>`.
    pub fn aggregate_table(&self, exp: &Experiment, basis: AnalysisBasis) -> String {
        format!(
            "{}_{}_{}_{}",
            exp.table_slug(),
            basis.name(),
            self.period.table_name(),
            self.index
        )
    }
    /// `statistics_<slug>_<period>_<index>`.
    pub fn statistics_table(&self, exp: &Experiment) -> String {
        format!(
            "statistics_{}_{}_{}",
            exp.table_slug(),
            self.period.table_name(),
            self.index
        )
    }
    /// The instant from which the window is complete for every client: the start of the
    /// day after (last enrollment date + end).
    pub fn complete_at(&self, exp: &Experiment) -> Timestamp {
        Timestamp::from_day(
            Day::from_date(exp.last_enrollment_date()).plus(i64::from(self.end) + 1),
        )
    }
}

/// `enrollments_<slug>`.
pub fn enrollments_table(exp: &Experiment) -> String {
    format!("enrollments_{}", exp.table_slug())
}

/// `statistics_<slug>_<daily|weekly|...>`.
pub fn statistics_view(exp: &Experiment, period: Period) -> String {
    format!("statistics_{}_{}", exp.table_slug(), period.view_name())
}

/// `activity_sketches_YYYYMMDD`: one day's activity sketches (date-sharded, as BigQuery
/// users shard daily tables).
pub fn activity_sketches_table(day: Day) -> String {
    format!("activity_sketches_{}", day.date().format("%Y%m%d"))
}

/// When enrollment is closed: the start of the day after the last enrollment date.
pub fn enrollment_closed_at(exp: &Experiment) -> Timestamp {
    Timestamp::from_day(Day::from_date(exp.last_enrollment_date()).plus(1))
}

/// Every window of the experiment's configured periods that fits in its analysis length.
pub fn windows(exp: &Experiment) -> Vec<Window> {
    let len = exp.analysis_length_days();
    let mut out = Vec::new();
    for &period in &exp.periods {
        let span = match period {
            Period::Day => 1,
            Period::Week => 7,
            Period::Days28 => 28,
            Period::Overall => {
                if len > 0 {
                    out.push(Window {
                        period,
                        index: 1,
                        start: 0,
                        end: len - 1,
                    });
                }
                continue;
            }
        };
        let mut k = 0;
        while (k + 1) * span <= len {
            out.push(Window {
                period,
                index: k + 1,
                start: k * span,
                end: k * span + span - 1,
            });
            k += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn exp(periods: Vec<Period>) -> Experiment {
        Experiment {
            slug: "bug-1".into(),
            branches: vec![],
            reference_branch: "control".into(),
            enrollment_start: NaiveDate::from_ymd_opt(2026, 11, 1).unwrap(),
            enrollment_period: 7,
            end_date: NaiveDate::from_ymd_opt(2026, 11, 23).unwrap(),
            analysis_bases: vec![AnalysisBasis::Enrollments],
            periods,
            segments: vec![],
            metrics: vec![],
            seed: 1,
        }
    }

    #[test]
    fn windows_fit_the_analysis_length() {
        let e = exp(Period::ALL.to_vec());
        assert_eq!(e.analysis_length_days(), 16);
        let w = windows(&e);
        let days: Vec<_> = w.iter().filter(|w| w.period == Period::Day).collect();
        assert_eq!(days.len(), 16);
        assert_eq!((days[15].index, days[15].start, days[15].end), (16, 15, 15));
        let weeks: Vec<_> = w
            .iter()
            .filter(|w| w.period == Period::Week)
            .map(|w| (w.index, w.start, w.end))
            .collect();
        assert_eq!(weeks, vec![(1, 0, 6), (2, 7, 13)]);
        assert!(w.iter().all(|w| w.period != Period::Days28));
        let overall = w.iter().find(|w| w.period == Period::Overall).unwrap();
        assert_eq!((overall.start, overall.end), (0, 15));
        assert_eq!(weeks.len() + days.len() + 1, w.len());
    }

    #[test]
    fn completion_and_names() {
        let e = exp(vec![Period::Day]);
        let w = Window {
            period: Period::Day,
            index: 1,
            start: 0,
            end: 0,
        };
        // last enrollment 2026-11-07, day 0 ends at the start of 2026-11-08
        assert_eq!(w.complete_at(&e).day().to_string(), "2026-11-08");
        assert_eq!(
            w.aggregate_table(&e, AnalysisBasis::Enrollments),
            "bug_1_enrollments_day_1"
        );
        assert_eq!(w.statistics_table(&e), "statistics_bug_1_day_1");
        assert_eq!(statistics_view(&e, Period::Week), "statistics_bug_1_weekly");
        assert_eq!(enrollment_closed_at(&e).day().to_string(), "2026-11-08");
    }
}
