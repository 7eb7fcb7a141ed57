//! The HTTP API against the real server on an ephemeral port: DAU/WAU/MAU accuracy against
//! exact distinct counts, union semantics, answers that survive a restart, bad requests;
//! and arbitrary query strings against the router in process.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use common::server::Server;
use common::*;
use serde_json::Value;
use slipstream::event::{decode_json, Event, Kind};

const CONFIG: &str = r#"
[pipeline]
replicates = 50
# Few registers so that 2,000 clients already reach the dense HLL regime (~6.5% error).
sketch_precision = 8

[[experiment]]
slug = "http-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-20"
"#;

/// Exact distinct clients per (date, os, channel) from the events the service accepts.
fn exact_activity(events: &Path) -> BTreeMap<chrono::NaiveDate, Vec<(String, String, String)>> {
    let mut by_day: BTreeMap<chrono::NaiveDate, Vec<(String, String, String)>> = BTreeMap::new();
    for line in std::fs::read_to_string(events).unwrap().lines() {
        if let Ok(Event::Telemetry(t)) = decode_json(line.as_bytes(), Kind::Any, 1 << 20) {
            let dim = |k: &str| {
                t.dimensions
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.to_string())
                    .unwrap_or_default()
            };
            by_day
                .entry(t.submission_timestamp.day().date())
                .or_default()
                .push((t.client_id.to_string(), dim("os"), dim("channel")));
        }
    }
    by_day
}

#[test]
fn counts_are_accurate_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", CONFIG);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "2000",
        "--seed",
        "3",
        "--out",
        p(&events),
    ]);
    let state = dir.path().join("state");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&state),
        "--out",
        p(&dir.path().join("out")),
    ]);
    let activity = exact_activity(&events);
    let exact =
        |end: chrono::NaiveDate, days: i64, os: Option<&str>, channel: Option<&str>| -> usize {
            let mut set = BTreeSet::new();
            for (d, rows) in activity.range(end - chrono::Days::new(days as u64 - 1)..=end) {
                let _ = d;
                for (c, o, ch) in rows {
                    if os.is_none_or(|x| x == o) && channel.is_none_or(|x| x == ch) {
                        set.insert(c.clone());
                    }
                }
            }
            set.len()
        };
    let server = Server::start(&cfg, &state, None);
    let mut zs = Vec::new();
    let mut answers = Vec::new();
    let dates: Vec<chrono::NaiveDate> = (0..20)
        .map(|i| chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap() + chrono::Days::new(i))
        .collect();
    for (i, date) in dates.iter().enumerate() {
        for (endpoint, days) in [("dau", 1), ("wau", 7), ("mau", 28)] {
            if days > 1 && i % 3 != 0 {
                continue;
            }
            for (os, channel) in [
                (None, None),
                (Some("Windows"), None),
                (None, Some("release")),
                (Some("Mac"), Some("release")),
            ] {
                let mut path = format!("/v1/{endpoint}?date={date}");
                if let Some(o) = os {
                    path.push_str(&format!("&os={o}"));
                }
                if let Some(c) = channel {
                    path.push_str(&format!("&channel={c}"));
                }
                let body = server.ok(&path);
                let (est, se) = (
                    body["estimate"].as_f64().unwrap(),
                    body["standard_error"].as_f64().unwrap(),
                );
                let truth = exact(*date, days, os, channel) as f64;
                assert!(
                    (est - truth).abs() <= 3.0 * se + 1.0,
                    "{path}: estimate {est} ± {se}, exact {truth}"
                );
                assert!(
                    body["lower"].as_f64().unwrap() <= est
                        && est <= body["upper"].as_f64().unwrap()
                );
                if truth > 300.0 {
                    zs.push((est - truth) / se);
                }
                answers.push((path, body));
            }
        }
    }
    assert!(answers.len() >= 48, "{} queries", answers.len());
    assert!(
        zs.len() >= 20,
        "only {} answers in the dense regime",
        zs.len()
    );
    let rms = (zs.iter().map(|z| z * z).sum::<f64>() / zs.len() as f64).sqrt();
    assert!((0.4..=1.6).contains(&rms), "RMS of z-scores {rms} over {} answers: the reported standard error does not match the spread", zs.len());
    eprintln!(
        "http accuracy: {} queries, RMS z {rms:.2} over {} dense answers",
        answers.len(),
        zs.len()
    );

    // Restart the service over the same state: identical answers.
    drop(server);
    let server = Server::start(&cfg, &state, None);
    for (path, before) in &answers {
        assert_eq!(&server.ok(path), before, "{path} changed across a restart");
    }
}

