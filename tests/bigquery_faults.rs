//! Faults: an emulator that is down when publishing starts, one killed between two
//! publications, one killed during a publication, one killed while `run` publishes to it,
//! and one that accepts connections but never answers. Each test owns its emulator,
//! since it kills it.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};
use slipstream::publish::{Column, ColumnType, PublishError, Sink, TableData, TableKind, Value};

use common::bqemulator::{assert_bigquery_equals_local, BqEmulator};
use common::broker::Broker;
use common::stream::{generate, split, trickle, Run};
use common::{p, slipstream, write};

fn sink_for(emu: &BqEmulator, dataset: &str, timeout: Duration) -> BigQuerySink {
    let mut config = BigQueryConfig::new(&emu.project, dataset);
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    config.timeout = timeout;
    BigQuerySink::new(config).expect("sink")
}

fn table(name: &str, n: i64) -> TableData {
    TableData {
        name: name.into(),
        kind: TableKind::Enrollments,
        columns: vec![
            Column::new("client_id", ColumnType::String, false),
            Column::new("num_enrollment_events", ColumnType::Int64, false),
        ],
        rows: (0..n)
            .map(|i| vec![Value::Str(format!("c-{i}")), Value::Int(i % 3 + 1)])
            .collect(),
    }
}

fn assert_transient(result: Result<(), PublishError>, table: &str) {
    match result {
        Err(PublishError::Transient { table: t, detail }) => {
            assert_eq!(t, table, "{detail}");
        }
        other => panic!("expected a transient error for {table}, got {other:?}"),
    }
}

fn count(sink: &BigQuerySink, dataset: &str, table: &str) -> serde_json::Value {
    sink.query_rows(&format!(
        "SELECT COUNT(*) AS n, SUM(num_enrollment_events) AS e FROM {dataset}.{table}"
    ))
    .expect("query")[0]
        .clone()
}

#[test]
fn emulator_down_at_start_is_transient_then_publishes_once_it_is_up() {
    let mut emu = BqEmulator::not_started("fault-down");
    let mut sink = sink_for(&emu, "down", Duration::from_secs(4));
    let t = table("enrollments_down", 500);

    let started = Instant::now();
    assert_transient(sink.publish(&t), "enrollments_down");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(6),
        "the publication should retry until its 4 s deadline, took {took:?}"
    );

    emu.restart();
    sink.publish(&t).expect("publish once the emulator is up");
    assert_eq!(
        count(&sink, "down", "enrollments_down"),
        json!({"n": 500, "e": 999})
    );
}

#[test]
fn emulator_coming_up_during_a_publication_is_waited_for() {
    let mut emu = BqEmulator::not_started("fault-late");
    let mut sink = sink_for(&emu, "late", Duration::from_secs(60));
    let t = table("enrollments_late", 300);
    let publisher = std::thread::spawn(move || {
        let started = Instant::now();
        let result = sink.publish(&t);
        (sink, result, started.elapsed())
    });
    std::thread::sleep(Duration::from_secs(2));
    emu.restart();
    let (sink, result, took) = publisher.join().unwrap();
    result.expect("retried until the emulator answered");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(
        count(&sink, "late", "enrollments_late"),
        json!({"n": 300, "e": 600})
    );
}

#[test]
fn emulator_killed_between_publications_recovers_after_restart() {
    let mut emu = BqEmulator::start("fault-killed");
    let mut sink = sink_for(&emu, "killed", Duration::from_secs(4));
    sink.publish(&table("enrollments_a", 100))
        .expect("before the crash");
    assert_eq!(
        count(&sink, "killed", "enrollments_a"),
        json!({"n": 100, "e": 199})
    );

    emu.kill();
    let started = Instant::now();
    assert_transient(sink.publish(&table("enrollments_b", 200)), "enrollments_b");
    assert!(started.elapsed() < Duration::from_secs(6));

    // In-memory: the restarted emulator has no dataset; the sink recreates what it needs.
    emu.restart();
    sink.publish(&table("enrollments_b", 200))
        .expect("after the restart");
    sink.publish(&table("enrollments_a", 100))
        .expect("republish a");
    assert_eq!(
        count(&sink, "killed", "enrollments_b"),
        json!({"n": 200, "e": 399})
    );
    assert_eq!(
        count(&sink, "killed", "enrollments_a"),
        json!({"n": 100, "e": 199})
    );
}

