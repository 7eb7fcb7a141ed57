//! `finalize` and `backfill` through the real binary: a quiet stream's windows published by
//! the calendar, late data below and above the re-publication threshold, statuses for
//! success, no data and failure, a backfill after adding a metric that equals a fresh
//! run with the metric from the start, and a restart with a metric removed or added that
//! republishes what was published.

mod common;

use std::process::Command;

use common::*;

const CONFIG: &str = r#"
[pipeline]
replicates = 50
republish_threshold = 0.5

[[experiment]]
slug = "fin-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"

[[experiment]]
slug = "empty-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"
"#;

/// Two clients; the stream goes quiet on 2026-11-05, long before the end date.
const EVENTS: &str = r#"{"client_id":"A","experiment":"fin-test","branch":"control","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}
{"client_id":"B","experiment":"fin-test","branch":"treatment","event":"enroll","timestamp":"2026-11-02T10:00:00Z"}
{"client_id":"A","submission_timestamp":"2026-11-01T12:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":1.0}}
{"client_id":"B","submission_timestamp":"2026-11-02T12:00:00Z","experiments":{"fin-test":"treatment"},"metrics":{"active_hours":2.0}}
{"client_id":"A","submission_timestamp":"2026-11-05T12:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":4.0}}
"#;

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin())
        .args(args)
        .env("SLIPSTREAM_LOG", "error")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A config, an event file (EVENTS), a data directory and an output directory.
struct Setup {
    cfg: std::path::PathBuf,
    input: std::path::PathBuf,
    state: std::path::PathBuf,
    out: std::path::PathBuf,
}

impl Setup {
    fn new(dir: &std::path::Path, config: &str) -> Setup {
        Setup {
            cfg: write(dir, "c.toml", config),
            input: write(dir, "events.ndjson", EVENTS),
            state: dir.join("state"),
            out: dir.join("out"),
        }
    }

    fn replay(&self) {
        slipstream(&[
            "replay",
            "--config",
            p(&self.cfg),
            "--input",
            p(&self.input),
            "--data-dir",
            p(&self.state),
            "--out",
            p(&self.out),
        ]);
    }

    /// Runs `finalize --date date`, asserts that fin-test succeeded, returns stdout.
    fn finalize_ok(&self, date: &str) -> String {
        let (ok, stdout) = run(&[
            "finalize",
            "--config",
            p(&self.cfg),
            "--data-dir",
            p(&self.state),
            "--date",
            date,
            "--out",
            p(&self.out),
        ]);
        assert!(ok, "{stdout}");
        assert!(
            stdout.contains(&format!("{date} fin-test: succeeded\n")),
            "{stdout}"
        );
        stdout
    }
}