#[test]
fn a_client_counts_once_across_days_and_dimension_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", CONFIG);
    // X: active three days; on 11-05 it upgrades from 133 to 134. Y: one day, tagged.
    let events = write(
        dir.path(),
        "events.ndjson",
        r#"{"client_id":"X","submission_timestamp":"2026-11-03T10:00:00Z","dimensions":{"os":"Linux","app_version":"133"}}
{"client_id":"X","submission_timestamp":"2026-11-05T09:00:00Z","dimensions":{"os":"Linux","app_version":"133"}}
{"client_id":"X","submission_timestamp":"2026-11-05T18:00:00Z","dimensions":{"os":"Linux","app_version":"134"}}
{"client_id":"X","submission_timestamp":"2026-11-07T10:00:00Z","dimensions":{"os":"Linux","app_version":"134"}}
{"client_id":"Y","submission_timestamp":"2026-11-05T12:00:00Z","experiments":{"http-test":"treatment"},"dimensions":{"os":"Mac","app_version":"134"}}
"#,
    );
    let state = dir.path().join("state");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&state),
        "--out",
        p(&dir.path().join("out")),
    ]);
    let s = Server::start(&cfg, &state, None);
    let est = |path: &str| s.ok(path)["estimate"].as_f64().unwrap();
    assert_eq!(est("/v1/mau?date=2026-11-07"), 2.0);
    assert_eq!(est("/v1/mau?date=2026-11-07&os=Linux"), 1.0);
    assert_eq!(est("/v1/dau?date=2026-11-05"), 2.0);
    assert_eq!(est("/v1/dau?date=2026-11-05&app_version=133"), 1.0);
    assert_eq!(est("/v1/dau?date=2026-11-05&app_version=134"), 2.0);
    assert_eq!(est("/v1/wau?date=2026-11-07&os=Linux&app_version=134"), 1.0);
    assert_eq!(est("/v1/dau?date=2026-11-04"), 0.0);
    let groups = s.ok("/v1/dau?date=2026-11-05&group_by=app_version")["groups"].clone();
    assert_eq!(groups.as_array().unwrap().len(), 2, "{groups}");
    assert_eq!(groups[0]["app_version"], "133");
    assert_eq!(groups[0]["estimate"], 1.0);
    assert_eq!(groups[1]["app_version"], "134");
    assert_eq!(groups[1]["estimate"], 2.0);
    let series = s.ok("/v1/dau?start=2026-11-03&end=2026-11-05")["series"].clone();
    let counts: Vec<f64> = series
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["estimate"].as_f64().unwrap())
        .collect();
    assert_eq!(counts, vec![1.0, 0.0, 2.0]);
    let e = s.ok("/v1/engagement?date=2026-11-07&os=Linux");
    assert_eq!(e["estimate"].as_f64(), Some(1.0)); // DAU 1 / MAU 1
    let b = s.ok("/v1/experiments/http-test/dau?date=2026-11-05");
    assert_eq!(b["branches"][0]["branch"], "control");
    assert_eq!(b["branches"][0]["estimate"], 0.0);
    assert_eq!(b["branches"][1]["estimate"], 1.0);
    // The union sketch decodes and counts the same.
    // The day's sketches are published as a table too: offline unions give the same counts.
    let out = dir.path().join("out");
    let rows = table(&out, "activity_sketches_20261105");
    let decode =
        |r: &Value| slipstream::sketch::Sketch::from_base64(r["sketch"].as_str().unwrap()).unwrap();
    let all = rows
        .iter()
        .find(|r| r["scope"] == "all")
        .expect("an all-clients row");
    assert_eq!(all["activity_date"], "2026-11-05");
    assert_eq!(decode(all).estimate().round(), 2.0);
    let mut union = slipstream::sketch::Sketch::new(slipstream::sketch::Precision::new(8).unwrap());
    let combos: Vec<&Value> = rows
        .iter()
        .filter(|r| r["scope"] == "combination")
        .collect();
    assert_eq!(combos.len(), 3, "Linux/133, Linux/134, Mac/134");
    for r in combos {
        union.merge(&decode(r)).unwrap();
    }
    assert_eq!(union.estimate().round(), 2.0);
    let branch = rows.iter().find(|r| r["scope"] == "branch").unwrap();
    assert_eq!(
        (branch["experiment"].as_str(), branch["branch"].as_str()),
        (Some("http-test"), Some("treatment"))
    );
    let sk = s.ok("/v1/sketch?start=2026-11-03&end=2026-11-07&os=Linux");
    let mut sketch =
        slipstream::sketch::Sketch::from_base64(sk["sketch"].as_str().unwrap()).unwrap();
    assert_eq!(sketch.estimate().round(), 1.0);
    assert_eq!(sk["format_version"], 1);
}

