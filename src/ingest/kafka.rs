//! Kafka ingest: a consumer-group source whose start positions come from our own store, and
//! the `produce` command's file producer.
//!
//! Why the consumer looks the way it does (DESIGN.md sections 6 and 7):
//! - Exactly-once effect is achieved by writing state and offsets in one sled batch, so Kafka's
//!   committed offsets are never trusted: on every assignment the start position of each new
//!   partition is read from [`OffsetStore`] and written into the partition list handed to
//!   `incremental_assign` inside the rebalance callback (a `seek` there fails with
//!   "Erroneous state"). Kafka-side commits are informational only (lag tools, humans).
//! - `partition.assignment.strategy=cooperative-sticky`: with the eager assignor a survivor
//!   never receives the partitions of a member that was SIGKILLed (seen on tansu).
//! - `auto.offset.reset=earliest`: tansu's "latest offset" answer is wrong, and a partition we
//!   have no position for must be read from its start anyway.
//! - `session.timeout.ms=6000` by default: a new group's first assignment waits about half of
//!   it on tansu, and client defaults (45 s) make the first message take ~20 s.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{Offset, Statistics, TopicPartitionList};
use serde::Deserialize;
use tokio::io::AsyncBufReadExt;

/// One consumed message, borrowed from librdkafka's buffer for the duration of the callback, so
/// the hot path allocates nothing per message.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Topic the message came from: decides the decoder (enrollment or telemetry).
    pub topic: &'a str,
    /// Partition: state is keyed by it so ownership can move a partition at a time.
    pub partition: i32,
    /// Offset of this message; the store records `offset + 1` as the next one to read.
    pub offset: i64,
    /// Message key (the `client_id`), when the producer set one.
    pub key: Option<&'a [u8]>,
    /// Message body (JSON or protobuf); empty for a tombstone.
    pub payload: &'a [u8],
}

/// How to reach Kafka and which group to join.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// `host:port[,host:port...]` bootstrap list.
    pub brokers: String,
    /// Consumer group: instances sharing it split the partitions between them.
    pub group_id: String,
    /// Topics to subscribe to (enrollments, telemetry).
    pub topics: Vec<String>,
    /// Group session timeout. Small (6 s) so a new group gets its first assignment quickly
    /// and a dead member's partitions move soon; raise it for slow, loaded clusters.
    pub session_timeout_ms: u32,
    /// Extra librdkafka properties, applied last so they can override ours (e.g. security).
    pub extra: Vec<(String, String)>,
}

impl KafkaSettings {
    /// Settings with the defaults DESIGN.md recommends (6 s session timeout, no extras).
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        KafkaSettings {
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            session_timeout_ms: 6000,
            extra: Vec::new(),
        }
    }
}

/// Where the consumer's start positions come from: OUR store (sled), not Kafka's committed
/// offsets, because state and offsets are written in one atomic batch (exactly-once effect).
pub trait OffsetStore: Send + Sync + 'static {
    /// Next offset to read for (topic, partition), or None to start from the earliest retained offset.
    fn next_offset(&self, topic: &str, partition: i32) -> Option<i64>;
}

/// Errors of the Kafka edge, each saying what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// librdkafka rejected the configuration (a bad property name or value in `extra`).
    #[error("invalid Kafka client configuration for brokers {brokers:?}: {source}")]
    Config {
        /// Bootstrap list the client was configured with.
        brokers: String,
        /// librdkafka's reason.
        source: Box<RdKafkaError>,
    },
    /// Subscribing failed (e.g. an invalid topic name).
    #[error("cannot subscribe to topics {topics:?}: {source}")]
    Subscribe {
        /// Topics we asked for.
        topics: Vec<String>,
        /// librdkafka's reason.
        source: Box<RdKafkaError>,
    },
    /// The client can no longer be used (librdkafka raised a fatal error); restart the process.
    #[error("fatal Kafka client error (the consumer must be recreated): {0}")]
    Fatal(String),
    /// The input file of `produce` could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// File being produced.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// A line could not be delivered even after retrying transient errors.
    #[error("could not produce line {line} of {path} to topic {topic:?}: {source}")]
    Produce {
        /// File being produced.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// Destination topic.
        topic: String,
        /// Last error seen.
        source: Box<RdKafkaError>,
    },
}

