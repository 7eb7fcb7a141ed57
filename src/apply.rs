//! Folding decoded events into state.
//!
//! Events are folded into an in-memory [`Pending`] batch (no disk write per event); a
//! flush writes it to sled in one atomic batch *together with the source offsets* that
//! produced it, the newest event time per partition, the reject counters and the
//! late-data marks. A crash before the batch lands loses the batch and its offsets
//! alike, so the events are read again: nothing is lost and nothing counts twice.
//!
//! The per-client part of a batch (enrollment and daily deltas) goes into that batch as
//! one delta-log segment, a single sled value, instead of a read and a write per client
//! and day: the fold never waits for sled's per-key work. A background thread (the
//! compactor) merges segments into the per-client records, each merge an atomic batch
//! that also removes the segments it merged; whoever reads per-client state
//! (materializing windows, `finalize`, retention) merges what is left first.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::aggregate::{event_fields, DailyRecord, Enrolled, EnrollmentRecord};
use crate::config::Config;
use crate::event::{
    Day, EnrollmentEvent, EnrollmentKind, Event, Reject, RejectReason, TelemetryEvent, Timestamp,
};
use crate::state::{self, keys, PublishedRecord, StateError, Store};
use crate::window::{self, Window};

/// A partition of a source: a Kafka topic partition, or partition 0 of an event file.
pub type SourcePartition = (String, i32);

/// Delta-log segments allowed to wait for the background compactor; past it, a flush
/// merges the oldest itself (backpressure, bounding the log on disk).
const MAX_PENDING_SEGMENTS: u64 = 64;

/// On a quiet stream, the longest a segment waits for the background compactor.
const COMPACT_AFTER: Duration = Duration::from_secs(5);

/// Segments that make the background compactor start a merge.
const COMPACT_GROUP: u64 = 8;

/// A client's telemetry deltas of the pending batch, one per day.
struct ClientDays {
    partition: u32,
    days: Vec<(Day, DailyRecord)>,
}

/// Everything folded since the last flush, besides daily records (see [`Fold::daily`]).
#[derive(Default)]
struct Pending {
    /// (experiment index, client) -> (partition, record delta).
    enrollments: HashMap<(usize, String), (u32, EnrollmentRecord)>,
    offsets: BTreeMap<SourcePartition, i64>,
    rejects: [u64; RejectReason::ALL.len()],
    /// (experiment index, table) -> late events that may change it.
    late: BTreeMap<(usize, String), u64>,
    /// Late events per published activity-sketch table.
    late_global: BTreeMap<String, u64>,
    /// Days whose sketches this batch touches.
    activity_days: std::collections::BTreeSet<Day>,
    events: usize,
}

/// Per-experiment facts the fold checks on every event, computed once.
struct ExperimentInfo {
    first_day: Day,
    last_enrollment_day: Day,
    /// Telemetry on or after this day is outside every window.
    end_day: Day,
    /// Dimensions kept from enrollment events (pipeline dimensions and segment inputs).
    dimensions: Vec<String>,
    windows: Vec<Window>,
}

/// Counters since start, for logs and `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct FoldStats {
    pub folded: u64,
    /// Events outside the backfill range.
    pub skipped: u64,
    pub rejected: [u64; RejectReason::ALL.len()],
    /// Batches the state writer has applied to sled.
    pub flushes: u64,
    /// How long the writer took to apply the last of them (encoding its delta-log
    /// segment, merging its sketches, the atomic sled batch), beside the fold.
    pub last_flush: Duration,
}

