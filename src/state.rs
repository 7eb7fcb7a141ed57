//! The embedded store: sled key layout, format version, offsets and atomic batches.
//!
//! Everything lives in sled's default tree, so that one `apply_batch` writes the folded
//! state *and* the source offsets that produced it atomically (DESIGN.md section 6).
//! `state/README.md` documents the key layout; bump [`FORMAT_VERSION`] when it changes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::aggregate::{DailyRecord, EnrollmentRecord};
use crate::config::Config;
use crate::event::{Day, RejectReason};

/// Version of the key layout and value encodings; a store with another version is refused.
/// Version 2 added the delta log (`L` keys); a version 1 store is a version 2 store without
/// one, so it is upgraded in place when opened. Version 3 splits each client's telemetry
/// into 7-day buckets (`W` keys); version 2 stores are split when opened.
pub const FORMAT_VERSION: u32 = 3;
/// Older versions this binary upgrades in place (their keys mean the same).
const UPGRADABLE_VERSIONS: [u32; 2] = [1, 2];

const META_FORMAT: &[u8] = b"M\0format";
/// The format version again, as a text file beside `db/`: read before sled opens the store
/// (sled rewrites its files on every open), so a version this binary does not know is
/// refused without a byte written.
const FORMAT_FILE: &str = "FORMAT";
const META_LAYOUT: &[u8] = b"M\0layout";
/// `M\0log-next`: u64 BE, the delta log's sequence numbers continue at or above it.
const META_LOG_NEXT: &[u8] = b"M\0log-next";
/// `M\0retired\0<slug>`: per-client state dropped (value 1) or being dropped (0).
const META_RETIRED: &[u8] = b"M\0retired\0";

/// Errors opening or using the store; each says what to do next. The underlying error is
/// the `source` (printed after the message), never repeated in the message itself.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot open the state store at {path}: {}", hint(source))]
    Open { path: String, source: sled::Error },
    #[error("the state at {path} has format version {found}, but this binary reads version {FORMAT_VERSION}; use a matching slipstream release or rebuild the state with `backfill` (nothing was written)")]
    Version { path: String, found: u32 },
    #[error("writing the state store failed: {}", hint(.0))]
    Io(#[from] sled::Error),
    #[error("corrupt state value under key {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

/// What an I/O error of the store most likely means and what to do about it.
fn hint(e: &sled::Error) -> &'static str {
    use std::io::ErrorKind as K;
    let sled::Error::Io(io) = e else {
        return "the store is damaged or was written by another program; restore it from a backup or rebuild it with `backfill`";
    };
    // sled wraps some errors in a custom io::Error that only keeps the text.
    let text = io.to_string();
    let kind = io.kind();
    if kind == K::StorageFull || text.contains("No space left") || text.contains("StorageFull") {
        "the disk is full; free space or move --data-dir to a larger disk, then start again (everything up to the last stored batch is kept)"
    } else if kind == K::ReadOnlyFilesystem || text.contains("Read-only file system") {
        "the file system is read-only; --data-dir must be on a writable disk"
    } else if kind == K::PermissionDenied {
        "permission denied; --data-dir must be writable by this user"
    } else if kind == K::WouldBlock || text.contains("lock") {
        "another slipstream process is using this data directory (only one may open it at a time)"
    } else {
        "an I/O error; check the disk and the directory"
    }
}

/// Field layout: data source and metric field names as small integers in the daily
/// records. Append-only, stored in the state, so adding a metric never renumbers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layout {
    pub sources: Vec<String>,
    /// (source index, field name).
    pub fields: Vec<(u16, String)>,
    /// Experiment slugs, for the tags of daily records.
    pub experiments: Vec<String>,
    /// (experiment index, branch name).
    pub branches: Vec<(u16, String)>,
}

/// Tag of a branch the config does not know (always contradictory).
pub const UNKNOWN_BRANCH: u16 = u16::MAX;

impl Layout {
    pub fn source_index(&self, name: &str) -> Option<u16> {
        self.sources
            .iter()
            .position(|s| s == name)
            .map(|i| i as u16)
    }
    pub fn field_index(&self, source: &str, field: &str) -> Option<u16> {
        self.field_index_by_source(self.source_index(source)?, field)
    }
    pub fn field_index_by_source(&self, source: u16, field: &str) -> Option<u16> {
        self.fields
            .iter()
            .position(|(s, f)| *s == source && f == field)
            .map(|i| i as u16)
    }
    /// The layout tag of a reported (experiment, branch), if the experiment is configured.
    pub fn tag(&self, slug: &str, branch: &str) -> Option<(u16, u16)> {
        let x = self.experiments.iter().position(|e| e == slug)? as u16;
        let b = self
            .branches
            .iter()
            .position(|(e, name)| *e == x && name == branch)
            .map_or(UNKNOWN_BRANCH, |b| b as u16);
        Some((x, b))
    }

    /// An experiment's tag and its branches' tags in config order.
    pub fn experiment_tags(&self, exp: &crate::config::Experiment) -> (u16, Vec<u16>) {
        let branches = exp
            .branches
            .iter()
            .map(|b| {
                self.tag(&exp.slug, &b.name)
                    .expect("layout covers config")
                    .1
            })
            .collect();
        let x = self
            .experiments
            .iter()
            .position(|e| *e == exp.slug)
            .expect("layout covers config") as u16;
        (x, branches)
    }

    /// Appends what the config needs and the layout lacks; true when it changed.
    fn extend_from(&mut self, cfg: &Config) -> bool {
        let before = (
            self.sources.len(),
            self.fields.len(),
            self.experiments.len(),
            self.branches.len(),
        );
        for e in &cfg.experiments {
            if !self.experiments.contains(&e.slug) {
                self.experiments.push(e.slug.clone());
            }
            let x = self.experiments.iter().position(|s| *s == e.slug).unwrap() as u16;
            for b in &e.branches {
                if !self
                    .branches
                    .iter()
                    .any(|(bx, name)| *bx == x && *name == b.name)
                {
                    self.branches.push((x, b.name.clone()));
                }
            }
        }
        for m in cfg.experiments.iter().flat_map(|e| &e.metrics) {
            if self.source_index(&m.data_source).is_none() {
                self.sources.push(m.data_source.clone());
            }
            if let Some(f) = &m.field {
                let s = self.source_index(&m.data_source).unwrap();
                if self.field_index_by_source(s, f).is_none() {
                    self.fields.push((s, f.clone()));
                }
            }
        }
        before
            != (
                self.sources.len(),
                self.fields.len(),
                self.experiments.len(),
                self.branches.len(),
            )
    }
}

/// The publication records of tables that belong to no experiment (activity sketches)
/// are kept under this empty slug.
pub const GLOBAL: &str = "";

