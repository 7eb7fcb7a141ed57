//! Experiment health, published statistics and the bearer token, against the real server
//! over a generated and replayed experiment.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::server::Server;
use common::*;
use serde_json::Value;

const CONFIG: &str = r#"
[pipeline]
replicates = 50
sketch_precision = 10

[[experiment]]
slug = "health-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-20"
"#;

/// Generates and replays an experiment; returns (dir, config, state, out).
fn replayed() -> (
    tempfile::TempDir,
    std::path::PathBuf,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "c.toml", CONFIG);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "1500",
        "--seed",
        "7",
        "--out",
        p(&events),
    ]);
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&state),
        "--out",
        p(&out),
    ]);
    (dir, cfg, state, out)
}

/// The pipeline keeps every published statistics table's rows in sled (`S` keys), byte
/// for byte what the local sink wrote.
fn assert_statistics_in_state(cfg: &Path, state: &Path, out: &Path) {
    let config = slipstream::config::load(cfg).unwrap();
    let store = slipstream::state::Store::open(state, &config).unwrap();
    let exp = &config.experiments[0];
    for w in slipstream::window::windows(exp) {
        let table = w.statistics_table(exp);
        let key = slipstream::health::statistics_key(&exp.slug, &table);
        let stored = store.get_raw(&key).unwrap().expect("rows stored in sled");
        let file = std::fs::read(out.join(format!("{table}.ndjson"))).unwrap();
        assert_eq!(&stored[..], &file[..], "{table}");
    }
}