/// The fold: applies events to a pending batch and flushes it atomically.
pub struct Fold {
    cfg: Config,
    store: Store,
    exps: Vec<ExperimentInfo>,
    pending: Pending,
    /// Telemetry deltas of the pending batch by client.
    daily: HashMap<String, ClientDays>,
    /// Newest event time per source partition, persisted and pending merged.
    event_times: BTreeMap<SourcePartition, i64>,
    /// When each partition last delivered an event (for idleness).
    last_seen: HashMap<SourcePartition, Instant>,
    /// Durable reject totals per reason.
    reject_totals: [u64; RejectReason::ALL.len()],
    /// Publication records per experiment (the fold marks them late).
    published: Vec<BTreeMap<String, PublishedRecord>>,
    /// Publication records of the activity-sketch tables.
    published_global: BTreeMap<String, PublishedRecord>,
    /// Per experiment, the last absolute day any published window covers: telemetry on
    /// or before it may change a published table (derived from the publication records,
    /// so it holds across restarts).
    published_until: Vec<Option<Day>>,
    fields: Vec<(u16, f64)>,
    tags: Vec<(u16, u16)>,
    /// Activity sketches touched since the last flush (DAU/MAU).
    sketches: crate::sketch::SketchBuffer,
    pub stats: FoldStats,
    /// Only events of these days are folded (backfill); others are skipped.
    day_filter: Option<(Day, Day)>,
    /// Per experiment: results final and per-client state dropped (`finalize`'s
    /// retention); its events are skipped and its tables never published again.
    retired: Vec<bool>,
    logged_rejects: [bool; RejectReason::ALL.len()],
    /// The background thread merging delta-log segments (see [`Fold::start_compactor`]).
    compactor: Option<Compactor>,
    /// The batch being written, if any (see [`Fold::flush_async`]).
    writing: Option<std::thread::JoinHandle<Result<WriteDone, StateError>>>,
    /// Emptied buffers of the last written batch, reused by the next.
    spare: Option<(HashMap<String, ClientDays>, crate::sketch::SketchBuffer)>,
}

impl Drop for Fold {
    fn drop(&mut self) {
        // A batch still being written lands (or fails) before the store closes.
        let _ = self.sync();
    }
}

/// One batch on its way to sled (see [`Fold::flush_async`]).
struct WriteJob {
    store: Store,
    /// Offsets, event times, counters and late marks, ready.
    batch: sled::Batch,
    daily: HashMap<String, ClientDays>,
    enrollments: HashMap<(usize, String), (u32, EnrollmentRecord)>,
    slugs: Vec<String>,
    sketches: crate::sketch::SketchBuffer,
    compactor: Option<Wake>,
}

/// What a finished write hands back: the emptied buffers, for the next batch.
struct WriteDone {
    daily: HashMap<String, ClientDays>,
    sketches: crate::sketch::SketchBuffer,
    took: Duration,
}

impl WriteJob {
    fn run(self) -> Result<WriteDone, StateError> {
        let started = Instant::now();
        let WriteJob {
            store,
            mut batch,
            mut daily,
            enrollments,
            slugs,
            mut sketches,
            compactor,
        } = self;
        let mut segment = state::SegmentOut::default();
        for (client, cd) in &daily {
            for (day, record) in &cd.days {
                segment.daily.push((cd.partition, client, day.0, record));
            }
        }
        for ((x, client), (partition, delta)) in &enrollments {
            segment
                .enrollments
                .push((slugs[*x].as_str(), *partition, client, delta));
        }
        let wrote_segment = !segment.daily.is_empty() || !segment.enrollments.is_empty();
        if wrote_segment {
            let (key, value) = store.write_segment(&state::encode(&segment))?;
            batch.insert(key, value);
        }
        drop(segment);
        let sketch_writes = sketches
            .prepare_flush(&store)
            .map_err(|e| StateError::Corrupt {
                key: "activity sketch".into(),
                detail: e.to_string(),
            })?;
        for (key, bytes) in sketch_writes {
            batch.insert([&[state::SKETCH_PREFIX][..], &key].concat(), bytes);
        }
        store.apply(batch)?;
        sketches.clear();
        daily.clear();
        if wrote_segment {
            store.segment_written();
            if let Some(wake) = compactor {
                wake.notify();
            }
            // Backpressure: the compactor fell far behind (or there is none).
            while store.pending_segments() > MAX_PENDING_SEGMENTS {
                store.compact()?;
            }
        }
        Ok(WriteDone {
            daily,
            sketches,
            took: started.elapsed(),
        })
    }
}

