//! The results page (`/` and `/experiments/{slug}`): server-side HTML with inline SVG.
//!
//! Built from what the API already serves: the health report (enrollment per branch and
//! day, SRM verdict, windows), the published statistics rows and live DAU, MAU and DAU/MAU
//! per branch. No script and no external resource, so it works offline and behind any
//! proxy.

pub mod svg;

use std::fmt::Write;

use chrono::NaiveDate;
use serde_json::Value;

use crate::config::{Experiment, Period};
use crate::health::{BranchActivity, Health, Status};
use crate::sketch::CountAnswer;
use svg::{Chart, Point, Series, Style};

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;max-width:1400px;color:#222}\
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;background:#fff}\
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}\
.ok{color:#1a7f37}.warn{color:#9a6700}.alert{color:#cf222e;font-weight:bold}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        escape(title)
    )
}

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Ok => "ok",
        Status::Warn => "warn",
        Status::Alert => "alert",
    }
}

/// The list of experiments with their health summary.
pub fn index_page(experiments: &[(&Experiment, Status, u64)]) -> String {
    let mut b = String::from("<h1>slipstream experiments</h1><table id=\"experiments\"><tr><th>experiment</th><th>status</th><th>enrolled</th><th>enrollment</th><th>end</th></tr>");
    for (e, status, enrolled) in experiments {
        let _ = write!(
            b,
            "<tr><td><a href=\"/experiments/{0}\">{0}</a></td><td class=\"{1}\">{1}</td><td>{enrolled}</td><td>{2} to {3}</td><td>{4}</td></tr>",
            escape(&e.slug),
            status_class(*status),
            e.enrollment_start,
            e.last_enrollment_date(),
            e.end_date
        );
    }
    b.push_str("</table>");
    page("slipstream experiments", &b)
}

/// The statistic charted for a metric: its mean, else its binomial proportion.
fn chart_statistic(rows: &[&Value], metric: &str) -> Option<&'static str> {
    ["mean", "binomial"].into_iter().find(|s| {
        rows.iter()
            .any(|r| r["metric"] == metric && r["statistic"] == *s)
    })
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// Series per branch of `statistic` rows matching `comparison`, by window index.
fn window_series(
    rows: &[&Value],
    metric: &str,
    statistic: &str,
    comparison: Option<&str>,
    branches: &[&str],
    windows: &[u64],
) -> Vec<Series> {
    branches
        .iter()
        .map(|b| Series {
            name: b.to_string(),
            points: rows
                .iter()
                .filter(|r| {
                    r["metric"] == metric
                        && r["statistic"] == statistic
                        && r["branch"] == *b
                        && r["comparison"].as_str() == comparison
                })
                .filter_map(|r| {
                    let w = r["window_index"].as_u64()?;
                    Some(Point {
                        x: windows.iter().position(|x| *x == w)?,
                        y: num(&r["point"])?,
                        interval: num(&r["lower"]).zip(num(&r["upper"])),
                    })
                })
                .collect(),
        })
        .collect()
}

/// Inputs of the experiment page.
pub struct ExperimentPage<'a> {
    pub exp: &'a Experiment,
    pub health: &'a Health,
    /// The period whose statistics are charted, and its rows (segment `all` is used).
    pub period: Period,
    pub rows: &'a [Value],
    /// Live DAU, MAU and DAU/MAU per branch by date.
    pub activity: &'a [(NaiveDate, Vec<BranchActivity>)],
}

