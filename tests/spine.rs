//! The spine end to end through the real binary: exact values for a hand-written event
//! set, late data, restart-resume and crash-resume with no double counting.

mod common;

use common::*;

const CONFIG: &str = r#"
[pipeline]
allowed_lateness_hours = 24
republish_threshold = 0.0
replicates = 50
batch_events = 3

[[experiment]]
slug = "hand-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"
analysis_bases = ["enrollments", "exposures"]
segments = [{ name = "windows_users", where = 'os = "Windows"' }]
metrics = [{ name = "active_hours", field = "active_hours", aggregation = "sum", statistics = ["sum", "count", "mean"] }]
"#;

/// Analysis length: 2026-11-10 minus the last enrollment date 2026-11-02 = 8 days:
/// day windows 1..8, week 1 (days 0-6), overall (days 0-7).
const EVENTS: &str = r#"{"client_id":"A","experiment":"hand-test","branch":"control","event":"enroll","timestamp":"2026-11-01T10:00:00Z","dimensions":{"os":"Windows"}}
{"client_id":"A","submission_timestamp":"2026-11-01T09:00:00Z","experiments":{},"metrics":{"active_hours":5.0}}
{"client_id":"A","submission_timestamp":"2026-11-01T12:00:00Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":1.5,"uri_count":10}}
{"client_id":"D","experiment":"hand-test","branch":"treatment","event":"enroll","timestamp":"2026-11-01T00:00:00Z","dimensions":{"os":"Mac"}}
{"client_id":"B","experiment":"hand-test","branch":"treatment","event":"enroll","timestamp":"2026-11-02T23:00:00Z","dimensions":{"os":"Linux"}}
{"client_id":"B","experiment":"hand-test","branch":"treatment","event":"exposure","timestamp":"2026-11-02T23:10:00Z"}
{"client_id":"B","submission_timestamp":"2026-11-02T23:30:00Z","experiments":{"hand-test":"treatment"},"metrics":{"active_hours":1.0}}
this is not json
{"client_id":"A","submission_timestamp":"2026-11-03T08:00:00Z","metrics":{"active_hours":0.5}}
{"client_id":"C","experiment":"hand-test","branch":"control","event":"enroll","timestamp":"2026-11-03T08:00:00Z"}
{"client_id":"C","submission_timestamp":"2026-11-03T09:00:00Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":9.0}}
{"client_id":"D","experiment":"hand-test","branch":"treatment","event":"unenroll","timestamp":"2026-11-04T00:00:00Z"}
{"client_id":"E","experiment":"other-test","branch":"control","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}
{"client_id":"E","experiment":"hand-test","branch":"purple","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}
{"client_id":"B","experiment":"hand-test","branch":"treatment","event":"enroll","timestamp":"2026-11-02T23:50:00Z"}
{"client_id":"B","experiment":"hand-test","branch":"treatment","event":"enroll","timestamp":"2026-11-05T10:00:00Z"}
{"client_id":"A","submission_timestamp":"2026-11-07T23:59:59Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":2.0}}
{"client_id":"A","submission_timestamp":"2026-11-08T00:00:00Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":4.0}}
{"client_id":"B","submission_timestamp":"2026-11-09T12:00:00Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":3.0}}
{"client_id":"B","submission_timestamp":"2026-11-10T12:00:00Z","experiments":{"hand-test":"treatment"},"metrics":{"active_hours":100.0}}
{"client_id":"Z","submission_timestamp":"2026-11-20T00:00:00Z","metrics":{"active_hours":1.0}}
"#;

fn replay(dir: &std::path::Path, input: &std::path::Path) -> String {
    let cfg = dir.join("c.toml");
    let out = slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(input),
        "--data-dir",
        p(&dir.join("state")),
        "--out",
        p(&dir.join("out")),
    ]);
    String::from_utf8(out.stdout).unwrap()
}

fn get(rows: &[serde_json::Value], client: &str, col: &str) -> serde_json::Value {
    row(rows, client)[col].clone()
}

fn stat_row<'a>(
    rows: &'a [serde_json::Value],
    segment: &str,
    metric: &str,
    statistic: &str,
    branch: &str,
    basis: &str,
) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| {
            r["segment"] == segment
                && r["metric"] == metric
                && r["statistic"] == statistic
                && r["branch"] == branch
                && r["analysis_basis"] == basis
                && r["comparison"].is_null()
        })
        .unwrap_or_else(|| panic!("no {segment}/{metric}/{statistic}/{branch}/{basis}"))
}

fn stat(
    rows: &[serde_json::Value],
    segment: &str,
    metric: &str,
    statistic: &str,
    branch: &str,
    basis: &str,
) -> f64 {
    stat_row(rows, segment, metric, statistic, branch, basis)["point"]
        .as_f64()
        .unwrap()
}