#[test]
fn bad_requests_get_a_400_that_names_the_parameter() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state) = replay_into(dir.path(), CONFIG, "");
    let s = Server::start(&cfg, &state, None);
    // (path, exact status, the parameter the error names in backticks, why)
    for (path, status, param, why) in [
        ("/v1/dau", 400, "`date`", "expected either"),
        ("/v1/dau?start=2026-11-01", 400, "`end`", "expected either"),
        ("/v1/dau?date=2026-02-30", 400, "`date`", "expected a date"),
        (
            "/v1/dau?date=2026-11-01&planet=mars",
            400,
            "`planet`",
            "unknown parameter",
        ),
        (
            "/v1/dau?date=2026-11-01&group_by=os,channel,country",
            400,
            "`group_by`",
            "at most 2",
        ),
        (
            "/v1/dau?date=2026-11-01&group_by=planet",
            400,
            "`group_by`",
            "`planet` is unknown",
        ),
        (
            "/v1/dau?date=2026-11-01&group_by=os,os",
            400,
            "`group_by`",
            "twice",
        ),
        (
            "/v1/dau?date=2026-11-01&os=Linux&group_by=os",
            400,
            "`os`",
            "both a filter and in `group_by`",
        ),
        (
            "/v1/mau?start=2026-01-01&end=2026-12-31",
            400,
            "`start`",
            "maximum is 366",
        ),
        (
            "/v1/dau?start=2026-11-05&end=2026-11-01",
            400,
            "`end`",
            "before",
        ),
        (
            "/v1/engagement?date=2026-11-01&group_by=os",
            400,
            "`group_by`",
            "not supported",
        ),
        (
            "/v1/sketch?date=2026-11-01&group_by=os",
            400,
            "`group_by`",
            "not supported",
        ),
        (
            "/v1/experiments/http-test/dau?date=2026-11-01&os=Linux",
            400,
            "`os`",
            "unknown parameter",
        ),
        (
            "/v1/experiments/http-test/health?verbose=1",
            400,
            "`verbose`",
            "takes none",
        ),
        (
            "/v1/experiments/http-test/statistics",
            400,
            "`period`",
            "missing",
        ),
        (
            "/v1/experiments/http-test/statistics?period=hourly",
            400,
            "`period`",
            "expected one of",
        ),
        // Malformed query strings and paths: the same JSON errors, never a lossy guess.
        (
            "/v1/dau?date=2026-11-01&date=2026-11-02",
            400,
            "`date`",
            "more than once",
        ),
        (
            "/v1/dau?date=2026-11-01&os=%ZZ",
            400,
            "`os`",
            "malformed percent-escape `%ZZ`",
        ),
        (
            "/v1/dau?date=2026-11-01&os=Linux%E",
            400,
            "`os`",
            "malformed percent-escape `%E`",
        ),
        ("/v1/dau?date=2026-11-01&os=%FF", 400, "`os`", "not UTF-8"),
        ("/v1/dau?date=2026-11-01&%FF=1", 400, "`%FF`", "not UTF-8"),
        (
            "/v1/dau?date=2026-11-01&=1",
            400,
            "`=1`",
            "no parameter name",
        ),
        (
            "/v1/dau?date=2026-11-01&group_by=",
            400,
            "`group_by`",
            "empty",
        ),
        ("/v1/dau?date=20261101", 400, "`date`", "expected a date"),
        (
            "/v1/experiments/%FF/dau?date=2026-11-01",
            400,
            "`slug`",
            "UTF-8",
        ),
        // Only an unknown resource is a 404, and the body says which.
        (
            "/v1/experiments/no-such/dau?date=2026-11-01",
            404,
            "`no-such`",
            "not configured",
        ),
        (
            "/v1/experiments/no-such/health",
            404,
            "`no-such`",
            "not configured",
        ),
        ("/nope", 404, "", "no such endpoint"),
    ] {
        let (got, body) = s.get(path);
        let error = body["error"].as_str().unwrap_or("");
        assert_eq!(got, status, "{path}: {body}");
        assert!(
            error.contains(param) && error.contains(why),
            "{path}: expected {param} and {why:?} in {body}"
        );
    }
    // Percent-encoding and `+` decode as in a form.
    let ok = s.ok("/v1/dau?date=2026%2D11%2D01&os=Windows+XP");
    assert_eq!(ok["filters"]["os"], "Windows XP");
    // A method the path does not take: 405 with `Allow`, and the JSON error.
    let r = reqwest::blocking::Client::new()
        .post(format!("{}/v1/dau?date=2026-11-01", s.base))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.headers()["allow"], "GET,HEAD");
    let body: Value = r.json().unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("POST is not allowed"),
        "{body}"
    );
    assert_eq!(s.get("/healthz").0, 200);
    assert_eq!(s.get("/readyz").0, 200);
}