/// librdkafka callbacks: start positions on assignment, logs and errors routed to `tracing`.
struct SourceContext {
    /// Our positions (sled in production).
    offsets: Arc<dyn OffsetStore>,
    /// Set when librdkafka reports a fatal error, so `poll_batch` checks a flag per message
    /// instead of taking a lock.
    fatal_seen: AtomicBool,
    /// The fatal error's description, returned by `poll_batch`.
    fatal: Mutex<Option<String>>,
    /// High watermark per (topic, partition) from the latest statistics. These come from fetch
    /// responses and are right on tansu, unlike its ListOffsets answer (start of last batch + 1).
    high_watermarks: Mutex<HashMap<(String, i32), i64>>,
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        route_log(level, fac, message);
    }

    fn stats(&self, statistics: Statistics) {
        self.record_high_watermarks(&statistics);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(target: "librdkafka", %error, reason, "fatal Kafka client error");
            let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
            fatal.get_or_insert_with(|| format!("{error}: {reason}"));
            self.fatal_seen.store(true, Ordering::Release);
        } else {
            transient_error(&error, reason);
        }
    }
}

/// Sends librdkafka's log lines to `tracing`. Its "Error" level is mostly connection trouble
/// that it recovers from by itself, so it becomes a warning; only worse levels are errors.
fn route_log(level: RDKafkaLogLevel, fac: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", "{fac}: {message}")
        }
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", "{fac}: {message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", "{fac}: {message}")
        }
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", "{fac}: {message}"),
    }
}

/// Logs a client error that librdkafka recovers from by itself (broker down, transport).
fn transient_error(error: &RdKafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error (librdkafka retries)");
}

/// The producer's callbacks: librdkafka logs and errors routed to `tracing`, like the consumer's.
struct ProducerLogs;

impl ClientContext for ProducerLogs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        route_log(level, fac, message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        // A fatal producer error also fails every delivery, which produce_file reports.
        transient_error(&error, reason);
    }
}

impl SourceContext {
    /// Records the high watermarks of a statistics report (cheap: a few map inserts).
    fn record_high_watermarks(&self, stats: &Statistics) {
        let mut map = self
            .high_watermarks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // librdkafka reports an internal partition -1 and -1 for "not known yet".
                if *partition >= 0 && p.hi_offset >= 0 {
                    map.insert((topic.clone(), *partition), p.hi_offset);
                }
            }
        }
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                // Start positions must be in the list given to (incremental_)assign: a seek from
                // inside this callback fails with "Erroneous state".
                let partitions: Vec<(String, i32)> = tpl
                    .elements()
                    .iter()
                    .map(|e| (e.topic().to_owned(), e.partition()))
                    .collect();
                for (topic, partition) in &partitions {
                    let offset = match self.offsets.next_offset(topic, *partition) {
                        Some(next) => Offset::Offset(next),
                        // Explicitly the beginning, never Kafka's (informational) committed offset.
                        None => Offset::Beginning,
                    };
                    tracing::info!(topic, partition, ?offset, "partition assigned");
                    if let Err(error) = tpl.set_partition_offset(topic, *partition, offset) {
                        tracing::error!(topic, partition, %error, "cannot set start offset");
                    }
                }
                let result = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(error) = result {
                    tracing::error!(%error, "assigning partitions failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                for e in tpl.elements() {
                    tracing::info!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "partition revoked"
                    );
                }
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "revoking partitions failed");
                }
            }
            other => {
                // librdkafka asks for the current assignment to be dropped on a rebalance error.
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                let result = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::error!(%error, "unassigning after a rebalance error failed");
                }
            }
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        _offsets: &TopicPartitionList,
    ) {
        if let Err(error) = result {
            // Informational commits only: a failure costs nothing but a stale lag figure.
            tracing::debug!(%error, "informational offset commit failed");
        }
    }
}

/// How often librdkafka reports statistics (and so how fresh [`KafkaSource::high_watermarks`] is).
const STATISTICS_INTERVAL_MS: &str = "2000";

