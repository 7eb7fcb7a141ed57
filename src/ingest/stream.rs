//! `slipstream run`: consume the Kafka topics and drive the pipeline.
//!
//! Messages are folded as they arrive; every `batch_events` events or `batch_millis`
//! the batch is flushed to sled together with the next offset of every partition it
//! covers, then due windows are published. Consumption starts from those stored
//! offsets (Kafka's committed offsets are only informational), so a restart resumes
//! exactly after the last durable batch.
//!
//! Rejected messages go to the dead-letter topic, when one is configured, and are
//! delivered before the offsets of their batch are stored (at-least-once).
//!
//! Shutdown (SIGTERM, Ctrl-C): stop consuming, deliver the batch's dead letters, write the
//! batch with its offsets, then publish what is due. Publication is given
//! [`SHUTDOWN_PUBLISH_LIMIT`]; one still running then is abandoned (the process exits):
//! every publication step is idempotent and a window is recorded as published only after
//! its last step, so the next start publishes it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::Format;
use crate::event::{decode_json, decode_protobuf, Kind};
use crate::health::PipelineMetrics;
use crate::ingest::kafka::{DeadLetters, KafkaSettings, KafkaSource, OffsetStore};
use crate::pipeline::{batch_interval, Pipeline, PublishReport};
use crate::state::Store;

/// How often the consumer lag is measured (cheap: librdkafka's statistics cache it).
const LAG_EVERY: Duration = Duration::from_secs(5);

/// Start positions for the consumer: the positions this process has consumed to (which
/// the pending batch will store), else the durable offsets in sled. Using the in-memory
/// position when a partition comes back to us before a flush keeps its pending events
/// from being read, and folded, twice.
pub struct Positions {
    store: Store,
    consumed: Mutex<HashMap<(String, i32), i64>>,
}

impl Positions {
    pub fn new(store: Store) -> Self {
        Positions {
            store,
            consumed: Mutex::new(HashMap::new()),
        }
    }
    fn set(&self, topic: &str, partition: i32, next: i64) {
        let mut m = self.consumed.lock().unwrap_or_else(|e| e.into_inner());
        match m
            .iter_mut()
            .find(|((t, p), _)| *p == partition && t == topic)
            .map(|(_, v)| v)
        {
            Some(v) => *v = next,
            None => {
                m.insert((topic.to_string(), partition), next);
            }
        }
    }
}

impl OffsetStore for Positions {
    fn next_offset(&self, topic: &str, partition: i32) -> Option<i64> {
        if let Some(v) = self
            .consumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_string(), partition))
        {
            return Some(*v);
        }
        match self.store.offsets(topic) {
            Ok(m) => m.get(&partition).copied(),
            Err(e) => {
                // Starting from the earliest offset would double count: refuse loudly.
                panic!("cannot read stored offsets for {topic}/{partition}: {e}");
            }
        }
    }
}

/// After a shutdown signal, how long publishing may take before it is abandoned (the
/// state and offsets are already stored; Kubernetes waits 60 s before its SIGKILL).
pub const SHUTDOWN_PUBLISH_LIMIT: Duration = Duration::from_secs(30);

/// After a shutdown signal, how long the batch's dead letters may take to be delivered;
/// past it the batch is not stored (its events are read, and rejected, again next time).
const SHUTDOWN_DEAD_LETTER_LIMIT: Duration = Duration::from_secs(10);

/// How a run ends besides a signal, and what it serves on the side.
#[derive(Default)]
pub struct RunOptions {
    /// Stop after this long without a message (for batch-like use and tests).
    pub idle_exit: Option<Duration>,
    /// Raised once the consumer owns partitions (the HTTP `/readyz`).
    pub ready: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Finalize requests from the HTTP API (`POST /v1/experiments/{slug}/finalize`).
    pub finalize: Option<tokio::sync::mpsc::Receiver<crate::http::FinalizeRequest>>,
    /// Stop once every partition reached the high watermark it had when this instance
    /// first owned them all (`backfill --brokers`: what was retained when it started).
    pub stop_at_end: bool,
}

/// Totals of a run, printed at exit.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub messages: u64,
    /// Dead letters the broker acknowledged.
    pub dead_letters: u64,
    /// Failed publication attempts (transient ones were retried later).
    pub failed_attempts: u64,
    /// Tables whose latest publication attempt failed, with the error, at exit: what the
    /// exit status reports (a failure that a later attempt repaired does not count).
    pub still_failing: Vec<String>,
    pub published: PublishReport,
    /// When the first and the last message were handed to the fold: the consume rate is
    /// measured between them, without the group join before or the idle wait after.
    pub first_message: Option<Instant>,
    pub last_message: Option<Instant>,
    /// The flush and publication after the loop ended (the last batch's durability).
    pub final_flush: Duration,
}

