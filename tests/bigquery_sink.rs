//! The BigQuery sink against a real emulator: values read back over REST queries must equal
//! what was published (the emulator accepts mismatches silently, so an OK proves nothing).

mod common;

use std::time::Duration;

use chrono::NaiveDate;
use serde_json::json;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};
use slipstream::publish::{Column, ColumnType, Sink, TableData, TableKind, Value};

use common::bqemulator::BqEmulator;

/// A sink on the shared emulator, writing to its own dataset.
fn sink(dataset: &str) -> BigQuerySink {
    let emu = BqEmulator::shared();
    let mut config = BigQueryConfig::new(&emu.project, dataset);
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    config.timeout = Duration::from_secs(60);
    BigQuerySink::new(config).expect("sink")
}

/// The dataset's table listing over REST, as raw JSON text.
fn list_tables(dataset: &str) -> String {
    let emu = BqEmulator::shared();
    let url = format!(
        "{}/bigquery/v2/projects/{}/datasets/{dataset}/tables",
        emu.rest_url(),
        emu.project
    );
    let out = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "10", &url])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn all_types_columns() -> Vec<Column> {
    vec![
        Column::new("id", ColumnType::Int64, false),
        Column::new("s", ColumnType::String, true),
        Column::new("i", ColumnType::Int64, true),
        Column::new("f", ColumnType::Float64, true),
        Column::new("b", ColumnType::Bool, true),
        Column::new("d", ColumnType::Date, true),
        Column::new("parameter", ColumnType::Numeric, true),
    ]
}

fn date(s: &str) -> NaiveDate {
    NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()
}

#[test]
fn every_column_type_round_trips_including_nulls_and_empty_tables() {
    let mut sink = sink("types");
    let mut rows = Vec::new();
    // Deciles 0.1..0.9 as NUMERIC, zero values that proto3 would drop, and NULLs.
    for k in 1..=9 {
        rows.push(vec![
            Value::Int(k),
            Value::Str(format!("row {k} é")),
            Value::Int(if k == 1 { 0 } else { -k * 1_000_000_007 }),
            Value::Float(if k == 1 { 0.0 } else { k as f64 / 7.0 }),
            Value::Bool(k % 2 == 0),
            Value::Date(date("2026-11-01") + chrono::Days::new(k as u64)),
            Value::Numeric(k as f64 / 10.0),
        ]);
    }
    rows.push(vec![
        Value::Int(10),
        Value::Null,
        Value::Null,
        Value::Float(f64::NAN),
        Value::Null,
        Value::Null,
        Value::Null,
    ]);
    rows.push(vec![
        Value::Int(11),
        Value::Str(String::new()),
        Value::Int(i64::MAX),
        Value::Float(-1.5e300),
        Value::Bool(false),
        Value::Date(date("1969-12-31")),
        Value::Numeric(0.0),
    ]);
    let table = TableData {
        name: "types_1".into(),
        kind: TableKind::Aggregates,
        columns: all_types_columns(),
        rows,
    };
    sink.publish(&table).expect("publish");

    let got = sink
        .query_rows("SELECT * FROM types.types_1 ORDER BY id")
        .expect("query");
    assert_eq!(got.len(), 11, "{got:?}");
    for k in 1..=9i64 {
        let r = &got[k as usize - 1];
        let expect_f = if k == 1 { 0.0 } else { k as f64 / 7.0 };
        assert_eq!(r["id"], json!(k));
        assert_eq!(r["s"], json!(format!("row {k} é")));
        assert_eq!(r["i"], json!(if k == 1 { 0 } else { -k * 1_000_000_007 }));
        assert_eq!(r["f"].as_f64(), Some(expect_f), "row {k}: {r}");
        assert_eq!(r["b"], json!(k % 2 == 0));
        assert_eq!(
            r["d"],
            json!((date("2026-11-01") + chrono::Days::new(k as u64)).to_string())
        );
        assert_eq!(
            r["parameter"].as_f64(),
            Some(k as f64 / 10.0),
            "row {k}: {r}"
        );
    }
    assert_eq!(
        got[9],
        json!({"id": 10, "s": null, "i": null, "f": null, "b": null, "d": null, "parameter": null})
    );
    assert_eq!(
        got[10],
        json!({"id": 11, "s": "", "i": i64::MAX, "f": -1.5e300, "b": false, "d": "1969-12-31", "parameter": 0.0})
    );
    // NUMERIC comes back exactly, not as a float approximation.
    let exact = sink
        .query_rows("SELECT id FROM types.types_1 WHERE parameter = 0.3")
        .expect("query");
    assert_eq!(exact, vec![json!({"id": 3})]);

    // An empty table exists with its schema.
    let empty = TableData {
        name: "empty_1".into(),
        kind: TableKind::Aggregates,
        columns: all_types_columns(),
        rows: Vec::new(),
    };
    sink.publish(&empty).expect("publish empty");
    let got = sink
        .query_rows("SELECT COUNT(*) AS n, COUNT(parameter) AS p FROM types.empty_1")
        .expect("the empty table exists with its columns");
    assert_eq!(got, vec![json!({"n": 0, "p": 0})]);

    // Re-publishing a table as empty empties it.
    let emptied = TableData {
        name: "types_1".into(),
        ..empty
    };
    sink.publish(&emptied).expect("publish emptied");
    let got = sink
        .query_rows("SELECT COUNT(*) AS n FROM types.types_1")
        .expect("query");
    assert_eq!(got, vec![json!({"n": 0})]);

    // No staging table is left behind.
    let listing = list_tables("types");
    assert!(
        listing.contains("\"types_1\"") && listing.contains("\"empty_1\""),
        "{listing}"
    );
    assert!(!listing.contains("__staging"), "{listing}");
}