/// What is known about a published table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishedRecord {
    pub rows: u64,
    /// Wall clock (micros) of the last successful publication.
    pub published_at: i64,
    /// Late events folded since then that may change the table.
    pub late_events: u64,
    /// Failed attempts since the last success, and why the last one failed.
    pub failures: u32,
    pub last_error: Option<String>,
    /// The last failure was permanent (schema, permission): not retried until forced.
    pub permanent: bool,
}

/// Key builders. Integers are big-endian so that sled's byte order is numeric order.
pub mod keys {
    use super::*;

    pub fn offset(source: &str, partition: i32) -> Vec<u8> {
        [b"O", source.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
    }
    pub fn offset_prefix(source: &str) -> Vec<u8> {
        [b"O", source.as_bytes(), b"\0"].concat()
    }
    pub fn event_time(source: &str, partition: i32) -> Vec<u8> {
        [b"T", source.as_bytes(), b"\0", &partition.to_be_bytes()].concat()
    }
    pub fn event_time_prefix(source: &str) -> Vec<u8> {
        [b"T", source.as_bytes(), b"\0"].concat()
    }
    pub fn enrollment(slug: &str, partition: u32, client: &str) -> Vec<u8> {
        [
            b"E",
            slug.as_bytes(),
            b"\0",
            &partition.to_be_bytes(),
            client.as_bytes(),
        ]
        .concat()
    }
    pub fn enrollment_prefix(slug: &str) -> Vec<u8> {
        [b"E", slug.as_bytes(), b"\0"].concat()
    }
    /// A day as 4 bytes with the sign bit flipped, so negative days sort first.
    fn day_bytes(day: Day) -> [u8; 4] {
        ((day.0 as u32) ^ 0x8000_0000).to_be_bytes()
    }
    /// The day in a key's last 4 bytes (`D` and `A` keys).
    pub fn day_of_daily_key(key: &[u8]) -> Day {
        let n = key.len();
        Day((u32::from_be_bytes(key[n - 4..].try_into().unwrap()) ^ 0x8000_0000) as i32)
    }
    /// A client's telemetry, all days in one value (format version 2; split into `W`
    /// keys on open).
    pub fn client(partition: u32, client: &str) -> Vec<u8> {
        [b"C", &partition.to_be_bytes()[..], client.as_bytes()].concat()
    }
    /// Days of a client's telemetry per `W` value: 7-day buckets of absolute days.
    pub const BUCKET_DAYS: i32 = 7;
    /// The bucket of a day (days since 1970-01-01).
    pub fn bucket_of(day: i32) -> i32 {
        day.div_euclid(BUCKET_DAYS)
    }
    /// A client's telemetry of one bucket of days (format version 3).
    pub fn client_bucket(partition: u32, client: &str, bucket: i32) -> Vec<u8> {
        client_bucket_bytes(partition, client.as_bytes(), bucket)
    }
    pub(super) fn client_bucket_bytes(partition: u32, client: &[u8], bucket: i32) -> Vec<u8> {
        [
            b"W",
            &partition.to_be_bytes()[..],
            client,
            b"\0",
            &day_bytes(Day(bucket))[..],
        ]
        .concat()
    }
    /// A client's telemetry of one day (format version 1; migrated to `C` keys on open).
    pub fn daily(partition: u32, client: &str, day: Day) -> Vec<u8> {
        [
            b"D",
            &partition.to_be_bytes()[..],
            client.as_bytes(),
            b"\0",
            &day_bytes(day),
        ]
        .concat()
    }
    pub fn published(slug: &str, table: &str) -> Vec<u8> {
        [b"P", slug.as_bytes(), b"\0", table.as_bytes()].concat()
    }
    pub fn published_prefix(slug: &str) -> Vec<u8> {
        [b"P", slug.as_bytes(), b"\0"].concat()
    }
    /// The signature (row count, metric sums) of a window as last published.
    pub fn signature(slug: &str, table: &str) -> Vec<u8> {
        [b"G", slug.as_bytes(), b"\0", table.as_bytes()].concat()
    }
    /// The shape (`materialize::window_shape`, `enrollments_shape`) a table was last
    /// published with.
    pub fn shape(slug: &str, table: &str) -> Vec<u8> {
        [b"K", slug.as_bytes(), b"\0", table.as_bytes()].concat()
    }
    /// A UTC day with activity sketches (value empty).
    pub fn activity_day(day: Day) -> Vec<u8> {
        [&b"A"[..], &day_bytes(day)].concat()
    }
    pub fn rejects(reason: RejectReason) -> Vec<u8> {
        [b"R", reason.as_str().as_bytes()].concat()
    }
}

/// Encodes a record value (postcard: compact, varint integers).
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("in-memory encoding cannot fail")
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StateError> {
    postcard::from_bytes(bytes).map_err(|e| StateError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        detail: e.to_string(),
    })
}

fn be_i64(bytes: &[u8]) -> i64 {
    i64::from_be_bytes(bytes.try_into().unwrap_or([0; 8]))
}

/// One enrolled (or partly known) client of an experiment, as scanned from the store.
pub struct EnrollmentEntry {
    pub partition: u32,
    pub client_id: String,
    pub record: EnrollmentRecord,
}

/// Sketch keys live under this prefix (the sketch module's own key bytes follow it).
pub const SKETCH_PREFIX: u8 = b'H';

impl crate::sketch::SketchSource for Store {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, crate::sketch::SketchError> {
        let full = [&[SKETCH_PREFIX][..], key].concat();
        Ok(self
            .db
            .get(full)
            .map_err(crate::sketch::SketchError::store)?
            .map(|v| v.to_vec()))
    }

    fn scan_prefix(
        &self,
        prefix: &[u8],
        visit: &mut crate::sketch::query::Visit<'_>,
    ) -> Result<(), crate::sketch::SketchError> {
        let full = [&[SKETCH_PREFIX][..], prefix].concat();
        for kv in self.db.scan_prefix(full) {
            let (k, v) = kv.map_err(crate::sketch::SketchError::store)?;
            visit(&k[1..], &v)?;
        }
        Ok(())
    }
}