#[test]
fn finalize_publishes_a_quiet_streams_windows_and_reports_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let setup = Setup::new(dir.path(), CONFIG);
    let (input, out) = (&setup.input, &setup.out);
    setup.replay();
    // The watermark (11-05 12:00 minus 24 h) completes day windows 1-2 only.
    assert!(out.join("fin_test_enrollments_day_2.ndjson").exists());
    assert!(!out.join("fin_test_enrollments_day_3.ndjson").exists());
    assert!(out.join("statistics_fin_test_day_2.ndjson").exists());
    assert!(!out.join("statistics_fin_test_day_3.ndjson").exists());
    assert!(!out.join("fin_test_enrollments_overall_1.ndjson").exists());
    let stdout = setup.finalize_ok("2026-11-12");
    assert!(
        stdout.contains("2026-11-12 empty-test: succeeded, no data\n"),
        "{stdout}"
    );
    let overall = table(out, "fin_test_enrollments_overall_1");
    assert_eq!(row(&overall, "A")["active_hours"], 5.0);
    assert_eq!(row(&overall, "B")["active_hours"], 2.0);
    assert_eq!(table(out, "enrollments_empty_test").len(), 0);

    // Late data below the threshold: A's second event of 11-05 moves day 5's active_hours
    // sum from 4 to 5 (+25%, not above 0.5; no other metric changes) and the overall
    // window's from 7 to 8: kept in state, not re-published by the stream...
    let mut text = EVENTS.to_string();
    text.push_str(r#"{"client_id":"A","submission_timestamp":"2026-11-05T13:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":1.0}}"#);
    text.push('\n');
    std::fs::write(input, &text).unwrap();
    setup.replay();
    let a = |t: &str| row(&table(out, t), "A")["active_hours"].as_f64().unwrap();
    assert_eq!(a("fin_test_enrollments_day_5"), 4.0);
    // ... nor by a finalize within the look-back (day 5 completes on 11-07, its look-back
    // of 3 days ends on 11-10); still a success, the change is pending ...
    let finalize_on = |date: &str| {
        setup.finalize_ok(date);
    };
    finalize_on("2026-11-08");
    assert_eq!(a("fin_test_enrollments_day_5"), 4.0);
    // ... but by the first finalize after it. The overall window completes on 11-10: its
    // look-back runs until 11-13, so it waits for a later finalize.
    finalize_on("2026-11-11");
    assert_eq!(a("fin_test_enrollments_day_5"), 5.0);
    assert_eq!(a("fin_test_enrollments_overall_1"), 5.0);
    finalize_on("2026-11-12");
    assert_eq!(a("fin_test_enrollments_overall_1"), 6.0);

    // Above the threshold (day 4's sum moves away from zero): the stream re-publishes at
    // once.
    text.push_str(r#"{"client_id":"A","submission_timestamp":"2026-11-04T12:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":0.5}}
{"client_id":"B","submission_timestamp":"2026-11-05T13:00:00Z","experiments":{"fin-test":"treatment"},"metrics":{"active_hours":0.25}}
{"client_id":"A","submission_timestamp":"2026-11-04T13:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":0.5}}
"#);
    std::fs::write(input, &text).unwrap();
    setup.replay();
    let d4 = table(out, "fin_test_enrollments_day_4");
    assert_eq!(row(&d4, "A")["active_hours"], 1.0);
    assert_eq!(row(&d4, "B")["active_hours"], 0.25);
}

#[test]
fn finalize_reports_failure_and_exits_non_zero_when_the_sink_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &CONFIG.replace(
            "republish_threshold = 0.5",
            "republish_threshold = 0.5\n[pipeline.bigquery]\ntarget = \"p.d\"\ntimeout_secs = 2",
        ),
    );
    let input = write(dir.path(), "events.ndjson", EVENTS);
    let state = dir.path().join("state");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (rest, grpc) = (
        format!("http://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{port}"),
    );
    let bq = [
        "--bigquery-rest",
        rest.as_str(),
        "--bigquery-grpc",
        grpc.as_str(),
    ];
    let mut args = vec![
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&input),
        "--data-dir",
        p(&state),
    ];
    args.extend(bq);
    let (ok, _) = run(&args);
    assert!(!ok, "publishing to nothing must fail");
    let mut args = vec![
        "finalize",
        "--config",
        p(&cfg),
        "--data-dir",
        p(&state),
        "--date",
        "2026-11-12",
    ];
    args.extend(bq);
    let (ok, stdout) = run(&args);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("2026-11-12 fin-test: failed: "), "{stdout}");
}

#[test]
fn backfill_after_adding_a_metric_equals_a_fresh_run_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "v1.toml", CONFIG);
    let v2 = write(
        dir.path(),
        "v2.toml",
        &CONFIG.replacen("end_date = \"2026-11-10\"\n", "end_date = \"2026-11-10\"\nmetrics = [{ name = \"max_hours\", field = \"active_hours\", aggregation = \"max\" }]\n", 1),
    );
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&v1),
        "--clients",
        "200",
        "--seed",
        "8",
        "--out",
        p(&events),
    ]);
    // Published with v1 first, into the same output directory the backfill replaces.
    let out = dir.path().join("out");
    slipstream(&[
        "replay",
        "--config",
        p(&v1),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s1")),
        "--out",
        p(&out),
    ]);
    assert!(table(&out, "fin_test_enrollments_week_1")[0]
        .get("max_hours")
        .is_none());
    let (ok, stdout) = run(&[
        "backfill",
        "--config",
        p(&v2),
        "--from",
        "2026-10-01",
        "--to",
        "2026-11-30",
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s2")),
        "--out",
        p(&out),
    ]);
    assert!(ok, "{stdout}");
    // A fresh run with v2 from the start, finalized for the same date.
    let fresh = dir.path().join("fresh");
    slipstream(&[
        "replay",
        "--config",
        p(&v2),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s3")),
        "--out",
        p(&fresh),
    ]);
    slipstream(&[
        "finalize",
        "--config",
        p(&v2),
        "--data-dir",
        p(&dir.path().join("s3")),
        "--date",
        "2026-11-30",
        "--out",
        p(&fresh),
    ]);
    let (a, b) = (all_tables(&out), all_tables(&fresh));
    for (name, text) in &b {
        assert!(
            a.get(name) == Some(text),
            "{name} differs between backfill and a fresh run"
        );
    }
    assert!(table(&out, "fin_test_enrollments_week_1")[0]
        .get("max_hours")
        .is_some());
    // Backfill refuses a data directory that already has state.
    let (ok, _) = run(&[
        "backfill",
        "--config",
        p(&v2),
        "--from",
        "2026-10-01",
        "--to",
        "2026-11-30",
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("s2")),
        "--out",
        p(&out),
    ]);
    assert!(!ok);
}

