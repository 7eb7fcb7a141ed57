//! Agreement with an independent implementation of the same definitions (issue 9):
//! `bench/batch/recompute.py` recomputes the tables from the raw events with DuckDB SQL
//! and the statistics with numpy (its own bootstrap draws), and compares with what
//! `replay` + `finalize` published: the same clients with the same aggregate values, the
//! same statistics rows, equal exact statistics (identity counts, counts, sums, binomial
//! and decile points) and bootstrap points (means, binomial and decile comparisons) within
//! a quarter of the interval width.
//!
//! Needs a Python with duckdb and numpy: `deploy/local/install-batch-python.sh`, whose
//! path `deploy/local/test.sh` passes in SLIPSTREAM_BATCH_PYTHON (and then requires it).

mod common;
use common::*;

#[test]
fn an_independent_duckdb_and_numpy_implementation_gives_the_same_tables() {
    let Some(python) = std::env::var_os("SLIPSTREAM_BATCH_PYTHON") else {
        assert!(
            std::env::var_os("SLIPSTREAM_REQUIRE_BATCH_PYTHON").is_none(),
            "SLIPSTREAM_BATCH_PYTHON is not set"
        );
        eprintln!("skipped: set SLIPSTREAM_BATCH_PYTHON (deploy/local/install-batch-python.sh)");
        return;
    };
    let root = env!("CARGO_MANIFEST_DIR");
    let dir = tempfile::tempdir().unwrap();
    // The benchmark's experiment over two weeks (17 windows, both analysis bases), with
    // fewer replicates to keep the numpy side quick.
    let base = std::fs::read_to_string(format!("{root}/bench/experiment-4w.toml")).unwrap();
    let config = base
        .replace("slug = \"bench-4w\"", "slug = \"indep-2w\"")
        .replace("end_date = \"2026-12-05\"", "end_date = \"2026-11-21\"")
        .replace("[pipeline]\n", "[pipeline]\nreplicates = 400\n");
    assert_ne!(config, base);
    let cfg = write(dir.path(), "c.toml", &config);
    let events = dir.path().join("events.ndjson");
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
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
    // Late events below the republish threshold wait for finalize; the batch reads them all.
    slipstream(&[
        "finalize",
        "--config",
        p(&cfg),
        "--data-dir",
        p(&state),
        "--out",
        p(&out),
        "--date",
        "2026-12-31",
    ]);
    let result = std::process::Command::new(python)
        .arg(format!("{root}/bench/batch/recompute.py"))
        .args(["--config", p(&cfg), "--events", p(&events)])
        .args([
            "--db",
            p(&dir.path().join("batch.duckdb")),
            "--threads",
            "2",
        ])
        .args(["--check", p(&out)])
        .args(["--check-windows", "day:1,day:9,week:1,week:2,overall:1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "recompute.py failed:\n{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let check = &report["check"];
    assert_eq!(check["problems"], serde_json::json!([]), "{stderr}");
    assert_eq!(
        check["windows"],
        serde_json::json!(["day_1", "week_1", "day_9", "overall_1", "week_2"]) // in nightly order
    );
    // Every enrolled client's row in 5 windows x 2 bases (exposures: the exposed ones).
    let compared = check["aggregate_rows_compared"].as_u64().unwrap();
    assert!(compared > 5 * 2000, "{compared}");
    assert!(check["statistics_rows_compared"].as_u64().unwrap() > 10_000);
    for stat in ["mean", "binomial", "deciles"] {
        let d = check["worst_point_over_width"][stat].as_f64().unwrap();
        assert!(d > 0.0 && d < 0.25, "{stat} points {d} of the width apart");
    }
    // Both sides reject the same malformed lines.
    let rejected: u64 = report["rejects"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(rejected, report["rejected"].as_u64().unwrap());
    assert!(rejected > 0);
}
