//! Hostile input (issue 8, point 4): bounded property tests of the event decoders, the
//! config parser and the bounded line reader. No panic, every error is a typed reject or
//! a config problem with a file and a message, and no unbounded allocation.
//!
//! Every property runs a fixed number of cases (see `cases` in each `check` call).
//! `HOSTILE_INPUT_SCALE=N` multiplies them for a longer fuzz run (e.g. a nightly job).
//! The seed is fixed by default (CI runs the same cases every time); `HOSTILE_INPUT_SEED=random`
//! explores new cases and `HOSTILE_INPUT_SEED=N` replays a run. Run with `--nocapture`
//! to see the cases and time per property.
//!
//! Allocation is measured with a counting global allocator (per thread, so the tests
//! may run in parallel): `peak_alloc` reports the largest number of bytes live at once
//! while a closure ran, above what was live when it started.

use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::fmt::Debug;
use std::io::{BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed, TestCaseError, TestRunner};

/// The seed CI runs with (see `rng_seed` below).
const DEFAULT_SEED: u64 = 0x5eed_2026_1123;

use slipstream::config::{self, SegmentClause};
use slipstream::event::{
    decode_json, decode_protobuf, encode_protobuf, format_timestamp, EnrollmentEvent,
    EnrollmentKind, Event, Kind, RejectReason, TelemetryEvent, Timestamp,
};
use slipstream::ingest::file::read_line_bounded;

// ---- counting allocator --------------------------------------------------------------

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn account(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            account(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        account(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            // Counted as a copy: old and new block live at once, then the old one goes.
            account(new_size as isize);
            account(-(l.size() as isize));
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result with the peak of bytes allocated (and live at once) on
/// this thread while it ran, above what was live before.
fn peak_alloc<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(|l| l.get());
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(|p| p.get());
    (r, (peak - base).max(0) as usize)
}

// ---- runner --------------------------------------------------------------------------

thread_local! {
    /// Outcomes of the decodes of the running property: `ok` or a reject reason.
    static OUTCOMES: std::cell::RefCell<std::collections::BTreeMap<&'static str, u64>> =
        const { std::cell::RefCell::new(std::collections::BTreeMap::new()) };
}

fn record(outcome: &'static str) {
    OUTCOMES.with(|o| *o.borrow_mut().entry(outcome).or_default() += 1);
}

fn scale() -> u32 {
    std::env::var("HOSTILE_INPUT_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Runs one property for `cases` generated inputs (times `HOSTILE_INPUT_SCALE`), prints
/// how many executions ran and how long it took, and fails with the shrunk input.
fn check<S>(
    name: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let config = ProptestConfig {
        cases: cases * scale(),
        failure_persistence: None, // no regression files written into the repo
        max_shrink_iters: 2_000,
        // A fixed seed by default, so CI runs the same cases every time (a red run must
        // mean a regression); HOSTILE_INPUT_SEED=random explores, =N replays a run.
        rng_seed: match std::env::var("HOSTILE_INPUT_SEED").ok().as_deref() {
            Some("random") => RngSeed::Random,
            Some(s) => RngSeed::Fixed(s.parse().expect("HOSTILE_INPUT_SEED: a number or `random`")),
            None => RngSeed::Fixed(DEFAULT_SEED),
        },
        ..ProptestConfig::default()
    };
    let runs = AtomicU64::new(0);
    OUTCOMES.with(|o| o.borrow_mut().clear());
    let start = Instant::now();
    let mut runner = TestRunner::new(config);
    let result = runner.run(&strategy, |v| {
        runs.fetch_add(1, Ordering::Relaxed);
        test(v)
    });
    let runs = runs.load(Ordering::Relaxed);
    let outcomes = OUTCOMES.with(|o| {
        o.borrow()
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    eprintln!(
        "hostile_input: {name}: {runs} executions ({} cases asked) in {:.2?}{}",
        cases * scale(),
        start.elapsed(),
        if outcomes.is_empty() {
            String::new()
        } else {
            format!("; outcomes: {outcomes}")
        }
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

// ---- valid events --------------------------------------------------------------------

const MAX: usize = 1 << 20;
/// 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: the range RFC 3339 can write.
const MIN_SECS: i64 = -62_167_219_200;
const MAX_SECS: i64 = 253_402_300_799;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9-]{1,16}",
        2 => "\\PC{1,12}",
        1 => "(?s).{1,12}", // any char, control characters included
    ]
}

fn pairs() -> impl Strategy<Value = Vec<(Cow<'static, str>, Cow<'static, str>)>> {
    // Sorted and unique: protobuf maps carry no order and no duplicates.
    btree_map(text(), text(), 0..5).prop_map(|m| {
        m.into_iter()
            .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
            .collect()
    })
}

fn timestamp() -> impl Strategy<Value = Timestamp> {
    prop_oneof![
        (MIN_SECS..=MAX_SECS),
        // mostly the years the service really sees
        (1_700_000_000i64..2_000_000_000),
    ]
    .prop_map(|s| Timestamp(s * 1_000_000))
}

fn metric_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>().prop_filter("finite", |x| x.is_finite()),
        (-1_000_000i64..1_000_000).prop_map(|i| i as f64),
        (0.0f64..1000.0),
    ]
}

fn valid_event() -> impl Strategy<Value = Event<'static>> {
    let enrollment = (
        text(),
        text(),
        text(),
        prop_oneof![
            Just(EnrollmentKind::Enroll),
            Just(EnrollmentKind::Unenroll),
            Just(EnrollmentKind::Exposure)
        ],
        timestamp(),
        pairs(),
    )
        .prop_map(|(c, e, b, kind, ts, dims)| {
            Event::Enrollment(EnrollmentEvent {
                client_id: c.into(),
                experiment: e.into(),
                branch: b.into(),
                kind,
                timestamp: ts,
                dimensions: dims,
            })
        });
    let telemetry = (
        text(),
        timestamp(),
        prop_oneof![Just("main".to_string()), text()],
        pairs(),
        pairs(),
        btree_map(text(), metric_value(), 0..6),
    )
        .prop_map(|(c, ts, ds, exps, dims, metrics)| {
            Event::Telemetry(TelemetryEvent {
                client_id: c.into(),
                submission_timestamp: ts,
                data_source: ds.into(),
                experiments: exps,
                dimensions: dims,
                metrics: metrics.into_iter().map(|(k, v)| (k.into(), v)).collect(),
            })
        });
    prop_oneof![enrollment, telemetry]
}

/// Metric values must come back exactly (the crate enables serde_json's `float_roundtrip`
/// feature); -0.0 equals 0.0, which protobuf does not distinguish.
fn same_event(a: &Event<'_>, b: &Event<'_>) -> bool {
    match (a, b) {
        (Event::Telemetry(x), Event::Telemetry(y)) => {
            x.client_id == y.client_id
                && x.submission_timestamp == y.submission_timestamp
                && x.data_source == y.data_source
                && x.experiments == y.experiments
                && x.dimensions == y.dimensions
                && x.metrics.len() == y.metrics.len()
                && x.metrics
                    .iter()
                    .zip(&y.metrics)
                    .all(|((k1, v1), (k2, v2))| k1 == k2 && v1 == v2)
        }
        _ => a == b,
    }
}

fn kind_of(e: &Event<'_>) -> Kind {
    match e {
        Event::Enrollment(_) => Kind::Enrollment,
        Event::Telemetry(_) => Kind::Telemetry,
    }
}

fn js(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).unwrap()
}

fn js_pairs(p: &[(Cow<'_, str>, Cow<'_, str>)]) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (k, v)) in p.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(js(k));
        out.push(b':');
        out.extend(js(v));
    }
    out.push(b'}');
    out
}

