//! HTTP request limits against the real server: a body over 64 KiB is refused with 413
//! and the JSON error body before any handler runs, and with a token set the finalize
//! trigger (a POST) is refused without it; a query that would read more sketches than
//! `max_query_sketches` is a 400 naming what to shorten. (Refusals of GETs without the
//! token, and the bounded query range, are tested in `http_health.rs` and `http.rs`.)

mod common;

use common::server::Server;
use common::*;

const CONFIG: &str = r#"
[pipeline]
max_query_sketches = 1000

[[experiment]]
slug = "limits-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-20"
"#;

#[test]
fn oversized_bodies_get_413_and_an_unauthenticated_post_gets_401() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state) = replay_into(dir.path(), CONFIG, "");
    let token = "limits-token";
    let server = Server::start(&cfg, &state, Some(token));
    // No connection reuse: the server closes a connection whose body it refused to read.
    let client = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let big = vec![b'x'; 100 * 1024];
    for (method, path) in [
        (
            reqwest::Method::POST,
            "/v1/experiments/limits-test/finalize",
        ),
        (reqwest::Method::GET, "/v1/dau?date=2026-11-02"),
    ] {
        let r = client
            .request(method.clone(), format!("{}{path}", server.base))
            .bearer_auth(token)
            .body(big.clone())
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 413, "{method} {path} with 100 KiB");
        let body: serde_json::Value = r.json().expect("a JSON error body");
        assert!(
            body["error"].as_str().unwrap().contains("65536 bytes"),
            "{body}"
        );
    }
    // A small body passes the limit (serve holds no pipeline: 409 for finalize).
    let r = client
        .post(format!(
            "{}/v1/experiments/limits-test/finalize",
            server.base
        ))
        .bearer_auth(token)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 409, "{}", r.text().unwrap());
    for auth in [None, Some("limits-tokeX")] {
        let mut req = client.post(format!(
            "{}/v1/experiments/limits-test/finalize",
            server.base
        ));
        if let Some(t) = auth {
            req = req.bearer_auth(t);
        }
        let r = req.send().unwrap();
        assert_eq!(r.status().as_u16(), 401, "POST finalize with {auth:?}");
        assert!(r.headers().contains_key("www-authenticate"));
    }
    assert_eq!(server.raw("/healthz", None).0, 200);
}

#[test]
fn a_query_over_the_sketch_budget_gets_a_400_naming_what_to_shorten() {
    let dir = tempfile::tempdir().unwrap();
    let events = r#"{"client_id":"X","submission_timestamp":"2026-11-03T10:00:00Z","dimensions":{"os":"Linux"}}"#;
    let (cfg, state) = replay_into(dir.path(), CONFIG, events);
    let server = Server::start(&cfg, &state, None);
    // Within max_query_days (339 points + 27 days = 366), but 339 MAUs by os read
    // 28 scans each: far over 1,000 reads.
    let (status, body) = server.get("/v1/mau?start=2025-12-20&end=2026-11-23&group_by=os");
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    for needle in [
        "1000 sketches",
        "max_query_sketches",
        "`start`..`end`",
        "`group_by`",
    ] {
        assert!(error.contains(needle), "{needle} in {error}");
    }
    // The same as a short series answers.
    let body = server.ok("/v1/mau?start=2026-11-03&end=2026-11-05&group_by=os");
    assert_eq!(body["series"][0]["groups"][0]["os"], "Linux");
}