/// Consumes until `shutdown` resolves (or the idle limit), then flushes and publishes.
pub async fn run(
    pipeline: &mut Pipeline,
    brokers: &str,
    opts: &mut RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<RunSummary> {
    let cfg = pipeline.fold.config().clone();
    let k = &cfg.pipeline.kafka;
    pipeline.fold.start_compactor();
    let mut settings = KafkaSettings::new(
        brokers,
        k.group_id.clone(),
        vec![k.enrollments_topic.clone(), k.telemetry_topic.clone()],
    );
    settings.session_timeout_ms = k.session_timeout_ms;
    let positions = Arc::new(Positions::new(pipeline.fold.store().clone()));
    let source = KafkaSource::new(&settings, positions.clone())?;
    let topics = settings.topics.clone();
    let counts =
        tokio::task::block_in_place(|| source.partition_counts(&topics, Duration::from_secs(30)))?;
    if counts[0].1 != counts[1].1 {
        anyhow::bail!(
            "topic {} has {} partitions but {} has {}: both must have the same count, so that a client's enrollment and telemetry land in partitions of the same number (state is keyed by partition)",
            counts[0].0, counts[0].1, counts[1].0, counts[1].1
        );
    }
    let all_partitions: usize = counts.iter().map(|(_, n)| n).sum();
    let mut dead_letters = match &k.dead_letter_topic {
        Some(topic) => {
            // Fail at start, not at the first reject, when the topic is missing.
            tokio::task::block_in_place(|| {
                source.partition_counts(std::slice::from_ref(topic), Duration::from_secs(30))
            })
            .map_err(|e| {
                anyhow::anyhow!("dead-letter topic ([pipeline.kafka] dead_letter_topic): {e}")
            })?;
            Some(DeadLetters::new(brokers, topic, &settings.extra)?)
        }
        None => None,
    };
    let metrics = pipeline.metrics.clone();
    let mut partial_logged = false;
    let max_bytes = cfg.pipeline.max_message_bytes;
    let idle_after = Duration::from_millis(k.idle_partition_millis);
    let idle = Some(idle_after);
    let interval = batch_interval(&pipeline.fold);
    let mut summary = RunSummary::default();
    let mut last_message = Instant::now();
    let mut last_flush = Instant::now();
    let mut last_report = Instant::now();
    let mut last_lag = Instant::now();
    let mut committed: Vec<(String, i32, i64)> = Vec::new();
    let mut idle_stop = false;
    let mut last_assigned = 0;
    let mut end_marks: Option<Vec<(String, i32, i64)>> = None;
    let mut last_end_check = Instant::now();
    tokio::pin!(shutdown);
    tracing::info!(brokers, group = %k.group_id, sink = %pipeline.sink_description(), "consuming");
    loop {
        let room = cfg
            .pipeline
            .batch_events
            .saturating_sub(pipeline.fold.pending_events())
            .max(1);
        let mut finalize_requests = opts.finalize.take();
        // Counted as folded, not from poll_batch's answer: a signal can cancel the poll
        // after some records were folded, and those count (their offsets are stored).
        let mut consumed = 0u64;
        let polled = tokio::select! {
            _ = &mut shutdown => None,
            Some(req) = next_request(&mut finalize_requests) => {
                opts.finalize = finalize_requests;
                // finalize stores the pending batch and its offsets: dead letters first.
                if !deliver_dead_letters(&mut dead_letters, &metrics, &mut summary, &mut shutdown).await {
                    let _ = req.reply.send(Err("the service is shutting down".into()));
                    tracing::info!("shutdown requested while delivering dead letters");
                    break;
                }
                let answer = match cfg.experiments.iter().position(|e| e.slug == req.slug) {
                    Some(x) => tokio::task::block_in_place(|| crate::finalize::finalize(pipeline, req.date, Some(x)))
                        .map(|(mut statuses, _)| statuses.remove(0))
                        .map_err(|e| e.to_string()),
                    None => Err(format!("experiment `{}` is not configured", req.slug)),
                };
                let _ = req.reply.send(answer);
                summary.messages += consumed;
                continue;
            }
            n = source.poll_batch(room, Duration::from_millis(200), |rec| {
                let (kind, format) = if rec.topic == k.enrollments_topic {
                    (Kind::Enrollment, k.enrollments_format)
                } else {
                    (Kind::Telemetry, k.telemetry_format)
                };
                // Rejected by the decoder (counted here) or by the fold (counted there).
                let rejected = match format {
                    Format::Json => decode_json(rec.payload, kind, max_bytes),
                    Format::Protobuf => decode_protobuf(rec.payload, kind, max_bytes),
                }
                .map_err(|r| {
                    pipeline.fold.reject(&r, rec.topic);
                    r.reason
                })
                .map_or_else(Some, |e| pipeline.fold.apply(rec.topic, rec.partition, &e));
                if let (Some(reason), Some(dl)) = (rejected, dead_letters.as_mut()) {
                    dl.send(&rec, reason);
                }
                pipeline.fold.record_offset(rec.topic, rec.partition, rec.offset + 1);
                positions.set(rec.topic, rec.partition, rec.offset + 1);
                consumed += 1;
                let now = Instant::now();
                summary.first_message.get_or_insert(now);
                summary.last_message = Some(now);
            }) => Some(n?),
        };
        opts.finalize = finalize_requests;
        summary.messages += consumed;
        let Some(n) = polled else {
            tracing::info!("shutdown requested: flushing state and offsets");
            break;
        };
        if n > 0 {
            last_message = Instant::now();
        }
        // One instance folds and publishes a whole experiment: while it owns only some
        // partitions (a restart while a killed predecessor is still in the group, or a
        // second instance), its view is partial, so it keeps folding but publishes nothing.
        let assigned = source.assignment().len();
        let owns_all = assigned == all_partitions;
        if !owns_all && !partial_logged && assigned > 0 {
            partial_logged = true;
            tracing::warn!(assigned, all_partitions, "this instance owns only some partitions: folding, but not publishing until it owns all of them");
        }
        if assigned != last_assigned {
            last_assigned = assigned;
            if let Some(r) = &opts.ready {
                r.store(assigned > 0, std::sync::atomic::Ordering::Relaxed);
            }
            last_message = Instant::now(); // new partitions: give them time to deliver
        }
        // Flush a full batch, or a batch that waited long enough; on a quiet stream, still
        // now and then, since the watermark moves as partitions turn idle.
        let pending = pipeline.fold.pending_events();
        let since = last_flush.elapsed();
        if pending >= cfg.pipeline.batch_events
            || (pending > 0 && since >= interval)
            || since >= interval * 5
        {
            // Dead letters first: the offsets stored next must not pass an undelivered one.
            if !deliver_dead_letters(&mut dead_letters, &metrics, &mut summary, &mut shutdown).await
            {
                tracing::info!("shutdown requested while delivering dead letters");
                break;
            }
            let wm = pipeline.fold.watermark(idle).filter(|_| owns_all);
            let r = tokio::task::block_in_place(|| pipeline.flush_and_publish(wm, false))?;
            summary.absorb(r);
            last_flush = Instant::now();
            committed.clear();
            for (topic, p) in source.assignment() {
                if let Some(next) = positions
                    .consumed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&(topic.clone(), p))
                {
                    committed.push((topic, p, *next));
                }
            }
            source.commit_informational(&committed);
        }
        if last_lag.elapsed() >= LAG_EVERY {
            last_lag = Instant::now();
            // Consumer lag for /metrics and health: messages between the next offset and
            // the high watermark (cached from librdkafka statistics; fetched when missing).
            let marks =
                tokio::task::block_in_place(|| source.high_watermarks(Duration::from_secs(1)));
            let lags = marks
                .into_iter()
                .map(|(topic, p, high)| {
                    let next = positions.next_offset(&topic, p).unwrap_or(0);
                    (topic, p, high - next)
                })
                .collect();
            let now = chrono::Utc::now().timestamp_micros();
            pipeline.metrics.record_consumer_lag(lags, now);
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            let rejects: Vec<String> = pipeline
                .fold
                .reject_totals()
                .iter()
                .map(|(r, n)| format!("{}={n}", r.as_str()))
                .collect();
            tracing::info!(messages = summary.messages, folded = pipeline.fold.stats.folded, rejects = %rejects.join(" "), watermark = ?pipeline.fold.watermark(idle).map(crate::event::format_timestamp), "progress");
        }
        if owns_all && opts.idle_exit.is_some_and(|d| last_message.elapsed() >= d) {
            // Quiet is not enough (a slow fetch looks quiet too): stop only when every
            // partition's position has reached its high watermark.
            let marks =
                tokio::task::block_in_place(|| source.high_watermarks(Duration::from_secs(5)));
            let caught_up = marks.len() == all_partitions
                && marks
                    .iter()
                    .all(|(t, p, high)| positions.next_offset(t, *p).unwrap_or(0) >= *high);
            if caught_up {
                tracing::info!(
                    "no message for {:?} and every partition caught up: stopping",
                    opts.idle_exit.unwrap()
                );
                idle_stop = true;
                break;
            }
            tracing::debug!(?marks, "quiet but not caught up: waiting");
            last_message = Instant::now();
        }
        if opts.stop_at_end && owns_all && last_end_check.elapsed() >= Duration::from_secs(1) {
            last_end_check = Instant::now();
            if end_marks.is_none() {
                let marks =
                    tokio::task::block_in_place(|| source.high_watermarks(Duration::from_secs(5)));
                end_marks = (marks.len() == all_partitions).then_some(marks);
            }
            let reached = |(t, p, high): &(String, i32, i64)| {
                positions.next_offset(t, *p).unwrap_or(0) >= *high
            };
            if end_marks.as_ref().is_some_and(|m| m.iter().all(reached)) {
                tracing::info!("every partition reached its end as of the start: stopping");
                idle_stop = true;
                break;
            }
        }
    }
    // Stopped because the whole stream went quiet: every partition is idle, so the
    // watermark is the newest event time seen (as at the end of a file replay). On a
    // signal the stream may still be flowing: keep the per-partition minimum.
    let owns_all = source.assignment().len() == all_partitions;
    let wm = pipeline
        .fold
        .watermark(if idle_stop {
            Some(Duration::ZERO)
        } else {
            Some(idle_after)
        })
        .filter(|_| owns_all);
    let started = Instant::now();
    let delivered = deliver_dead_letters(
        &mut dead_letters,
        &metrics,
        &mut summary,
        tokio::time::sleep(SHUTDOWN_DEAD_LETTER_LIMIT),
    )
    .await;
    if !delivered {
        tracing::error!(
            pending = pipeline.fold.pending_events(),
            "the dead-letter topic did not acknowledge this batch's rejects in {SHUTDOWN_DEAD_LETTER_LIMIT:?}: the batch is not stored, and its events are read again at the next start"
        );
        return Ok(summary);
    }
    // State and offsets first, durably: whatever happens to the publication below, the
    // next start resumes after this batch.
    tokio::task::block_in_place(|| {
        pipeline.fold.flush()?;
        pipeline.fold.store().flush()
    })?;
    if !idle_stop {
        abandon_publication_after(SHUTDOWN_PUBLISH_LIMIT);
    }
    pipeline.late_check_interval = Duration::ZERO; // the last pass measures all late changes
    let r = tokio::task::block_in_place(|| {
        let r = pipeline.flush_and_publish(wm, false)?;
        pipeline.compact()?; // leave the state at rest merged
        Ok::<_, crate::state::StateError>(r)
    })?;
    summary.absorb(r);
    pipeline.fold.store().flush()?;
    summary.final_flush = started.elapsed();
    summary.still_failing = still_failing(pipeline);
    tracing::info!(
        messages = summary.messages,
        "stopped cleanly: state and offsets stored"
    );
    Ok(summary)
}