/// Publishing again after a metric is removed from the config, then added back: the same
/// data directory and events, no new line, only the config changes. Each time the
/// published windows are replaced and equal a fresh run with that config, file for file.
#[test]
fn a_config_that_removes_or_adds_a_metric_republishes_the_published_windows() {
    let dir = tempfile::tempdir().unwrap();
    let with = write(
        dir.path(),
        "with.toml",
        &CONFIG.replacen("end_date = \"2026-11-10\"\n", "end_date = \"2026-11-10\"\nmetrics = [{ name = \"max_hours\", field = \"active_hours\", aggregation = \"max\" }]\n", 1),
    );
    let without = write(dir.path(), "without.toml", CONFIG);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&with),
        "--clients",
        "150",
        "--seed",
        "9",
        "--out",
        p(&events),
    ]);
    let replay = |cfg: &std::path::Path, state: &str, out: &std::path::Path| {
        let out = slipstream(&[
            "replay",
            "--config",
            p(cfg),
            "--input",
            p(&events),
            "--data-dir",
            p(&dir.path().join(state)),
            "--out",
            p(out),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let same_as = |fresh: &std::path::Path| {
        let (got, want) = (all_tables(&dir.path().join("out")), all_tables(fresh));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (name, text) in &want {
            assert!(got[name] == *text, "{name} differs from a fresh run");
        }
    };
    let out = dir.path().join("out");
    replay(&with, "state", &out);
    let week = |metric: &str| {
        let has_column = table(&out, "fin_test_enrollments_week_1")
            .iter()
            .any(|r| r.get(metric).is_some());
        let has_rows = table(&out, "statistics_fin_test_weekly")
            .iter()
            .any(|r| r["metric"] == metric);
        (has_column, has_rows)
    };
    assert_eq!(week("max_hours"), (true, true));

    // The metric removed: no new event, yet every published window is replaced.
    let stdout = replay(&without, "state", &out);
    assert!(stdout.contains("replayed 0 lines"), "{stdout}");
    assert_eq!(week("max_hours"), (false, false));
    assert_eq!(week("active_hours"), (true, true));
    replay(&without, "fresh-without", &dir.path().join("fresh-without"));
    same_as(&dir.path().join("fresh-without"));

    // Nothing changed: nothing is published again.
    let stdout = replay(&without, "state", &out);
    assert!(stdout.contains("published 0 tables"), "{stdout}");

    // Added back: the windows get the metric again, as a fresh run computes it.
    replay(&with, "state", &out);
    assert_eq!(week("max_hours"), (true, true));
    replay(&with, "fresh-with", &dir.path().join("fresh-with"));
    same_as(&dir.path().join("fresh-with"));
}

/// `POST /v1/experiments/{slug}/finalize` on a running `run --listen`: the consume loop
/// finalizes that experiment; a second call within the interval gets 429; `serve` has no
/// pipeline and answers 409.
#[test]
fn finalize_over_http_while_running() {
    let broker = common::broker::Broker::shared();
    for t in ["fin-enr", "fin-tel"] {
        broker.create_topic(t, 2);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &CONFIG.replace(
            "republish_threshold = 0.5",
            "republish_threshold = 0.5\nfinalize_min_interval_secs = 2\n[pipeline.kafka]\nenrollments_topic = \"fin-enr\"\ntelemetry_topic = \"fin-tel\"\ngroup_id = \"fin-group\"",
        ),
    );
    let input = write(dir.path(), "events.ndjson", EVENTS);
    slipstream(&[
        "produce",
        "--brokers",
        &broker.addr,
        "--input",
        p(&input),
        "--config",
        p(&cfg),
    ]);
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let mut child = Command::new(bin())
        .args([
            "run",
            "--config",
            p(&cfg),
            "--brokers",
            &broker.addr,
            "--data-dir",
            p(&state),
            "--out",
            p(&out),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SLIPSTREAM_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (base, lines) = common::server::listening_address(child.stderr.take().unwrap());
    std::thread::spawn(move || for _ in lines {}); // keep draining stderr
    let client = reqwest::blocking::Client::new();
    let post = |path: &str| {
        let r = client.post(format!("{base}{path}")).send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    };
    // Retry until the consumer has read the events and finalize published the overall window.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, body) = post("/v1/experiments/fin-test/finalize?date=2026-11-12");
        let overall = out.join("fin_test_enrollments_overall_1.ndjson");
        let a_hours = |rows: Vec<serde_json::Value>| {
            rows.into_iter()
                .find(|r| r["client_id"] == "A")
                .map(|r| r["active_hours"].clone())
        };
        let done = status == 200
            && overall.exists()
            && a_hours(table(&out, "fin_test_enrollments_overall_1"))
                == Some(serde_json::json!(5.0));
        if done {
            assert!(body.contains("\"status\":\"succeeded\""), "{body}");
            let (again, text) = post("/v1/experiments/fin-test/finalize?date=2026-11-12");
            assert_eq!(again, 429, "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "finalize over HTTP never published: {status} {body}"
        );
        std::thread::sleep(std::time::Duration::from_millis(2100));
    }
    assert_eq!(post("/v1/experiments/no-such/finalize").0, 404);
    assert_eq!(post("/v1/experiments/fin-test/finalize?date=soon").0, 400);
    let _ = Command::new("kill").arg(child.id().to_string()).status(); // SIGTERM: clean stop
    assert!(child.wait().unwrap().success());

    let mut serve = Command::new(bin())
        .args([
            "serve",
            "--config",
            p(&cfg),
            "--data-dir",
            p(&state),
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (base, _) = common::server::listening_address(serve.stderr.take().unwrap());
    let r = reqwest::blocking::Client::new()
        .post(format!("{base}/v1/experiments/fin-test/finalize"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409);
    let _ = serve.kill();
    let _ = serve.wait();
}

/// Once an experiment's results are final (every window published, no late change
/// pending, every look-back over) and its retention is over, `finalize` drops its
/// per-client state; later events of that experiment change nothing.
#[test]
fn finalize_drops_per_client_state_once_results_are_final_and_retention_is_over() {
    let dir = tempfile::tempdir().unwrap();
    let config = CONFIG.replace(
        "republish_threshold = 0.5",
        "republish_threshold = 0.5\nretention_days = 5",
    );
    let setup = Setup::new(dir.path(), &config);
    let (cfg, input, state, out) = (&setup.cfg, &setup.input, &setup.state, &setup.out);
    let replay = || setup.replay();
    let finalize_on = |date: &str| setup.finalize_ok(date);
    let enrollment_records = || {
        let config = slipstream::config::load(cfg).unwrap();
        let store = slipstream::state::Store::open(state, &config).unwrap();
        store.enrollments("fin-test").count()
    };
    replay();
    // Final on 11-13 (the overall window's look-back ends), retention over 5 days later:
    // at the end of 11-17.
    let stdout = finalize_on("2026-11-16");
    assert!(!stdout.contains("dropped"), "{stdout}");
    assert_eq!(enrollment_records(), 2);
    let stdout = finalize_on("2026-11-17");
    // Daily records stay while another experiment still spans their day: here the last
    // experiment retired drops them.
    assert!(
        stdout.contains("2026-11-17 fin-test: results final, per-client state dropped (2 enrollment and 0 daily records; sketches kept)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2026-11-17 empty-test: results final, per-client state dropped (0 enrollment and 3 daily records; sketches kept)"),
        "{stdout}"
    );
    assert_eq!(enrollment_records(), 0);
    let overall = all_tables(out);
    {
        // The HTTP API still answers: health says so, DAU comes from the kept sketches,
        // the published statistics stay.
        let server = common::server::Server::start(cfg, state, None);
        let health = server.ok("/v1/experiments/fin-test/health");
        assert_eq!(health["per_client_state_dropped"], true, "{health}");
        assert_eq!(health["status"], "ok", "{health}");
        assert_eq!(health["checks"][0]["name"], "retention", "{health}");
        assert_eq!(server.ok("/v1/dau?date=2026-11-05")["estimate"], 1.0);
        let stats = server.ok("/v1/experiments/fin-test/statistics?period=overall");
        assert!(
            stats["rows"].as_array().is_some_and(|r| !r.is_empty()),
            "{stats}"
        );
    }

    // Late events of a retired experiment are skipped; nothing is published again.
    let mut text = EVENTS.to_string();
    text.push_str(r#"{"client_id":"C","experiment":"fin-test","branch":"control","event":"enroll","timestamp":"2026-11-02T11:00:00Z"}
{"client_id":"A","submission_timestamp":"2026-11-05T13:00:00Z","experiments":{"fin-test":"control"},"metrics":{"active_hours":100.0}}
"#);
    std::fs::write(input, &text).unwrap();
    replay();
    let stdout = finalize_on("2026-11-18");
    assert!(!stdout.contains("dropped"), "{stdout}");
    assert_eq!(enrollment_records(), 0);
    assert_eq!(all_tables(out), overall);
}

/// `backfill --brokers --from-beginning` reads the topics from the earliest retained
/// offsets up to their ends as of its start, in a consumer group of its own, and gives
/// the same tables as `backfill --input` of the same events.
#[test]
fn backfill_from_the_brokers_equals_backfill_from_the_archive() {
    let broker = common::broker::Broker::shared();
    for t in ["bf-enr", "bf-tel"] {
        broker.create_topic(t, 3);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &CONFIG.replace(
            "republish_threshold = 0.5",
            "republish_threshold = 0.5\n[pipeline.kafka]\nenrollments_topic = \"bf-enr\"\ntelemetry_topic = \"bf-tel\"\ngroup_id = \"bf-group\"",
        ),
    );
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "300",
        "--seed",
        "11",
        "--out",
        p(&events),
    ]);
    slipstream(&[
        "produce",
        "--brokers",
        &broker.addr,
        "--input",
        p(&events),
        "--config",
        p(&cfg),
    ]);
    let backfill = |source: &[&str], name: &str| {
        let out = dir.path().join(format!("out-{name}"));
        let state = dir.path().join(format!("state-{name}"));
        let mut args = vec![
            "backfill",
            "--config",
            p(&cfg),
            "--from",
            "2026-10-25",
            "--to",
            "2026-11-20",
            "--data-dir",
            p(&state),
            "--out",
            p(&out),
        ];
        args.extend_from_slice(source);
        let (ok, stdout) = run(&args);
        assert!(ok, "{stdout}");
        (out, stdout)
    };
    let (from_file, _) = backfill(&["--input", p(&events)], "file");
    let (from_brokers, stdout) =
        backfill(&["--brokers", &broker.addr, "--from-beginning"], "brokers");
    assert!(
        stdout.contains("from topics bf-enr and bf-tel on"),
        "{stdout}"
    );
    let (a, b) = (all_tables(&from_file), all_tables(&from_brokers));
    assert!(a.len() > 10, "{} tables", a.len());
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, text) in &a {
        assert!(
            b[name] == *text,
            "{name} differs between the archive and the brokers"
        );
    }
    // --brokers without --from-beginning is refused.
    let (ok, _) = run(&[
        "backfill",
        "--config",
        p(&cfg),
        "--from",
        "2026-10-25",
        "--to",
        "2026-11-20",
        "--data-dir",
        p(&dir.path().join("state-x")),
        "--brokers",
        &broker.addr,
    ]);
    assert!(!ok);
}