/// See `fetch.queue.backoff.ms` in [`consumer_config`].
const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// The consumer's librdkafka settings (see the module doc for why each is set), shared with
/// `bench/kafka_read.rs` so the bare-consumer benchmark reads exactly as the service does.
pub fn consumer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", &settings.group_id)
        .set(
            "session.timeout.ms",
            settings.session_timeout_ms.to_string(),
        )
        // librdkafka requires heartbeat < session timeout; a third is Kafka's own ratio.
        .set(
            "heartbeat.interval.ms",
            (settings.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        // Statistics carry the high watermarks of fetch responses, our lag source.
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS)
        // Once a partition's prefetch queue passes its threshold, librdkafka postpones the
        // next fetch by this much (default 1000 ms). A consumer that works on each message
        // drains the queue long before that and then sits idle: measured on a local
        // broker, a consumer spending 2 µs a message got 129k messages/s with the default.
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    for (key, value) in &settings.extra {
        config.set(key, value);
    }
    config
}

/// A consumer-group member reading the configured topics from the positions in our store.
pub struct KafkaSource {
    /// librdkafka consumer; its context carries the offset store and the fatal-error slot.
    consumer: StreamConsumer<SourceContext>,
}

impl KafkaSource {
    /// Creates the consumer and subscribes; partitions arrive later, on the first rebalance
    /// (about half of `session_timeout_ms` for a new group on tansu).
    pub fn new(
        settings: &KafkaSettings,
        offsets: Arc<dyn OffsetStore>,
    ) -> Result<Self, KafkaError> {
        let config = consumer_config(settings);
        let context = SourceContext {
            offsets,
            fatal_seen: AtomicBool::new(false),
            fatal: Mutex::new(None),
            high_watermarks: Mutex::new(HashMap::new()),
        };
        let consumer: StreamConsumer<SourceContext> =
            config
                .create_with_context(context)
                .map_err(|source| KafkaError::Config {
                    brokers: settings.brokers.clone(),
                    source: Box::new(source),
                })?;
        let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .map_err(|source| KafkaError::Subscribe {
                topics: settings.topics.clone(),
                source: Box::new(source),
            })?;
        Ok(KafkaSource { consumer })
    }

    /// Waits up to `linger` for messages and hands each to `f`, at most `max` messages; returns how many.
    /// The call lasts about `linger` (plus the time spent in `f`) and returns early only when
    /// `max` is reached, so a caller batches up to `max` messages into one sled write. Records
    /// of one partition come in offset order; the caller stores `offset + 1` as the next one.
    /// Errors that are transient (broker down, transport) are logged and retried by librdkafka; only fatal ones return Err.
    pub async fn poll_batch<F: FnMut(Record<'_>)>(
        &self,
        max: usize,
        linger: Duration,
        mut f: F,
    ) -> Result<usize, KafkaError> {
        let deadline = tokio::time::Instant::now() + linger;
        let mut count = 0;
        while count < max {
            self.check_fatal()?;
            let received = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(received) => received,
                Err(_elapsed) => break,
            };
            match received {
                Ok(message) => {
                    f(Record {
                        topic: message.topic(),
                        partition: message.partition(),
                        offset: message.offset(),
                        key: message.key(),
                        payload: message.payload().unwrap_or(&[]),
                    });
                    count += 1;
                }
                Err(RdKafkaError::MessageConsumptionFatal(code)) => {
                    return Err(KafkaError::Fatal(format!("message consumption: {code}")));
                }
                Err(error) => {
                    tracing::warn!(%error, "Kafka consumer error (librdkafka retries)");
                }
            }
        }
        self.check_fatal()?;
        Ok(count)
    }

    /// Returns the fatal error librdkafka reported through the context, if any.
    fn check_fatal(&self) -> Result<(), KafkaError> {
        let context = self.consumer.context();
        if !context.fatal_seen.load(Ordering::Acquire) {
            return Ok(());
        }
        let fatal = context.fatal.lock().unwrap_or_else(|e| e.into_inner());
        match fatal.as_ref() {
            Some(reason) => Err(KafkaError::Fatal(reason.clone())),
            None => Ok(()),
        }
    }

    /// Partition count of each subscribed topic, from cluster metadata (blocks up to
    /// `timeout`; call it from a blocking context). A topic the broker does not know is an error.
    pub fn partition_counts(
        &self,
        topics: &[String],
        timeout: Duration,
    ) -> Result<Vec<(String, usize)>, KafkaError> {
        let mut out = Vec::with_capacity(topics.len());
        for topic in topics {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), timeout)
                .map_err(|e| KafkaError::Fatal(format!("metadata of topic {topic:?}: {e}")))?;
            let count = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .filter(|t| t.error().is_none())
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if count == 0 {
                return Err(KafkaError::Fatal(format!(
                    "topic {topic:?} does not exist on the broker (create it, or set [pipeline.kafka] topics)"
                )));
            }
            out.push((topic.clone(), count));
        }
        Ok(out)
    }

    /// Partitions currently assigned (topic, partition), sorted; the watermark is the minimum
    /// over exactly these.
    pub fn assignment(&self) -> Vec<(String, i32)> {
        let mut out: Vec<(String, i32)> = match self.consumer.assignment() {
            Ok(tpl) => tpl
                .elements()
                .iter()
                .map(|e| (e.topic().to_owned(), e.partition()))
                .collect(),
            Err(error) => {
                tracing::warn!(%error, "cannot read the consumer's assignment");
                Vec::new()
            }
        };
        out.sort();
        out
    }

    /// Informational commit of offsets to Kafka (our truth is in sled), async / non-blocking.
    /// Each entry is (topic, partition, next offset to read), the Kafka convention.
    pub fn commit_informational(&self, offsets: &[(String, i32, i64)]) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (topic, partition, next) in offsets {
            if let Err(error) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::debug!(topic, partition, %error, "skipping informational commit");
            }
        }
        if let Err(error) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::debug!(%error, "informational offset commit not sent");
        }
    }

    /// Per assigned partition: (topic, partition, high watermark) for consumer-lag reporting.
    /// Normally non-blocking: the value comes from librdkafka's statistics (fetch responses,
    /// emitted every 2 s and delivered only while `poll_batch` runs), which is right on tansu,
    /// whose ListOffsets answer is not (it says start of the last batch + 1). Only a partition without statistics yet (just assigned)
    /// is queried over the network, blocking up to `timeout`: call this from a blocking context
    /// (`tokio::task::block_in_place`) or accept that rare wait. Failed queries are left out.
    pub fn high_watermarks(&self, timeout: Duration) -> Vec<(String, i32, i64)> {
        let assigned = self.assignment();
        let cached: Vec<Option<i64>> = {
            let map = self
                .consumer
                .context()
                .high_watermarks
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            assigned.iter().map(|key| map.get(key).copied()).collect()
        };
        assigned
            .into_iter()
            .zip(cached)
            .filter_map(|((topic, partition), cached)| {
                if let Some(high) = cached {
                    return Some((topic, partition, high));
                }
                match self.consumer.fetch_watermarks(&topic, partition, timeout) {
                    Ok((_low, high)) => Some((topic, partition, high)),
                    Err(error) => {
                        tracing::debug!(topic, partition, %error, "cannot fetch high watermark");
                        None
                    }
                }
            })
            .collect()
    }
}