impl RunSummary {
    /// Adds a publication pass, keeping only the number of failures: a long sink outage
    /// must not grow the summary.
    fn absorb(&mut self, mut r: PublishReport) {
        self.failed_attempts += r.failures.len() as u64;
        r.failures.clear();
        self.published.absorb(r);
    }
}

/// Tables whose last publication attempt failed (`table: error`).
fn still_failing(pipeline: &Pipeline) -> Vec<String> {
    let experiments = pipeline.fold.config().experiments.len();
    (0..experiments)
        .map(Some)
        .chain([None])
        .flat_map(|x| pipeline.fold.published(x).iter())
        .filter(|(_, rec)| rec.failures > 0)
        .map(|(table, rec)| format!("{table}: {}", rec.last_error.as_deref().unwrap_or("failed")))
        .collect()
}

/// Delivers the pending batch's dead letters (if a topic is configured); false when `stop`
/// resolved first, in which case the batch must not be stored.
async fn deliver_dead_letters(
    dead_letters: &mut Option<DeadLetters>,
    metrics: &PipelineMetrics,
    summary: &mut RunSummary,
    stop: impl std::future::Future<Output = ()>,
) -> bool {
    let Some(dl) = dead_letters.as_mut() else {
        return true;
    };
    if dl.pending() == 0 {
        return true;
    }
    let delivery = dl.deliver_all(|r| {
        summary.dead_letters += r.delivered;
        metrics.record_dead_letters(r);
    });
    tokio::select! {
        _ = delivery => true,
        _ = stop => false,
    }
}

/// Ends the process if publishing after a shutdown signal takes longer than `limit`. Safe
/// because the state and offsets were stored first and publication steps are idempotent:
/// the next start publishes whatever was in flight again (a SIGKILL here would do the same).
fn abandon_publication_after(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        tracing::warn!(
            "publication still running {limit:?} after the shutdown signal: abandoning it (state and offsets are stored; it is published again at the next start)"
        );
        std::process::exit(0);
    });
}

/// The next HTTP finalize request, or never when there is no API.
async fn next_request(
    rx: &mut Option<tokio::sync::mpsc::Receiver<crate::http::FinalizeRequest>>,
) -> Option<crate::http::FinalizeRequest> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