/// The JSON fields of an event, as (key, raw JSON value), in contract order.
fn json_fields(e: &Event<'_>, omit_default_data_source: bool) -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = Vec::new();
    match e {
        Event::Enrollment(e) => {
            f.push(("client_id".into(), js(&e.client_id)));
            f.push(("experiment".into(), js(&e.experiment)));
            f.push(("branch".into(), js(&e.branch)));
            let kind = match e.kind {
                EnrollmentKind::Enroll => "enroll",
                EnrollmentKind::Unenroll => "unenroll",
                EnrollmentKind::Exposure => "exposure",
            };
            f.push(("event".into(), js(kind)));
            f.push(("timestamp".into(), js(&format_timestamp(e.timestamp))));
            f.push(("dimensions".into(), js_pairs(&e.dimensions)));
        }
        Event::Telemetry(t) => {
            f.push(("client_id".into(), js(&t.client_id)));
            f.push((
                "submission_timestamp".into(),
                js(&format_timestamp(t.submission_timestamp)),
            ));
            if !(omit_default_data_source && t.data_source == "main") {
                f.push(("data_source".into(), js(&t.data_source)));
            }
            f.push(("experiments".into(), js_pairs(&t.experiments)));
            f.push(("dimensions".into(), js_pairs(&t.dimensions)));
            let mut m = b"{".to_vec();
            for (i, (k, v)) in t.metrics.iter().enumerate() {
                if i > 0 {
                    m.push(b',');
                }
                m.extend(js(k));
                m.push(b':');
                m.extend(serde_json::to_vec(v).unwrap());
            }
            m.push(b'}');
            f.push(("metrics".into(), m));
        }
    }
    f
}

fn render(fields: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = b"{".to_vec();
    for (i, (k, v)) in fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend(js(k));
        out.push(b':');
        out.extend(v);
    }
    out.push(b'}');
    out
}

// ---- shared assertions ---------------------------------------------------------------

/// What a decoded event must satisfy whatever the input was.
fn check_decoded(e: &Event<'_>) -> Result<(), TestCaseError> {
    match e {
        Event::Enrollment(e) => {
            prop_assert!(
                !e.client_id.is_empty() && !e.experiment.is_empty() && !e.branch.is_empty()
            );
        }
        Event::Telemetry(t) => {
            prop_assert!(!t.client_id.is_empty() && !t.data_source.is_empty());
            prop_assert!(
                t.metrics.iter().all(|(_, v)| v.is_finite()),
                "{:?}",
                t.metrics
            );
        }
    }
    Ok(())
}

const JSON_REASONS: [RejectReason; 6] = [
    RejectReason::InvalidJson,
    RejectReason::MissingField,
    RejectReason::BadTimestamp,
    RejectReason::BadValue,
    RejectReason::Oversized,
    RejectReason::UnknownEventKind,
];
const PROTO_REASONS: [RejectReason; 6] = [
    RejectReason::InvalidProtobuf,
    RejectReason::MissingField,
    RejectReason::BadTimestamp,
    RejectReason::BadValue,
    RejectReason::Oversized,
    RejectReason::UnknownEventKind,
];

fn check_json(bytes: &[u8], kind: Kind, max: usize) -> Result<Option<RejectReason>, TestCaseError> {
    let r = decode_json(bytes, kind, max);
    record(
        r.as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.reason.as_str()),
    );
    match r {
        Ok(e) => {
            prop_assert!(bytes.len() <= max);
            check_decoded(&e)?;
            Ok(None)
        }
        Err(r) => {
            prop_assert!(JSON_REASONS.contains(&r.reason), "{r:?}");
            prop_assert!(!r.detail.is_empty(), "{r:?}");
            prop_assert_eq!(
                r.reason == RejectReason::Oversized,
                bytes.len() > max,
                "{:?}",
                r
            );
            Ok(Some(r.reason))
        }
    }
}

fn check_proto(
    bytes: &[u8],
    kind: Kind,
    max: usize,
) -> Result<Option<RejectReason>, TestCaseError> {
    let r = decode_protobuf(bytes, kind, max);
    record(
        r.as_ref()
            .map(|_| "ok")
            .unwrap_or_else(|e| e.reason.as_str()),
    );
    match r {
        Ok(e) => {
            prop_assert!(bytes.len() <= max);
            check_decoded(&e)?;
            Ok(None)
        }
        Err(r) => {
            prop_assert!(PROTO_REASONS.contains(&r.reason), "{r:?}");
            prop_assert!(!r.detail.is_empty(), "{r:?}");
            prop_assert_eq!(
                r.reason == RejectReason::Oversized,
                bytes.len() > max,
                "{:?}",
                r
            );
            Ok(Some(r.reason))
        }
    }
}

fn any_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Enrollment),
        Just(Kind::Telemetry),
        Just(Kind::Any)
    ]
}

// ---- JSON ----------------------------------------------------------------------------

#[test]
fn json_arbitrary_bytes() {
    let bytes = prop_oneof![
        vec(any::<u8>(), 0..300),
        // mostly JSON punctuation and field names, so the parser gets further
        vec(
            prop_oneof![
                Just(b"{".to_vec()),
                Just(b"}".to_vec()),
                Just(b"[".to_vec()),
                Just(b"]".to_vec()),
                Just(b":".to_vec()),
                Just(b",".to_vec()),
                Just(b"\"".to_vec()),
                Just(b"\\u".to_vec()),
                Just(b"\"client_id\"".to_vec()),
                Just(b"\"event\"".to_vec()),
                Just(b"\"metrics\"".to_vec()),
                Just(b"\"submission_timestamp\"".to_vec()),
                Just(b"\"dimensions\"".to_vec()),
                Just(b"1e999".to_vec()),
                Just(b"-0".to_vec()),
                Just(b"null".to_vec()),
                Just(b"true".to_vec()),
                vec(any::<u8>(), 1..4),
            ],
            0..40
        )
        .prop_map(|v| v.concat()),
    ];
    check(
        "decode_json(arbitrary bytes)",
        3000,
        (
            bytes,
            any_kind(),
            prop_oneof![1 => 0usize..400, 2 => Just(MAX)],
        ),
        |(b, kind, max)| check_json(&b, kind, max).map(|_| ()),
    );
}

