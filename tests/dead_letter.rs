//! The dead-letter topic against a real broker (tansu): every message `run` rejects is
//! written there once, with its original key and payload and the reason and source position
//! in headers, while the good events' tables stay what `replay` gives; and dead letters that
//! cannot be delivered hold their batch back until the broker is reachable again.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use slipstream::event::{decode_json, Kind};
use slipstream::ingest::kafka::{DeadLetters, Record};

use common::broker::Broker;
use common::proxy::Proxy;
use common::stream::*;
use common::*;

/// A dead letter as read back: headers by name, key and payload.
#[derive(Debug)]
struct Letter {
    headers: BTreeMap<String, String>,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// Reads `topic` from the start until `want` messages arrived and then 2 s of quiet (to
/// catch extras), or until `timeout`.
fn read_topic(broker: &str, topic: &str, want: usize, timeout: Duration) -> Vec<Letter> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker)
        .set("group.id", format!("{topic}-reader-{}", std::process::id()))
        .set("session.timeout.ms", "6000")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for i in 0..h.count() {
                        let header = h.get(i);
                        let value = header
                            .value
                            .map(|v| String::from_utf8_lossy(v).into_owned());
                        headers.insert(header.key.to_owned(), value.unwrap_or_default());
                    }
                }
                out.push(Letter {
                    headers,
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or(&[]).to_vec(),
                });
                quiet_since = Instant::now();
            }
            Some(Err(e)) => eprintln!("reading {topic}: {e}"),
            None => {
                if out.len() >= want && quiet_since.elapsed() > Duration::from_secs(2) {
                    break;
                }
            }
        }
    }
    out
}

/// `reason -> count` from the "rejected events by reason" lines of a summary.
fn rejects(stdout: &str) -> BTreeMap<String, usize> {
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("rejected events by reason"))
        .skip(1)
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.parse().ok()?))
        })
        .collect()
}

#[test]
fn every_reject_is_written_to_the_dead_letter_topic_with_its_reason() {
    let broker = Broker::shared();
    let dir = tempfile::tempdir().unwrap();
    broker.create_topic("dlq-dead", 2);
    let cfg = config(
        dir.path(),
        broker,
        "dlq",
        3,
        r#"dead_letter_topic = "dlq-dead""#,
    );
    let events = dir.path().join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        "600",
        "--seed",
        "31",
        "--malformed-fraction",
        "0.01",
        "--out",
        p(&events),
    ]);
    // Rejects the fold makes after decoding, too (they reach the topic as well).
    let mut text = std::fs::read_to_string(&events).unwrap();
    text.push_str(concat!(
        r#"{"client_id":"c-x1","experiment":"no-such-experiment","branch":"control","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}"#,
        "\n",
        r#"{"client_id":"c-x2","experiment":"stream-test","branch":"no-such-branch","event":"enroll","timestamp":"2026-11-01T10:00:00Z"}"#,
        "\n",
        r#"{"client_id":"c-x3","experiment":"stream-test","branch":"control","event":"teleport","timestamp":"2026-11-01T10:00:00Z"}"#,
        "\n",
        "not json at all\n",
    ));
    std::fs::write(&events, text).unwrap();
    let want_tables = replay_tables(dir.path(), &cfg, &events);
    produce(&broker.addr, &cfg, &events);

    let out = dir.path().join("out");
    let run = Run::start("run", &run_args(&cfg, &broker.addr, dir.path(), 4));
    let (status, stdout) = run.wait(Duration::from_secs(120));
    assert!(status.success(), "{stdout}");
    let by_reason = rejects(&stdout);
    let total: usize = by_reason.values().sum();
    for reason in [
        "invalid_json",
        "unknown_experiment",
        "unknown_branch",
        "unknown_event_kind",
    ] {
        assert!(
            by_reason.contains_key(reason),
            "no {reason} reject: {stdout}"
        );
    }
    assert!(
        stdout.contains(&format!(
            "dead-letter topic dlq-dead: {total} rejected messages delivered"
        )),
        "{stdout}"
    );

    let letters = read_topic(&broker.addr, "dlq-dead", total, Duration::from_secs(60));
    assert_eq!(
        letters.len(),
        total,
        "one dead letter per reject ({by_reason:?})"
    );
    let mut seen_reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut positions = std::collections::BTreeSet::new();
    for l in &letters {
        let reason = &l.headers["slipstream-reject-reason"];
        let topic = &l.headers["slipstream-source-topic"];
        let partition: i32 = l.headers["slipstream-source-partition"].parse().unwrap();
        let offset: i64 = l.headers["slipstream-source-offset"].parse().unwrap();
        assert!(
            positions.insert((topic.clone(), partition, offset)),
            "{l:?} twice"
        );
        assert!((0..3).contains(&partition) && offset >= 0, "{l:?}");
        *seen_reasons.entry(reason.clone()).or_default() += 1;
        // The payload is the original message: it is rejected again, for the same reason
        // (decoding), or decodes and names what the config lacks (the fold's rejects).
        let kind = match topic.as_str() {
            "dlq-enr" => Kind::Enrollment,
            "dlq-tel" => Kind::Telemetry,
            other => panic!("source topic {other}"),
        };
        match decode_json(&l.payload, kind, 1 << 20) {
            Err(r) => assert_eq!(r.reason.as_str(), reason, "{l:?}"),
            Ok(_) => assert!(
                ["unknown_experiment", "unknown_branch"].contains(&reason.as_str()),
                "{l:?}"
            ),
        }
        // And its key is the original one: the client_id `produce` keyed it by, if any.
        let client = serde_json::from_slice::<serde_json::Value>(&l.payload)
            .ok()
            .and_then(|v| {
                v.get("client_id")
                    .and_then(|c| c.as_str())
                    .map(String::from)
            });
        assert_eq!(l.key, client.map(String::into_bytes), "{l:?}");
    }
    assert_eq!(
        seen_reasons, by_reason,
        "dead letters by reason vs the run's reject counts"
    );
    eprintln!("dead-letter test: {total} dead letters {seen_reasons:?}");
    assert_same(
        &want_tables,
        &all_tables(&out),
        "run with a dead-letter topic vs replay",
    );
}