#[test]
fn a_service_that_never_answers_is_bounded_by_the_deadline() {
    // Accepts connections and holds them silently, like the emulator's 7th AppendRows stream.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    let mut config = BigQueryConfig::new("hang", "hang");
    config.rest_url = Some(format!("http://127.0.0.1:{port}"));
    config.grpc_url = Some(format!("http://127.0.0.1:{port}"));
    config.timeout = Duration::from_secs(3);
    config.call_timeout = Duration::from_secs(1);
    let mut sink = BigQuerySink::new(config).unwrap();
    let started = Instant::now();
    assert_transient(
        sink.publish(&table("enrollments_hang", 10)),
        "enrollments_hang",
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn emulator_killed_during_a_publication_then_republished_exactly_once() {
    let mut emu = BqEmulator::start("fault-mid");
    let mut config = BigQueryConfig::new(&emu.project, "mid");
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    config.timeout = Duration::from_secs(6);
    // Small appends so that the write takes a few seconds and the kill lands inside it.
    config.chunk_rows = 500;
    let mut sink = BigQuerySink::new(config).expect("sink");
    let t = table("enrollments_mid", 40_000);
    let publisher = std::thread::spawn(move || {
        let result = sink.publish(&t);
        (sink, t, result)
    });
    // Kill it as soon as the staging table exists, that is while the rows are appended.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !table_ids(&emu, "mid")
        .iter()
        .any(|t| t.contains("__staging"))
    {
        assert!(Instant::now() < deadline, "no staging table appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(100));
    emu.kill();
    let (mut sink, t, result) = publisher.join().unwrap();
    assert_transient(result, "enrollments_mid");

    emu.restart();
    sink.publish(&t).expect("after the restart");
    assert_eq!(
        count(&sink, "mid", "enrollments_mid"),
        json!({"n": 40_000, "e": 79_999})
    );
}

/// Table ids of a dataset, from the REST API (empty when the emulator does not answer).
fn table_ids(emu: &BqEmulator, dataset: &str) -> Vec<String> {
    let url = format!(
        "{}/bigquery/v2/projects/{}/datasets/{dataset}/tables",
        emu.rest_url(),
        emu.project
    );
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "2", &url])
        .output()
        .expect("run curl");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list["tables"]
        .as_array()
        .map(|tables| {
            tables
                .iter()
                .filter_map(|t| t["tableReference"]["tableId"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The emulator killed (SIGKILL) while `run` has a publication in flight, with the stream
/// still flowing, and restarted on the same ports 3 s later. It keeps what it had committed
/// (persistent, as BigQuery keeps committed tables through an outage; an in-memory one
/// would forget tables that sled already records as published, which nothing real does).
/// `run` folds on, publishes everything once the emulator is back, and stops on SIGTERM;
/// then every table and view equals the local sink's for the same events, row for row,
/// each row once, and no staging table is left.
#[test]
fn emulator_killed_while_run_publishes_then_everything_is_published_once() {
    let broker = Broker::shared();
    let mut emu = BqEmulator::start_persistent("fault-run");
    let dir = tempfile::tempdir().unwrap();
    for t in ["enr", "tel"] {
        broker.create_topic(&format!("midrun-{t}"), 2);
    }
    // Every late change republished at once, so that the end state does not depend on
    // when each table happened to be published; a publication gives up after 2 s.
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            r#"
[pipeline]
republish_threshold = 0.0
replicates = 20
batch_events = 500
batch_millis = 200

[pipeline.kafka]
enrollments_topic = "midrun-enr"
telemetry_topic = "midrun-tel"
group_id = "midrun-group"
idle_partition_millis = 1000

[pipeline.bigquery]
target = "{}.midrun"
rest_url = "{}"
grpc_url = "{}"
timeout_secs = 2

[[experiment]]
slug = "killed-mid-run"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-10"
analysis_bases = ["enrollments"]
periods = ["day", "week", "overall"]
"#,
            emu.project,
            emu.rest_url(),
            emu.grpc_url()
        ),
    );
    let events = generate(dir.path(), &cfg, 300, 12);
    let local = dir.path().join("local");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("replay-state")),
        "--out",
        p(&local),
    ]);

    let started = Instant::now();
    let state = dir.path().join("state");
    let mut run = Run::start(
        "run",
        &[
            "--config",
            p(&cfg),
            "--brokers",
            &broker.addr,
            "--data-dir",
            p(&state),
        ],
    );
    let producer = trickle(
        &broker.addr,
        &cfg,
        split(&events, 8),
        Duration::from_millis(700),
    );
    run.assert_assigned();
    // Kill it as soon as a staging table exists: a publication is in flight.
    while !table_ids(&emu, "midrun")
        .iter()
        .any(|t| t.contains("__staging"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no publication started:\n{}",
            run.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    emu.kill();
    let killed_at = started.elapsed();
    let published_before = run.count("published");
    std::thread::sleep(Duration::from_secs(3)); // longer than a publication's deadline
    emu.restart();
    let back_at = started.elapsed();
    assert!(
        run.wait_for("published", published_before + 1, Duration::from_secs(30)),
        "nothing published after the emulator came back:\n{}",
        run.log_tail(30)
    );
    producer.join().unwrap();
    // Every partition idle gives the final watermark, and the last windows and sketch days
    // are published: wait until the emulator lists every table the replay wrote (a fixed
    // pause was too short on a loaded machine), then stop `run`.
    let want: Vec<String> = common::all_tables(&local)
        .keys()
        .map(|name| name.trim_end_matches(".ndjson").to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = table_ids(&emu, "midrun");
        let missing: Vec<&String> = want.iter().filter(|t| !have.contains(t)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not published within 60 s of the last event: {missing:?}\n{}",
            run.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!run.exited(), "{}", run.log_tail(30));
    let failures = run.count("publication failed");
    run.signal("TERM");
    let (status, stdout) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stdout}");
    eprintln!(
        "killed {killed_at:?} after the start, back at {back_at:?}; {failures} failed publications; stopped at {:?}",
        started.elapsed()
    );
    assert!(failures >= 1, "the kill did not fail a publication");

    assert_bigquery_equals_local(&emu, "midrun", &local, 20);
    let tables = table_ids(&emu, "midrun");
    assert!(
        !tables.iter().any(|t| t.contains("__staging")),
        "staging tables left: {tables:?}"
    );
    eprintln!("test took {:?}", started.elapsed());
}
