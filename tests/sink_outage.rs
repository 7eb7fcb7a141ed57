//! A long BigQuery outage while the stream keeps flowing: `run` folds on, its memory stays
//! bounded (it does not grow with the outage's length), and once the emulator is up every
//! table is published, once, equal row for row to what the local sink writes for the same
//! events.

mod common;

use std::time::{Duration, Instant};

use common::bqemulator::{assert_bigquery_equals_local, BqEmulator};
use common::broker::Broker;
use common::stream::*;
use common::*;

/// Resident memory of a process in MiB (VmRSS in /proc/PID/status).
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

#[test]
fn a_long_sink_outage_keeps_memory_bounded_and_publishes_everything_once_after() {
    let broker = Broker::shared();
    let mut emu = BqEmulator::not_started("sink-outage");
    let dir = tempfile::tempdir().unwrap();
    for t in ["enr", "tel"] {
        broker.create_topic(&format!("sinkout-{t}"), 3);
    }
    // A table's publication gives up after 3 s (then the pass waits 1 s, doubling), so the
    // outage below outlasts many batch intervals and retry windows.
    let cfg = write(
        dir.path(),
        "c.toml",
        &format!(
            r#"
[pipeline]
republish_threshold = 0.0
replicates = 50
batch_events = 2000
batch_millis = 200

[pipeline.kafka]
enrollments_topic = "sinkout-enr"
telemetry_topic = "sinkout-tel"
group_id = "sinkout-group"
idle_partition_millis = 2000

[pipeline.bigquery]
target = "{}.outage"
rest_url = "{}"
grpc_url = "{}"
timeout_secs = 3

[[experiment]]
slug = "sink-outage"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 2
end_date = "2026-11-09"
analysis_bases = ["enrollments"]
periods = ["week", "overall"]
"#,
            emu.project,
            emu.rest_url(),
            emu.grpc_url()
        ),
    );
    let events = generate(dir.path(), &cfg, 1500, 41);
    let local = dir.path().join("local");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&events),
        "--data-dir",
        p(&dir.path().join("replay-state")),
        "--out",
        p(&local),
    ]);

    let state = dir.path().join("state");
    let mut run = Run::start(
        "run",
        &[
            "--config",
            p(&cfg),
            "--brokers",
            &broker.addr,
            "--data-dir",
            p(&state),
        ],
    );
    let producer = trickle(
        &broker.addr,
        &cfg,
        split(&events, 12),
        Duration::from_millis(1500),
    );
    assert!(
        run.wait_for("partition assigned", 1, Duration::from_secs(40)),
        "{}",
        run.log_tail(30)
    );
    // The outage: the emulator stays down while every chunk is produced and folded.
    let outage_started = Instant::now();
    let mut samples: Vec<(f64, f64)> = Vec::new(); // (seconds into the outage, MiB)
    while !producer.is_finished() || outage_started.elapsed() < Duration::from_secs(25) {
        assert!(
            !run.exited(),
            "run exited during the outage:\n{}",
            run.log_tail(30)
        );
        if let Some(mib) = rss_mib(run.pid()) {
            samples.push((outage_started.elapsed().as_secs_f64(), mib));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    producer.join().unwrap();
    let outage = outage_started.elapsed();
    let failures = run.count("publication failed") + run.count("transient");
    assert!(
        run.count("published") == 0,
        "published during the outage:\n{}",
        run.log_tail(30)
    );

    // Bounded: after the first seconds (partitions assigned, first batches), memory stays
    // within a margin of that level instead of growing with the outage.
    let early: f64 = samples
        .iter()
        .filter(|(t, _)| *t < 5.0)
        .map(|(_, m)| *m)
        .fold(0.0, f64::max);
    let peak: f64 = samples.iter().map(|(_, m)| *m).fold(0.0, f64::max);
    let late: f64 = samples
        .iter()
        .filter(|(t, _)| *t > outage.as_secs_f64() - 8.0)
        .map(|(_, m)| *m)
        .fold(0.0, f64::max);
    eprintln!(
        "sink outage: {outage:?} with the stream running; RSS first 5 s {early:.0} MiB, peak {peak:.0} MiB, last 8 s {late:.0} MiB; {failures} failure log lines"
    );
    assert!(
        failures >= 2,
        "the sink was not retried during the outage:\n{}",
        run.log_tail(30)
    );
    assert!(early > 0.0, "no memory sample in the first seconds");
    assert!(
        peak < early + 150.0,
        "memory grew from {early:.0} to {peak:.0} MiB during the outage"
    );

    emu.restart(); // the outage ends
    assert!(
        run.wait_for("published", 1, Duration::from_secs(90)),
        "nothing published after the emulator came back:\n{}",
        run.log_tail(40)
    );
    run.signal("TERM");
    let (status, stdout) = run.wait(Duration::from_secs(60));
    assert!(status.success(), "{stdout}");
    assert_bigquery_equals_local(&emu, "outage", &local, 6);
}