/// A query string of up to 6 `name=value` pairs: known and unknown names, dates good and
/// bad, extreme and malformed, dimension lists, percent-escapes of any bytes.
fn query_string() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let name = prop_oneof![
        4 => proptest::sample::select(&[
            "date", "start", "end", "group_by", "os", "channel", "country", "app_version",
            "period", "metric", "segment", "planet", "", "+", "%FF", "%ZZ", "d%61te", "%",
        ][..])
        .prop_map(String::from),
        1 => "[a-z_%+0-9]{0,6}",
    ];
    let date =
        (2025..2028i32, 0..14u32, 0..33u32).prop_map(|(y, m, d)| format!("{y}-{m:02}-{d:02}"));
    let bytes = proptest::collection::vec(any::<u8>(), 1..5)
        .prop_map(|b| b.iter().map(|x| format!("%{x:02X}")).collect::<String>());
    let value = prop_oneof![
        4 => date,
        3 => proptest::sample::select(&[
            "", "Linux", "Windows+XP", "os", "os,channel", "os,os", "os,channel,country", ",",
            "planet", "weekly", "daily", "2026-11-05", "2025-12-01", "2026-02-30", "20261105",
            "0000-01-01", "-262143-01-01", "+262142-12-31", "99999-01-01", "-1", "1e9",
            "%ZZ", "%", "%E2%82%AC", "%C3",
        ][..])
        .prop_map(String::from),
        1 => bytes,
        1 => "[A-Za-z0-9%+,.:_~-]{0,12}",
    ];
    proptest::collection::vec((name, proptest::option::of(value)), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(n, v)| match v {
                Some(v) => format!("{n}={v}"),
                None => n,
            })
            .collect::<Vec<_>>()
            .join("&")
    })
}