#[test]
fn republishing_replaces_rows_and_follows_schema_changes() {
    let mut sink = sink("replace");
    let columns = vec![
        Column::new("client_id", ColumnType::String, false),
        Column::new("branch", ColumnType::String, false),
        Column::new("active_hours", ColumnType::Float64, true),
        Column::new("uri_count", ColumnType::Int64, true),
    ];
    let rows: Vec<Vec<Value>> = (0..2500)
        .map(|i| {
            vec![
                Value::Str(format!("c-{i:05}")),
                Value::Str(if i % 2 == 0 { "control" } else { "treatment" }.into()),
                Value::Float(i as f64 * 0.25),
                Value::Int(i),
            ]
        })
        .collect();
    let mut table = TableData {
        name: "slug_enrollments_week_1".into(),
        kind: TableKind::Aggregates,
        columns,
        rows,
    };
    // Small chunks so the table spans several appends with offsets.
    let emu = BqEmulator::shared();
    let mut config = BigQueryConfig::new(&emu.project, "replace");
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    config.chunk_rows = 1000;
    let mut chunked = BigQuerySink::new(config).unwrap();
    chunked.publish(&table).expect("first publish");
    sink.publish(&table).expect("second publish");
    chunked.publish(&table).expect("third publish");

    let got = sink
        .query_rows(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT client_id) AS clients, SUM(uri_count) AS uris, \
             SUM(active_hours) AS hours FROM replace.slug_enrollments_week_1",
        )
        .unwrap();
    let sum: i64 = (0..2500).sum();
    assert_eq!(
        got,
        vec![json!({"n": 2500, "clients": 2500, "uris": sum, "hours": sum as f64 * 0.25})]
    );
    let one = sink
        .query_rows("SELECT * FROM replace.slug_enrollments_week_1 WHERE client_id = 'c-01235'")
        .unwrap();
    assert_eq!(
        one,
        vec![
            json!({"client_id": "c-01235", "branch": "treatment", "active_hours": 308.75, "uri_count": 1235})
        ]
    );

    // A config change removes a metric: its column disappears, and the rows are the new ones.
    table.columns.remove(2);
    table.rows.truncate(10);
    for row in &mut table.rows {
        row.remove(2);
    }
    sink.publish(&table).expect("publish without active_hours");
    let got = sink
        .query_rows("SELECT * FROM replace.slug_enrollments_week_1 ORDER BY client_id")
        .unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(
        got[3],
        json!({"client_id": "c-00003", "branch": "treatment", "uri_count": 3})
    );
    let err = sink
        .query_rows("SELECT active_hours FROM replace.slug_enrollments_week_1")
        .unwrap_err();
    assert!(err.to_string().contains("permanent"), "{err}");

    // And a metric added back later appends as a new column.
    table
        .columns
        .push(Column::new("search_count", ColumnType::Int64, true));
    for (i, row) in table.rows.iter_mut().enumerate() {
        row.push(Value::Int(100 + i as i64));
    }
    sink.publish(&table).expect("publish with search_count");
    let got = sink
        .query_rows(
            "SELECT SUM(search_count) AS s, COUNT(*) AS n FROM replace.slug_enrollments_week_1",
        )
        .unwrap();
    assert_eq!(got, vec![json!({"s": 1045, "n": 10})]);
}

/// Section 5's statistics schema.
fn statistics_columns() -> Vec<Column> {
    let s = |n: &str, nullable| Column::new(n, ColumnType::String, nullable);
    let f = |n: &str| Column::new(n, ColumnType::Float64, true);
    vec![
        s("segment", false),
        s("metric", false),
        s("statistic", false),
        Column::new("parameter", ColumnType::Numeric, true),
        s("branch", false),
        s("comparison", true),
        s("comparison_to_branch", true),
        f("ci_width"),
        f("point"),
        f("lower"),
        f("upper"),
        s("analysis_basis", false),
    ]
}