#[test]
fn hand_written_events_give_exact_tables() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "c.toml", CONFIG);
    let input = write(dir.path(), "events.ndjson", EVENTS);
    let summary = replay(dir.path(), &input);
    assert!(summary.contains("invalid_json         1"), "{summary}");
    assert!(summary.contains("unknown_experiment   1"), "{summary}");
    assert!(summary.contains("unknown_branch       1"), "{summary}");
    let out = dir.path().join("out");

    // Enrollment: C enrolled after the period; B's second enroll in the period only
    // counts, its third (after the period) does not.
    let enr = table(&out, "enrollments_hand_test");
    let mut clients: Vec<&str> = enr
        .iter()
        .map(|r| r["client_id"].as_str().unwrap())
        .collect();
    clients.sort();
    assert_eq!(clients, ["A", "B", "D"]);
    assert_eq!(get(&enr, "B", "num_enrollment_events"), 2);
    assert_eq!(get(&enr, "B", "enrollment_date"), "2026-11-02");
    assert_eq!(get(&enr, "A", "windows_users"), true);
    assert_eq!(get(&enr, "B", "windows_users"), false);

    // Week 1 = days 0..6. A: 1.5 (tagged, day 0; the untagged 5.0 before enrolling is
    // ignored) + 0.5 (untagged, day 2) + 2.0 (last second of day 6); 4.0 on day 7 is out.
    let w1 = table(&out, "hand_test_enrollments_week_1");
    assert_eq!(w1.len(), 3);
    assert_eq!(get(&w1, "A", "active_hours"), 4.0);
    assert_eq!(get(&w1, "A", "uri_count"), 10.0);
    assert_eq!(get(&w1, "A", "days_of_use"), 3);
    assert_eq!(get(&w1, "A", "retained"), true);
    assert_eq!(get(&w1, "A", "main_has_non_enrolled_data"), true);
    assert_eq!(get(&w1, "A", "main_has_contradictory_branch"), false);
    assert_eq!(get(&w1, "A", "analysis_window_start"), 0);
    assert_eq!(get(&w1, "A", "analysis_window_end"), 6);
    assert_eq!(get(&w1, "A", "exposure_date"), serde_json::Value::Null);
    // B enrolled on the last enrollment day: its week 1 is 11-02..11-08.
    assert_eq!(get(&w1, "B", "active_hours"), 1.0);
    assert_eq!(get(&w1, "B", "days_of_use"), 1);
    assert_eq!(get(&w1, "B", "num_exposure_events"), 1);
    assert_eq!(get(&w1, "B", "exposure_date"), "2026-11-02");
    assert_eq!(get(&w1, "B", "main_has_contradictory_branch"), false);
    // D unenrolled but stays in the analysis (intent to treat) with no activity.
    assert_eq!(get(&w1, "D", "active_hours"), 0.0);
    assert_eq!(get(&w1, "D", "retained"), false);
    assert_eq!(get(&w1, "D", "days_of_use"), 0);

    // Overall = days 0..7: A gains day 7 (4.0); B gains 11-09 (contradictory tag), not 11-10.
    let all = table(&out, "hand_test_enrollments_overall_1");
    assert_eq!(get(&all, "A", "active_hours"), 8.0);
    assert_eq!(get(&all, "A", "days_of_use"), 4);
    assert_eq!(get(&all, "B", "active_hours"), 4.0);
    assert_eq!(get(&all, "B", "main_has_contradictory_branch"), true);
    assert_eq!(get(&all, "A", "analysis_window_end"), 7);

    // Day windows: day_1 is day 0, day_8 is day 7.
    let d1 = table(&out, "hand_test_enrollments_day_1");
    assert_eq!(get(&d1, "A", "active_hours"), 1.5);
    assert_eq!(get(&d1, "B", "active_hours"), 1.0);
    let d8 = table(&out, "hand_test_enrollments_day_8");
    assert_eq!(get(&d8, "A", "active_hours"), 4.0);
    assert_eq!(get(&d8, "B", "active_hours"), 3.0);
    assert!(!out.join("hand_test_enrollments_day_9.ndjson").exists());

    // Exposures basis: only B.
    let x1 = table(&out, "hand_test_exposures_week_1");
    assert_eq!(x1.len(), 1);
    assert_eq!(get(&x1, "B", "active_hours"), 1.0);

    // Statistics: identity counts and sums per branch, segment and basis.
    let s1 = table(&out, "statistics_hand_test_week_1");
    assert_eq!(
        stat(&s1, "all", "identity", "count", "control", "enrollments"),
        1.0
    );
    assert_eq!(
        stat(&s1, "all", "identity", "count", "treatment", "enrollments"),
        2.0
    );
    assert_eq!(
        stat(&s1, "all", "active_hours", "sum", "control", "enrollments"),
        4.0
    );
    assert_eq!(
        stat(
            &s1,
            "all",
            "active_hours",
            "sum",
            "treatment",
            "enrollments"
        ),
        1.0
    );
    assert_eq!(
        stat(
            &s1,
            "windows_users",
            "identity",
            "count",
            "treatment",
            "enrollments"
        ),
        0.0
    );
    assert_eq!(
        stat(&s1, "all", "identity", "count", "control", "exposures"),
        0.0
    );
    assert_eq!(
        stat(&s1, "all", "identity", "count", "treatment", "exposures"),
        1.0
    );
    // One control client: its mean is exact, interval included. Two treatment clients
    // (1.0 and 0.0): a bootstrap mean strictly inside, with an interval around it.
    let m = stat_row(&s1, "all", "active_hours", "mean", "control", "enrollments");
    assert_eq!(
        (
            m["point"].as_f64(),
            m["lower"].as_f64(),
            m["upper"].as_f64()
        ),
        (Some(4.0), Some(4.0), Some(4.0))
    );
    let m = stat_row(
        &s1,
        "all",
        "active_hours",
        "mean",
        "treatment",
        "enrollments",
    );
    let (point, lower, upper) = (
        m["point"].as_f64().unwrap(),
        m["lower"].as_f64().unwrap(),
        m["upper"].as_f64().unwrap(),
    );
    assert!(
        0.0 < lower && lower < point && point < upper && upper < 1.0,
        "{m}"
    );
    assert_eq!(
        stat(
            &s1,
            "all",
            "active_hours",
            "count",
            "treatment",
            "enrollments"
        ),
        2.0
    );
    let weekly = table(&out, "statistics_hand_test_weekly");
    assert_eq!(weekly.len(), s1.len());
    assert!(weekly.iter().all(|r| r["window_index"] == 1));
}

