//! The results page in a real headless Chromium: the page of a replayed experiment has its
//! charts with the right number of series; a screenshot is kept under target/ as an artifact.
//!
//! Needs the Debian `chromium` package; without it the browser part is skipped with a
//! message (set SLIPSTREAM_REQUIRE_CHROMIUM=1 to make that a failure, as CI should).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::server::Server;
use common::*;

const CONFIG: &str = r#"
[pipeline]
replicates = 50
sketch_precision = 10

[[experiment]]
slug = "page-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-20"
"#;

/// Headless Chromium with everything that would reach the network turned off.
fn chromium(args: &[&str]) -> Option<std::process::Output> {
    let profile = tempfile::tempdir().unwrap();
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &profile_arg,
        ])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    Some(out)
}

/// (data-chart, data-series, number of `<g class="series">`) per chart in a DOM dump.
fn charts(dom: &str) -> Vec<(String, usize, usize)> {
    let attr = |s: &str, name: &str| -> String {
        let k = format!("{name}=\"");
        let i = s.find(&k).unwrap() + k.len();
        s[i..i + s[i..].find('"').unwrap()].to_string()
    };
    dom.split("<svg ")
        .skip(1)
        .filter(|s| s.starts_with("class=\"chart\""))
        .map(|s| {
            let body = &s[..s.find("</svg>").unwrap()];
            (
                attr(body, "data-chart"),
                attr(body, "data-series").parse().unwrap(),
                body.matches("<g class=\"series\"").count(),
            )
        })
        .collect()
}

#[test]
fn the_results_page_draws_every_chart_in_chromium() {
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
        "11",
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
    // Metrics charted: those with a mean or binomial statistic in the weekly view.
    let view = table(&out, "statistics_page_test_weekly");
    let mut metrics: Vec<String> = view
        .iter()
        .filter(|r| r["statistic"] == "mean" || r["statistic"] == "binomial")
        .map(|r| r["metric"].as_str().unwrap().to_string())
        .collect();
    metrics.sort();
    metrics.dedup();
    assert!(metrics.len() >= 3, "{metrics:?}");

    // MAU per branch is the union of the branch's daily sketches over 28 days, so it is at
    // least that day's DAU and grows while the experiment runs; DAU/MAU is their ratio.
    let days = {
        let config = slipstream::config::load(&cfg).unwrap();
        let store = slipstream::state::Store::open(&state, &config).unwrap();
        let exp = &config.experiments[0];
        let sketch = config.pipeline.sketch_config();
        let start = exp.enrollment_start;
        let activity =
            slipstream::health::branch_activity(&sketch, &store, exp, start, exp.end_date).unwrap();
        assert_eq!(activity.len(), 20);
        for (date, per) in &activity {
            let first = *date - chrono::Days::new(27);
            let direct =
                slipstream::sketch::experiment_branches(&sketch, &store, &exp.slug, first, *date)
                    .unwrap();
            assert_eq!(per.len(), 2);
            for a in per {
                let (_, m) = direct.iter().find(|(b, _)| *b == a.branch).unwrap();
                assert_eq!(a.mau.estimate, m.estimate.round(), "{date} {}", a.branch);
                assert!(
                    a.mau.estimate >= a.dau.estimate && a.dau.estimate > 0.0,
                    "{date} {a:?}"
                );
                let r = a.dau_per_mau.unwrap();
                assert!(r.estimate > 0.0 && r.estimate <= 1.0 + 1e-9, "{date} {r:?}");
            }
        }
        let last = &activity.last().unwrap().1[0];
        assert!(last.mau.estimate > activity[0].1[0].mau.estimate);
        activity.len()
    };

    let server = Server::start(&cfg, &state, None);
    let index = reqwest::blocking::get(format!("{}/", server.base))
        .unwrap()
        .text()
        .unwrap();
    assert!(index.contains("href=\"/experiments/page-test\""), "{index}");
    let url = format!("{}/experiments/page-test", server.base);
    let started = std::time::Instant::now();
    let html = reqwest::blocking::get(&url).unwrap();
    eprintln!("results page rendered in {:?}", started.elapsed());
    assert_eq!(html.status().as_u16(), 200);
    let html = html.text().unwrap();
    assert!(!html.contains("c-0"), "no client id on the page");
    assert!(
        !html.contains("http://") || !html.contains("<script"),
        "no external resources"
    );

    let Some(dump) = chromium(&["--dump-dom", &url]).filter(|o| o.status.success()) else {
        assert!(
            std::env::var_os("SLIPSTREAM_REQUIRE_CHROMIUM").is_none(),
            "chromium is required but could not run"
        );
        eprintln!(
            "SKIPPED the browser part: `chromium` is not installed (apt-get install chromium)"
        );
        return;
    };
    let dom = String::from_utf8(dump.stdout).unwrap();
    let found = charts(&dom);
    let expect = |id: &str, series: usize| {
        let c = found
            .iter()
            .find(|c| c.0 == id)
            .unwrap_or_else(|| panic!("chart {id} missing; charts: {found:?}"));
        assert_eq!((c.1, c.2), (series, series), "chart {id}");
    };
    for m in &metrics {
        expect(&format!("metric-{m}"), 2); // control and treatment
        expect(&format!("uplift-{m}"), 1); // treatment vs control
    }
    expect("enrollment", 2);
    for id in ["dau", "mau", "dau-mau"] {
        expect(id, 2);
        // One point per day of the experiment for each branch.
        let svg = dom
            .split("<svg ")
            .find(|s| s.contains(&format!("data-chart=\"{id}\"")))
            .unwrap();
        let svg = &svg[..svg.find("</svg>").unwrap()];
        for g in svg.split("<g class=\"series\"").skip(1) {
            assert_eq!(g.matches("<circle").count(), days, "{id}");
        }
    }
    assert_eq!(found.len(), 2 * metrics.len() + 4, "{found:?}");
    assert!(dom.contains("id=\"srm\""));
    // Every series has points: a weekly window per metric, a day per enrollment/DAU chart.
    for part in dom.split("<g class=\"series\"").skip(1) {
        let g = &part[..part.find("</g>").unwrap()];
        assert!(g.contains("<circle"), "an empty series: {g}");
    }

    let shot: PathBuf = Path::new(env!("CARGO_TARGET_TMPDIR")).join("results_page.png");
    let _ = std::fs::remove_file(&shot);
    let arg = format!("--screenshot={}", shot.display());
    let o = chromium(&[&arg, "--window-size=1400,3300", "--hide-scrollbars", &url]).unwrap();
    assert!(o.status.success());
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    eprintln!("screenshot: {}", shot.display());
}