/// `raw` with `+` as a space and valid `%XX` escapes decoded (others kept).
fn form_decoded(raw: &str) -> String {
    let b = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (b[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(x)) if hex.is_some_and(|h| !h.starts_with('+')) => {
                out.push(x);
                i += 2;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn arbitrary_query_strings_get_a_json_answer_with_a_known_status() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
    use tower::ServiceExt;

    let dir = tempfile::tempdir().unwrap();
    let events = r#"{"client_id":"X","submission_timestamp":"2026-11-03T10:00:00Z","experiments":{"http-test":"control"},"dimensions":{"os":"Linux","channel":"release"}}
{"client_id":"Y","submission_timestamp":"2026-11-05T12:00:00Z","dimensions":{"os":"Mac","country":"DE"}}
"#;
    let (cfg, state) = replay_into(dir.path(), CONFIG, events);
    let cfg = std::sync::Arc::new(slipstream::config::load(&cfg).unwrap());
    let store = slipstream::state::Store::open(&state, &cfg).unwrap();
    let app = slipstream::http::router(slipstream::http::Api::new(store, cfg).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let paths = [
        "/v1/dau",
        "/v1/wau",
        "/v1/mau",
        "/v1/engagement",
        "/v1/sketch",
        "/v1/experiments",
        "/v1/experiments/http-test/dau",
        "/v1/experiments/http-test/health",
        "/v1/experiments/http-test/statistics",
        "/v1/experiments/no-such/dau",
        "/v1/experiments/%E2%82%AC/health",
        "/v1/experiments/%FF/dau",
    ];
    let mut runner = TestRunner::new(Config {
        cases: 1000,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(4),
        ..Config::default()
    });
    let started = std::time::Instant::now();
    let statuses = std::cell::RefCell::new(BTreeMap::new());
    runner
        .run(
            &(proptest::sample::select(paths.to_vec()), query_string()),
            |(path, query)| {
                let uri = format!("{path}?{query}");
                let request = axum::http::Request::get(&uri)
                    .body(axum::body::Body::empty())
                    .unwrap();
                let (status, body) = rt.block_on(async {
                    let r = app.clone().oneshot(request).await.unwrap();
                    let status = r.status().as_u16();
                    (
                        status,
                        axum::body::to_bytes(r.into_body(), 1 << 24).await.unwrap(),
                    )
                });
                *statuses.borrow_mut().entry(status).or_insert(0) += 1;
                prop_assert!(
                    [200, 400, 404, 503].contains(&status),
                    "{uri}: status {status}"
                );
                let body: Value = serde_json::from_slice(&body)
                    .map_err(|e| TestCaseError::fail(format!("{uri}: not JSON ({e})")))?;
                if status == 200 {
                    return Ok(());
                }
                let error = body["error"].as_str().unwrap_or_default();
                prop_assert!(
                    !error.is_empty(),
                    "{uri}: {status} without an error: {body}"
                );
                if status == 404 {
                    prop_assert!(
                        !path.contains("http-test") && error.contains("is not configured"),
                        "{uri}: {error}"
                    );
                }
                if status == 400 {
                    // Names a parameter of the request (as sent, or decoded), or the
                    // one that is missing.
                    let mut names: Vec<String> =
                        ["date", "start", "end", "group_by", "period", "slug"]
                            .map(String::from)
                            .to_vec();
                    for pair in query.split('&') {
                        let name = pair.split('=').next().unwrap_or_default();
                        names.extend([pair.to_string(), name.to_string(), form_decoded(name)]);
                    }
                    prop_assert!(
                        names.iter().any(|n| error.contains(&format!("`{n}`"))),
                        "{uri}: the error names no parameter: {error}"
                    );
                }
                Ok(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let statuses = statuses.into_inner();
    eprintln!(
        "http: arbitrary query strings: statuses {statuses:?} in {:.2?}",
        started.elapsed()
    );
    // The generator reaches answers as well as refusals.
    assert!(statuses.get(&200).is_some_and(|n| *n >= 20), "{statuses:?}");
    assert!(statuses.get(&404).is_some_and(|n| *n >= 20), "{statuses:?}");
    assert!(
        statuses.get(&400).is_some_and(|n| *n >= 100),
        "{statuses:?}"
    );
}