/// Just enough of an event to route and key it, borrowed from the line where possible.
#[derive(Deserialize)]
struct RoutingFields<'a> {
    /// The message key; `Cow` because a string with escapes cannot be borrowed.
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
    /// True when an `event` key is present at all (enrollment events have it).
    #[serde(default, deserialize_with = "key_present")]
    event: bool,
}

/// Where one line of an event file goes.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    /// Message key: the `client_id` (unescaped), or None when the line has none.
    key: Option<Vec<u8>>,
    /// True for the enrollments topic (the line has an `event` key), false for telemetry.
    enrollment: bool,
}

/// Routes a line: lines that are not JSON objects (bad input, kept for testing the
/// dead-letter path) or whose `client_id` is not a string go to telemetry unkeyed.
fn route(line: &[u8]) -> Route {
    match serde_json::from_slice::<RoutingFields<'_>>(line) {
        Ok(fields) => Route {
            key: fields.client_id.map(|c| c.into_owned().into_bytes()),
            enrollment: fields.event,
        },
        Err(_) => Route {
            key: None,
            enrollment: false,
        },
    }
}

/// Marks a field as present whatever its value (even `null`), skipping the value cheaply.
fn key_present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

/// Errors worth retrying when producing: tansu answers "Unknown broker error" for a few
/// seconds while it restarts, and librdkafka does not retry that one itself.
fn is_transient(error: &RdKafkaError) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        error.rdkafka_error_code(),
        Some(
            C::Unknown
                | C::QueueFull
                | C::MessageTimedOut
                | C::RequestTimedOut
                | C::NetworkException
                | C::NotLeaderForPartition
                | C::LeaderNotAvailable
                | C::BrokerNotAvailable
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::NotEnoughReplicas
                | C::NotEnoughReplicasAfterAppend
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::UnknownTopicOrPartition
        )
    )
}