#[test]
fn dead_letters_wait_for_an_unreachable_broker_and_are_then_delivered() {
    let proxy = Proxy::start();
    let broker = Broker::start_advertised(proxy.port, 1);
    proxy.forward_to(broker.listen_port());
    broker.create_topic("dl-wait", 1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Deliveries time out after 2 s, so the outage shows as failures that are retried.
    let extra = [("message.timeout.ms".to_string(), "2000".to_string())];
    let mut dl = rt
        .block_on(async { DeadLetters::new(&broker.addr, "dl-wait", &extra) })
        .unwrap();
    let payloads: Vec<String> = (0..3).map(|i| format!("bad message {i}")).collect();
    proxy.cut();
    let rounds = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let delivery = {
        let rounds = rounds.clone();
        let payloads = payloads.clone();
        std::thread::spawn(move || {
            rt.block_on(async {
                for (i, payload) in payloads.iter().enumerate() {
                    dl.send(
                        &Record {
                            topic: "some-topic",
                            partition: 0,
                            offset: i as i64,
                            key: Some(b"c-1"),
                            payload: payload.as_bytes(),
                        },
                        slipstream::event::RejectReason::InvalidJson,
                    );
                }
                let started = Instant::now();
                dl.deliver_all(|r| rounds.lock().unwrap().push(r)).await;
                started.elapsed()
            })
        })
    };
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        !delivery.is_finished(),
        "deliver_all returned while the broker was unreachable"
    );
    let retried: u64 = rounds.lock().unwrap().iter().map(|r| r.retried).sum();
    assert!(
        retried > 0,
        "no failed attempt counted: {:?}",
        rounds.lock().unwrap()
    );
    proxy.restore();
    let took = delivery.join().unwrap();
    let delivered: u64 = rounds.lock().unwrap().iter().map(|r| r.delivered).sum();
    assert_eq!(delivered, 3, "{:?}", rounds.lock().unwrap());
    eprintln!("dead letters delivered {took:?} after the outage began, {retried} retried attempts");
    // At least once: every dead letter arrived (a retried one may arrive twice).
    let letters = read_topic(&broker.addr, "dl-wait", 3, Duration::from_secs(30));
    for payload in &payloads {
        assert!(
            letters.iter().any(|l| l.payload == payload.as_bytes()
                && l.headers["slipstream-reject-reason"] == "invalid_json"
                && l.key.as_deref() == Some(&b"c-1"[..])),
            "{payload} missing from {letters:?}"
        );
    }
}