/// A wake-up call for a thread that sleeps until there is work: [`Wake::notify`] is never
/// lost, even when it comes before the sleeper waits.
#[derive(Clone, Default)]
struct Wake(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Wake {
    fn notify(&self) {
        let (flag, cv) = &*self.0;
        *flag.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_one();
    }

    /// Sleeps until notified (since the last wait) or for `timeout`.
    fn wait(&self, timeout: Duration) {
        let (flag, cv) = &*self.0;
        let mut woken = flag.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken {
            woken = cv
                .wait_timeout(woken, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *woken = false;
    }
}

/// The background compactor: merges delta-log segments as flushes write them.
struct Compactor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: Wake,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Compactor {
    fn start(store: Store) -> Compactor {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wake = Wake::default();
        let (stop2, wake2) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("compactor".into())
            .spawn(move || {
                // Segments are merged a full group at a time (each merge rewrites every
                // client it touches, so merging each segment alone would multiply that
                // work), or once the oldest waited [`COMPACT_AFTER`] on a quiet stream.
                let mut waiting_since: Option<Instant> = None;
                while !stop2.load(Ordering::Relaxed) {
                    let pending = store.pending_segments();
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    let due = pending >= COMPACT_GROUP
                        || (pending > 0 && since.elapsed() >= COMPACT_AFTER);
                    if pending == 0 {
                        waiting_since = None;
                    }
                    match if due { store.compact() } else { Ok(0) } {
                        Ok(n) if n > 0 => waiting_since = None,
                        Ok(_) => wake2.wait(Duration::from_secs(1)),
                        Err(e) => {
                            // The fold's own flushes and reads meet the same error and
                            // report it; here only wait and try again.
                            tracing::warn!(error = %e, "compacting the delta log failed; retrying in 1 s");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .expect("cannot start the compactor thread");
        Compactor {
            stop,
            wake,
            thread: Some(thread),
        }
    }
}

impl Drop for Compactor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Fold {
    /// Loads offsets, event times and counters for the given sources from the store.
    pub fn new(cfg: Config, store: Store, sources: &[&str]) -> Result<Fold, StateError> {
        let mut event_times = BTreeMap::new();
        let now = Instant::now();
        let mut last_seen = HashMap::new();
        for s in sources {
            for (p, t) in store.event_times(s)? {
                event_times.insert((s.to_string(), p), t);
                last_seen.insert((s.to_string(), p), now);
            }
        }
        let mut reject_totals = [0; RejectReason::ALL.len()];
        for (r, n) in store.rejects()? {
            reject_totals[r.index()] = n;
        }
        let exps = cfg
            .experiments
            .iter()
            .map(|e| {
                let mut dimensions = cfg.pipeline.dimensions.clone();
                for s in &e.segments {
                    for c in &s.clauses {
                        let d = match c {
                            crate::config::SegmentClause::Equals(d, _)
                            | crate::config::SegmentClause::NotEquals(d, _)
                            | crate::config::SegmentClause::In(d, _) => d,
                        };
                        if !dimensions.contains(d) {
                            dimensions.push(d.clone());
                        }
                    }
                }
                ExperimentInfo {
                    first_day: Day::from_date(e.enrollment_start),
                    last_enrollment_day: Day::from_date(e.last_enrollment_date()),
                    end_day: Day::from_date(e.end_date),
                    dimensions,
                    windows: window::windows(e),
                }
            })
            .collect();
        let published = cfg
            .experiments
            .iter()
            .map(|e| store.published(&e.slug))
            .collect::<Result<_, _>>()?;
        let cfg_sketch = cfg.pipeline.sketch_config();
        let published_global = store.published(state::GLOBAL)?;
        let retired_slugs = store.retired()?;
        let retired = cfg
            .experiments
            .iter()
            .map(|e| retired_slugs.contains_key(&e.slug))
            .collect();
        let mut fold = Fold {
            published_global,
            cfg,
            store,
            exps,
            pending: Pending::default(),
            daily: HashMap::new(),
            event_times,
            last_seen,
            reject_totals,
            published,
            published_until: Vec::new(),
            fields: Vec::new(),
            tags: Vec::new(),
            sketches: crate::sketch::SketchBuffer::new(&cfg_sketch),
            stats: FoldStats::default(),
            day_filter: None,
            retired,
            logged_rejects: [false; RejectReason::ALL.len()],
            compactor: None,
            writing: None,
            spare: None,
        };
        fold.published_until = (0..fold.cfg.experiments.len())
            .map(|x| fold.compute_published_until(x))
            .collect();
        Ok(fold)
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Starts merging delta-log segments in a background thread (long-running commands);
    /// without it they are merged when per-client state is read, or when too many wait.
    pub fn start_compactor(&mut self) {
        if self.compactor.is_none() {
            self.compactor = Some(Compactor::start(self.store.clone()));
        }
    }

    /// Merges every flushed delta into the per-client records: call before reading them.
    pub fn compact_all(&mut self) -> Result<(), StateError> {
        self.sync()?;
        self.store.compact_all().map(|_| ())
    }

    /// Whether experiment `x`'s per-client state was dropped (see [`Fold::retire`]).
    pub fn is_retired(&self, x: usize) -> bool {
        self.retired[x]
    }

    /// Drops experiment `x`'s per-client state (its results are final): enrollment
    /// records, and daily records of days no other experiment spans. Sketches, publication
    /// records and published statistics stay. Returns the (enrollment, daily) records
    /// removed.
    pub fn retire(&mut self, x: usize) -> Result<(u64, u64), StateError> {
        self.flush()?;
        self.retired[x] = true;
        let spans: Vec<(Day, Day)> = self
            .exps
            .iter()
            .zip(&self.retired)
            .filter(|(_, r)| !**r)
            .map(|(i, _)| (i.first_day, i.end_day))
            .collect();
        let slug = self.cfg.experiments[x].slug.clone();
        self.store.drop_client_state(&slug, |day| {
            spans.iter().any(|(from, to)| day >= *from && day <= *to)
        })
    }
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Events folded (or rejected) since the last flush.
    pub fn pending_events(&self) -> usize {
        self.pending.events
    }

    /// Records that a source partition's next unread offset is `next`.
    pub fn record_offset(&mut self, source: &str, partition: i32, next: i64) {
        match self
            .pending
            .offsets
            .iter_mut()
            .find(|((s, p), _)| *p == partition && s == source)
            .map(|(_, v)| v)
        {
            Some(v) => *v = next,
            None => {
                self.pending
                    .offsets
                    .insert((source.to_string(), partition), next);
            }
        }
    }

    /// Counts a rejected event; the first of each kind is logged with its detail.
    pub fn reject(&mut self, r: &Reject, source: &str) {
        let i = r.reason.index();
        self.pending.rejects[i] += 1;
        self.pending.events += 1;
        self.stats.rejected[i] += 1;
        if !self.logged_rejects[i] {
            self.logged_rejects[i] = true;
            tracing::warn!(source, reason = r.reason.as_str(), detail = %r.detail, "rejected event (first of its kind; later ones are only counted)");
        }
    }

    /// Folds only events whose UTC day is in `from..=to` (backfill of a date range).
    pub fn set_day_filter(&mut self, from: Day, to: Day) {
        self.day_filter = Some((from, to));
    }

    /// Folds one decoded event from a source partition. Returns the reason when the event
    /// was rejected (counted already) after decoding: an experiment or branch the config
    /// does not have; the Kafka path sends it to the dead-letter topic.
    pub fn apply(
        &mut self,
        source: &str,
        partition: i32,
        event: &Event<'_>,
    ) -> Option<RejectReason> {
        let ts = event.timestamp();
        if self
            .day_filter
            .is_some_and(|(from, to)| ts.day() < from || ts.day() > to)
        {
            self.stats.skipped += 1;
            return None;
        }
        // A few partitions at most: a scan beats allocating a key per event.
        let now = Instant::now();
        match self
            .event_times
            .iter_mut()
            .find(|((s, p), _)| *p == partition && s == source)
        {
            Some((_, t)) => *t = (*t).max(ts.0),
            None => {
                self.event_times
                    .insert((source.to_string(), partition), ts.0);
            }
        }
        match self
            .last_seen
            .iter_mut()
            .find(|((s, p), _)| *p == partition && s == source)
        {
            Some((_, t)) => *t = now,
            None => {
                self.last_seen.insert((source.to_string(), partition), now);
            }
        }
        let result = match event {
            Event::Enrollment(e) if self.is_retired_slug(&e.experiment) => {
                self.stats.skipped += 1;
                return None;
            }
            Event::Enrollment(e) => self.apply_enrollment(partition as u32, e),
            Event::Telemetry(t) => {
                self.apply_telemetry(partition as u32, t);
                Ok(())
            }
        };
        match result {
            Ok(()) => {
                self.pending.events += 1;
                self.stats.folded += 1;
                None
            }
            Err(r) => {
                self.reject(&r, source);
                Some(r.reason)
            }
        }
    }

    fn is_retired_slug(&self, slug: &str) -> bool {
        self.cfg
            .experiments
            .iter()
            .zip(&self.retired)
            .any(|(e, r)| *r && e.slug == slug)
    }

    fn apply_enrollment(&mut self, partition: u32, e: &EnrollmentEvent<'_>) -> Result<(), Reject> {
        let Some(x) = self
            .cfg
            .experiments
            .iter()
            .position(|x| x.slug == e.experiment)
        else {
            return Err(Reject {
                reason: RejectReason::UnknownExperiment,
                detail: format!("experiment `{}` is not configured", e.experiment),
            });
        };
        let exp = &self.cfg.experiments[x];
        if exp.branch_index(&e.branch).is_none() {
            return Err(Reject {
                reason: RejectReason::UnknownBranch,
                detail: format!("branch `{}` is not a branch of `{}`", e.branch, exp.slug),
            });
        }
        let info = &self.exps[x];
        let day = e.timestamp.day();
        let mut delta = EnrollmentRecord::default();
        let in_period = day >= info.first_day && day <= info.last_enrollment_day;
        // Whether the event changes columns of tables that may already be published
        // (enrollment counts and dates, exposure dates), whatever its timestamp.
        let changes_published = match e.kind {
            EnrollmentKind::Enroll if in_period => {
                delta.num_enrollment_events = 1;
                let mut dimensions: Vec<(String, String)> = e
                    .dimensions
                    .iter()
                    .filter(|(k, _)| info.dimensions.iter().any(|d| d == k))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                dimensions.sort();
                dimensions.dedup_by(|a, b| a.0 == b.0);
                delta.enrolled = Some(Enrolled {
                    branch: e.branch.to_string(),
                    timestamp: e.timestamp.0,
                    dimensions,
                });
                true
            }
            EnrollmentKind::Enroll => false, // outside the enrollment period: not an enrollment
            EnrollmentKind::Exposure => {
                delta.num_exposure_events = 1;
                delta.first_exposure = Some(e.timestamp.0);
                true
            }
            EnrollmentKind::Unenroll => {
                delta.num_unenrollment_events = 1;
                delta.first_unenrollment = Some(e.timestamp.0);
                false
            }
        };
        if changes_published {
            let names: Vec<String> = self.published[x].keys().cloned().collect();
            for table in names {
                *self.pending.late.entry((x, table)).or_default() += 1;
            }
        }
        match self
            .pending
            .enrollments
            .get_mut(&(x, e.client_id.to_string()))
        {
            Some((_, rec)) => rec.merge(&delta),
            None => {
                self.pending
                    .enrollments
                    .insert((x, e.client_id.to_string()), (partition, delta));
            }
        }
        Ok(())
    }

    fn apply_telemetry(&mut self, partition: u32, t: &TelemetryEvent<'_>) {
        let day = t.submission_timestamp.day();
        self.record_sketches(day, t);
        if !self
            .exps
            .iter()
            .zip(&self.retired)
            .any(|(x, retired)| !retired && day >= x.first_day && day < x.end_day)
        {
            return; // outside every experiment: only the watermark (and sketches) see it
        }
        let layout = self.store.layout();
        let Some(source) = layout.source_index(&t.data_source) else {
            return;
        };
        event_fields(layout, source, t, &mut self.fields);
        self.tags.clear();
        self.tags.extend(
            t.experiments
                .iter()
                .filter_map(|(slug, branch)| layout.tag(slug, branch)),
        );
        self.tags.sort_unstable();
        if self
            .published_until
            .iter()
            .any(|u| u.is_some_and(|u| day <= u))
        {
            self.mark_late(day);
        }
        let entry = match self.daily.get_mut(t.client_id.as_ref()) {
            Some(e) => e,
            None => self
                .daily
                .entry(t.client_id.to_string())
                .or_insert_with(|| ClientDays {
                    partition,
                    days: Vec::new(),
                }),
        };
        let record = match entry.days.iter().position(|d| d.0 == day) {
            Some(i) => &mut entry.days[i].1,
            None => {
                entry.days.push((day, DailyRecord::default()));
                &mut entry.days.last_mut().unwrap().1
            }
        };
        record.add_event(&self.tags, source, &self.fields);
    }

    fn compute_published_until(&self, x: usize) -> Option<Day> {
        let (exp, info) = (&self.cfg.experiments[x], &self.exps[x]);
        info.windows
            .iter()
            .filter(|w| self.published[x].contains_key(&w.statistics_table(exp)))
            .map(|w| info.last_enrollment_day.plus(i64::from(w.end)))
            .max()
    }

    /// Every telemetry event, enrolled or not, counts in the activity sketches of its day;
    /// tagged events of configured experiments also in their (experiment, branch) sketch.
    fn record_sketches(&mut self, day: Day, t: &TelemetryEvent<'_>) {
        let date = day.date();
        if self.pending.activity_days.insert(day) {
            // First event of this day in the batch: if the day is published, it is dirty.
            // (Counted once per batch: the threshold compares batches with sketch rows.)
            let table = window::activity_sketches_table(day);
            if self.published_global.contains_key(&table) {
                *self.pending.late_global.entry(table).or_default() += 1;
            }
        }
        let dims: Vec<(&str, &str)> = t
            .dimensions
            .iter()
            .map(|(k, v)| (k.as_ref(), v.as_ref()))
            .collect();
        self.sketches.record_activity(date, &t.client_id, &dims);
        let layout = self.store.layout();
        for (slug, branch) in &t.experiments {
            if layout
                .tag(slug, branch)
                .is_some_and(|(_, b)| b != crate::state::UNKNOWN_BRANCH)
            {
                self.sketches
                    .record_branch(date, &t.client_id, slug, branch);
            }
        }
    }

    /// Marks every published window whose span of absolute days holds `day` as touched.
    fn mark_late(&mut self, day: Day) {
        for (x, (exp, info)) in self.cfg.experiments.iter().zip(&self.exps).enumerate() {
            if self.published[x].is_empty() || self.retired[x] {
                continue;
            }
            for w in &info.windows {
                let covers = day >= info.first_day.plus(i64::from(w.start))
                    && day <= info.last_enrollment_day.plus(i64::from(w.end));
                if !covers {
                    continue;
                }
                let stat = w.statistics_table(exp);
                if self.published[x].contains_key(&stat) {
                    *self.pending.late.entry((x, stat)).or_default() += 1;
                }
            }
        }
    }

    /// Writes the pending batch, its offsets and counters in one atomic sled batch, and
    /// waits until it is applied.
    pub fn flush(&mut self) -> Result<(), StateError> {
        self.flush_async()?;
        self.sync()
    }

    /// Waits until the batch being written (see [`Fold::flush_async`]) is applied, and
    /// returns its error if it failed. Call it before reading state the fold writes.
    pub fn sync(&mut self) -> Result<(), StateError> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let done = writing.join().map_err(|_| StateError::Corrupt {
            key: "(state writer)".into(),
            detail: "the thread writing a batch panicked; the batch was not stored".into(),
        })??;
        self.stats.flushes += 1;
        self.stats.last_flush = done.took;
        self.spare = Some((done.daily, done.sketches));
        Ok(())
    }

    /// Hands the pending batch to a writer thread, which encodes its delta-log segment,
    /// merges its activity sketches and applies it, with its offsets and counters, in one
    /// atomic sled batch; meanwhile the fold goes on with the next batch. The batch before
    /// is waited for first, so batches land in order, one at a time.
    pub fn flush_async(&mut self) -> Result<(), StateError> {
        self.sync()?;
        let p = std::mem::take(&mut self.pending);
        let (spare_daily, spare_sketches) = match self.spare.take() {
            Some(spare) => spare,
            None => (
                HashMap::new(),
                crate::sketch::SketchBuffer::new(&self.cfg.pipeline.sketch_config()),
            ),
        };
        let daily = std::mem::replace(&mut self.daily, spare_daily);
        let sketches = std::mem::replace(&mut self.sketches, spare_sketches);
        let mut batch = sled::Batch::default();
        for ((source, partition), next) in &p.offsets {
            batch.insert(keys::offset(source, *partition), &state::i64_value(*next));
            if let Some(t) = self.event_times.get(&(source.clone(), *partition)) {
                batch.insert(keys::event_time(source, *partition), &state::i64_value(*t));
            }
        }
        for (i, n) in p.rejects.iter().enumerate() {
            if *n > 0 {
                self.reject_totals[i] += n;
                batch.insert(
                    keys::rejects(RejectReason::ALL[i]),
                    &state::i64_value(self.reject_totals[i] as i64),
                );
            }
        }
        for day in &p.activity_days {
            batch.insert(keys::activity_day(*day), &[]);
        }
        for (table, n) in &p.late_global {
            if let Some(rec) = self.published_global.get_mut(table) {
                rec.late_events += n;
                batch.insert(keys::published(state::GLOBAL, table), state::encode(rec));
            }
        }
        for ((x, table), n) in &p.late {
            if let Some(rec) = self.published[*x].get_mut(table) {
                rec.late_events += n;
                batch.insert(
                    keys::published(&self.cfg.experiments[*x].slug, table),
                    state::encode(rec),
                );
            }
        }
        tracing::debug!(offsets = ?p.offsets, "flushing batch");
        let job = WriteJob {
            store: self.store.clone(),
            batch,
            daily,
            enrollments: p.enrollments,
            slugs: self
                .cfg
                .experiments
                .iter()
                .map(|e| e.slug.clone())
                .collect(),
            sketches,
            compactor: self.compactor.as_ref().map(|c| c.wake.clone()),
        };
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || job.run())
            .map_err(|e| StateError::Io(sled::Error::Io(e)))?;
        self.writing = Some(writer);
        self.stats.flushes += 1;
        Ok(())
    }

    /// Newest event time per partition minus the allowed lateness, taking the minimum over
    /// partitions. With `idle`, partitions silent for longer are left out (unless all are).
    pub fn watermark(&self, idle: Option<Duration>) -> Option<Timestamp> {
        let lateness = i64::from(self.cfg.pipeline.allowed_lateness_hours) * 3_600_000_000;
        let now = Instant::now();
        let active = |k: &SourcePartition| match idle {
            None => true,
            Some(idle) => self
                .last_seen
                .get(k)
                .is_none_or(|t| now.duration_since(*t) <= idle),
        };
        let times = self.event_times.iter().filter(|(_, t)| **t != i64::MIN);
        let min_active = times
            .clone()
            .filter(|(k, _)| active(k))
            .map(|(_, t)| *t)
            .min();
        let newest = min_active.or_else(|| times.map(|(_, t)| *t).max())?;
        Some(Timestamp(newest - lateness))
    }

    /// Publication records of experiment `x` (or the global tables for `None`).
    pub fn published(&self, x: Option<usize>) -> &BTreeMap<String, PublishedRecord> {
        match x {
            Some(x) => &self.published[x],
            None => &self.published_global,
        }
    }

    /// Records a successful or failed publication (durably, outside the fold batch) of a
    /// table of experiment `x`, or of a global table for `None`.
    pub fn set_published(
        &mut self,
        x: Option<usize>,
        table: &str,
        rec: PublishedRecord,
    ) -> Result<(), StateError> {
        match x {
            Some(x) => {
                self.store
                    .set_published(&self.cfg.experiments[x].slug, table, &rec)?;
                self.published[x].insert(table.to_string(), rec);
                self.published_until[x] = self.compute_published_until(x);
            }
            None => {
                self.store.set_published(state::GLOBAL, table, &rec)?;
                self.published_global.insert(table.to_string(), rec);
            }
        }
        Ok(())
    }

    /// Rejects by reason since the store was created (durable totals plus pending).
    pub fn reject_totals(&self) -> Vec<(RejectReason, u64)> {
        RejectReason::ALL
            .iter()
            .map(|r| {
                (
                    *r,
                    self.reject_totals[r.index()] + self.pending.rejects[r.index()],
                )
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}