/// How many messages may await their delivery report at once: bounds memory for huge files.
const MAX_IN_FLIGHT: usize = 50_000;
/// Attempts per message for transient errors: with the back-off below, about 50 s in all.
const MAX_ATTEMPTS: u32 = 35;

/// Back-off before retry number `attempt` (1-based): 100 ms doubling, capped at 1.6 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(100 << attempt.clamp(1, 5).saturating_sub(1))
}

/// A line being produced, kept until its delivery report so it can be sent again.
struct Line {
    /// 1-based line number, for error messages.
    number: u64,
    /// Destination topic.
    topic: Arc<str>,
    /// Message key (client_id), if the line had one.
    key: Option<Vec<u8>>,
    /// The line itself, without its line break.
    payload: Vec<u8>,
    /// Failed attempts so far.
    failures: u32,
    /// When it was last handed to librdkafka: decides whether a failure still needs a back-off.
    sent_at: Instant,
}

/// The state of one `produce_file` run: the producer and the messages awaiting delivery.
struct FileProducer<'p> {
    /// librdkafka producer (batches, retries what it considers retriable).
    producer: FutureProducer<ProducerLogs>,
    /// Input file, for error messages.
    path: &'p Path,
    /// Messages sent but not yet acknowledged, oldest first.
    in_flight: VecDeque<(DeliveryFuture, Line)>,
    /// Messages acknowledged by the broker.
    produced: u64,
    /// End of the latest back-off sleep. An outage fails many messages at once; only one
    /// sleep per round is needed, so a message sent before this instant is resent at once.
    backoff_end: Instant,
}

impl FileProducer<'_> {
    /// Hands one line to librdkafka, making room first when too many are in flight or
    /// librdkafka's own queue is full.
    async fn enqueue(&mut self, mut line: Line) -> Result<(), KafkaError> {
        while self.in_flight.len() >= MAX_IN_FLIGHT {
            self.settle_oldest().await?;
        }
        loop {
            match self.try_send(&mut line) {
                Ok(delivery) => {
                    self.in_flight.push_back((delivery, line));
                    return Ok(());
                }
                Err(RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
                    if !self.in_flight.is_empty() =>
                {
                    self.settle_oldest().await?;
                }
                Err(error) => self.retry_or_fail(&mut line, error).await?,
            }
        }
    }

    /// Waits for the oldest message's delivery report. On a transient error the message is
    /// sent again and queued behind the others (so one outage costs one round of back-off,
    /// not one per message).
    async fn settle_oldest(&mut self) -> Result<(), KafkaError> {
        let Some((delivery, mut line)) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let error = match delivery.await {
            Ok(Ok(_delivered)) => {
                self.produced += 1;
                return Ok(());
            }
            Ok(Err((error, _message))) => error,
            // The producer dropped the report without an answer: resend.
            Err(_canceled) => RdKafkaError::Canceled,
        };
        self.retry_or_fail(&mut line, error).await?;
        loop {
            match self.try_send(&mut line) {
                Ok(delivery) => {
                    self.in_flight.push_back((delivery, line));
                    return Ok(());
                }
                Err(error) => self.retry_or_fail(&mut line, error).await?,
            }
        }
    }

    /// One non-blocking send attempt.
    fn try_send(&self, line: &mut Line) -> Result<DeliveryFuture, RdKafkaError> {
        line.sent_at = Instant::now();
        let mut record = FutureRecord::<[u8], [u8]>::to(&line.topic).payload(&line.payload);
        if let Some(key) = &line.key {
            record = record.key(key);
        }
        self.producer
            .send_result(record)
            .map_err(|(error, _record)| error)
    }

    /// Returns the error when it is permanent or the line has used up its attempts; otherwise
    /// backs off (unless the line was sent before the latest back-off ended) so the caller
    /// can resend. A full local queue is waited out without counting as an attempt (messages
    /// time out after `message.timeout.ms`, which frees it).
    async fn retry_or_fail(
        &mut self,
        line: &mut Line,
        error: RdKafkaError,
    ) -> Result<(), KafkaError> {
        if matches!(
            error,
            RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        ) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            return Ok(());
        }
        line.failures += 1;
        let transient = is_transient(&error) || matches!(error, RdKafkaError::Canceled);
        if !transient || line.failures >= MAX_ATTEMPTS {
            return Err(KafkaError::Produce {
                path: self.path.to_owned(),
                line: line.number,
                topic: line.topic.to_string(),
                source: Box::new(error),
            });
        }
        if line.sent_at >= self.backoff_end {
            let pause = backoff(line.failures);
            tracing::warn!(
                line = line.number,
                topic = %line.topic,
                attempt = line.failures,
                %error,
                ?pause,
                "produce failed; backing off, then resending every failed message"
            );
            tokio::time::sleep(pause).await;
            self.backoff_end = Instant::now();
        }
        Ok(())
    }
}

