//! The whole pipeline publishing to a real BigQuery emulator: every table equals, row for
//! row, what the local sink writes for the same events; the contract's example queries
//! run unchanged against the views; an emulator that is down while events are folded
//! gets everything once it is up; a config that removes a metric replaces the tables.

mod common;

use std::process::Command;

use common::bqemulator::{assert_bigquery_equals_local, query, BqEmulator};
use common::*;
use serde_json::Value;

const CONFIG: &str = r#"
[pipeline]
replicates = 50

[[experiment]]
slug = "bq-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"
analysis_bases = ["enrollments", "exposures"]
segments = [{ name = "windows_users", where = 'os = "Windows"' }]
"#;

fn bq_args<'a>(emu: &'a BqEmulator, dataset: &'a str, rest: &'a str, grpc: &'a str) -> Vec<String> {
    vec![
        "--bigquery".into(),
        format!("{}.{dataset}", emu.project),
        "--bigquery-rest".into(),
        rest.into(),
        "--bigquery-grpc".into(),
        grpc.into(),
    ]
}

#[test]
fn tables_and_views_equal_the_local_sink_row_for_row() {
    let emu = BqEmulator::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", CONFIG);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "300",
        "--seed",
        "4",
        "--out",
        p(&events),
    ]);
    let local = dir.path().join("out");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s1")),
        "--out",
        p(&local),
    ]);
    let (rest, grpc) = (emu.rest_url(), emu.grpc_url());
    let mut args: Vec<String> = [
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s2")),
    ]
    .map(String::from)
    .to_vec();
    args.extend(bq_args(emu, "pipeline", &rest, &grpc));
    slipstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_bigquery_equals_local(emu, "pipeline", &local, 21);

    // The contract's queries run unchanged against the views and agree with the local view.
    let weekly = table(&local, "statistics_bq_test_weekly");
    let means = query(
        emu,
        r#"SELECT segment, window_index AS week, branch, point, lower, upper FROM pipeline.statistics_bq_test_weekly
           WHERE metric = "active_hours" AND statistic = "mean" AND comparison IS NULL"#,
    );
    let want = weekly
        .iter()
        .filter(|r| {
            r["metric"] == "active_hours" && r["statistic"] == "mean" && r["comparison"].is_null()
        })
        .count();
    assert_eq!(means.len(), want);
    assert!(want >= 2 * 2 * 2, "segments x branches x bases: {want}");
    let diff = query(
        emu,
        r#"SELECT window_index AS week, branch, point, lower, upper FROM pipeline.statistics_bq_test_weekly
           WHERE metric = "active_hours" AND statistic = "mean" AND comparison = "difference"
           AND branch = "treatment" AND comparison_to_branch = "control" AND segment = "all""#,
    );
    let local_diff: Vec<&Value> = weekly
        .iter()
        .filter(|r| {
            r["metric"] == "active_hours"
                && r["statistic"] == "mean"
                && r["comparison"] == "difference"
                && r["branch"] == "treatment"
                && r["comparison_to_branch"] == "control"
                && r["segment"] == "all"
        })
        .collect();
    assert_eq!(diff.len(), local_diff.len());
    assert!(!diff.is_empty());
    for d in &diff {
        assert_eq!(d["week"], 1);
        let close = |a: &Value, b: &Value| {
            (a.as_f64().unwrap() - b.as_f64().unwrap()).abs()
                <= 1e-12 * a.as_f64().unwrap().abs().max(1.0)
        };
        assert!(
            local_diff.iter().any(|l| close(&l["point"], &d["point"])
                && close(&l["lower"], &d["lower"])
                && close(&l["upper"], &d["upper"])),
            "{d}"
        );
    }
}

#[test]
fn an_emulator_down_during_the_fold_gets_everything_once_it_is_up() {
    let mut emu = BqEmulator::not_started("slipstream-down");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", CONFIG);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "150",
        "--seed",
        "6",
        "--out",
        p(&events),
    ]);
    let local = dir.path().join("out");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s1")),
        "--out",
        p(&local),
    ]);
    // Quick deadline so the failing attempts are short.
    let cfg_bq = write(
        dir.path(),
        "bq.toml",
        &CONFIG.replace(
            "replicates = 50",
            "replicates = 50\n[pipeline.bigquery]\ntarget = \"x.y\"\ntimeout_secs = 3",
        ),
    );
    let (rest, grpc) = (emu.rest_url(), emu.grpc_url());
    let mut args: Vec<String> = [
        "replay",
        "--config",
        p(&cfg_bq),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s2")),
    ]
    .map(String::from)
    .to_vec();
    args.extend(bq_args(&emu, "down", &rest, &grpc));
    let first = Command::new(bin())
        .args(&args)
        .env("SLIPSTREAM_LOG", "error")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(
        !first.status.success(),
        "publishing to a down emulator must fail: {stdout}"
    );
    assert!(stdout.contains("folded"), "{stdout}");
    assert!(String::from_utf8_lossy(&first.stderr).contains("publication failed"));
    // Every event was folded despite the sink; now it comes up and a rerun publishes all.
    emu.restart();
    let second = slipstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(String::from_utf8_lossy(&second.stdout).contains("replayed 0 lines"));
    assert_bigquery_equals_local(&emu, "down", &local, 21);
}

/// A config change that removes a metric republishes the published windows: the
/// emulator's tables and views then equal a fresh local run without the metric, row for
/// row, with no copy of an old row and no row of the removed metric.
#[test]
fn removing_a_metric_from_the_config_replaces_the_published_tables() {
    let emu = BqEmulator::shared();
    let dir = tempfile::tempdir().unwrap();
    let without_text = r#"
[pipeline]
replicates = 20

[[experiment]]
slug = "bq-reshape"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"
analysis_bases = ["enrollments"]
periods = ["week", "overall"]
"#;
    let with_text = format!(
        "{without_text}metrics = [{{ name = \"max_hours\", field = \"active_hours\", aggregation = \"max\" }}]\n"
    );
    let with = write(dir.path(), "with.toml", &with_text);
    let without = write(dir.path(), "without.toml", without_text);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&with),
        "--clients",
        "100",
        "--seed",
        "5",
        "--out",
        p(&events),
    ]);
    let (rest, grpc) = (emu.rest_url(), emu.grpc_url());
    let to_bigquery = |cfg: &std::path::Path| {
        let mut args: Vec<String> = [
            "replay",
            "--config",
            p(cfg),
            "--input",
            p(&events),
            "--data-dir",
            p(&dir.path().join("state")),
        ]
        .map(String::from)
        .to_vec();
        args.extend(bq_args(emu, "reshape", &rest, &grpc));
        slipstream(&args.iter().map(String::as_str).collect::<Vec<_>>());
    };
    let removed = || {
        query(
            emu,
            r#"SELECT COUNT(*) AS n FROM reshape.statistics_bq_reshape_weekly WHERE metric = "max_hours""#,
        )[0]["n"]
            .as_i64()
            .unwrap()
    };
    to_bigquery(&with);
    assert!(removed() > 0);
    to_bigquery(&without);
    assert_eq!(removed(), 0);
    let local = dir.path().join("fresh");
    slipstream(&[
        "replay",
        "--config",
        p(&without),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("fresh-state")),
        "--out",
        p(&local),
    ]);
    assert_bigquery_equals_local(emu, "reshape", &local, 7);
}
