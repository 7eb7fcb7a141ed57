//! DESIGN.md section 6 under stress, through a real broker (tansu): `slipstream run`
//! SIGKILLed at random moments while the stream flows, stopped with SIGTERM, cut off from
//! the broker for longer than a session timeout, and sharing its group with a second
//! instance that joins and leaves. Each time the published tables must equal, byte for
//! byte, those of an uninterrupted `replay` of the same events.

mod common;

use std::time::{Duration, Instant};

use common::broker::Broker;
use common::proxy::Proxy;
use common::stream::*;
use common::*;

#[test]
fn sigkill_at_random_moments_while_the_stream_flows() {
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    // A short session: a killed member's partitions move on sooner, so each life consumes.
    let cfg = config(dir.path(), broker, "kills", 3, "session_timeout_ms = 3000");
    let events = generate(dir.path(), &cfg, 2500, 21);
    let want = replay_tables(dir.path(), &cfg, &events);
    // The stream keeps flowing through the first kills.
    let producer = trickle(
        &broker.addr,
        &cfg,
        split(&events, 10),
        Duration::from_millis(800),
    );

    let out = dir.path().join("out");
    let args = run_args(&cfg, &broker.addr, dir.path(), 4);
    let mut rng = Rng::from_env_or_time("sigkill test");
    let started = Instant::now();
    let mut kills = 0;
    let mut lives = Vec::new();
    while kills < 10 {
        let life = Instant::now();
        let mut run = Run::start(&format!("run #{kills}"), &args);
        // Kill at a random moment once it consumes: 0 to 2.5 s after its first partition.
        assert!(
            run.wait_for("partition assigned", 1, Duration::from_secs(40)),
            "{} got no partition:\n{}",
            run.name,
            run.log_tail(30)
        );
        let assigned = life.elapsed();
        std::thread::sleep(Duration::from_millis(rng.below(2500)));
        assert!(
            !run.exited(),
            "{} exited before its kill:\n{}",
            run.name,
            run.log_tail(30)
        );
        lives.push((
            assigned.as_millis(),
            life.elapsed().as_millis(),
            run.count("published"),
        ));
        run.kill();
        kills += 1;
    }
    producer.join().unwrap();
    let (status, stdout) = Run::start("final run", &args).wait(Duration::from_secs(90));
    assert!(status.success(), "final run failed: {stdout}");
    eprintln!(
        "sigkill test: {kills} SIGKILLs in {:?}; per life (ms to a partition, ms to the kill, publications): {lives:?}",
        started.elapsed()
    );
    assert_same(
        &want,
        &all_tables(&out),
        &format!("run killed {kills} times vs replay"),
    );
}

#[test]
fn sigterm_stops_cleanly_with_offsets_covering_exactly_what_was_folded() {
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker, "term", 3, "");
    let events = generate(dir.path(), &cfg, 1500, 22);
    let want = replay_tables(dir.path(), &cfg, &events);
    let total = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    let chunks = split(&events, 12);
    produce(&broker.addr, &cfg, &chunks[0]);

    let (state, out) = (dir.path().join("state"), dir.path().join("out"));
    let args = run_args(&cfg, &broker.addr, dir.path(), 4);
    let mut run = Run::start("run", &args);
    run.assert_assigned();
    // Mid-stream: the rest arrives while it runs (11 chunks 0.5 s apart, so the last
    // ones come well after the signal however fast the run folds), and the signal lands
    // in the middle.
    let producer = trickle(
        &broker.addr,
        &cfg,
        chunks[1..].to_vec(),
        Duration::from_millis(500),
    );
    std::thread::sleep(Duration::from_millis(2500));
    let signalled = Instant::now();
    run.signal("TERM");
    let log = run.log();
    let (status, stdout) = run.wait(Duration::from_secs(15));
    let took = signalled.elapsed();
    producer.join().unwrap();
    assert!(status.success(), "SIGTERM: exit {status}: {stdout}");
    assert!(took < Duration::from_secs(15), "SIGTERM took {took:?}");
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("shutdown requested"), "{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    let first = consumed(&stdout);
    assert!(
        first > 0 && first < total,
        "consumed {first} of {total} before SIGTERM: not mid-stream"
    );

    // The stored offsets cover exactly what this process folded: offsets start at 0, so
    // their sum over partitions is the number of messages read and stored.
    let stored: i64 = {
        let config = slipstream::config::load(&cfg).unwrap();
        let store = slipstream::state::Store::open(&state, &config).unwrap();
        ["term-enr", "term-tel"]
            .iter()
            .map(|t| store.offsets(t).unwrap().values().sum::<i64>())
            .sum()
    };
    assert_eq!(
        stored as u64, first,
        "stored offsets vs messages folded before SIGTERM"
    );

    // The restart reads only what the first run had not: no event is read twice.
    let (status, stdout) = Run::start("restart", &args).wait(Duration::from_secs(90));
    assert!(status.success(), "{stdout}");
    let second = consumed(&stdout);
    assert_eq!(
        first + second,
        total,
        "messages read by the two runs ({first} + {second})"
    );
    eprintln!("sigterm test: exited in {took:?} after {first} messages; the restart read {second}");
    assert_same(&want, &all_tables(&out), "SIGTERM and restart vs replay");
}