/// A rejected message on its way to the dead-letter topic: the original key and payload,
/// and where it came from and why it was rejected (sent as headers).
#[derive(Debug, Clone)]
struct DeadLetter {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    reason: &'static str,
    topic: String,
    partition: i32,
    offset: i64,
}

/// Header names of a dead letter (DESIGN.md section 3; README "Kafka").
pub const REJECT_REASON_HEADER: &str = "slipstream-reject-reason";
pub const SOURCE_TOPIC_HEADER: &str = "slipstream-source-topic";
pub const SOURCE_PARTITION_HEADER: &str = "slipstream-source-partition";
pub const SOURCE_OFFSET_HEADER: &str = "slipstream-source-offset";

/// Longest pause between two rounds of resending dead letters while the topic is unreachable.
const DEAD_LETTER_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What [`DeadLetters::deliver_all`] did, for the metrics and the logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterReport {
    /// Dead letters the broker acknowledged.
    pub delivered: u64,
    /// Failed attempts that were retried (transient errors: broker down, timeouts).
    pub retried: u64,
    /// Dead letters the broker refused for good (e.g. too large): logged and given up.
    pub dropped: u64,
}

/// The dead-letter producer. Rejects are handed over as they are met ([`DeadLetters::send`],
/// non-blocking); before the batch holding them is stored, [`DeadLetters::deliver_all`] waits
/// until every one is acknowledged, resending on transient errors for as long as it takes.
/// So the stored offsets never pass an undelivered dead letter: a crash may repeat dead
/// letters (their batch is read again), never lose one (at-least-once).
pub struct DeadLetters {
    producer: FutureProducer<ProducerLogs>,
    /// The dead-letter topic.
    topic: String,
    /// Sent, awaiting their delivery report, oldest first. Entries leave only once their
    /// report is in, so a cancelled `deliver_all` loses none.
    in_flight: VecDeque<(DeliveryFuture, DeadLetter)>,
    /// Not handed to librdkafka yet (its queue was full) or failed: sent again by `deliver_all`.
    unsent: Vec<DeadLetter>,
}