const FIELDS: [&str; 10] = [
    "client_id",
    "experiment",
    "branch",
    "event",
    "timestamp",
    "submission_timestamp",
    "data_source",
    "experiments",
    "dimensions",
    "metrics",
];

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from), // non-finite become null
        ".{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("enroll"),
            Just("exposure"),
            Just("2026-11-01T00:00:00Z"),
            Just("2026-11-01T00:00:00.5+02:00"),
            Just("9999-12-31T23:59:59Z"),
            Just("0000-01-01T00:00:00Z"),
            Just("2026-02-30T00:00:00Z"),
            Just("2026-11-01T24:00:00Z"),
            Just("+262143-12-31T23:59:59Z"),
            Just("-262144-01-01T00:00:00Z"),
            Just("2026-11-01T00:00:60Z"),
            Just("")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 40, 6, |inner| {
        let key = prop_oneof![
            proptest::sample::select(&FIELDS[..]).prop_map(String::from),
            ".{0,6}"
        ];
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::Array),
            btree_map(key, inner, 0..6).prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn json_arbitrary_values() {
    let key = prop_oneof![3 => proptest::sample::select(&FIELDS[..]).prop_map(String::from), 1 => ".{0,8}"];
    let top = prop_oneof![
        4 => btree_map(key, json_value(), 0..10).prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        1 => json_value(),
    ];
    check(
        "decode_json(arbitrary JSON values)",
        2000,
        (top, any_kind()),
        |(v, kind)| {
            let bytes = serde_json::to_vec(&v).unwrap();
            let r = check_json(&bytes, kind, MAX)?;
            // Syntactically valid JSON is `invalid_json` only when it is not an object or a
            // known field has the wrong type (e.g. `"client_id": false`, `"dimensions": []`).
            if r == Some(RejectReason::InvalidJson) {
                let wrong_type = match &v {
                    serde_json::Value::Object(m) => m.iter().any(|(k, x)| match k.as_str() {
                        "experiments" | "dimensions" | "metrics" => !(x.is_object() || x.is_null()),
                        k if FIELDS.contains(&k) => !(x.is_string() || x.is_null()),
                        _ => false,
                    }),
                    _ => true,
                };
                prop_assert!(
                    wrong_type,
                    "valid JSON object rejected as invalid_json: {}",
                    v
                );
            }
            Ok(())
        },
    );
}

#[test]
fn json_valid_events_decode() {
    check(
        "decode_json(valid event) == event",
        1000,
        (
            valid_event(),
            any::<bool>(),
            any::<bool>(),
            any::<u8>(),
            prop_oneof![Just(0i64), 1i64..1_000_000],
        ),
        |(mut event, specific_kind, omit_main, extra, micros)| {
            // sub-second timestamps go through chrono's RFC 3339 parser
            if micros > 0 {
                match &mut event {
                    Event::Enrollment(e) => e.timestamp.0 += micros,
                    Event::Telemetry(t) => t.submission_timestamp.0 += micros,
                }
            }
            let mut fields = json_fields(&event, omit_main);
            if micros > 0 {
                let at = fields
                    .iter_mut()
                    .find(|(k, _)| k.ends_with("timestamp"))
                    .unwrap();
                let t = chrono::DateTime::from_timestamp_micros(event.timestamp().0).unwrap();
                at.1 = js(&t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string());
            }
            // unknown fields are ignored, wherever they are
            if extra % 3 == 0 {
                let at = usize::from(extra) % (fields.len() + 1);
                fields.insert(
                    at,
                    (
                        "x_unknown".into(),
                        br#"{"a":[1,2,{"b":null}],"c":1e308}"#.to_vec(),
                    ),
                );
            }
            let bytes = render(&fields);
            let kind = if specific_kind {
                kind_of(&event)
            } else {
                Kind::Any
            };
            let decoded = decode_json(&bytes, kind, MAX).map_err(|r| {
                TestCaseError::fail(format!("{r} for {}", String::from_utf8_lossy(&bytes)))
            })?;
            prop_assert!(
                same_event(&decoded, &event),
                "{:?} != {:?} for {}",
                decoded,
                event,
                String::from_utf8_lossy(&bytes)
            );
            // exactly at the limit still decodes
            prop_assert!(decode_json(&bytes, kind, bytes.len()).is_ok());
            Ok(())
        },
    );
}

/// Strings that are wrong for the field they land in: bad timestamps and event kinds,
/// empty, control characters, escapes.
fn hostile_string() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(""),
        Just("enrol"),
        Just("ENROLL"),
        Just("enroll "),
        Just("exposure"),
        Just("unenroll"),
        Just("2026-11-01T00:00:00Z"),
        Just("2026-11-01T00:00:00.123456789Z"),
        Just("2026-11-01T00:00:00+14:00"),
        Just("2026-11-01 00:00:00Z"),
        Just("2026-11-01t00:00:00z"),
        Just("2026-13-01T00:00:00Z"),
        Just("2026-02-29T00:00:00Z"),
        Just("2028-02-29T00:00:00Z"),
        Just("2026-11-01T23:59:60Z"),
        Just("2026-11-01T00:00:00"),
        Just("2026-11-01"),
        Just("1730000000"),
        Just("0000-00-00T00:00:00Z"),
        Just("9999-99-99T99:99:99Z"),
        Just("2026-11-01T00:00:00-00:00"),
        Just("\\u0000"),
        Just("main"),
        Just("\\ud83d\\ude00"),
        Just("2026-11-01T00:00:00\\u0000Z"),
    ]
    .prop_map(|s| format!("\"{s}\"").into_bytes())
}