#[test]
fn a_broker_outage_longer_than_the_session_timeout_loses_and_doubles_nothing() {
    // Its own broker, behind a proxy that stages the outage: the broker keeps its data
    // (the memory engine would lose it on a restart; DESIGN.md section 7).
    let proxy = Proxy::start();
    let broker = Broker::start_advertised(proxy.port, 3);
    proxy.forward_to(broker.listen_port());
    let dir = tempfile::tempdir().unwrap();
    broker.create_topic("outage-dead", 1);
    let cfg = config(
        dir.path(),
        &broker,
        "outage",
        3,
        r#"dead_letter_topic = "outage-dead""#,
    );
    let events = generate(dir.path(), &cfg, 1500, 23);
    let want = replay_tables(dir.path(), &cfg, &events);
    let chunks = split(&events, 2);
    produce(&broker.addr, &cfg, &chunks[0]);

    let out = dir.path().join("out");
    // Idle exit only after longer quiet than the outage.
    let args = run_args(&cfg, &broker.addr, dir.path(), 15);
    let mut run = Run::start("run", &args);
    run.assert_assigned();
    std::thread::sleep(Duration::from_millis(1500));
    proxy.cut();
    let outage = Duration::from_secs(10); // > session.timeout.ms (6 s) and batch_millis
    std::thread::sleep(outage);
    assert!(
        !run.exited(),
        "run exited during the outage:\n{}",
        run.log_tail(30)
    );
    proxy.restore();
    produce(&broker.addr, &cfg, &chunks[1]);
    let (status, stdout) = run.wait(Duration::from_secs(120));
    assert!(status.success(), "{stdout}");
    eprintln!("outage test: {outage:?} outage; {stdout}");
    assert_same(
        &want,
        &all_tables(&out),
        "run through a broker outage vs replay",
    );
}

#[test]
fn a_second_instance_joining_and_leaving_the_group_loses_nothing() {
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker, "rebalance", 4, "");
    let events = generate(dir.path(), &cfg, 2000, 24);
    let want = replay_tables(dir.path(), &cfg, &events);
    let producer = trickle(
        &broker.addr,
        &cfg,
        split(&events, 16),
        Duration::from_millis(900),
    );

    let a_args = run_args(&cfg, &broker.addr, &dir.path().join("a"), 6);
    let b_args = run_args(&cfg, &broker.addr, &dir.path().join("b"), 6);
    let mut a = Run::start("instance A", &a_args);
    a.assert_assigned();
    std::thread::sleep(Duration::from_secs(1));
    // B joins mid-stream and takes some partitions from A.
    let mut b = Run::start("instance B", &b_args);
    b.assert_assigned();
    assert!(
        a.wait_for("partition revoked", 1, Duration::from_secs(10)),
        "A gave nothing up:\n{}",
        a.log_tail(30)
    );
    std::thread::sleep(Duration::from_secs(4));
    b.signal("TERM");
    let (status, b_out) = b.wait(Duration::from_secs(20));
    assert!(status.success(), "B: {b_out}");
    let b_consumed = consumed(&b_out);
    assert!(
        b_consumed > 0,
        "B consumed nothing while it owned partitions"
    );
    // A owns every partition again and must still see B's share of the events.
    producer.join().unwrap();
    let (status, a_out) = a.wait(Duration::from_secs(120));
    assert!(status.success(), "A: {a_out}");
    eprintln!("rebalance test: B consumed {b_consumed} messages while it was a member; A: {a_out}");
    assert_same(
        &want,
        &all_tables(&dir.path().join("a").join("out")),
        "instance A after B joined and left vs replay",
    );
    assert!(
        all_tables(&dir.path().join("b").join("out")).is_empty(),
        "B published though it never owned every partition"
    );
}