impl DeadLetters {
    /// A producer for `topic`; `extra` are librdkafka properties applied last (security).
    pub fn new(brokers: &str, topic: &str, extra: &[(String, String)]) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("linger.ms", "5")
            // A dead letter is as large as the message that was rejected, oversized ones
            // included: let the broker decide, not the client's 1 MB default.
            .set("message.max.bytes", "100000000")
            // Bounded so an unreachable broker surfaces (then our retries) instead of hanging.
            .set("message.timeout.ms", "30000");
        for (key, value) in extra {
            config.set(key, value);
        }
        let producer =
            config
                .create_with_context(ProducerLogs)
                .map_err(|source| KafkaError::Config {
                    brokers: brokers.to_owned(),
                    source: Box::new(source),
                })?;
        Ok(DeadLetters {
            producer,
            topic: topic.to_owned(),
            in_flight: VecDeque::new(),
            unsent: Vec::new(),
        })
    }

    /// Dead letters not yet acknowledged (bounded by the batch: each is a pending event).
    pub fn pending(&self) -> usize {
        self.in_flight.len() + self.unsent.len()
    }

    /// Hands a rejected record to librdkafka without waiting (copies key and payload).
    pub fn send(&mut self, record: &Record<'_>, reason: crate::event::RejectReason) {
        let letter = DeadLetter {
            key: record.key.map(<[u8]>::to_vec),
            payload: record.payload.to_vec(),
            reason: reason.as_str(),
            topic: record.topic.to_owned(),
            partition: record.partition,
            offset: record.offset,
        };
        match self.try_send(&letter) {
            Ok(delivery) => self.in_flight.push_back((delivery, letter)),
            Err(_) => self.unsent.push(letter),
        }
    }

    fn try_send(&self, letter: &DeadLetter) -> Result<DeliveryFuture, RdKafkaError> {
        use rdkafka::message::{Header, OwnedHeaders};
        let (partition, offset) = (letter.partition.to_string(), letter.offset.to_string());
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: REJECT_REASON_HEADER,
                value: Some(letter.reason),
            })
            .insert(Header {
                key: SOURCE_TOPIC_HEADER,
                value: Some(&letter.topic),
            })
            .insert(Header {
                key: SOURCE_PARTITION_HEADER,
                value: Some(&partition),
            })
            .insert(Header {
                key: SOURCE_OFFSET_HEADER,
                value: Some(&offset),
            });
        let mut record = FutureRecord::<[u8], [u8]>::to(&self.topic)
            .payload(&letter.payload)
            .headers(headers);
        if let Some(key) = &letter.key {
            record = record.key(key);
        }
        self.producer
            .send_result(record)
            .map_err(|(error, _record)| error)
    }

    /// Waits until every dead letter handed over so far is acknowledged. Transient failures
    /// (broker down, "Unknown broker error" while tansu restarts, timeouts) are resent after
    /// a back-off of 100 ms doubling to 5 s, for as long as it takes: the caller must not
    /// store its batch's offsets before this returns. A dead letter the broker refuses for
    /// good is logged with its source position and given up. `progress` sees each round's
    /// report as it happens (for the metrics).
    pub async fn deliver_all(&mut self, mut progress: impl FnMut(DeadLetterReport)) {
        let mut round = 0u32;
        loop {
            let mut report = DeadLetterReport::default();
            // Resent failures go behind the letters already in flight; no await in between,
            // so a cancellation cannot lose the ones taken out of `unsent`.
            for letter in std::mem::take(&mut self.unsent) {
                match self.try_send(&letter) {
                    Ok(delivery) => self.in_flight.push_back((delivery, letter)),
                    Err(error) => self.failed(letter, error, &mut report),
                }
            }
            while let Some((delivery, _)) = self.in_flight.front_mut() {
                let result = delivery.await;
                let (_, letter) = self.in_flight.pop_front().expect("front exists");
                match result {
                    Ok(Ok(_)) => report.delivered += 1,
                    Ok(Err((error, _message))) => self.failed(letter, error, &mut report),
                    Err(_canceled) => self.failed(letter, RdKafkaError::Canceled, &mut report),
                }
            }
            progress(report);
            if self.unsent.is_empty() {
                return;
            }
            round += 1;
            let pause =
                Duration::from_millis(100 << (round - 1).min(6)).min(DEAD_LETTER_MAX_BACKOFF);
            tracing::warn!(
                topic = %self.topic,
                undelivered = self.unsent.len(),
                round,
                ?pause,
                "dead letters not delivered; the batch's offsets wait until they are"
            );
            tokio::time::sleep(pause).await;
        }
    }

    /// Sorts a failed dead letter: resent later, or given up when the error is permanent.
    fn failed(&mut self, letter: DeadLetter, error: RdKafkaError, report: &mut DeadLetterReport) {
        let full = matches!(
            error,
            RdKafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)
        );
        if full || is_transient(&error) || matches!(error, RdKafkaError::Canceled) {
            if !full {
                report.retried += 1;
            }
            self.unsent.push(letter);
        } else {
            report.dropped += 1;
            tracing::error!(
                topic = %self.topic,
                source_topic = %letter.topic,
                partition = letter.partition,
                offset = letter.offset,
                reason = letter.reason,
                %error,
                "the broker refused a dead letter for good; it is not retried"
            );
        }
    }
}

/// Produces every line of an NDJSON event file to its topic, keyed by client_id: lines with an "event" field
/// go to the enrollments topic, all others (including lines that are not valid JSON: they are how we test bad
/// input) to the telemetry topic. Retries "Unknown broker error"/transient errors itself (see DESIGN.md 7). Returns lines produced.
/// Blank lines are skipped (not counted). A retried message lands after later messages of the
/// same partition; events carry their own timestamps, so consumers must not rely on order. A
/// line that still fails after ~50 s of retries (or fails permanently) stops the run with an
/// error naming it; lines acknowledged before that stay produced.
pub async fn produce_file(
    brokers: &str,
    input: &Path,
    enrollments_topic: &str,
    telemetry_topic: &str,
) -> Result<u64, KafkaError> {
    produce_file_with(
        brokers,
        input,
        enrollments_topic,
        telemetry_topic,
        |line, _| line,
    )
    .await
}