/// Version 1 to 2: wraps enrollment values with their delta-log mark and moves the per-day `D` records into per-client `C` records, a chunk of
/// keys per atomic batch (each removes the `D` keys it merged, so a migration cut short
/// by a crash resumes at the next open without counting a day twice).
fn migrate_daily_keys(db: &sled::Db) -> Result<(), StateError> {
    const CHUNK: usize = 10_000;
    // Enrollment values gain their delta-log mark (0: no segment merged). A chunk per
    // batch, each also storing the last key it converted, so that a migration cut short
    // resumes after it instead of wrapping a value twice.
    const PROGRESS: &[u8] = b"M\0migrating-enrollments";
    loop {
        let start = db.get(PROGRESS)?.map(|v| v.to_vec());
        let mut batch = sled::Batch::default();
        let mut last = None;
        let range = match &start {
            Some(after) => db.range::<&[u8], _>((
                std::ops::Bound::Excluded(after.as_slice()),
                std::ops::Bound::Excluded(&b"F"[..]),
            )),
            None => db.range::<&[u8], _>(&b"E"[..]..&b"F"[..]),
        };
        for kv in range.take(CHUNK) {
            let (k, v) = kv?;
            let record: EnrollmentRecord = decode(&k, &v)?;
            let stored = StoredEnrollment {
                merged_below: 0,
                record,
            };
            batch.insert(k.clone(), encode(&stored));
            last = Some(k);
        }
        let Some(last) = last else { break };
        batch.insert(PROGRESS, last);
        db.apply_batch(batch)?;
    }
    loop {
        let mut clients: BTreeMap<Vec<u8>, ClientRecord> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in db.scan_prefix(b"D").take(CHUNK) {
            let (k, v) = kv?;
            // D<partition u32><client>\0<day 4 bytes>
            let client_end = k.len() - 5;
            let key = [b"C", &k[1..client_end]].concat();
            let rec: DailyRecord = decode(&k, &v)?;
            clients
                .entry(key)
                .or_default()
                .merge_day(keys::day_of_daily_key(&k).0, rec);
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            // Done: version 2 and the end of the progress mark, together.
            let mut done = sled::Batch::default();
            done.insert(META_FORMAT, &2u32.to_be_bytes());
            done.remove(PROGRESS);
            db.apply_batch(done)?;
            return Ok(());
        }
        for (key, rec) in clients {
            let merged = match db.get(&key)? {
                Some(v) => {
                    let mut old: ClientRecord = decode(&key, &v)?;
                    old.merge(rec);
                    old
                }
                None => rec,
            };
            batch.insert(key, encode(&merged));
        }
        db.apply_batch(batch)?;
    }
}

/// Version 2 to 3: splits each per-client `C` record into per-bucket `W` records (each
/// with the `C` record's delta-log mark), a chunk of clients per atomic batch that also
/// removes their `C` keys, so a migration cut short resumes where it stopped.
fn migrate_client_buckets(db: &sled::Db) -> Result<(), StateError> {
    const CHUNK: usize = 10_000;
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in db.scan_prefix(b"C").take(CHUNK) {
            let (k, v) = kv?;
            let rec: ClientRecord = decode(&k, &v)?;
            let partition =
                u32::from_be_bytes(k[1..5].try_into().map_err(|_| StateError::Corrupt {
                    key: String::from_utf8_lossy(&k).into_owned(),
                    detail: "a client key without its partition".into(),
                })?);
            let mut buckets: BTreeMap<i32, ClientRecord> = BTreeMap::new();
            for (day, r) in rec.days {
                buckets
                    .entry(keys::bucket_of(day))
                    .or_insert_with(|| ClientRecord {
                        merged_below: rec.merged_below,
                        days: Vec::new(),
                    })
                    .days
                    .push((day, r));
            }
            for (bucket, r) in buckets {
                batch.insert(
                    keys::client_bucket_bytes(partition, &k[5..], bucket),
                    encode(&r),
                );
            }
            batch.remove(k);
            n += 1;
        }
        if n == 0 {
            db.insert(META_FORMAT, &3u32.to_be_bytes())?;
            return Ok(());
        }
        db.apply_batch(batch)?;
    }
}

/// The sled-backed store.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    layout: Layout,
    log: Arc<Log>,
}

/// Delta-log segments live under this prefix: `L<sequence u64 BE>`.
pub const LOG_PREFIX: u8 = b'L';

fn log_seq(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[1..9].try_into().unwrap_or([0; 8]))
}

/// Segments merged into per-client records by one compaction batch at most.
pub const SEGMENTS_PER_COMPACTION: usize = 8;

/// Segment files live in this directory beside `db/`.
const LOG_DIR: &str = "log";

/// The delta log's bookkeeping, shared by the clones of a [`Store`].
struct Log {
    /// Where segment files are written (`<seq as 16 hex digits>.seg`).
    dir: std::path::PathBuf,
    /// Held while segments are merged (one compaction at a time: two would apply a
    /// segment twice) and while per-client state is dropped.
    compaction: Mutex<()>,
    /// Sequence number of the next segment.
    next: AtomicU64,
    /// Segments written and not merged yet.
    segments: AtomicU64,
}

/// One flushed batch of per-client deltas, as the fold writes it (borrowed) ...
#[derive(Serialize, Default)]
pub struct SegmentOut<'a> {
    /// (partition, client, day, delta).
    pub daily: Vec<(u32, &'a str, i32, &'a DailyRecord)>,
    /// (experiment slug, partition, client, delta).
    pub enrollments: Vec<(&'a str, u32, &'a str, &'a EnrollmentRecord)>,
}

/// A client's telemetry: its daily records, sorted by day (the value of a `W` key: the
/// days of one bucket; of a `C` key in format version 2: all days).
#[derive(Serialize, Deserialize, Default, Debug)]
pub struct ClientRecord {
    /// Every delta-log segment below this sequence number is merged in (see
    /// [`Store::compact`]).
    pub merged_below: u64,
    pub days: Vec<(i32, DailyRecord)>,
}

/// An enrollment record with its delta-log mark (the value of an `E` key).
#[derive(Serialize, Deserialize, Default, Debug)]
struct StoredEnrollment {
    /// Every delta-log segment below this sequence number is merged in.
    merged_below: u64,
    record: EnrollmentRecord,
}

impl ClientRecord {
    /// Adds a day's delta, keeping the days sorted.
    pub fn merge_day(&mut self, day: i32, delta: DailyRecord) {
        match self.days.binary_search_by_key(&day, |d| d.0) {
            Ok(i) => self.days[i].1.merge(&delta),
            Err(i) => self.days.insert(i, (day, delta)),
        }
    }
    /// Adds every day of another record (its mark is not touched).
    pub fn merge(&mut self, other: ClientRecord) {
        for (day, delta) in other.days {
            self.merge_day(day, delta);
        }
    }
}

/// ... and as compaction reads it back (the same postcard encoding).
#[derive(Deserialize)]
struct Segment {
    daily: Vec<(u32, String, i32, DailyRecord)>,
    enrollments: Vec<(String, u32, String, EnrollmentRecord)>,
}

