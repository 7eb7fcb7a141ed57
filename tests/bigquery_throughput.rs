//! Throughput against the emulator: a 100,000-row, 20-column aggregates table.
//! Ignored by default (the emulator keeps ~150 MiB per 100k rows); run with
//! `cargo test --test bigquery_throughput -- --ignored --nocapture`.

mod common;

use std::time::{Duration, Instant};

use chrono::NaiveDate;
use serde_json::json;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};
use slipstream::publish::{Column, ColumnType, Sink, TableData, TableKind, Value};

use common::bqemulator::BqEmulator;

fn aggregates(n: usize) -> TableData {
    use ColumnType::*;
    let mut columns = vec![
        Column::new("client_id", String, false),
        Column::new("branch", String, false),
        Column::new("enrollment_date", Date, false),
        Column::new("exposure_date", Date, true),
        Column::new("num_enrollment_events", Int64, false),
        Column::new("num_exposure_events", Int64, false),
        Column::new("analysis_window_start", Int64, false),
        Column::new("analysis_window_end", Int64, false),
    ];
    for m in [
        "active_hours",
        "uri_count",
        "search_count",
        "days_of_use",
        "retained",
        "ad_clicks",
        "tab_count",
        "bookmarks",
    ] {
        let kind = if m == "active_hours" {
            Float64
        } else if m == "retained" {
            Bool
        } else {
            Int64
        };
        columns.push(Column::new(m, kind, true));
    }
    for c in [
        "main_has_contradictory_branch",
        "main_has_non_enrolled_data",
        "windows",
        "release",
    ] {
        columns.push(Column::new(c, Bool, true));
    }
    let day = NaiveDate::from_ymd_opt(2026, 11, 1).unwrap();
    let rows = (0..n)
        .map(|i| {
            let mut row = vec![
                Value::Str(format!("c-{i:07}")),
                Value::Str(if i % 2 == 0 { "control" } else { "treatment" }.into()),
                Value::Date(day + chrono::Days::new((i % 7) as u64)),
                if i % 3 == 0 {
                    Value::Null
                } else {
                    Value::Date(day)
                },
                Value::Int(1),
                Value::Int((i % 4) as i64),
                Value::Int(0),
                Value::Int(6),
            ];
            for (k, col) in columns[8..16].iter().enumerate() {
                row.push(match col.kind {
                    Float64 => Value::Float(i as f64 * 0.001),
                    Bool => Value::Bool(i % 5 != 0),
                    _ => Value::Int((i * (k + 1)) as i64 % 1000),
                });
            }
            for k in 0..4 {
                row.push(Value::Bool((i + k) % 3 == 0));
            }
            row
        })
        .collect();
    TableData {
        name: "bug_1_slug_enrollments_week_1".into(),
        kind: TableKind::Aggregates,
        columns,
        rows,
    }
}

#[test]
#[ignore]
fn hundred_thousand_rows() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("slipstream=debug")
        .with_test_writer()
        .try_init();
    let emu = BqEmulator::start("throughput");
    let mut config = BigQueryConfig::new(&emu.project, "tp");
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    config.timeout = Duration::from_secs(300);
    config.call_timeout = Duration::from_secs(120);
    let mut sink = BigQuerySink::new(config).unwrap();
    let n = 100_000;
    let table = aggregates(n);
    for round in 1..=2 {
        let started = Instant::now();
        sink.publish(&table).expect("publish");
        let published = started.elapsed();
        let got = sink
            .query_rows("SELECT COUNT(*) AS n, COUNT(DISTINCT client_id) AS c FROM tp.bug_1_slug_enrollments_week_1")
            .unwrap();
        let queryable = started.elapsed();
        assert_eq!(got, vec![json!({"n": n, "c": n})]);
        eprintln!(
            "round {round}: {n} rows x {} columns: publish returned after {:.2} s ({:.0} rows/s end to end), rows counted by a query after {:.2} s",
            table.columns.len(),
            published.as_secs_f64(),
            n as f64 / published.as_secs_f64(),
            queryable.as_secs_f64()
        );
    }
    // The fixed cost of a publication (REST calls, stream, copy): a 200-row table.
    let small = TableData {
        name: "small_1".into(),
        rows: table.rows[..200].to_vec(),
        ..table.clone()
    };
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let started = Instant::now();
            sink.publish(&small).expect("publish small");
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    eprintln!(
        "200-row table: publish took {:.3} s (median of 5), {:.3} s max",
        times[2], times[4]
    );
}