/// A statistics table for one week: means per branch and a difference, offset by `shift`.
fn statistics_week(index: u32, shift: f64) -> TableData {
    let mut rows = Vec::new();
    let row = |metric: &str,
               statistic: &str,
               parameter: Option<f64>,
               branch: &str,
               cmp: Option<&str>,
               point: f64| {
        vec![
            Value::Str("all".into()),
            Value::Str(metric.into()),
            Value::Str(statistic.into()),
            parameter.map(Value::Numeric).unwrap_or(Value::Null),
            Value::Str(branch.into()),
            cmp.map(|c| Value::Str(c.into())).unwrap_or(Value::Null),
            cmp.map(|_| Value::Str("control".into()))
                .unwrap_or(Value::Null),
            Value::Float(0.95),
            Value::Float(point),
            Value::Float(point - 0.5),
            Value::Float(point + 0.5),
            Value::Str("enrollments".into()),
        ]
    };
    rows.push(row(
        "active_hours",
        "mean",
        None,
        "control",
        None,
        1.0 + shift,
    ));
    rows.push(row(
        "active_hours",
        "mean",
        None,
        "treatment",
        None,
        2.0 + shift,
    ));
    rows.push(row(
        "active_hours",
        "mean",
        None,
        "treatment",
        Some("difference"),
        1.0,
    ));
    rows.push(row(
        "uri_count",
        "mean",
        None,
        "control",
        None,
        30.0 + shift,
    ));
    for d in 1..=9 {
        rows.push(row(
            "active_hours",
            "deciles",
            Some(d as f64 / 10.0),
            "control",
            None,
            d as f64,
        ));
    }
    TableData {
        name: format!("statistics_bug_1_slug_week_{index}"),
        kind: TableKind::Statistics {
            view: "statistics_bug_1_slug_weekly".into(),
            window_index: index,
            data_sources: vec![],
        },
        columns: statistics_columns(),
        rows,
    }
}

#[test]
fn statistics_view_unions_the_period_with_window_index() {
    let mut sink = sink("views");
    sink.publish(&statistics_week(1, 0.0)).expect("week 1");
    sink.publish(&statistics_week(2, 10.0)).expect("week 2");

    let sql = "SELECT window_index AS week, branch, point FROM views.statistics_bug_1_slug_weekly \
               WHERE metric = \"active_hours\" AND statistic = \"mean\" AND comparison IS NULL \
               ORDER BY week, branch";
    let got = sink.query_rows(sql).expect("the contract's query runs");
    assert_eq!(
        got,
        vec![
            json!({"week": 1, "branch": "control", "point": 1.0}),
            json!({"week": 1, "branch": "treatment", "point": 2.0}),
            json!({"week": 2, "branch": "control", "point": 11.0}),
            json!({"week": 2, "branch": "treatment", "point": 12.0}),
        ]
    );
    // Section 5's example query, with the fully qualified form too.
    let got = sink
        .query_rows(
            "SELECT window_index AS week, branch, point, lower, upper FROM \
             `slipstream-test.views.statistics_bug_1_slug_weekly` WHERE metric = \"active_hours\" \
             AND statistic = \"mean\" AND comparison = \"difference\" AND branch = \"treatment\" \
             AND comparison_to_branch = \"control\" AND segment = \"all\" ORDER BY week",
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            json!({"week": 1, "branch": "treatment", "point": 1.0, "lower": 0.5, "upper": 1.5}),
            json!({"week": 2, "branch": "treatment", "point": 1.0, "lower": 0.5, "upper": 1.5}),
        ]
    );

    // Re-publishing week 1 (late data) changes the view's rows, and week 3 joins it.
    sink.publish(&statistics_week(1, 100.0))
        .expect("week 1 again");
    sink.publish(&statistics_week(3, 20.0)).expect("week 3");
    let got = sink
        .query_rows(
            "SELECT window_index AS week, point, parameter FROM views.statistics_bug_1_slug_weekly \
             WHERE metric = 'active_hours' AND branch = 'control' AND statistic = 'mean' ORDER BY week",
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            json!({"week": 1, "point": 101.0, "parameter": null}),
            json!({"week": 2, "point": 11.0, "parameter": null}),
            json!({"week": 3, "point": 21.0, "parameter": null}),
        ]
    );
    let got = sink
        .query_rows(
            "SELECT window_index, COUNT(*) AS n, SUM(parameter) AS p FROM views.statistics_bug_1_slug_weekly \
             GROUP BY window_index ORDER BY window_index",
        )
        .unwrap();
    assert_eq!(
        got,
        vec![
            json!({"window_index": 1, "n": 13, "p": 4.5}),
            json!({"window_index": 2, "n": 13, "p": 4.5}),
            json!({"window_index": 3, "n": 13, "p": 4.5}),
        ]
    );
}

