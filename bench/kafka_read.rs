//! The broker's own limit for `slipstream run`: a bare rdkafka consumer with exactly the
//! service's client settings (`slipstream::ingest::kafka::consumer_config`) and a fresh
//! consumer group reads the topics from the beginning and does nothing with the messages.
//! It stops once every partition reached its high watermark (from librdkafka's statistics,
//! which carry the fetch responses' high watermarks; tansu's ListOffsets answer is wrong),
//! and prints the rate between the first and the last message, as `run` does.
//!
//! Run: `cargo bench --bench kafka_read -- --brokers 127.0.0.1:9092 [--topics enrollments,telemetry] [--timeout-secs 600]`.
//! Under `cargo test` (no `--bench` argument) it returns at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{ClientContext, Message, Statistics};
use slipstream::ingest::kafka::{consumer_config, KafkaSettings};

/// Keeps the high watermark of every partition from the statistics callback.
#[derive(Default)]
struct Marks(Mutex<HashMap<(String, i32), i64>>);

impl ClientContext for Marks {
    fn stats(&self, stats: Statistics) {
        let mut map = self.0.lock().unwrap();
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.hi_offset >= 0 {
                    map.insert((topic.clone(), *partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for Marks {}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        return; // `cargo test` runs bench targets too: nothing heavy there.
    }
    let brokers = arg(&args, "--brokers").expect("--brokers HOST:PORT is required");
    let topics: Vec<String> = arg(&args, "--topics")
        .unwrap_or_else(|| "enrollments,telemetry".into())
        .split(',')
        .map(String::from)
        .collect();
    let timeout = Duration::from_secs(
        arg(&args, "--timeout-secs")
            .map(|s| s.parse().expect("--timeout-secs N"))
            .unwrap_or(600),
    );
    let group = format!(
        "kafka-read-bench-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let settings = KafkaSettings::new(brokers, group, topics.clone());
    let consumer: BaseConsumer<Marks> = consumer_config(&settings)
        .create_with_context(Marks::default())
        .expect("consumer");
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topic_refs).expect("subscribe");
    let mut partitions = 0;
    for t in &topics {
        let md = consumer
            .fetch_metadata(Some(t), Duration::from_secs(30))
            .expect("metadata");
        partitions += md.topics()[0].partitions().len();
    }

    let started = Instant::now();
    let (mut messages, mut bytes) = (0u64, 0u64);
    let (mut first, mut last) = (None, None);
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut last_check = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                messages += 1;
                bytes += (m.payload_len() + m.key().map_or(0, <[u8]>::len)) as u64;
                let key = (m.topic().to_owned(), m.partition());
                match next.get_mut(&key) {
                    Some(v) => *v = m.offset() + 1,
                    None => {
                        next.insert(key, m.offset() + 1);
                    }
                }
            }
            Some(Err(e)) => eprintln!("kafka_read: consumer error: {e}"),
            None => {}
        }
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            let marks = consumer.context().0.lock().unwrap().clone();
            let done = marks.len() == partitions
                && marks
                    .iter()
                    .all(|(k, high)| next.get(k).copied().unwrap_or(0) >= *high);
            if done && messages > 0 {
                break;
            }
            if started.elapsed() > timeout {
                eprintln!(
                    "kafka_read: timed out after {timeout:?}; marks {marks:?}, positions {next:?}"
                );
                std::process::exit(1);
            }
        }
    }
    let secs = (last.unwrap() - first.unwrap()).as_secs_f64().max(1e-9);
    println!(
        "kafka_read: {messages} messages ({bytes} bytes) over {partitions} partitions in {secs:.2}s from the first to the last message: {:.0} messages/s, {:.1} MB/s; first message {:.2}s after subscribing",
        messages as f64 / secs,
        bytes as f64 / secs / 1e6,
        (first.unwrap() - started).as_secs_f64()
    );
}