/// The results page of one experiment.
pub fn experiment_page(p: &ExperimentPage<'_>) -> String {
    let exp = p.exp;
    let h = p.health;
    let branches: Vec<&str> = exp.branches.iter().map(|b| b.name.as_str()).collect();
    let mut b = String::new();
    let _ = write!(
        b,
        "<p><a href=\"/\">all experiments</a></p><h1>{}</h1><p>Status: <span class=\"{1}\" id=\"status\">{1}</span>; {2} clients enrolled; enrollment {3} to {4}, ends {5}.</p>",
        escape(&exp.slug),
        status_class(h.status),
        h.enrolled_total,
        exp.enrollment_start,
        exp.last_enrollment_date(),
        exp.end_date
    );
    b.push_str(
        "<h2>Health</h2><table id=\"checks\"><tr><th>check</th><th>status</th><th>reason</th></tr>",
    );
    for c in &h.checks {
        let _ = write!(
            b,
            "<tr><td>{}</td><td class=\"{1}\">{1}</td><td>{2}</td></tr>",
            c.name,
            status_class(c.status),
            escape(&c.reason)
        );
    }
    b.push_str("</table>");

    // Statistics: per metric, each branch's point and interval by window, then the
    // relative uplift against the reference branch.
    let rows: Vec<&Value> = p.rows.iter().filter(|r| r["segment"] == "all").collect();
    let mut windows: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["window_index"].as_u64())
        .collect();
    windows.sort_unstable();
    windows.dedup();
    let labels: Vec<String> = windows
        .iter()
        .map(|w| format!("{} {w}", p.period.table_name()))
        .collect();
    let _ = write!(
        b,
        "<h2>Metrics ({} windows)</h2>",
        escape(p.period.view_name())
    );
    let mut metrics: Vec<&str> = Vec::new();
    for r in &rows {
        if let Some(m) = r["metric"].as_str() {
            if !metrics.contains(&m) {
                metrics.push(m);
            }
        }
    }
    let others: Vec<&str> = branches
        .iter()
        .copied()
        .filter(|b| *b != exp.reference_branch)
        .collect();
    let mut charted = 0;
    for m in metrics {
        let Some(stat) = chart_statistic(&rows, m) else {
            continue;
        };
        charted += 1;
        let _ = write!(b, "<h3>{} ({stat})</h3><div class=\"charts\">", escape(m));
        b.push_str(&svg::render(&Chart {
            id: format!("metric-{m}"),
            title: format!("{m}: {stat} per branch, 95% interval"),
            y_label: stat.into(),
            x_labels: labels.clone(),
            series: window_series(&rows, m, stat, None, &branches, &windows),
            style: Style::Intervals,
            zero_line: false,
        }));
        let uplift: Vec<Series> =
            window_series(&rows, m, stat, Some("relative_uplift"), &others, &windows)
                .into_iter()
                .map(|mut s| {
                    for pt in &mut s.points {
                        pt.y *= 100.0;
                        pt.interval = pt.interval.map(|(l, h)| (l * 100.0, h * 100.0));
                    }
                    s.name = format!("{} vs {}", s.name, exp.reference_branch);
                    s
                })
                .collect();
        b.push_str(&svg::render(&Chart {
            id: format!("uplift-{m}"),
            title: format!("{m}: relative uplift vs {} (%)", exp.reference_branch),
            y_label: "uplift %".into(),
            x_labels: labels.clone(),
            series: uplift,
            style: Style::Intervals,
            zero_line: true,
        }));
        b.push_str("</div>");
    }
    if charted == 0 {
        b.push_str("<p id=\"no-statistics\">No statistics published for this period yet.</p>");
    }

    // Enrollment per branch over time (cumulative), with the SRM verdict.
    b.push_str("<h2>Enrollment</h2>");
    let srm = match &h.srm {
        Some(s) if s.mismatch => format!(
            "<p class=\"alert\" id=\"srm\">Sample ratio mismatch: p = {:.2e} (alert below {})</p>",
            s.test.p_value, s.threshold
        ),
        Some(s) => format!(
            "<p class=\"ok\" id=\"srm\">No sample ratio mismatch: p = {:.3} (alert below {})</p>",
            s.test.p_value, s.threshold
        ),
        None => "<p class=\"warn\" id=\"srm\">Sample ratio test not computable yet.</p>".into(),
    };
    b.push_str(&srm);
    let days: Vec<String> = h.enrollment_by_day.iter().map(|d| d.date.clone()).collect();
    let enrollment: Vec<Series> = branches
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mut total = 0u64;
            Series {
                name: name.to_string(),
                points: h
                    .enrollment_by_day
                    .iter()
                    .enumerate()
                    .map(|(x, d)| {
                        total += d.enrolled.get(i).copied().unwrap_or(0);
                        Point {
                            x,
                            y: total as f64,
                            interval: None,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    b.push_str("<div class=\"charts\">");
    b.push_str(&svg::render(&Chart {
        id: "enrollment".into(),
        title: "Enrolled clients per branch (cumulative)".into(),
        y_label: "clients".into(),
        x_labels: days,
        series: enrollment,
        style: Style::Line,
        zero_line: false,
    }));
    b.push_str("</div><h2>Activity</h2><div class=\"charts\">");
    let dates: Vec<String> = p.activity.iter().map(|(d, _)| d.to_string()).collect();
    // One series per branch of one answer per day (skipping days without one).
    let per_branch = |pick: &dyn Fn(&BranchActivity) -> Option<CountAnswer>, scale: f64| {
        branches
            .iter()
            .enumerate()
            .map(|(i, name)| Series {
                name: name.to_string(),
                points: p
                    .activity
                    .iter()
                    .enumerate()
                    .filter_map(|(x, (_, per))| {
                        let a = pick(per.get(i)?)?;
                        Some(Point {
                            x,
                            y: a.estimate * scale,
                            interval: Some((a.lower * scale, a.upper * scale)),
                        })
                    })
                    .collect(),
            })
            .collect::<Vec<Series>>()
    };
    for (id, title, y_label, series) in [
        (
            "dau",
            "Daily active clients per branch (reported branch)",
            "DAU",
            per_branch(&|a| Some(a.dau), 1.0),
        ),
        (
            "mau",
            "Monthly active clients per branch (28 days ending each day)",
            "MAU",
            per_branch(&|a| Some(a.mau), 1.0),
        ),
        (
            "dau-mau",
            "DAU/MAU per branch (%)",
            "DAU/MAU %",
            per_branch(&|a| a.dau_per_mau, 100.0),
        ),
    ] {
        b.push_str(&svg::render(&Chart {
            id: id.into(),
            title: title.into(),
            y_label: y_label.into(),
            x_labels: dates.clone(),
            series,
            style: Style::Line,
            zero_line: false,
        }));
    }
    b.push_str("</div>");

    b.push_str("<h2>Windows</h2><table id=\"windows\"><tr><th>table</th><th>state</th><th>complete at</th><th>published at</th><th>last error</th></tr>");
    for w in &h.windows {
        let state = serde_json::to_value(w.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&w.table),
            state,
            w.complete_at,
            w.published_at.as_deref().unwrap_or(""),
            escape(w.last_error.as_deref().unwrap_or(""))
        );
    }
    b.push_str("</table>");
    page(&format!("{} - slipstream", exp.slug), &b)
}