/// Replacement values for a field: type swaps, huge numbers, deep nesting, long strings,
/// invalid UTF-8, NaN-like literals, bad timestamps.
fn hostile_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"null".to_vec()),
        Just(b"true".to_vec()),
        Just(b"0".to_vec()),
        Just(b"-0".to_vec()),
        Just(b"1e999".to_vec()),
        Just(b"-1e999".to_vec()),
        Just(b"1e-999".to_vec()),
        Just(b"123456789012345678901234567890".to_vec()),
        Just(b"18446744073709551616".to_vec()),
        Just(b"-9223372036854775809".to_vec()),
        Just(b"1.7976931348623157e308".to_vec()),
        Just(b"NaN".to_vec()),
        Just(b"nan".to_vec()),
        Just(b"Infinity".to_vec()),
        Just(b"-Infinity".to_vec()),
        Just(b"\"NaN\"".to_vec()),
        Just(b"\"inf\"".to_vec()),
        Just(b"[]".to_vec()),
        Just(b"{}".to_vec()),
        Just(b"\"\"".to_vec()),
        Just(b"\"\\ud800\"".to_vec()),
        Just(b"\"\\u0000\"".to_vec()),
        Just(b"\"\\udbff\\udfff\"".to_vec()),
        Just(b"\"\xff\xfe\"".to_vec()),
        Just(b"\"\xc3\x28\"".to_vec()),
        Just(b"\"\xed\xa0\x80\"".to_vec()),
        Just(b"\"2026-11-01T00:00:00\xffZ\"".to_vec()),
        Just(b"\"+262143-12-31T23:59:59Z\"".to_vec()),
        Just(b"\"2026-11-01T00:00:00.999999999999Z\"".to_vec()),
        Just(b"\"2026-11-01T00:00:00+99:99\"".to_vec()),
        Just(b"\"9999-12-31T23:59:59-23:59\"".to_vec()),
        Just(b"\"0000-01-01T00:00:00+23:59\"".to_vec()),
        Just(br#"{"a":1,"a":"x","b":[1,{"c":null}],"d":1e999}"#.to_vec()),
        Just(br#"{"x":1e308,"y":-1e308,"z":true,"n":null,"s":"v"}"#.to_vec()),
        Just(br#"{"k":["v"],"l":{"m":"n"}}"#.to_vec()),
        // deep nesting, up past serde_json's recursion limit
        (1usize..400).prop_map(|d| [vec![b'['; d], vec![b']'; d]].concat()),
        (1usize..300).prop_map(|d| [b"{\"a\":".repeat(d), b"1".to_vec(), vec![b'}'; d]].concat()),
        (1usize..300).prop_map(|d| [
            b"{\"k\":".to_vec(),
            vec![b'['; d],
            vec![b']'; d],
            b"}".to_vec()
        ]
        .concat()),
        // long strings, plain and escaped
        (0usize..20_000).prop_map(|n| [b"\"".to_vec(), vec![b'x'; n], b"\"".to_vec()].concat()),
        (0usize..2_000)
            .prop_map(|n| [b"\"".to_vec(), b"\\u00e9".repeat(n), b"\"".to_vec()].concat()),
        any::<f64>().prop_map(|x| format!("{x:e}").into_bytes()),
        any::<i128>().prop_map(|x| x.to_string().into_bytes()),
        ".{0,10}".prop_map(|s| js(&s)),
        vec(any::<u8>(), 0..12),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize),
    Replace(usize, Vec<u8>),
    /// Replace one inner value of an object-valued field (dimensions, metrics, ...).
    ReplaceInner(usize, Vec<u8>),
    Duplicate(usize),
    Add(String, Vec<u8>),
    Swap(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        2 => any::<usize>().prop_map(Mutation::Delete),
        4 => (any::<usize>(), hostile_value()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        4 => (any::<usize>(), hostile_string()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        3 => (any::<usize>(), hostile_value()).prop_map(|(i, v)| Mutation::ReplaceInner(i, v)),
        1 => any::<usize>().prop_map(Mutation::Duplicate),
        1 => (proptest::sample::select(&FIELDS[..]).prop_map(String::from), hostile_value())
            .prop_map(|(k, v)| Mutation::Add(k, v)),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Mutation::Swap(a, b)),
    ]
}

fn apply(fields: &mut Vec<(String, Vec<u8>)>, m: &Mutation) {
    let n = fields.len();
    if n == 0 {
        if let Mutation::Add(k, v) = m {
            fields.push((k.clone(), v.clone()));
        }
        return;
    }
    match m {
        Mutation::Delete(i) => {
            fields.remove(i % n);
        }
        Mutation::Replace(i, v) => fields[i % n].1 = v.clone(),
        Mutation::ReplaceInner(i, v) => {
            let f = &mut fields[i % n].1;
            // `{"k":"v",...}` -> `{"k":<v>,...}` for the first entry, or add one.
            if f.first() == Some(&b'{') {
                let pos = f.iter().position(|&c| c == b':');
                let end = pos.and_then(|p| {
                    let mut in_str = false;
                    let mut esc = false;
                    (p + 1..f.len()).find(|&j| {
                        let c = f[j];
                        if esc {
                            esc = false;
                        } else if c == b'\\' {
                            esc = true;
                        } else if c == b'"' {
                            in_str = !in_str;
                        } else if !in_str && (c == b',' || c == b'}') {
                            return true;
                        }
                        false
                    })
                });
                match (pos, end) {
                    (Some(p), Some(e)) => {
                        f.splice(p + 1..e, v.iter().copied());
                    }
                    _ => *f = [b"{\"k\":".to_vec(), v.clone(), b"}".to_vec()].concat(),
                }
            } else {
                *f = [b"{\"k\":".to_vec(), v.clone(), b"}".to_vec()].concat();
            }
        }
        Mutation::Duplicate(i) => {
            let f = fields[i % n].clone();
            fields.push(f);
        }
        Mutation::Add(k, v) => fields.push((k.clone(), v.clone())),
        Mutation::Swap(a, b) => {
            let (a, b) = (a % n, b % n);
            let va = fields[a].1.clone();
            fields[a].1 = fields[b].1.clone();
            fields[b].1 = va;
        }
    }
}

const REQUIRED_ENROLLMENT: [&str; 5] = ["client_id", "experiment", "branch", "event", "timestamp"];
const REQUIRED_TELEMETRY: [&str; 2] = ["client_id", "submission_timestamp"];

#[test]
fn json_mutated_valid_events() {
    check(
        "decode_json(mutated valid event)",
        3000,
        (
            valid_event(),
            vec(mutation(), 1..3),
            any::<bool>(),
            any::<(u16, u8)>(),
        ),
        |(event, mutations, specific_kind, (cut, flip))| {
            let original = json_fields(&event, false);
            let mut fields = original.clone();
            for m in &mutations {
                apply(&mut fields, m);
            }
            let kind = if specific_kind {
                kind_of(&event)
            } else {
                Kind::Any
            };
            let bytes = render(&fields);
            let r = check_json(&bytes, kind, MAX)?;
            // Deleting a required field of the topic's kind is a missing_field reject.
            if let [Mutation::Delete(i)] = mutations.as_slice() {
                let deleted = &original[i % original.len()].0;
                let required: &[&str] = match event {
                    Event::Enrollment(_) => &REQUIRED_ENROLLMENT,
                    Event::Telemetry(_) => &REQUIRED_TELEMETRY,
                };
                if specific_kind && required.contains(&deleted.as_str()) {
                    prop_assert_eq!(r, Some(RejectReason::MissingField), "deleted {}", deleted);
                }
            }
            // And, one case in four, byte-level damage on top: truncation and a flipped byte.
            if flip % 4 != 0 {
                return Ok(());
            }
            let mut damaged = bytes.clone();
            damaged.truncate(usize::from(cut) % (bytes.len() + 1));
            if !damaged.is_empty() {
                let at = usize::from(flip) % damaged.len();
                damaged[at] ^= flip | 1;
            }
            check_json(&damaged, kind, MAX)?;
            Ok(())
        },
    );
}

#[test]
fn json_oversized_is_rejected_without_parsing() {
    check(
        "decode_json(over max_bytes) is oversized, unparsed",
        500,
        (valid_event(), 1usize..64, vec(any::<u8>(), 0..2000)),
        |(event, under, garbage)| {
            for bytes in [render(&json_fields(&event, false)), garbage] {
                if bytes.is_empty() {
                    continue;
                }
                let max = bytes.len().saturating_sub(under);
                let (r, alloc) = peak_alloc(|| decode_json(&bytes, Kind::Any, max).map(|_| ()));
                prop_assert_eq!(r.unwrap_err().reason, RejectReason::Oversized);
                // only the detail message: nothing proportional to the input
                prop_assert!(alloc < 256, "{} bytes allocated", alloc);
                let (r, alloc) =
                    peak_alloc(|| decode_protobuf(&bytes, Kind::Telemetry, max).map(|_| ()));
                prop_assert_eq!(r.unwrap_err().reason, RejectReason::Oversized);
                prop_assert!(alloc < 256, "{} bytes allocated", alloc);
            }
            Ok(())
        },
    );
}

/// Worst cases of allocation for a 1 MiB input at the default 1 MiB limit: each shape is
/// built up to the limit and decoded; the peak of live bytes must stay linear in the
/// input, at most `ALLOC_FACTOR` times it (override the limit in bytes with
/// `HOSTILE_INPUT_ALLOC_LIMIT`). Measured peaks are printed with `--nocapture`.
#[test]
fn json_allocation_is_bounded_at_the_limit() {
    let head = br#"{"client_id":"c","submission_timestamp":"2026-11-01T00:00:00Z","#;
    let fill = |prefix: &[u8], unit: &[u8], suffix: &[u8]| -> Vec<u8> {
        let n = (MAX - head.len() - prefix.len() - suffix.len()) / unit.len();
        let mut v = Vec::with_capacity(MAX);
        v.extend_from_slice(head);
        v.extend_from_slice(prefix);
        for _ in 0..n {
            v.extend_from_slice(unit);
        }
        // units end with a comma: drop the last one so the JSON is valid
        if v.last() == Some(&b',') {
            v.pop();
        }
        v.extend_from_slice(suffix);
        assert!(v.len() <= MAX);
        v
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "whitespace",
            [
                head.as_slice(),
                &vec![b' '; MAX - head.len() - 14],
                br#""x_unknown":1}"#,
            ]
            .concat(),
        ),
        (
            "unknown field [0,0,...]",
            fill(br#""x_unknown":["#, b"0,", b"]}"),
        ),
        (
            "unknown field [[],[],...]",
            fill(br#""x_unknown":["#, b"[],", b"]}"),
        ),
        (
            "long string client id",
            fill(br#""data_source":""#, b"x", b"\"}"),
        ),
        (
            "long escaped string",
            fill(br#""data_source":""#, b"\\u00e9", b"\"}"),
        ),
        ("deep nesting", fill(br#""x_unknown":"#, b"[", b"")),
        (
            "dimensions {\"\":\"\",...}",
            fill(br#""dimensions":{"#, br#""":"","#, b"}}"),
        ),
        (
            "dimensions {\"\":0,...}",
            fill(br#""dimensions":{"#, br#""":0,"#, b"}}"),
        ),
        (
            "dimension value [0,0,...]",
            fill(br#""dimensions":{"k":["#, b"0,", b"]}}"),
        ),
        (
            "dimension value [[],[],...]",
            fill(br#""dimensions":{"k":["#, b"[],", b"]}}"),
        ),
        (
            "dimension value {\"a\":0,...}",
            fill(br#""dimensions":{"k":{"#, br#""a":0,"#, b"}}}"),
        ),
        (
            "experiments {\"\":\"\",...}",
            fill(br#""experiments":{"#, br#""":"","#, b"}}"),
        ),
        (
            "metrics {\"\":0,...}",
            fill(br#""metrics":{"#, br#""":0,"#, b"}}"),
        ),
        (
            "metric value [0,0,...]",
            fill(br#""metrics":{"k":["#, b"0,", b"]}}"),
        ),
        (
            "metric value [[],[],...]",
            fill(br#""metrics":{"k":["#, b"[],", b"]}}"),
        ),
        (
            "metric value {\"\":0,...}",
            fill(br#""metrics":{"k":{"#, br#""":0,"#, b"}}}"),
        ),
        ("metric value {\"a\":0,...} distinct", {
            let mut v = head.to_vec();
            v.extend_from_slice(br#""metrics":{"k":{"#);
            let mut i = 0u32;
            while v.len() < MAX - 40 {
                v.extend_from_slice(format!("\"{i:x}\":0,").as_bytes());
                i += 1;
            }
            v.pop();
            v.extend_from_slice(b"}}}");
            v
        }),
    ];
    let limit = bound();
    let mut worst = 0usize;
    let mut over = Vec::new();
    for (name, bytes) in &cases {
        let start = Instant::now();
        let (r, peak) = peak_alloc(|| {
            decode_json(bytes, Kind::Any, MAX)
                .map(|_| ())
                .map_err(|r| r.reason)
        });
        eprintln!(
            "hostile_input: 1 MiB JSON, {name}: {r:?}, peak {:.1} MiB ({:.1}x input), {:.2?}",
            peak as f64 / (1 << 20) as f64,
            peak as f64 / bytes.len() as f64,
            start.elapsed()
        );
        worst = worst.max(peak);
        if peak > limit {
            over.push(format!(
                "{name}: {peak} bytes live at once for a {} byte message",
                bytes.len()
            ));
        }
    }
    eprintln!(
        "hostile_input: 1 MiB JSON worst peak {:.1} MiB",
        worst as f64 / (1 << 20) as f64
    );
    assert!(
        over.is_empty(),
        "over the {limit} byte limit:\n{}",
        over.join("\n")
    );
}

/// Largest peak allocation per input byte a JSON decode may reach. Today's worst shapes:
/// many `"":""` pairs in `dimensions`/`experiments` (a 48-byte pair per 6 input bytes,
/// 18x with the vector's doubling) and, without the `StrOrOther`/`MetricValue` fix, a
/// `[0,0,...]` dimension or metric value buffered as a value tree (24x).
const ALLOC_FACTOR: usize = 32;

/// Peak bytes a 1 MiB message may allocate while it is decoded.
fn bound() -> usize {
    std::env::var("HOSTILE_INPUT_ALLOC_LIMIT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(ALLOC_FACTOR * MAX)
}

// ---- protobuf ------------------------------------------------------------------------

#[test]
fn protobuf_arbitrary_bytes() {
    check(
        "decode_protobuf(arbitrary bytes)",
        3000,
        (
            vec(any::<u8>(), 0..300),
            any_kind(),
            prop_oneof![1 => 0usize..400, 2 => Just(MAX)],
        ),
        |(b, kind, max)| {
            let (r, alloc) = peak_alloc(|| check_proto(&b, kind, max));
            r?;
            prop_assert!(
                alloc <= 64 * b.len() + 4096,
                "{} bytes allocated for {} input bytes",
                alloc,
                b.len()
            );
            Ok(())
        },
    );
}

#[test]
fn protobuf_round_trip() {
    check(
        "decode_protobuf(encode_protobuf(valid event)) == event",
        1000,
        valid_event(),
        |event| {
            let bytes = encode_protobuf(&event);
            let decoded = decode_protobuf(&bytes, kind_of(&event), MAX)
                .map_err(|r| TestCaseError::fail(r.to_string()))?;
            prop_assert_eq!(&decoded, &event);
            // and the JSON path agrees with the protobuf path
            let json = render(&json_fields(&event, false));
            let from_json = decode_json(&json, kind_of(&event), MAX)
                .map_err(|r| TestCaseError::fail(r.to_string()))?;
            prop_assert!(
                same_event(&from_json, &decoded),
                "{:?} != {:?}",
                from_json,
                decoded
            );
            Ok(())
        },
    );
}

#[derive(Debug, Clone)]
enum ByteMutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Remove(usize, usize),
    /// Repeat a slice (duplicated fields, overlapping map entries).
    Repeat(usize, usize),
    /// Append well-formed fields: protobuf merges them (last string wins, maps merge).
    Append(Vec<u8>),
}

/// A well-formed length-delimited field.
fn ld_field(field: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![field << 3 | 2];
    let mut l = body.len();
    loop {
        let b = (l & 0x7f) as u8;
        l >>= 7;
        if l == 0 {
            v.push(b);
            break;
        }
        v.push(b | 0x80);
    }
    v.extend_from_slice(body);
    v
}

fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    let insert = prop_oneof![
        vec(any::<u8>(), 1..8),
        // hostile length prefixes and varints: field 1..=6, wire type 2 with huge lengths
        (
            1u8..=7,
            prop_oneof![
                Just(u64::MAX),
                Just(u32::MAX as u64),
                Just(1 << 31),
                1u64..1 << 20
            ]
        )
            .prop_map(|(field, len)| {
                let mut v = vec![field << 3 | 2];
                let mut l = len;
                loop {
                    let b = (l & 0x7f) as u8;
                    l >>= 7;
                    if l == 0 {
                        v.push(b);
                        break;
                    }
                    v.push(b | 0x80);
                }
                v
            }),
        // unknown fields of every wire type, groups included
        (8u8..30, 0u8..6).prop_map(|(field, wt)| vec![
            field << 3 | wt,
            0x01,
            0x02,
            0x03,
            0x04,
            0x05,
            0x06,
            0x07,
            0x08
        ]),
        // a NaN / infinite metric value: map entry {key "m", value NaN}
        Just(vec![
            0x32, 0x0c, 0x0a, 0x01, b'm', 0x11, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f
        ]),
        Just(vec![
            0x32, 0x0c, 0x0a, 0x01, b'm', 0x11, 0, 0, 0, 0, 0, 0, 0xf0, 0xff
        ]),
        // invalid UTF-8 in a string field
        Just(vec![0x0a, 0x02, 0xc3, 0x28]),
        Just(vec![0x0a, 0x03, 0xed, 0xa0, 0x80]),
        // varint of 11 bytes (overlong)
        Just(vec![
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
        ]),
    ];
    prop_oneof![
        2 => (any::<usize>(), 1u8..=255).prop_map(|(i, x)| ByteMutation::Flip(i, x)),
        1 => any::<usize>().prop_map(ByteMutation::Truncate),
        2 => (any::<usize>(), insert).prop_map(|(i, v)| ByteMutation::Insert(i, v)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(i, n)| ByteMutation::Remove(i, n)),
        1 => (any::<usize>(), 1usize..32).prop_map(|(i, n)| ByteMutation::Repeat(i, n)),
        4 => prop_oneof![
            valid_event().prop_map(|e| encode_protobuf(&e)),
            // a string field (1..=6) with a wrong string, or a map entry with one
            (1u8..=6, hostile_string()).prop_map(|(f, s)| {
                let body: Vec<u8> = serde_json::from_slice::<String>(&s).unwrap_or_default().into_bytes();
                ld_field(f, &body)
            }),
            (4u8..=6, hostile_string(), hostile_string()).prop_map(|(f, k, v)| {
                let k: String = serde_json::from_slice(&k).unwrap_or_default();
                let v: String = serde_json::from_slice(&v).unwrap_or_default();
                ld_field(f, &[ld_field(1, k.as_bytes()), ld_field(2, v.as_bytes())].concat())
            }),
        ]
        .prop_map(ByteMutation::Append),
    ]
}

fn apply_bytes(b: &mut Vec<u8>, m: &ByteMutation) {
    let n = b.len();
    match m {
        ByteMutation::Flip(i, x) if n > 0 => b[i % n] ^= x,
        ByteMutation::Truncate(i) => b.truncate(i % (n + 1)),
        ByteMutation::Insert(i, v) => {
            let at = i % (n + 1);
            b.splice(at..at, v.iter().copied());
        }
        ByteMutation::Remove(i, k) if n > 0 => {
            let at = i % n;
            b.drain(at..(at + k).min(n));
        }
        ByteMutation::Repeat(i, k) if n > 0 => {
            let at = i % n;
            let s: Vec<u8> = b[at..(at + k).min(n)].to_vec();
            b.splice(at..at, s);
        }
        ByteMutation::Append(v) => b.extend_from_slice(v),
        _ => {}
    }
}

#[test]
fn protobuf_mutated_valid_events() {
    check(
        "decode_protobuf(mutated encoding)",
        3000,
        (
            valid_event(),
            vec(byte_mutation(), 1..3),
            any_kind(),
            any::<u8>(),
        ),
        |(event, mutations, other_kind, pick)| {
            // mostly the topic's own message type, sometimes the other one
            let kind = if pick % 4 == 0 {
                other_kind
            } else {
                kind_of(&event)
            };
            let mut bytes = encode_protobuf(&event);
            for m in &mutations {
                apply_bytes(&mut bytes, m);
            }
            let (r, alloc) = peak_alloc(|| check_proto(&bytes, kind, MAX));
            r?;
            prop_assert!(
                alloc <= 64 * bytes.len() + 4096,
                "{} bytes allocated for {} input bytes",
                alloc,
                bytes.len()
            );
            Ok(())
        },
    );
}

/// `produce --format protobuf` re-encodes JSON events; the protobuf timestamp is written
/// by `format_timestamp`, whole seconds only, so sub-second precision is lost.
#[test]
fn protobuf_keeps_sub_second_timestamps() {
    let json = br#"{"client_id":"c","submission_timestamp":"2026-11-02T08:00:00.5Z"}"#;
    let ev = decode_json(json, Kind::Telemetry, MAX).unwrap();
    let back = decode_protobuf(&encode_protobuf(&ev), Kind::Telemetry, MAX).unwrap();
    assert_eq!(back.timestamp(), ev.timestamp());
}

// ---- config --------------------------------------------------------------------------

const GOOD: &str = r#"
[pipeline]
allowed_lateness_hours = 24
dimensions = ["os", "channel"]
max_message_bytes = 1048576
replicates = 50

[pipeline.kafka]
telemetry_format = "protobuf"

[[experiment]]
slug = "bug-1-slug"
branches = ["control", { name = "treatment", ratio = 1.0 }]
enrollment_start = "2026-11-01"
enrollment_period = 7
end_date = "2026-12-06"
analysis_bases = ["enrollments", "exposures"]
periods = ["day", "week", "days28", "overall"]
segments = [{ name = "windows", where = 'os = "Windows" and country in ["DE", "FR"]' }]
metrics = [{ name = "tabs", field = "tab_count", aggregation = "max", statistics = ["count", { kind = "mean", ci_width = 0.9, drop_highest = 0.01 }] }]
"#;

const CONFIG_KEYS: [&str; 49] = [
    "slug",
    "branches",
    "reference_branch",
    "enrollment_start",
    "enrollment_period",
    "end_date",
    "analysis_bases",
    "periods",
    "segments",
    "metrics",
    "default_metrics",
    "seed",
    "name",
    "where",
    "field",
    "aggregation",
    "statistics",
    "kind",
    "ci_width",
    "drop_highest",
    "data_source",
    "ratio",
    "allowed_lateness_hours",
    "dimensions",
    "max_message_bytes",
    "republish_threshold",
    "batch_events",
    "batch_millis",
    "replicates",
    "sketch_precision",
    "max_query_days",
    "max_query_sketches",
    "max_concurrent_queries",
    "query_wait_millis",
    "late_check_secs",
    "late_lookback_days",
    "state_cache_mb",
    "retention_days",
    "mean_cap",
    "kafka",
    "bigquery",
    "target",
    "timeout_secs",
    "telemetry_format",
    "group_id",
    "idle_partition_millis",
    "session_timeout_ms",
    "dead_letter_topic",
    "x_unknown",
];

fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|i| i.to_string()),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(7),
            Just(365),
            Just(366),
            Just(-1),
            Just(64),
            Just(4),
            Just(18),
            Just(19)
        ]
        .prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|x| format!("{x:?}")),
        prop_oneof![
            Just("nan"),
            Just("inf"),
            Just("-inf"),
            Just("1e999"),
            Just("0.5"),
            Just("1.5"),
            Just("-0.0")
        ]
        .prop_map(String::from),
        any::<bool>().prop_map(|b| b.to_string()),
        // dates, good and bad (four-digit years; see the ignored regression test below)
        (0u32..10000, 0u32..14, 0u32..33).prop_map(|(y, m, d)| format!("\"{y:04}-{m:02}-{d:02}\"")),
        prop_oneof![
            Just("\"2026-11-01\""),
            Just("\"2026-12-06\""),
            Just("\"2027-12-31\""),
            Just("\"9999-12-31\""),
            Just("\"0000-01-01\""),
            Just("\"2026-02-29\""),
            Just("\"+2026-11-01\""),
            Just("\"-0001-01-01\""),
            Just("\"control\""),
            Just("\"treatment\""),
            Just("\"sum\""),
            Just("\"max\""),
            Just("\"mean\""),
            Just("\"count\""),
            Just("\"days\""),
            Just("\"any\""),
            Just("\"enrollments\""),
            Just("\"exposures\""),
            Just("\"day\""),
            Just("\"week\""),
            Just("\"json\""),
            Just("\"protobuf\""),
            Just("\"all\""),
            Just("\"client_id\""),
            Just("\"per_replicate\""),
            Just("\"p.d\""),
            Just("1979-05-27"),
            Just("1979-05-27T07:32:00Z"),
            Just("07:32:00"),
            Just(r#"'os = "Windows"'"#),
            Just(r#"'os in ["a", "b"] and x != "y"'"#),
            Just(r#"'os ~ "W"'"#),
            Just(
                r#""""multi
line""""#
            ),
            Just("'''lit'''"),
            Just("\"\\u00e9\\n\""),
            Just("\"\""),
        ]
        .prop_map(String::from),
        ".{0,10}".prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(|v| format!("[{}]", v.join(", "))),
            vec((proptest::sample::select(&CONFIG_KEYS[..]), inner), 0..5).prop_map(|v| {
                let kv: Vec<String> = v.into_iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", kv.join(", "))
            }),
        ]
    })
}

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => (proptest::sample::select(&CONFIG_KEYS[..]), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => prop_oneof![
            Just("[pipeline]"), Just("[[experiment]]"), Just("[pipeline.kafka]"), Just("[pipeline.bigquery]"),
            Just("[[experiment.metrics]]"), Just("[[experiment.segments]]"), Just("[[experiment.branches]]"),
            Just("[experiment]"), Just("[[pipeline]]"), Just("[x]"), Just("[[]]"), Just("["), Just("# comment"),
            Just(""), Just("a.b.c = 1"), Just("pipeline.kafka.group_id = \"g\""),
        ]
        .prop_map(String::from),
        1 => ".{0,30}",
        // deep nesting, beyond any reasonable recursion limit of the TOML parser
        1 => (1usize..300).prop_map(|d| format!("x_unknown = {}{}", "[".repeat(d), "]".repeat(d))),
        1 => (1usize..300).prop_map(|d| format!("x_unknown = {}1{}", "{a=".repeat(d), "}".repeat(d))),
        1 => (1usize..200).prop_map(|d| format!("{} = 1", vec!["a"; d].join("."))),
    ]
}

/// Line-level mutations of a good config: drop, replace, duplicate, insert.
fn mutated_good() -> impl Strategy<Value = String> {
    let lines: Vec<String> = GOOD.lines().map(String::from).collect();
    let n = lines.len();
    vec((0..n, 0u8..4, toml_line(), toml_value()), 0..5).prop_map(move |edits| {
        let mut ls = lines.clone();
        for (i, op, line, value) in edits {
            let i = i % ls.len().max(1);
            match op {
                0 if !ls.is_empty() => {
                    ls.remove(i);
                }
                1 if !ls.is_empty() => {
                    // keep the key, replace the value
                    let l = &ls[i];
                    ls[i] = match l.split_once('=') {
                        Some((k, _)) => format!("{k}= {value}"),
                        None => line,
                    };
                }
                2 if !ls.is_empty() => {
                    let l = ls[i].clone();
                    ls.insert(i, l);
                }
                _ => ls.insert(i, line),
            }
        }
        ls.join("\n")
    })
}

fn check_config(path: &std::path::Path, files: &[std::path::PathBuf]) -> Result<(), TestCaseError> {
    let r = config::load(path);
    record(if r.is_ok() { "loaded" } else { "problems" });
    match r {
        Ok(cfg) => {
            prop_assert!(!cfg.experiments.is_empty());
            // what the rest of the service assumes of a loaded config
            let _ = cfg.pipeline.sketch_config();
            prop_assert!(cfg.pipeline.max_message_bytes >= 64 && cfg.pipeline.batch_events >= 1);
            for e in &cfg.experiments {
                prop_assert!(e.branches.len() >= 2 && e.end_date > e.last_enrollment_date());
                let _ = (e.analysis_length_days(), e.table_slug(), e.data_sources());
                prop_assert!(e.branch_index(&e.reference_branch).is_some());
            }
        }
        Err(errors) => {
            prop_assert!(!errors.0.is_empty());
            for p in &errors.0 {
                prop_assert!(!p.message.trim().is_empty(), "{:?}", p);
                prop_assert!(!p.field.is_empty(), "{:?}", p);
                prop_assert!(
                    p.file == path || files.contains(&p.file),
                    "problem names {} (loaded {})",
                    p.file.display(),
                    path.display()
                );
            }
            prop_assert!(!errors.to_string().is_empty());
        }
    }
    Ok(())
}

#[test]
fn config_load_arbitrary_text() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    let text = prop_oneof![
        4 => vec(toml_line(), 0..16).prop_map(|l| l.join("\n")),
        4 => mutated_good(),
        1 => ".{0,200}",
        1 => vec(any::<u8>(), 0..200).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    check(
        "config::load(TOML-ish text)",
        1500,
        (text, any::<bool>()),
        |(text, invalid_utf8)| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            let path = dir.path().join(format!("c{i}.toml"));
            let mut bytes = text.into_bytes();
            if invalid_utf8 && !bytes.is_empty() && i.is_multiple_of(8) {
                let at = i % bytes.len();
                bytes.insert(at, 0xff);
            }
            std::fs::write(&path, &bytes).unwrap();
            let r = check_config(&path, std::slice::from_ref(&path));
            std::fs::remove_file(&path).unwrap();
            r
        },
    );
}

#[test]
fn config_load_directory_of_files() {
    let root = tempfile::tempdir().unwrap();
    let n = std::sync::atomic::AtomicUsize::new(0);
    check(
        "config::load(directory of TOML-ish files)",
        300,
        vec(
            prop_oneof![
                mutated_good(),
                vec(toml_line(), 0..8).prop_map(|l| l.join("\n"))
            ],
            0..4,
        ),
        |texts| {
            let dir = root
                .path()
                .join(format!("d{}", n.fetch_add(1, Ordering::Relaxed)));
            std::fs::create_dir(&dir).unwrap();
            let mut files = Vec::new();
            for (i, t) in texts.iter().enumerate() {
                let p = dir.join(format!("{i}.toml"));
                std::fs::write(&p, t).unwrap();
                files.push(p);
            }
            std::fs::write(dir.join("ignored.txt"), "not toml").unwrap();
            let r = check_config(&dir, &files);
            std::fs::remove_dir_all(&dir).unwrap();
            r
        },
    );
}

#[test]
fn config_load_missing_path_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.toml");
    let err = config::load(&path).unwrap_err();
    assert_eq!(err.0.len(), 1);
    assert_eq!(err.0[0].file, path);
    assert!(!err.0[0].message.is_empty());
}

/// `NaiveDate + Days` panics on overflow: a start date at chrono's last representable
/// day makes `load` panic instead of reporting a problem. Un-ignore with the fix.
#[test]
fn config_enrollment_start_at_the_end_of_time_is_a_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.toml");
    let text = GOOD
        .replace(
            "enrollment_start = \"2026-11-01\"",
            "enrollment_start = \"+262142-12-31\"",
        )
        .replace("end_date = \"2026-12-06\"", "end_date = \"+262142-12-31\"");
    std::fs::write(&path, text).unwrap();
    let err = config::load(&path).unwrap_err();
    assert!(
        err.0
            .iter()
            .all(|p| p.file == path && !p.message.is_empty()),
        "{err}"
    );
}

fn segment_token() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        Just("os"),
        Just("country"),
        Just("app_version"),
        Just(" = "),
        Just("="),
        Just("!="),
        Just(" != "),
        Just(" in "),
        Just(" and "),
        Just(" and"),
        Just("and "),
        Just("\""),
        Just("\"Windows\""),
        Just("\"DE\""),
        Just("["),
        Just("]"),
        Just(", "),
        Just(","),
        Just(" "),
        Just("é"),
        Just("\"é\""),
        Just("ü"),
        Just("\u{0}"),
        Just("\n"),
        Just("\t"),
        Just("'"),
        Just("!"),
        Just("in"),
        Just("[\"a\", \"b\"]"),
        Just("\"a and b\""),
    ]
}

fn segment_text() -> impl Strategy<Value = String> {
    // a valid expression with a few tokens inserted or characters deleted
    let mutated = (
        segment_clauses(),
        vec((any::<usize>(), any::<bool>(), segment_token()), 0..3),
    )
        .prop_map(|(clauses, edits)| {
            let mut text: Vec<char> = render_segment(&clauses).chars().collect();
            for (at, insert, token) in edits {
                let at = at % (text.len() + 1);
                if insert {
                    text.splice(at..at, token.chars());
                } else if at < text.len() {
                    text.remove(at);
                }
            }
            text.into_iter().collect::<String>()
        });
    prop_oneof![
        3 => mutated,
        3 => vec(segment_token(), 0..14).prop_map(|t| t.concat()),
        1 => ".{0,40}",
        1 => "[ a-z=!\\[\\],\"é]{0,40}",
    ]
}

/// Clauses the parser can read back: values without `"`, `=`, `!` and `,` (the parser
/// splits on those without looking at quotes; see the report) and without leading or
/// trailing blanks (trimmed).
fn segment_clauses() -> impl Strategy<Value = Vec<SegmentClause>> {
    let value = "[A-Za-z0-9_.é -]{0,8}".prop_map(|s| s.trim().to_string());
    let ident = "[a-z_][a-z0-9_]{0,8}";
    let clause = prop_oneof![
        (ident, value.clone()).prop_map(|(d, v)| SegmentClause::Equals(d, v)),
        (ident, value.clone()).prop_map(|(d, v)| SegmentClause::NotEquals(d, v)),
        (ident, vec(value, 1..4)).prop_map(|(d, v)| SegmentClause::In(d, v)),
    ];
    vec(clause, 1..4)
}

fn render_segment(clauses: &[SegmentClause]) -> String {
    clauses
        .iter()
        .map(|c| match c {
            SegmentClause::Equals(d, v) => format!("{d} = \"{v}\""),
            SegmentClause::NotEquals(d, v) => format!("{d} != \"{v}\""),
            SegmentClause::In(d, vs) => format!(
                "{d} in [{}]",
                vs.iter()
                    .map(|v| format!("\"{v}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

#[test]
fn parse_segment_arbitrary_strings() {
    check(
        "config::parse_segment(arbitrary string)",
        3000,
        segment_text(),
        |s| {
            let r = config::parse_segment(&s);
            record(if r.is_ok() { "ok" } else { "error" });
            match r {
                Ok(clauses) => {
                    prop_assert!(!clauses.is_empty());
                    for c in &clauses {
                        let d = match c {
                            SegmentClause::Equals(d, _)
                            | SegmentClause::NotEquals(d, _)
                            | SegmentClause::In(d, _) => d,
                        };
                        prop_assert!(
                            !d.is_empty()
                                && d.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                            "{:?}",
                            c
                        );
                    }
                }
                Err(why) => prop_assert!(!why.trim().is_empty()),
            }
            Ok(())
        },
    );
}

#[test]
fn parse_segment_round_trip() {
    check(
        "config::parse_segment(render(clauses)) == clauses",
        1000,
        segment_clauses(),
        |clauses| {
            let text = render_segment(&clauses);
            prop_assert_eq!(config::parse_segment(&text), Ok(clauses), "{}", text);
            Ok(())
        },
    );
}

// ---- read_line_bounded ---------------------------------------------------------------

/// A reader that hands out the input in chunks of the given sizes (short reads).
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    i: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let want = self
            .sizes
            .get(self.i % self.sizes.len().max(1))
            .copied()
            .unwrap_or(1)
            .max(1);
        self.i += 1;
        let n = want.min(out.len()).min(self.data.len());
        out[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn read_line_bounded_keeps_the_lines_that_fit() {
    let data = prop_oneof![
        vec(
            prop_oneof![4 => Just(b'a'), 2 => Just(b'\n'), 1 => Just(b'\r'), 1 => any::<u8>()],
            0..200
        ),
        vec(any::<u8>(), 0..200),
        // long lines among short ones
        vec((0usize..40, any::<bool>()), 0..10).prop_map(|ls| {
            ls.into_iter()
                .flat_map(|(n, nl)| {
                    let mut l = vec![b'x'; n];
                    if nl {
                        l.push(b'\n')
                    }
                    l
                })
                .collect()
        }),
    ];
    check(
        "read_line_bounded(arbitrary stream)",
        3000,
        (data, 1usize..20, 0usize..24, vec(1usize..10, 1..5)),
        |(data, capacity, max, sizes)| {
            // expected: the input's lines (a trailing newline does not start another one)
            let mut expected: Vec<(usize, bool, Vec<u8>)> = Vec::new();
            let mut rest = &data[..];
            while !rest.is_empty() {
                let (line, consumed) = match rest.iter().position(|&c| c == b'\n') {
                    Some(i) => (&rest[..i], i + 1),
                    None => (rest, rest.len()),
                };
                let fits = line.len() <= max;
                expected.push((
                    consumed,
                    fits,
                    if fits { line.to_vec() } else { Vec::new() },
                ));
                rest = &rest[consumed..];
            }
            let mut r = BufReader::with_capacity(
                capacity,
                Chunked {
                    data: &data,
                    sizes,
                    i: 0,
                },
            );
            let mut buf = b"stale".to_vec();
            let mut got = Vec::new();
            loop {
                let (n, fits) = read_line_bounded(&mut r, &mut buf, max).unwrap();
                prop_assert!(
                    buf.len() <= max,
                    "kept {} bytes over the limit {}",
                    buf.len(),
                    max
                );
                if n == 0 {
                    prop_assert!(buf.is_empty());
                    break;
                }
                got.push((n, fits, buf.clone()));
                prop_assert!(got.len() <= data.len(), "no progress");
            }
            prop_assert_eq!(got.iter().map(|g| g.0).sum::<usize>(), data.len());
            prop_assert_eq!(&got, &expected);
            // the kept lines are exactly the input's lines that fit
            let kept: Vec<u8> = got
                .iter()
                .filter(|g| g.1)
                .flat_map(|g| g.2.clone())
                .collect();
            let fitting: Vec<u8> = data
                .split(|&c| c == b'\n')
                .take(expected.len())
                .filter(|l| l.len() <= max)
                .flatten()
                .copied()
                .collect();
            prop_assert_eq!(kept, fitting);
            Ok(())
        },
    );
}
