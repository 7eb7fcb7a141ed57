//! A replay killed with SIGKILL at many moments and restarted each time ends with the same
//! tables, byte for byte, as an uninterrupted run: nothing lost, nothing counted twice.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const CONFIG: &str = r#"
[pipeline]
republish_threshold = 0.0
replicates = 50
batch_events = 400

[[experiment]]
slug = "crash-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 4
end_date = "2026-11-19"
analysis_bases = ["enrollments", "exposures"]
periods = ["day", "week", "overall"]
segments = [{ name = "windows_users", where = 'os = "Windows"' }]
"#;

#[test]
fn sigkill_at_random_moments_loses_and_doubles_nothing() {
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

    let clean = dir.path().join("clean");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&clean.join("state")),
        "--out",
        p(&clean.join("out")),
    ]);

    let crashy = dir.path().join("crashy");
    let (state, out) = (crashy.join("state"), crashy.join("out"));
    let args = [
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&state),
        "--out",
        p(&out),
    ];
    // Kill after a varying delay, restart, until a run finishes on its own.
    let mut kills = 0;
    let mut finished = false;
    for i in 0..40u64 {
        let mut child = Command::new(bin())
            .args(args)
            .env("SLIPSTREAM_LOG", "error")
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(80 + (i * 7919) % 400);
        let started = Instant::now();
        while started.elapsed() < delay {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "replay failed on its own");
                finished = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if finished {
            break;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    if !finished {
        slipstream(&args);
    }
    eprintln!("crash test: {kills} SIGKILLs before a run finished");
    assert!(
        kills >= 10,
        "only {kills} kills: the replay finished too fast to test anything"
    );
    let (a, b) = (
        all_tables(&clean.join("out")),
        all_tables(&crashy.join("out")),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, text) in &a {
        assert!(text == &b[name], "table {name} differs after {kills} kills");
    }
    assert!(a.len() > 40);
}