#[test]
fn late_data_republishes_and_a_second_replay_resumes_without_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "c.toml", CONFIG);
    let input = write(dir.path(), "events.ndjson", EVENTS);
    replay(dir.path(), &input);
    let before = all_tables(&dir.path().join("out"));
    // Replaying the same file again resumes at its end: nothing changes.
    let again = replay(dir.path(), &input);
    assert!(again.contains("replayed 0 lines"), "{again}");
    assert_eq!(all_tables(&dir.path().join("out")), before);
    // A late event for A on day 2 lands after week 1 was published: re-published.
    let mut text = EVENTS.to_string();
    text.push_str(r#"{"client_id":"A","submission_timestamp":"2026-11-03T20:00:00Z","experiments":{"hand-test":"control"},"metrics":{"active_hours":1.25}}"#);
    text.push('\n');
    std::fs::write(&input, text).unwrap();
    let third = replay(dir.path(), &input);
    assert!(third.contains("replayed 1 lines"), "{third}");
    let out = dir.path().join("out");
    assert_eq!(
        get(
            &table(&out, "hand_test_enrollments_week_1"),
            "A",
            "active_hours"
        ),
        5.25
    );
    assert_eq!(
        get(
            &table(&out, "hand_test_enrollments_overall_1"),
            "A",
            "active_hours"
        ),
        9.25
    );
    assert_eq!(
        get(
            &table(&out, "hand_test_enrollments_day_3"),
            "A",
            "active_hours"
        ),
        1.75
    );
    assert_eq!(
        stat(
            &table(&out, "statistics_hand_test_week_1"),
            "all",
            "active_hours",
            "sum",
            "control",
            "enrollments"
        ),
        5.25
    );
    // Windows the late event does not touch keep their rows.
    assert_eq!(
        all_tables(&out)["hand_test_enrollments_day_1.ndjson"],
        before["hand_test_enrollments_day_1.ndjson"]
    );
}

/// `check-config` prints every problem with file, field and the expected value; `replay`
/// and `run` refuse the same config before touching state, output or a broker.
#[test]
fn a_bad_config_is_reported_in_full_and_never_starts_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        r#"
[[experiment]]
slug = "x"
branches = ["control"]
reference_branch = "nope"
enrollment_start = "2026-13-01"
enrollment_period = 0
end_date = "2026-12-06"
segments = [{ name = "w", where = 'os ~ "Windows"' }]
metrics = [{ name = "bad name", aggregation = "sum", statistics = ["median"] }]
"#,
    );
    let out = std::process::Command::new(bin())
        .args(["check-config", p(&bad)])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (field, expected) in [
        ("branches", "expected at least two"),
        ("reference_branch", "expected one of {\"control\"}"),
        ("enrollment_start", "expected YYYY-MM-DD"),
        ("enrollment_period", "expected a number of days in 1..=365"),
        ("segments[0].where", "expected clauses like"),
        ("metrics[0].name", "expected letters, digits and _"),
        ("metrics[0].statistics[0]", "expected one of [\"mean\""),
    ] {
        let line = text
            .lines()
            .find(|l| l.contains(&format!(".{field}: ")))
            .unwrap_or_else(|| panic!("no line for {field} in:\n{text}"));
        assert!(line.contains(p(&bad)), "{line}");
        assert!(line.contains(expected), "{line}");
    }
    let (state, results) = (dir.path().join("state"), dir.path().join("out"));
    let events = write(dir.path(), "e.ndjson", "");
    for args in [
        vec!["replay", "--input", p(&events)],
        vec!["run", "--brokers", "127.0.0.1:9"],
    ] {
        let mut cmd = std::process::Command::new(bin());
        cmd.args(&args).args([
            "--config",
            p(&bad),
            "--data-dir",
            p(&state),
            "--out",
            p(&results),
        ]);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(
            stderr.contains("invalid configuration (8 problem(s))"),
            "{stderr}"
        );
        assert!(
            !state.exists() && !results.exists(),
            "{args:?} wrote something"
        );
    }
}