#[test]
fn publish_works_from_inside_a_tokio_runtime() {
    let mut sink = sink("in_runtime");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let table = statistics_week(1, 0.0);
    let (sink, result) = rt.block_on(async move {
        tokio::spawn(async move {
            let r = tokio::task::block_in_place(|| sink.publish(&table));
            (sink, r)
        })
        .await
        .unwrap()
    });
    result.expect("publish inside the runtime");
    let got = sink
        .query_rows("SELECT COUNT(*) AS n FROM in_runtime.statistics_bug_1_slug_weekly")
        .unwrap();
    assert_eq!(got, vec![json!({"n": 13})]);
    // Dropping the sink inside an async context must not panic either.
    rt.block_on(async move { drop(sink) });
}

#[test]
fn errors_are_classified_and_name_the_table() {
    let mut sink = sink("errors");
    let bad = TableData {
        name: "bad_1".into(),
        kind: TableKind::Aggregates,
        columns: vec![Column::new("n", ColumnType::Int64, true)],
        rows: vec![vec![Value::Str("not a number".into())]],
    };
    let err = sink.publish(&bad).unwrap_err().to_string();
    assert!(
        err.contains("permanent") && err.contains("bad_1") && err.contains("column n"),
        "{err}"
    );
    let err = sink
        .query_rows("SELECT nope FROM errors.missing")
        .unwrap_err();
    assert!(err.to_string().contains("permanent"), "{err}");
}

#[test]
fn emulator_selected_by_environment_variables() {
    let emu = BqEmulator::shared();
    // Only this test builds a sink without URLs, so the process-wide variables are safe here.
    std::env::set_var(
        "BIGQUERY_EMULATOR_HOST",
        format!("127.0.0.1:{}", emu.rest_port),
    );
    std::env::set_var(
        "BIGQUERY_STORAGE_EMULATOR_HOST",
        format!("127.0.0.1:{}", emu.grpc_port),
    );
    let mut sink = BigQuerySink::new(BigQueryConfig::from_target("slipstream-test.env").unwrap())
        .expect("sink");
    assert_eq!(sink.describe(), "bigquery:slipstream-test.env");
    let mut table = statistics_week(4, 0.0);
    table.kind = TableKind::Aggregates;
    sink.publish(&table).expect("publish");
    let got = sink
        .query_rows("SELECT COUNT(*) AS n FROM env.statistics_bug_1_slug_week_4")
        .unwrap();
    assert_eq!(got, vec![json!({"n": 13})]);
}

#[test]
fn readers_see_the_old_table_or_the_new_one_never_a_mix() {
    let emu = BqEmulator::shared();
    let mut config = BigQueryConfig::new(&emu.project, "atomic");
    config.rest_url = Some(emu.rest_url());
    config.grpc_url = Some(emu.grpc_url());
    // Many small appends, so the write lasts long enough to be observed.
    config.chunk_rows = 250;
    let mut writer = BigQuerySink::new(config).unwrap();
    let reader = sink("atomic");
    let table = |n: i64| TableData {
        name: "enrollments_atomic".into(),
        kind: TableKind::Enrollments,
        columns: vec![
            Column::new("client_id", ColumnType::String, false),
            Column::new("num_enrollment_events", ColumnType::Int64, false),
        ],
        rows: (0..n)
            .map(|i| vec![Value::Str(format!("c-{i}")), Value::Int(1)])
            .collect(),
    };
    writer.publish(&table(1000)).unwrap();
    let publisher = std::thread::spawn(move || writer.publish(&table(20_000)));
    let mut seen = std::collections::BTreeSet::new();
    while !publisher.is_finished() {
        let got = reader
            .query_rows("SELECT COUNT(*) AS n FROM atomic.enrollments_atomic")
            .unwrap();
        seen.insert(got[0]["n"].as_i64().unwrap());
    }
    publisher.join().unwrap().expect("publish");
    let got = reader
        .query_rows("SELECT COUNT(*) AS n FROM atomic.enrollments_atomic")
        .unwrap();
    seen.insert(got[0]["n"].as_i64().unwrap());
    assert!(seen.contains(&1000) && seen.contains(&20_000), "{seen:?}");
    assert!(
        seen.iter().all(|n| *n == 1000 || *n == 20_000),
        "a reader saw a partial table: {seen:?}"
    );
}
