//! The Kafka path against a real tansu broker: `produce` then `run` gives the same tables,
//! byte for byte, as `replay` of the same file (JSON and protobuf topics), and a `run`
//! killed with SIGKILL and restarted resumes from its stored offsets with nothing lost or
//! counted twice.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::broker::Broker;
use common::*;

/// A config whose topics and group are unique to one test, so tests share one broker.
fn config(dir: &Path, name: &str, format: &str) -> std::path::PathBuf {
    let broker = Broker::shared();
    for t in ["enr", "tel"] {
        broker.create_topic(&format!("{name}-{t}"), 3);
    }
    write(
        dir,
        "c.toml",
        &format!(
            r#"
[pipeline]
republish_threshold = 0.0
replicates = 50
batch_events = 2000
batch_millis = 200

[pipeline.kafka]
enrollments_topic = "{name}-enr"
telemetry_topic = "{name}-tel"
enrollments_format = "{format}"
telemetry_format = "{format}"
group_id = "{name}-group"

[[experiment]]
slug = "kafka-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-15"
analysis_bases = ["enrollments", "exposures"]
segments = [{{ name = "windows_users", where = 'os = "Windows"' }}]
"#
        ),
    )
}

fn run_args<'a>(cfg: &'a str, state: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--config",
        cfg,
        "--brokers",
        &Broker::shared().addr,
        "--data-dir",
        state,
        "--out",
        out,
        "--idle-exit-secs",
        "4",
    ]
}

fn replay_tables(
    dir: &Path,
    cfg: &Path,
    events: &Path,
) -> std::collections::BTreeMap<String, String> {
    let (state, out) = (dir.join("replay-state"), dir.join("replay-out"));
    slipstream(&[
        "replay",
        "--config",
        p(cfg),
        "--input",
        p(events),
        "--data-dir",
        p(&state),
        "--out",
        p(&out),
    ]);
    all_tables(&out)
}

fn assert_same(
    a: &std::collections::BTreeMap<String, String>,
    b: &std::collections::BTreeMap<String, String>,
    what: &str,
) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: different tables"
    );
    let differing: Vec<&String> = a.keys().filter(|n| a[*n] != b[*n]).collect();
    if !differing.is_empty() {
        eprintln!(
            "{what}: {} of {} tables differ: {differing:?}",
            differing.len(),
            a.len()
        );
    }
    for (name, text) in a {
        if text != &b[name] {
            let (x, y): (Vec<&str>, Vec<&str>) =
                (text.lines().collect(), b[name].lines().collect());
            let i = (0..x.len().min(y.len()))
                .find(|&i| x[i] != y[i])
                .unwrap_or(x.len().min(y.len()));
            panic!("{what}: table {name} differs ({} vs {} rows); first difference at row {i}:\n {}\n {}", x.len(), y.len(), x.get(i).unwrap_or(&""), y.get(i).unwrap_or(&""));
        }
    }
    assert!(a.len() > 30, "{what}: only {} tables", a.len());
}

fn produce_and_compare(name: &str, format: &str, clients: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), name, format);
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        clients,
        "--seed",
        "5",
        "--out",
        p(&events),
    ]);
    let produced = slipstream(&[
        "produce",
        "--brokers",
        &Broker::shared().addr,
        "--input",
        p(&events),
        "--config",
        p(&cfg),
    ]);
    assert!(String::from_utf8_lossy(&produced.stdout).contains("produced"));
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let ran = slipstream(&run_args(p(&cfg), p(&state), p(&out)));
    let summary = String::from_utf8_lossy(&ran.stdout).to_string();
    assert!(summary.contains("rejected"), "{summary}");
    assert_same(
        &replay_tables(dir.path(), &cfg, &events),
        &all_tables(&out),
        &format!("{format} run vs replay"),
    );
}

#[test]
fn json_topics_give_the_same_tables_as_replaying_the_file() {
    produce_and_compare("json", "json", "3000");
}

#[test]
fn protobuf_topics_give_the_same_tables_as_replaying_the_file() {
    produce_and_compare("proto", "protobuf", "2000");
}

#[test]
fn sigkill_and_restart_resume_from_stored_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "crash", "json");
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "1500",
        "--seed",
        "9",
        "--out",
        p(&events),
    ]);
    slipstream(&[
        "produce",
        "--brokers",
        &Broker::shared().addr,
        "--input",
        p(&events),
        "--config",
        p(&cfg),
    ]);
    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = run_args(p(&cfg), p(&state), p(&out));
    // A new member gets its partitions ~3 s after joining; kill at varied moments after that.
    let mut kills = 0;
    for i in 0..4u64 {
        let mut child = Command::new(bin())
            .args(&args)
            .env("SLIPSTREAM_LOG", "error")
            .spawn()
            .unwrap();
        let delay = Duration::from_millis(3200 + i * 350);
        let started = Instant::now();
        while started.elapsed() < delay && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    slipstream(&args);
    eprintln!("kafka crash test: {kills} SIGKILLs");
    assert!(kills >= 2, "the run finished before it could be killed");
    assert_same(
        &replay_tables(dir.path(), &cfg, &events),
        &all_tables(&out),
        "killed run vs replay",
    );
}