impl Store {
    /// Opens (or creates) the store, checks its format version and extends its layout
    /// with the config's fields.
    ///
    /// Nothing is left behind when it fails: a version it does not know is refused before
    /// sled touches a file, and a store it was creating (a read-only or full disk) is removed.
    pub fn open(dir: &Path, cfg: &Config) -> Result<Store, StateError> {
        let path = dir.display().to_string();
        let open_error = |e: std::io::Error| StateError::Open {
            path: path.clone(),
            source: sled::Error::Io(e),
        };
        match std::fs::read_to_string(dir.join(FORMAT_FILE)) {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(found) if found == FORMAT_VERSION || UPGRADABLE_VERSIONS.contains(&found) => {}
                Ok(found) => return Err(StateError::Version { path, found }),
                Err(_) => {
                    return Err(StateError::Corrupt {
                        key: format!("{}/{FORMAT_FILE}", dir.display()),
                        detail: format!("{:?} is not a format version number", text.trim()),
                    })
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(open_error(e)),
        }
        let created_dir = !dir.exists();
        let created_db = !dir.join("db").exists();
        let opened = Store::open_db(dir, &path, cfg);
        if opened.is_err() && created_db {
            // Leave no half-created store behind (best effort: the disk may refuse this too).
            let _ = std::fs::remove_dir_all(dir.join("db"));
            let _ = std::fs::remove_file(dir.join(FORMAT_FILE));
            if created_dir {
                let _ = std::fs::remove_dir(dir);
            }
        }
        opened
    }

    fn open_db(dir: &Path, path: &str, cfg: &Config) -> Result<Store, StateError> {
        let open_error = |source| StateError::Open {
            path: path.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(|e| open_error(sled::Error::Io(e)))?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cfg.pipeline.state_cache_mb << 20) // validated: 16 MiB..=1 TiB
            .flush_every_ms(Some(500))
            .open()
            .map_err(open_error)?;
        let path = path.to_owned();
        match db.get(META_FORMAT)? {
            Some(v) => {
                let found = u32::from_be_bytes(v.as_ref().try_into().unwrap_or([0xff; 4]));
                if UPGRADABLE_VERSIONS.contains(&found) {
                    if found == 1 {
                        migrate_daily_keys(&db)?; // to version 2
                    }
                    migrate_client_buckets(&db)?; // to version 3
                } else if found != FORMAT_VERSION {
                    return Err(StateError::Version { path, found });
                }
            }
            None => {
                db.insert(META_FORMAT, &FORMAT_VERSION.to_be_bytes())?;
            }
        }
        let mut layout: Layout = match db.get(META_LAYOUT)? {
            Some(v) => decode(META_LAYOUT, &v)?,
            None => Layout::default(),
        };
        if layout.extend_from(cfg) {
            db.insert(META_LAYOUT, encode(&layout))?;
        }
        db.flush()?;
        let format_file = dir.join(FORMAT_FILE);
        let current = std::fs::read_to_string(&format_file)
            .is_ok_and(|t| t.trim() == FORMAT_VERSION.to_string());
        if !current {
            // Written whole or not at all (rename), so a crash cannot leave a torn version.
            let tmp = dir.join(format!("{FORMAT_FILE}.tmp"));
            std::fs::write(&tmp, format!("{FORMAT_VERSION}\n"))
                .and_then(|()| std::fs::rename(&tmp, &format_file))
                .map_err(|e| open_error(sled::Error::Io(e)))?;
        }
        // The delta log: its next sequence number and how many segments wait. Segment
        // files without their `L` key are orphans (a crash between writing the file and
        // the batch, or between merging a segment and deleting its file): removed.
        let mut segments = 0u64;
        let mut next = match db.get(META_LOG_NEXT)? {
            Some(v) => be_i64(&v) as u64,
            None => 0,
        };
        let mut live = std::collections::BTreeSet::new();
        for kv in db.scan_prefix([LOG_PREFIX]) {
            let (k, _) = kv?;
            segments += 1;
            next = log_seq(&k) + 1;
            live.insert(log_seq(&k));
        }
        let log_dir = dir.join(LOG_DIR);
        std::fs::create_dir_all(&log_dir).map_err(|e| open_error(sled::Error::Io(e)))?;
        for entry in std::fs::read_dir(&log_dir).map_err(|e| open_error(sled::Error::Io(e)))? {
            let entry = entry.map_err(|e| open_error(sled::Error::Io(e)))?;
            let name = entry.file_name();
            let seq = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            match seq {
                Some(seq) if live.contains(&seq) => {}
                Some(seq) => {
                    next = next.max(seq + 1);
                    let _ = std::fs::remove_file(entry.path());
                }
                None => {}
            }
        }
        Ok(Store {
            db,
            layout,
            log: Arc::new(Log {
                dir: log_dir,
                compaction: Mutex::new(()),
                next: AtomicU64::new(next),
                segments: AtomicU64::new(segments),
            }),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Writes a delta-log segment file durably and returns the `L` key and value to put
    /// in the batch that carries its offsets: the segment exists once that batch does.
    ///
    /// The bytes live in a file, not in sled: sled rewrites a leaf's values whenever it
    /// consolidates the leaf, so megabyte values beside each other cost far more than the
    /// file write and its fsync.
    pub fn write_segment(&self, bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), StateError> {
        use std::io::Write;
        let seq = self.log.next.fetch_add(1, Ordering::SeqCst);
        let path = self.log.dir.join(format!("{seq:016x}.seg"));
        let io = |e: std::io::Error| StateError::Io(sled::Error::Io(e));
        let mut file = std::fs::File::create(&path).map_err(io)?;
        file.write_all(bytes).map_err(io)?;
        file.sync_data().map_err(io)?;
        // The new file's directory entry, durable too.
        std::fs::File::open(&self.log.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        let key = [&[LOG_PREFIX][..], &seq.to_be_bytes()].concat();
        let value = [
            (bytes.len() as u64).to_be_bytes(),
            xxhash_rust::xxh3::xxh3_64(bytes).to_be_bytes(),
        ]
        .concat();
        Ok((key, value))
    }

    /// Reads a segment file back, checking its length and checksum against its `L` value.
    fn read_segment(&self, key: &[u8], value: &[u8]) -> Result<Segment, StateError> {
        let seq = log_seq(key);
        let path = self.log.dir.join(format!("{seq:016x}.seg"));
        let corrupt = |detail: String| StateError::Corrupt {
            key: format!("L{seq} ({})", path.display()),
            detail,
        };
        let bytes = std::fs::read(&path)
            .map_err(|e| corrupt(format!("cannot read the segment file: {e}")))?;
        if value.len() != 16 {
            return Err(corrupt("malformed segment entry".into()));
        }
        let len = u64::from_be_bytes(value[..8].try_into().unwrap());
        let hash = u64::from_be_bytes(value[8..].try_into().unwrap());
        if bytes.len() as u64 != len || xxhash_rust::xxh3::xxh3_64(&bytes) != hash {
            return Err(corrupt(format!(
                "the segment file has {} bytes or a checksum that does not match the {len} bytes written",
                bytes.len()
            )));
        }
        decode(key, &bytes)
    }

    /// Counts a segment that a batch applied successfully wrote.
    pub fn segment_written(&self) {
        self.log.segments.fetch_add(1, Ordering::SeqCst);
    }

    /// Delta-log segments not merged into per-client records yet.
    pub fn pending_segments(&self) -> u64 {
        self.log.segments.load(Ordering::SeqCst)
    }

    /// Merges up to [`SEGMENTS_PER_COMPACTION`] of the oldest delta-log segments into the
    /// per-client records (`E` and `D` keys) and removes them, in one atomic batch: a
    /// crash leaves either the segments or the merged records, never both. Returns how
    /// many segments it merged (0: the log is empty).
    pub fn compact(&self) -> Result<usize, StateError> {
        let _guard = self
            .log
            .compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.compact_locked()
    }

    /// Merges every segment written so far (before reading per-client state).
    pub fn compact_all(&self) -> Result<usize, StateError> {
        let _guard = self
            .log
            .compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut total = 0;
        loop {
            match self.compact_locked()? {
                0 => return Ok(total),
                n => total += n,
            }
        }
    }

    /// Merging is idempotent rather than one big batch: sled's `apply_batch` holds a
    /// global write lock that stops every other read and write for its whole duration,
    /// which would stall the fold behind each compaction. Instead each record carries the
    /// sequence number below which every segment is merged in; a record is written with
    /// plain inserts, and the segments are removed only after those writes are durable. A
    /// crash in between makes the next compaction skip, per record, what it already has.
    fn compact_locked(&self) -> Result<usize, StateError> {
        // Per key, the deltas of each segment (by sequence number), sorted by key so that
        // the reads and writes below walk sled's tree in order. A client's days go into
        // one value per 7-day bucket: one read and one write per client and compaction
        // (segments cover about a day), not per client and day (sled's per-key work is
        // what limits the fold), and not the client's whole history either (that would
        // make each merge, and each window read, grow with the experiment's length).
        let mut clients: BTreeMap<Vec<u8>, Vec<(u64, ClientRecord)>> = BTreeMap::new();
        let mut enrollments: BTreeMap<Vec<u8>, Vec<(u64, EnrollmentRecord)>> = BTreeMap::new();
        let mut segments = Vec::new();
        let mut last_seq = 0;
        for kv in self
            .db
            .scan_prefix([LOG_PREFIX])
            .take(SEGMENTS_PER_COMPACTION)
        {
            let (k, v) = kv?;
            let seq = log_seq(&k);
            let segment = self.read_segment(&k, &v)?;
            for (partition, client, day, delta) in segment.daily {
                let key = keys::client_bucket(partition, &client, keys::bucket_of(day));
                let deltas = clients.entry(key).or_default();
                if deltas.last().is_none_or(|d| d.0 != seq) {
                    deltas.push((seq, ClientRecord::default()));
                }
                deltas.last_mut().unwrap().1.merge_day(day, delta);
            }
            for (slug, partition, client, delta) in segment.enrollments {
                let deltas = enrollments
                    .entry(keys::enrollment(&slug, partition, &client))
                    .or_default();
                match deltas.last_mut() {
                    Some(d) if d.0 == seq => d.1.merge(&delta),
                    _ => deltas.push((seq, delta)),
                }
            }
            segments.push(k);
            last_seq = seq;
        }
        if segments.is_empty() {
            return Ok(0);
        }
        let below = last_seq + 1;
        for (key, deltas) in enrollments {
            let mut rec: StoredEnrollment = self.get(&key)?.unwrap_or_default();
            let mut changed = false;
            for (_, delta) in deltas.iter().filter(|d| d.0 >= rec.merged_below) {
                rec.record.merge(delta);
                changed = true;
            }
            if changed {
                rec.merged_below = below;
                self.db.insert(key, encode(&rec))?;
            }
        }
        for (key, deltas) in clients {
            let mut rec: ClientRecord = self.get(&key)?.unwrap_or_default();
            let mut changed = false;
            for (seq, delta) in deltas {
                if seq >= rec.merged_below {
                    rec.merge(delta);
                    changed = true;
                }
            }
            if changed {
                rec.merged_below = below;
                self.db.insert(key, encode(&rec))?;
            }
        }
        // The merged records are durable before the segments go.
        self.db.flush()?;
        let mut batch = sled::Batch::default();
        for k in &segments {
            batch.remove(k.clone());
        }
        // Sequence numbers never go back (a restart continues above it): records say
        // "merged below N", so a reused number would be taken as merged already.
        batch.insert(META_LOG_NEXT, &below.to_be_bytes());
        self.db.apply_batch(batch)?;
        // sled keeps recent writes in memory for up to `flush_every_ms`: the removal must
        // be on disk before the files go, or a crash would bring back keys without files.
        self.db.flush()?;
        self.log
            .segments
            .fetch_sub(segments.len() as u64, Ordering::SeqCst);
        for k in &segments {
            // An undeleted file is an orphan, removed at the next open.
            let _ = std::fs::remove_file(self.log.dir.join(format!("{:016x}.seg", log_seq(k))));
        }
        Ok(segments.len())
    }

    /// Applies one batch atomically (state and offsets together).
    pub fn apply(&self, batch: sled::Batch) -> Result<(), StateError> {
        Ok(self.db.apply_batch(batch)?)
    }

    /// Makes everything applied so far durable; called before anything is published.
    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    pub fn get_raw(&self, key: &[u8]) -> Result<Option<sled::IVec>, StateError> {
        Ok(self.db.get(key)?)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StateError> {
        self.db.get(key)?.map(|v| decode(key, &v)).transpose()
    }

    /// Next offset to read per partition of a source (a topic, or `file:<path>`).
    pub fn offsets(&self, source: &str) -> Result<BTreeMap<i32, i64>, StateError> {
        self.partition_values(&keys::offset_prefix(source))
    }

    /// Newest event time seen per partition of a source (the watermark's input).
    pub fn event_times(&self, source: &str) -> Result<BTreeMap<i32, i64>, StateError> {
        self.partition_values(&keys::event_time_prefix(source))
    }

    /// Newest event time per (source, partition) of every source seen, for health and
    /// metrics (which do not know whether the state was fed from Kafka or from files).
    pub fn all_event_times(&self) -> Result<Vec<(String, i32, i64)>, StateError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"T") {
            let (k, v) = kv?;
            // T <source> \0 <partition: 4 bytes, big-endian>
            let source = String::from_utf8_lossy(&k[1..k.len() - 5]).into_owned();
            let p = i32::from_be_bytes(k[k.len() - 4..].try_into().unwrap());
            out.push((source, p, be_i64(&v)));
        }
        Ok(out)
    }

    fn partition_values(&self, prefix: &[u8]) -> Result<BTreeMap<i32, i64>, StateError> {
        let mut out = BTreeMap::new();
        for kv in self.db.scan_prefix(prefix) {
            let (k, v) = kv?;
            let p = i32::from_be_bytes(k[k.len() - 4..].try_into().unwrap());
            out.insert(p, be_i64(&v));
        }
        Ok(out)
    }

    /// Every enrollment record of an experiment, in key order.
    pub fn enrollments(
        &self,
        slug: &str,
    ) -> impl Iterator<Item = Result<EnrollmentEntry, StateError>> + '_ {
        let prefix = keys::enrollment_prefix(slug);
        let skip = prefix.len();
        self.db.scan_prefix(prefix).map(move |kv| {
            let (k, v) = kv?;
            let partition = u32::from_be_bytes(k[skip..skip + 4].try_into().unwrap());
            let client_id = String::from_utf8_lossy(&k[skip + 4..]).into_owned();
            let stored: StoredEnrollment = decode(&k, &v)?;
            Ok(EnrollmentEntry {
                partition,
                client_id,
                record: stored.record,
            })
        })
    }

    /// A client's daily records for days `from..=to`, sorted by day.
    pub fn client_days(
        &self,
        partition: u32,
        client: &str,
        from: Day,
        to: Day,
        out: &mut Vec<(Day, DailyRecord)>,
    ) -> Result<(), StateError> {
        out.clear();
        if from > to {
            return Ok(());
        }
        let (first, last) = (keys::bucket_of(from.0), keys::bucket_of(to.0));
        let mut add = |k: &[u8], v: &[u8]| -> Result<(), StateError> {
            let rec: ClientRecord = decode(k, v)?;
            out.extend(
                rec.days
                    .into_iter()
                    .filter(|(d, _)| *d >= from.0 && *d <= to.0)
                    .map(|(d, r)| (Day(d), r)),
            );
            Ok(())
        };
        if i64::from(last) - i64::from(first) < 64 {
            // A window's few buckets: point reads (cheaper in sled than a range scan).
            for bucket in first..=last {
                let key = keys::client_bucket(partition, client, bucket);
                if let Some(v) = self.db.get(&key)? {
                    add(&key, &v)?;
                }
            }
        } else {
            let lo = keys::client_bucket(partition, client, first);
            let hi = keys::client_bucket(partition, client, last);
            for kv in self.db.range(lo.as_slice()..=hi.as_slice()) {
                let (k, v) = kv?;
                if k.len() == lo.len() {
                    add(&k, &v)?; // not another client whose id extends this one's with a NUL
                }
            }
        }
        Ok(())
    }

    /// Records `finalize`'s outcome for an experiment and date.
    pub fn set_finalize_status(
        &self,
        slug: &str,
        date: chrono::NaiveDate,
        status: &str,
    ) -> Result<(), StateError> {
        let key = [b"F", slug.as_bytes(), b"\0", date.to_string().as_bytes()].concat();
        self.db.insert(key, status.as_bytes())?;
        Ok(())
    }

    /// `finalize`'s outcomes for an experiment: (date, status), oldest first.
    pub fn finalize_statuses(&self, slug: &str) -> Result<Vec<(String, String)>, StateError> {
        let prefix = [b"F", slug.as_bytes(), b"\0"].concat();
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv?;
            out.push((
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                String::from_utf8_lossy(&v).into_owned(),
            ));
        }
        Ok(out)
    }

    /// Days that have activity sketches, in order.
    pub fn activity_days(&self) -> Result<Vec<Day>, StateError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(b"A") {
            let (k, _) = kv?;
            out.push(keys::day_of_daily_key(&k));
        }
        Ok(out)
    }

    /// Publication records of an experiment by table name.
    pub fn published(&self, slug: &str) -> Result<BTreeMap<String, PublishedRecord>, StateError> {
        let prefix = keys::published_prefix(slug);
        let mut out = BTreeMap::new();
        for kv in self.db.scan_prefix(&prefix) {
            let (k, v) = kv?;
            out.insert(
                String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                decode(&k, &v)?,
            );
        }
        Ok(out)
    }

    pub fn set_published(
        &self,
        slug: &str,
        table: &str,
        rec: &PublishedRecord,
    ) -> Result<(), StateError> {
        self.db.insert(keys::published(slug, table), encode(rec))?;
        Ok(())
    }

    /// Experiments whose per-client state `finalize` dropped (or is dropping), by slug:
    /// `true` once the drop completed.
    pub fn retired(&self) -> Result<BTreeMap<String, bool>, StateError> {
        let mut out = BTreeMap::new();
        for kv in self.db.scan_prefix(META_RETIRED) {
            let (k, v) = kv?;
            let slug = String::from_utf8_lossy(&k[META_RETIRED.len()..]).into_owned();
            out.insert(slug, v.first() == Some(&1));
        }
        Ok(out)
    }

    /// Drops an experiment's per-client state: its enrollment records, and the daily
    /// records of days that no remaining experiment needs (`keep_day` false). The
    /// experiment is marked retired first (so the fold ignores it from then on) and the
    /// drop completed last; a drop cut short by a crash is finished by calling this
    /// again. Returns the (enrollment, daily) records removed.
    pub fn drop_client_state(
        &self,
        slug: &str,
        keep_day: impl Fn(Day) -> bool,
    ) -> Result<(u64, u64), StateError> {
        let _guard = self
            .log
            .compaction
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while self.compact_locked()? > 0 {}
        let marker = [META_RETIRED, slug.as_bytes()].concat();
        self.db.insert(&marker, &[0u8])?;
        self.db.flush()?;
        const CHUNK: usize = 10_000;
        let mut removed = (0u64, 0u64);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.db.scan_prefix(keys::enrollment_prefix(slug)) {
            let (k, _) = kv?;
            batch.remove(k);
            removed.0 += 1;
            n += 1;
            if n == CHUNK {
                self.db.apply_batch(std::mem::take(&mut batch))?;
                n = 0;
            }
        }
        for kv in self.db.scan_prefix(b"W") {
            let (k, v) = kv?;
            let mut rec: ClientRecord = decode(&k, &v)?;
            let before = rec.days.len();
            rec.days.retain(|(d, _)| keep_day(Day(*d)));
            if rec.days.len() == before {
                continue;
            }
            removed.1 += (before - rec.days.len()) as u64;
            if rec.days.is_empty() {
                batch.remove(k);
            } else {
                batch.insert(k, encode(&rec));
            }
            n += 1;
            if n == CHUNK {
                self.db.apply_batch(std::mem::take(&mut batch))?;
                n = 0;
            }
        }
        batch.insert(marker, &[1u8]);
        self.db.apply_batch(batch)?;
        self.db.flush()?;
        Ok(removed)
    }

    /// What a window's tables held when last published (see `materialize::WindowSignature`).
    pub fn signature(
        &self,
        slug: &str,
        table: &str,
    ) -> Result<Option<crate::materialize::WindowSignature>, StateError> {
        let key = keys::signature(slug, table);
        self.db.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    pub fn set_signature(
        &self,
        slug: &str,
        table: &str,
        sig: &crate::materialize::WindowSignature,
    ) -> Result<(), StateError> {
        self.db.insert(keys::signature(slug, table), encode(sig))?;
        Ok(())
    }

    /// The shape a table was last published with (see `materialize::window_shape`), if
    /// it was published since shapes were kept.
    pub fn shape(&self, slug: &str, table: &str) -> Result<Option<u64>, StateError> {
        let key = keys::shape(slug, table);
        self.db.get(&key)?.map(|v| decode(&key, &v)).transpose()
    }

    pub fn set_shape(&self, slug: &str, table: &str, shape: u64) -> Result<(), StateError> {
        self.db.insert(keys::shape(slug, table), encode(&shape))?;
        Ok(())
    }

    /// Rejected events by reason, as durably counted.
    pub fn rejects(&self) -> Result<Vec<(RejectReason, u64)>, StateError> {
        let mut out = Vec::new();
        for r in RejectReason::ALL {
            if let Some(v) = self.db.get(keys::rejects(r))? {
                out.push((r, be_i64(&v) as u64));
            }
        }
        Ok(out)
    }

    /// Bytes on disk, for metrics.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

pub(crate) fn i64_value(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare sled database for writing old formats by hand: without sled's flusher
    /// thread, which keeps the directory locked for a while after the handle is dropped
    /// (a `Store::open` right after could fail with "could not acquire lock").
    fn raw_db(path: &std::path::Path) -> sled::Db {
        sled::Config::new()
            .path(path)
            .flush_every_ms(None)
            .open()
            .unwrap()
    }

    /// `Store::open` right after a handle on the same directory was dropped in this
    /// process: sled's background threads can hold its lock for a moment, so the lock
    /// error ("another slipstream process is using ...") is retried for up to 5 s.
    fn reopen(dir: &std::path::Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(dir, &empty_config()) {
                Ok(store) => return store,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    #[test]
    fn daily_keys_sort_by_day_including_negative() {
        let a = keys::daily(1, "c", Day(-5));
        let b = keys::daily(1, "c", Day(3));
        assert!(a < b);
        assert_eq!(keys::day_of_daily_key(&a), Day(-5));
        assert_eq!(keys::day_of_daily_key(&b), Day(3));
    }

    #[test]
    fn refuses_another_format_version() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config {
            pipeline: Default::default(),
            experiments: vec![],
        };
        drop(Store::open(dir.path(), &cfg).unwrap());
        {
            let db = raw_db(&dir.path().join("db"));
            db.insert(META_FORMAT, &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path(), &cfg).err().unwrap();
        assert!(err.to_string().contains("format version 99"), "{err}");
    }

    fn empty_config() -> Config {
        Config {
            pipeline: Default::default(),
            experiments: vec![],
        }
    }

    fn day_with(events: u32) -> DailyRecord {
        let mut r = DailyRecord::default();
        for _ in 0..events {
            r.add_event(&[], 0, &[]);
        }
        r
    }

    fn events_of(store: &Store, client: &str) -> Vec<(i32, u32)> {
        let mut out = Vec::new();
        store
            .client_days(0, client, Day(i32::MIN), Day(i32::MAX), &mut out)
            .unwrap();
        out.iter()
            .map(|(d, r)| {
                (
                    d.0,
                    r.groups
                        .iter()
                        .flat_map(|g| &g.sources)
                        .map(|s| s.events)
                        .sum(),
                )
            })
            .collect()
    }

    /// Writes a segment as the fold does: the file, then its `L` entry in a batch.
    fn write(store: &Store, daily: &[(&str, i32, u32)]) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let records: Vec<DailyRecord> = daily.iter().map(|d| day_with(d.2)).collect();
        let mut seg = SegmentOut::default();
        for (d, r) in daily.iter().zip(&records) {
            seg.daily.push((0, d.0, d.1, r));
        }
        let bytes = encode(&seg);
        let (k, v) = store.write_segment(&bytes).unwrap();
        let mut batch = sled::Batch::default();
        batch.insert(k.clone(), v.clone());
        store.apply(batch).unwrap();
        store.segment_written();
        (k, v, bytes)
    }

    #[test]
    fn compaction_merges_segments_into_client_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        write(&store, &[("a", 10, 2), ("b", 10, 1)]);
        write(&store, &[("a", 10, 3), ("a", 12, 1)]);
        assert_eq!(store.pending_segments(), 2);
        assert!(events_of(&store, "a").is_empty(), "read before merging");
        assert_eq!(store.compact_all().unwrap(), 2);
        assert_eq!(store.pending_segments(), 0);
        assert_eq!(events_of(&store, "a"), vec![(10, 5), (12, 1)]);
        assert_eq!(events_of(&store, "b"), vec![(10, 1)]);
        // The merged segments' files are gone.
        let files = std::fs::read_dir(dir.path().join(LOG_DIR)).unwrap().count();
        assert_eq!(files, 0);
        // A later segment adds to the merged records.
        write(&store, &[("b", 11, 4)]);
        store.compact_all().unwrap();
        assert_eq!(events_of(&store, "b"), vec![(10, 1), (11, 4)]);
    }

    #[test]
    fn a_segment_merged_but_not_removed_is_not_counted_twice() {
        // A crash after the merged records were written but before the segment was
        // removed leaves both: the next compaction must skip what the records hold.
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        let (k, v, bytes) = write(&store, &[("a", 10, 2)]);
        store.compact_all().unwrap();
        assert_eq!(events_of(&store, "a"), vec![(10, 2)]);
        // Put the segment back, as the crash would have left it, with a newer one.
        std::fs::write(
            dir.path()
                .join(LOG_DIR)
                .join(format!("{:016x}.seg", log_seq(&k))),
            &bytes,
        )
        .unwrap();
        let mut batch = sled::Batch::default();
        batch.insert(k, v);
        store.apply(batch).unwrap();
        drop(store);
        let store = reopen(dir.path());
        write(&store, &[("a", 10, 1), ("c", 3, 1)]);
        assert_eq!(store.compact_all().unwrap(), 2);
        assert_eq!(events_of(&store, "a"), vec![(10, 3)]);
        assert_eq!(events_of(&store, "c"), vec![(3, 1)]);
    }

    #[test]
    fn sequence_numbers_continue_after_a_restart_with_an_empty_log() {
        // Records say "every segment below N is merged": a segment numbered below that
        // after a restart would be skipped, and its deltas lost.
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        write(&store, &[("a", 1, 1)]);
        write(&store, &[("a", 1, 1)]);
        store.compact_all().unwrap();
        drop(store);
        let store = reopen(dir.path());
        let (k, _, _) = write(&store, &[("a", 1, 5)]);
        assert_eq!(log_seq(&k), 2);
        store.compact_all().unwrap();
        assert_eq!(events_of(&store, "a"), vec![(1, 7)]);
    }

    #[test]
    fn a_version_1_store_is_migrated_in_place() {
        // Version 1: bare enrollment values and one `D` key per client and day.
        let dir = tempfile::tempdir().unwrap();
        drop(reopen(dir.path()));
        {
            let db = raw_db(&dir.path().join("db"));
            let enrollment = EnrollmentRecord {
                num_exposure_events: 3,
                ..Default::default()
            };
            db.insert(keys::enrollment("exp", 0, "a"), encode(&enrollment))
                .unwrap();
            db.insert(keys::daily(0, "a", Day(5)), encode(&day_with(2)))
                .unwrap();
            db.insert(keys::daily(0, "a", Day(-1)), encode(&day_with(1)))
                .unwrap();
            db.insert(keys::daily(0, "b", Day(5)), encode(&day_with(4)))
                .unwrap();
            db.insert(META_FORMAT, &1u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        std::fs::write(dir.path().join(FORMAT_FILE), "1\n").unwrap();
        let store = reopen(dir.path());
        let e: Vec<_> = store.enrollments("exp").map(|e| e.unwrap()).collect();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].client_id, "a");
        assert_eq!(e[0].record.num_exposure_events, 3);
        assert_eq!(events_of(&store, "a"), vec![(-1, 1), (5, 2)]);
        assert_eq!(events_of(&store, "b"), vec![(5, 4)]);
        assert_eq!(
            store.db.get(META_FORMAT).unwrap().unwrap().as_ref(),
            &FORMAT_VERSION.to_be_bytes()
        );
        assert!(store.db.scan_prefix(b"D").next().is_none());
        assert!(store.db.scan_prefix(b"C").next().is_none());
        drop(store);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(),
            "3\n"
        );
        // A second open changes nothing.
        let store = reopen(dir.path());
        assert_eq!(events_of(&store, "a"), vec![(-1, 1), (5, 2)]);
        let e: Vec<_> = store.enrollments("exp").map(|e| e.unwrap()).collect();
        assert_eq!(e[0].record.num_exposure_events, 3);
    }

    #[test]
    fn a_version_2_store_is_split_into_buckets() {
        // Version 2: one `C` value per client with all its days and its delta-log mark.
        let dir = tempfile::tempdir().unwrap();
        drop(reopen(dir.path()));
        {
            let db = raw_db(&dir.path().join("db"));
            let mut rec = ClientRecord {
                merged_below: 4,
                days: Vec::new(),
            };
            for (day, n) in [(-8, 1), (-1, 2), (0, 3), (6, 4), (7, 5), (20, 6)] {
                rec.merge_day(day, day_with(n));
            }
            db.insert(keys::client(0, "a"), encode(&rec)).unwrap();
            db.insert(META_FORMAT, &2u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        std::fs::write(dir.path().join(FORMAT_FILE), "2\n").unwrap();
        let store = reopen(dir.path());
        let all = vec![(-8, 1), (-1, 2), (0, 3), (6, 4), (7, 5), (20, 6)];
        assert_eq!(events_of(&store, "a"), all);
        assert!(store.db.scan_prefix(b"C").next().is_none());
        // Buckets -2, -1, 0, 1 and 2, each with the record's mark.
        let buckets: Vec<(Vec<u8>, ClientRecord)> = store
            .db
            .scan_prefix(b"W")
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), decode(&k, &v).unwrap())
            })
            .collect();
        assert_eq!(buckets.len(), 5);
        assert!(buckets.iter().all(|(_, r)| r.merged_below == 4));
        assert_eq!(buckets[2].0, keys::client_bucket(0, "a", 0));
        assert_eq!(buckets[2].1.days.len(), 2); // days 0 and 6
                                                // A second open changes nothing.
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FORMAT_FILE)).unwrap(),
            "3\n"
        );
        assert_eq!(events_of(&store, "a"), all);
    }

    #[test]
    fn a_range_of_days_reads_only_its_buckets_and_its_client() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        write(
            &store,
            &[("a", -1, 1), ("a", 0, 2), ("a", 13, 3), ("a", 14, 4)],
        );
        // A client whose id extends "a" with a NUL sorts among "a"'s buckets ("n" is
        // 0x6e, inside the bucket bytes of the widest range of days).
        write(&store, &[("a\0n", 6, 9), ("b", 0, 7)]);
        store.compact_all().unwrap();
        let days = |from: i32, to: i32| {
            let mut out = Vec::new();
            store
                .client_days(0, "a", Day(from), Day(to), &mut out)
                .unwrap();
            out.iter()
                .map(|(d, r)| (d.0, r.groups[0].sources[0].events))
                .collect::<Vec<_>>()
        };
        assert_eq!(days(0, 0), vec![(0, 2)]);
        assert_eq!(days(-1, 13), vec![(-1, 1), (0, 2), (13, 3)]);
        assert_eq!(days(1, 12), vec![]);
        assert_eq!(days(13, 100), vec![(13, 3), (14, 4)]);
        assert_eq!(days(5, 4), vec![]);
        assert_eq!(events_of(&store, "b"), vec![(0, 7)]);
        assert_eq!(
            events_of(&store, "a"),
            vec![(-1, 1), (0, 2), (13, 3), (14, 4)]
        );
        assert_eq!(events_of(&store, "a\0n"), vec![(6, 9)]);
    }

    #[test]
    fn orphan_and_damaged_segment_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopen(dir.path());
        // A file whose batch never landed (a crash in between): removed at the next open,
        // and its sequence number is not reused.
        let orphan = store.write_segment(b"never referenced").unwrap().0;
        let (k, _, _) = write(&store, &[("a", 1, 1)]);
        drop(store);
        let store = reopen(dir.path());
        let name = |key: &[u8]| {
            dir.path()
                .join(LOG_DIR)
                .join(format!("{:016x}.seg", log_seq(key)))
        };
        assert!(!name(&orphan).exists());
        assert!(name(&k).exists());
        // A damaged file is an error that names it, never a silent loss.
        std::fs::write(name(&k), b"garbage").unwrap();
        let err = store.compact_all().unwrap_err().to_string();
        assert!(err.contains(".seg") && err.contains("checksum"), "{err}");
    }
}
