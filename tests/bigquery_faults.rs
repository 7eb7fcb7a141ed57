//! Faults: an emulator that is down when publishing starts, one killed between two
//! publications, and one that accepts connections but never answers. Each test owns its
//! emulator, since it kills it.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};
use slipstream::publish::{Column, ColumnType, PublishError, Sink, TableData, TableKind, Value};

use common::bqemulator::BqEmulator;

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
    let url = format!(
        "{}/bigquery/v2/projects/{}/datasets/mid/tables",
        emu.rest_url(),
        emu.project
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "2", &url])
            .output()
            .expect("run curl");
        if String::from_utf8_lossy(&out.stdout).contains("__staging") {
            break;
        }
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