#[test]
fn health_reports_enrollment_srm_windows_and_no_client_ids() {
    let (_dir, cfg, state, out) = replayed();
    let enrollments = table(&out, "enrollments_health_test");
    let mut per_branch: BTreeMap<String, u64> = BTreeMap::new();
    let mut per_day: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in &enrollments {
        let b = r["branch"].as_str().unwrap().to_string();
        *per_branch.entry(b.clone()).or_default() += 1;
        *per_day
            .entry((r["enrollment_date"].as_str().unwrap().to_string(), b))
            .or_default() += 1;
    }
    let server = Server::start(&cfg, &state, None);
    let (status, text) = server.raw("/v1/experiments/health-test/health", None);
    assert_eq!(status, 200, "{text}");
    // Aggregates only: no generated client id (c-0000123) appears anywhere.
    assert!(!text.contains("\"c-0"), "a client id leaked: {text}");
    let h: Value = serde_json::from_str(&text).unwrap();

    let branches = h["branches"].as_array().unwrap();
    assert_eq!(branches.len(), 2);
    for b in branches {
        let name = b["branch"].as_str().unwrap();
        assert_eq!(b["enrolled"].as_u64().unwrap(), per_branch[name], "{name}");
        let rate = b["exposure_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&rate));
        assert_eq!(b["expected_share"], 0.5);
    }
    let total: u64 = per_branch.values().sum();
    assert_eq!(h["enrolled_total"].as_u64().unwrap(), total);
    for d in h["enrollment_by_day"].as_array().unwrap() {
        let date = d["date"].as_str().unwrap().to_string();
        for (i, name) in ["control", "treatment"].iter().enumerate() {
            let expected = per_day
                .get(&(date.clone(), name.to_string()))
                .copied()
                .unwrap_or(0);
            assert_eq!(
                d["enrolled"][i].as_u64().unwrap(),
                expected,
                "{date} {name}"
            );
        }
    }
    assert_eq!(h["enrollment_by_day"].as_array().unwrap().len(), 3);

    // SRM: the same chi-square as computed here from the published enrollments table.
    let observed = [per_branch["control"], per_branch["treatment"]];
    let srm = slipstream::stats::srm::sample_ratio_mismatch(&observed, &[1.0, 1.0]).unwrap();
    assert!((h["srm"]["p_value"].as_f64().unwrap() - srm.p_value).abs() < 1e-12);
    assert_eq!(h["srm"]["mismatch"], srm.p_value < 0.001);
    assert_eq!(h["srm"]["threshold"], 0.001);

    // Every window is reported; the replay ran to the end, so each complete one is published.
    let windows = h["windows"].as_array().unwrap();
    assert!(!windows.is_empty());
    for w in windows {
        assert_eq!(w["state"], "published", "{w}");
        assert!(w["published_at"].is_string());
        assert!(w["table"]
            .as_str()
            .unwrap()
            .starts_with("statistics_health_test_"));
    }
    assert!(h["last_published_at"].is_string());

    // Each check has a status and a one-line reason; the overall status is the worst.
    let rank = |s: &str| {
        ["ok", "warn", "alert"]
            .iter()
            .position(|x| *x == s)
            .unwrap()
    };
    let checks = h["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for n in [
        "enrollment",
        "sample_ratio",
        "exposure",
        "unenrollment",
        "windows",
        "event_time_lag",
    ] {
        assert!(names.contains(&n), "missing check {n}: {names:?}");
    }
    let worst = checks
        .iter()
        .map(|c| {
            let r = c["reason"].as_str().unwrap();
            assert!(!r.is_empty() && !r.contains('\n'));
            rank(c["status"].as_str().unwrap())
        })
        .max()
        .unwrap();
    assert_eq!(rank(h["status"].as_str().unwrap()), worst);
    // The replayed file's newest event is known; the experiment has ended, so lag is fine.
    assert!(h["newest_event_time"]
        .as_str()
        .unwrap()
        .starts_with("2026-11-"));
    assert!(h["event_time_lag_seconds"].as_f64().unwrap() > 0.0);
    let lag = checks
        .iter()
        .find(|c| c["name"] == "event_time_lag")
        .unwrap();
    assert_eq!(lag["status"], "ok", "{lag}");
    let dau = h["dau"].as_array().unwrap();
    assert_eq!(dau.len(), 2);
    assert!(
        dau.iter().any(|d| d["estimate"].as_f64().unwrap() > 0.0),
        "{dau:?}"
    );
    let windows_check = checks.iter().find(|c| c["name"] == "windows").unwrap();
    assert_eq!(windows_check["status"], "ok", "{windows_check}");

    // Per data source: the flags of the latest window of the longest period, counted from
    // its published aggregate tables (overall, as the replay ran past the end date).
    let ds = &h["data_sources"];
    assert_eq!(ds["table"], "statistics_health_test_overall_1", "{ds}");
    assert_eq!(ds["period"], "overall");
    let sources = ds["sources"].as_array().unwrap();
    assert_eq!(
        sources.len(),
        1,
        "one per basis (enrollments) and data source: {ds}"
    );
    for s in sources {
        let basis = s["analysis_basis"].as_str().unwrap();
        assert_eq!(s["data_source"], "main");
        let rows = table(&out, &format!("health_test_{basis}_overall_1"));
        let count = |col: &str| rows.iter().filter(|r| r[col] == true).count() as u64;
        assert_eq!(s["clients"].as_u64().unwrap(), rows.len() as u64, "{basis}");
        let contradictory = count("main_has_contradictory_branch");
        let untagged = count("main_has_non_enrolled_data");
        assert_eq!(s["contradictory_branch"].as_u64().unwrap(), contradictory);
        assert_eq!(s["non_enrolled_data"].as_u64().unwrap(), untagged);
        assert!(
            contradictory > 0 && untagged > 0,
            "the generator writes both: {s}"
        );
        let share = s["contradictory_share"].as_f64().unwrap();
        assert!((share - contradictory as f64 / rows.len() as f64).abs() < 1e-12);
    }
    let worst = sources
        .iter()
        .map(|s| s["contradictory_share"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let check = checks.iter().find(|c| c["name"] == "data_sources").unwrap();
    let expected = if worst > 0.05 {
        "alert"
    } else if worst > 0.01 {
        "warn"
    } else {
        "ok"
    };
    assert_eq!(check["status"], expected, "{check}");
    assert!(check["reason"]
        .as_str()
        .unwrap()
        .starts_with("statistics_health_test_overall_1 (days 0-"));
    // `serve` runs no consumer, and says so rather than reporting no lag.
    assert!(h["consumer_lag"].is_null());
    assert!(checks.iter().all(|c| c["name"] != "consumer_lag"));
    let not_reported = h["not_reported"].as_array().unwrap();
    assert_eq!(not_reported.len(), 1);
    assert!(not_reported[0]
        .as_str()
        .unwrap()
        .starts_with("consumer lag per partition: this process runs no consumer"));

    // The list carries a summary per experiment.
    let list = server.ok("/v1/experiments");
    let e = &list["experiments"][0];
    assert_eq!(e["slug"], "health-test");
    assert_eq!(e["health"]["enrolled_total"].as_u64().unwrap(), total);
    assert_eq!(e["health"]["status"], h["status"]);
    assert_eq!(&e["health"]["data_sources"], &ds["sources"]);

    let (status, body) = server.get("/v1/experiments/nope/health");
    assert_eq!(status, 404);
    assert!(body["error"].as_str().unwrap().contains("not configured"));
}

#[test]
fn statistics_serve_the_published_rows_like_the_view() {
    let (_dir, cfg, state, out) = replayed();
    assert_statistics_in_state(&cfg, &state, &out);
    let server = Server::start(&cfg, &state, None);
    let view = table(&out, "statistics_health_test_weekly");
    assert!(!view.is_empty());
    let body = server.ok("/v1/experiments/health-test/statistics?period=weekly");
    assert_eq!(body["rows"].as_array().unwrap(), &view);

    // Filters select exactly the view's matching rows.
    let body = server
        .ok("/v1/experiments/health-test/statistics?period=weekly&metric=active_hours&segment=all");
    let expected: Vec<&Value> = view
        .iter()
        .filter(|r| r["metric"] == "active_hours" && r["segment"] == "all")
        .collect();
    assert!(!expected.is_empty());
    let got: Vec<&Value> = body["rows"].as_array().unwrap().iter().collect();
    assert_eq!(got, expected);
    assert_eq!(body["filters"]["metric"], "active_hours");

    // The BigQuery example query's shape, answered over HTTP.
    let body = server.ok("/v1/experiments/health-test/statistics?period=weekly&metric=active_hours&statistic=mean&comparison=difference&branch=treatment&segment=all");
    let rows = body["rows"].as_array().unwrap();
    assert!(!rows.is_empty());
    for r in rows {
        assert_eq!(r["comparison_to_branch"], "control");
        assert!(r["window_index"].as_u64().unwrap() >= 1);
        assert!(r["lower"].as_f64().unwrap() <= r["upper"].as_f64().unwrap());
        assert!(r.get("client_id").is_none());
    }

    for (path, needle) in [
        (
            "/v1/experiments/health-test/statistics",
            "`period` is missing",
        ),
        (
            "/v1/experiments/health-test/statistics?period=monthly",
            "\"monthly\"",
        ),
        (
            "/v1/experiments/health-test/statistics?period=weekly&planet=mars",
            "`planet`",
        ),
        (
            "/v1/experiments/nope/statistics?period=weekly",
            "not configured",
        ),
    ] {
        let (status, body) = server.get(path);
        assert!(status == 400 || status == 404, "{path}: {status}");
        assert!(
            body["error"].as_str().unwrap_or("").contains(needle),
            "{path}: {body}"
        );
    }
}

/// `name{labels} value` lines of a Prometheus text exposition.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

#[test]
fn metrics_expose_state_counters_in_prometheus_text() {
    let (_dir, cfg, state, _out) = replayed();
    let rejects = {
        let config = slipstream::config::load(&cfg).unwrap();
        let store = slipstream::state::Store::open(&state, &config).unwrap();
        store.rejects().unwrap()
    };
    assert!(
        !rejects.is_empty(),
        "the generator writes some malformed lines"
    );
    let server = Server::start(&cfg, &state, None);
    let r = reqwest::blocking::get(format!("{}/metrics", server.base)).unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let text = r.text().unwrap();
    assert!(text.contains("# TYPE slipstream_rejected_events_stored_total counter"));
    let m = samples(&text);
    for (reason, n) in rejects {
        let key = format!(
            "slipstream_rejected_events_stored_total{{reason=\"{}\"}}",
            reason.as_str()
        );
        assert_eq!(m.get(&key), Some(&(n as f64)), "{key}\n{text}");
    }
    let windows = server.ok("/v1/experiments/health-test/health")["windows"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        m[r#"slipstream_windows{experiment="health-test",state="published"}"#],
        windows as f64
    );
    assert_eq!(
        m[r#"slipstream_windows{experiment="health-test",state="failed"}"#],
        0.0
    );
    // Each window publishes aggregates and statistics tables, plus the enrollments table.
    assert!(m[r#"slipstream_published_tables{experiment="health-test"}"#] > windows as f64);
    assert!(m["slipstream_sketches"] > 0.0);
    assert!(m["slipstream_state_size_bytes"] > 0.0);
    assert_eq!(m["slipstream_ready"], 1.0);
    assert!(!text.contains("c-0"), "no client id in metrics");
}

/// `slipstream probe ARGS` against a server; (exit code, stdout).
fn probe(args: &[&str], token: Option<&str>) -> (i32, String) {
    let mut cmd = Command::new(bin());
    cmd.arg("probe").args(args).env_remove("SLIPSTREAM_TOKEN");
    if let Some(t) = token {
        cmd.env("SLIPSTREAM_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_token_protects_everything_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, state) = replay_into(dir.path(), CONFIG, "");
    let token = "s3cret-token-value";
    let server = Server::start(&cfg, &state, Some(token));
    // Liveness stays open: it says only that the process answers.
    assert_eq!(server.raw("/healthz", None).0, 200);
    for path in [
        "/readyz",
        "/metrics",
        "/v1/experiments",
        "/v1/dau?date=2026-11-02",
        "/v1/experiments/health-test/health",
        "/v1/experiments/health-test/statistics?period=weekly",
        "/",
        "/experiments/health-test",
        "/no-such-endpoint",
    ] {
        let (status, text) = server.raw(path, None);
        assert_eq!(status, 401, "{path} without a token: {text}");
        assert!(text.contains("bearer token"), "{path}: {text}");
        assert_eq!(
            server.raw(path, Some("s3cret-token-valuX")).0,
            401,
            "{path}"
        );
        assert_eq!(server.raw(path, Some("short")).0, 401, "{path}");
    }
    assert_eq!(server.raw("/v1/experiments", Some(token)).0, 200);
    assert_eq!(server.raw("/readyz", Some(token)).0, 200);
    assert_eq!(
        server
            .raw("/v1/experiments/health-test/health", Some(token))
            .0,
        200
    );
    // The exec probe sends the token from the same environment; liveness needs none.
    let url = server.base.clone();
    let url = url.as_str();
    assert_eq!(probe(&["--ready", "--url", url], Some(token)).0, 0);
    let (code, out) = probe(&["--ready", "--url", url], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("401"), "{out}");
    assert_eq!(probe(&["--live", "--url", url], None).0, 0);
    // Without the variable the server is open (it binds loopback by default).
    drop(server);
    let open = Server::start(&cfg, &state, None);
    assert_eq!(open.raw("/v1/experiments", None).0, 200);
    assert_eq!(open.raw("/readyz", None).0, 200);
    drop(open);
    let (code, out) = probe(&["--ready", "--url", url], None);
    assert_eq!(code, 1, "nothing listens any more: {out}");
}

#[test]
fn the_token_can_come_from_a_file_named_in_config() {
    let dir = tempfile::tempdir().unwrap();
    let secret = write(dir.path(), "token", "from-the-file-0123\n");
    let with_file = |file: &Path| {
        CONFIG.replacen(
            "[pipeline]",
            &format!("[pipeline]\ntoken_file = {:?}", p(file)),
            1,
        )
    };
    let (cfg, state) = replay_into(dir.path(), &with_file(&secret), "");
    let server = Server::start(&cfg, &state, None);
    assert_eq!(server.raw("/healthz", None).0, 200);
    assert_eq!(server.raw("/readyz", None).0, 401);
    assert_eq!(server.raw("/readyz", Some("from-the-file-0123")).0, 200);
    assert_eq!(server.raw("/v1/experiments", None).0, 401);
    assert_eq!(
        server.raw("/v1/experiments", Some("from-the-file-0123")).0,
        200
    );
    let url = server.base.clone();
    // The probe finds the same file through the config.
    assert_eq!(
        probe(&["--ready", "--url", &url, "--config", p(&cfg)], None).0,
        0
    );
    assert_eq!(probe(&["--ready", "--url", &url], None).0, 1);
    drop(server);

    // The environment wins over the file (for the server and the probe alike).
    let server = Server::start(&cfg, &state, Some("from-the-env"));
    assert_eq!(server.raw("/readyz", Some("from-the-file-0123")).0, 401);
    assert_eq!(server.raw("/readyz", Some("from-the-env")).0, 200);
    let url = server.base.clone();
    let args = ["--ready", "--url", url.as_str(), "--config", p(&cfg)];
    assert_eq!(probe(&args, Some("from-the-env")).0, 0);
    drop(server);

    // check-config names the field and what is wrong with the file.
    let empty = write(dir.path(), "empty", " \n");
    let spaced = write(dir.path(), "spaced", "two words\n");
    for (file, needle) in [
        (dir.path().join("missing"), "cannot read"),
        (empty, "is empty"),
        (spaced, "inside the token"),
        (
            Path::new("relative/token").to_path_buf(),
            "expected an absolute path",
        ),
    ] {
        let bad = write(dir.path(), "bad.toml", &with_file(&file));
        let out = Command::new(bin())
            .args(["check-config", p(&bad)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("pipeline.token_file") && err.contains(needle),
            "{err}"
        );
    }
}

/// `run --listen` exposes the running pipeline's counters next to the stored ones.
#[test]
fn run_exposes_pipeline_counters_at_metrics_while_consuming() {
    use common::broker::Broker;
    let broker = Broker::shared();
    let name = "metrics-run";
    for t in ["enr", "tel"] {
        broker.create_topic(&format!("{name}-{t}"), 2);
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            "{CONFIG}\n[pipeline.kafka]\nenrollments_topic = \"{name}-enr\"\ntelemetry_topic = \"{name}-tel\"\ngroup_id = \"{name}-group\"\n"
        )
        .replacen("sketch_precision = 10", "sketch_precision = 10\nbatch_millis = 200", 1),
    );
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "300",
        "--seed",
        "9",
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
    let state = dir.path().join("state");
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
            p(&dir.path().join("out")),
            "--idle-exit-secs",
            "20",
            "--listen",
            "127.0.0.1:0",
        ])
        .env("SLIPSTREAM_LOG", "warn")
        .env_remove("SLIPSTREAM_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("run exited before listening").unwrap();
        if let Some(addr) = line.strip_prefix("serving on ") {
            break addr.trim().to_string();
        }
    };
    // Keep draining stderr so that the child never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let m = loop {
        let m = reqwest::blocking::get(format!("{base}/metrics"))
            .ok()
            .and_then(|r| r.text().ok())
            .map(|t| samples(&t))
            .unwrap_or_default();
        if m.get("slipstream_tables_published_total")
            .copied()
            .unwrap_or(0.0)
            > 0.0
        {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing published within 60 s: {m:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    // Health carries the consumer's lag per assigned partition (2 topics x 2), with a check.
    let health = loop {
        let h: Value = reqwest::blocking::get(format!("{base}/v1/experiments/health-test/health"))
            .unwrap()
            .json()
            .unwrap();
        if h["consumer_lag"]["partitions"].as_array().map(Vec::len) == Some(4) {
            break h;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no lag for 4 partitions within 60 s: {}",
            h["consumer_lag"]
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let metrics_text = reqwest::blocking::get(format!("{base}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    // Counting under `run --listen`: once everything is consumed, the same answers as
    // `serve` over a replay of the same file (the sketches are folded the same way).
    let replayed = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&events).unwrap();
    let (rcfg, rstate) = replay_into(
        replayed.path(),
        &std::fs::read_to_string(&cfg).unwrap(),
        &text,
    );
    let serve = Server::start(&rcfg, &rstate, None);
    for q in [
        "/v1/mau?date=2026-11-20",
        "/v1/dau?date=2026-11-04&group_by=os",
        "/v1/experiments/health-test/dau?date=2026-11-05",
    ] {
        let want = serve.ok(q);
        assert!(want.to_string().contains("estimate"), "{q}: {want}");
        if q.starts_with("/v1/mau") {
            // 300 generated clients, nearly all active in the 28 days.
            let estimate = want["estimate"].as_f64().unwrap();
            assert!((250.0..=310.0).contains(&estimate), "{want}");
        }
        loop {
            let got: Value = reqwest::blocking::get(format!("{base}{q}"))
                .unwrap()
                .json()
                .unwrap();
            if got == want {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{q} under run: {got}, serve over the replay: {want}"
            );
            std::thread::sleep(std::time::Duration::from_millis(300));
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let lag = &health["consumer_lag"];
    assert!(
        lag["measured_at"].as_str().unwrap().starts_with("20"),
        "{lag}"
    );
    let parts = lag["partitions"].as_array().unwrap();
    let sum: i64 = parts
        .iter()
        .map(|p| p["lag_messages"].as_i64().unwrap())
        .sum();
    assert_eq!(lag["total_messages"].as_i64().unwrap(), sum);
    let gauges = samples(&metrics_text);
    for p in parts {
        assert!(p["lag_messages"].as_i64().unwrap() >= 0);
        let key = format!(
            "slipstream_consumer_lag_messages{{partition=\"{}\",topic=\"{}\"}}",
            p["partition"],
            p["topic"].as_str().unwrap()
        );
        assert!(gauges.contains_key(&key), "{key} not in /metrics");
    }
    let check = health["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "consumer_lag")
        .expect("a consumer_lag check under run");
    assert!(check["reason"]
        .as_str()
        .unwrap()
        .contains("messages behind on 4 partitions"));
    assert_eq!(check["status"], "ok", "{check}");
    assert!(health["not_reported"].as_array().unwrap().is_empty());
    assert!(m["slipstream_events_folded_total"] > 1000.0, "{m:?}");
    assert!(m["slipstream_batch_commit_seconds_count"] >= 1.0, "{m:?}");
    assert!(m["slipstream_publish_attempts_total"] >= m["slipstream_tables_published_total"]);
    assert_eq!(m["slipstream_ready"], 1.0);
    assert!(m
        .keys()
        .any(|k| k.starts_with("slipstream_rejected_events_stored_total")));
}