/// [`produce_file`] with each line re-encoded first: `encode(line, is_enrollment)` returns the
/// message body (e.g. the event as protobuf, for topics configured with that format).
pub async fn produce_file_with(
    brokers: &str,
    input: &Path,
    enrollments_topic: &str,
    telemetry_topic: &str,
    encode: impl Fn(Vec<u8>, bool) -> Vec<u8>,
) -> Result<u64, KafkaError> {
    let producer: FutureProducer<ProducerLogs> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "5")
        // Bounded so a dead broker surfaces as an error (then our retries) instead of a 5-min hang.
        .set("message.timeout.ms", "30000")
        .create_with_context(ProducerLogs)
        .map_err(|source| KafkaError::Config {
            brokers: brokers.to_owned(),
            source: Box::new(source),
        })?;
    let io_error = |source| KafkaError::Io {
        path: input.to_owned(),
        source,
    };
    let file = tokio::fs::File::open(input).await.map_err(io_error)?;
    let mut reader = tokio::io::BufReader::with_capacity(1 << 20, file);
    let enrollments: Arc<str> = Arc::from(enrollments_topic);
    let telemetry: Arc<str> = Arc::from(telemetry_topic);
    let mut out = FileProducer {
        producer,
        path: input,
        in_flight: VecDeque::new(),
        produced: 0,
        backoff_end: Instant::now(),
    };
    let mut line = 0u64;
    loop {
        let mut buf = Vec::new();
        if reader.read_until(b'\n', &mut buf).await.map_err(io_error)? == 0 {
            break;
        }
        line += 1;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Route { key, enrollment } = route(&buf);
        out.enqueue(Line {
            number: line,
            topic: if enrollment {
                enrollments.clone()
            } else {
                telemetry.clone()
            },
            key,
            payload: encode(buf, enrollment),
            failures: 0,
            sent_at: Instant::now(),
        })
        .await?;
    }
    while !out.in_flight.is_empty() {
        out.settle_oldest().await?;
    }
    Ok(out.produced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Option<Vec<u8>> {
        Some(s.as_bytes().to_vec())
    }

    #[test]
    fn routes_on_the_presence_of_event() {
        let r = route(br#"{"client_id":"c-1","event":"enroll","dimensions":{"os":"Linux"}}"#);
        assert_eq!(
            r,
            Route {
                key: key("c-1"),
                enrollment: true
            }
        );
        let r = route(br#"{"client_id":"c-2","event":null}"#);
        assert_eq!(
            r,
            Route {
                key: key("c-2"),
                enrollment: true
            }
        );
        let r = route(br#"{"metrics":{"event":1},"client_id":"c-3"}"#);
        assert_eq!(
            r,
            Route {
                key: key("c-3"),
                enrollment: false
            }
        );
    }

    #[test]
    fn unescapes_keys_and_tolerates_bad_lines() {
        let r = route(br#"{"client_id":"c-\u00e9\"x","event":"enroll"}"#);
        assert_eq!(
            r,
            Route {
                key: key("c-\u{e9}\"x"),
                enrollment: true
            }
        );
        for bad in [
            &b"not json"[..],
            b"42",
            b"[1,2]",
            br#"{"client_id":7,"event":"enroll"}"#,
            b"{\"client_id\":\"\xff",
        ] {
            assert_eq!(
                route(bad),
                Route {
                    key: None,
                    enrollment: false
                },
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let r = route(br#"{"submission_timestamp":"2026-11-02T08:00:00Z"}"#);
        assert_eq!(
            r,
            Route {
                key: None,
                enrollment: false
            }
        );
    }

    #[test]
    fn backoff_doubles_up_to_1600_ms() {
        let ms: Vec<u128> = (1..=7).map(|a| backoff(a).as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 1600, 1600]);
    }

    /// The service shares one source between the consume loop and the lag reporter, and
    /// spawns the loop: both need these bounds.
    #[allow(dead_code)]
    fn source_is_shareable_and_its_poll_future_is_send(source: &KafkaSource) {
        fn is_send<T: Send>(_: T) {}
        fn is_sync<T: Sync>() {}
        is_sync::<KafkaSource>();
        is_send(source.poll_batch(1, Duration::ZERO, |_| {}));
    }
}
