//! Input events (DESIGN.md section 3): the model, and decoding from JSON and protobuf.
//!
//! Decoding borrows from the message bytes where it can (`Cow`), so the per-event path
//! allocates only for escaped JSON strings and small field lists. Everything that is
//! wrong with a message becomes a [`Reject`] with a reason that is counted by kind.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// Generated from `proto/events.proto`.
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/slipstream.events.v1.rs"));
}

/// Microseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

/// A UTC calendar day as days since 1970-01-01 (also the BigQuery DATE encoding).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Day(pub i32);

const MICROS_PER_DAY: i64 = 86_400_000_000;

impl Timestamp {
    pub fn day(self) -> Day {
        Day(self.0.div_euclid(MICROS_PER_DAY) as i32)
    }
    pub fn from_day(day: Day) -> Self {
        Timestamp(i64::from(day.0) * MICROS_PER_DAY)
    }
}

impl Day {
    pub fn from_date(d: chrono::NaiveDate) -> Self {
        Day((d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as i32)
    }
    pub fn date(self) -> chrono::NaiveDate {
        chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
            + chrono::TimeDelta::days(i64::from(self.0))
    }
    pub fn plus(self, days: i64) -> Day {
        Day(self.0 + days as i32)
    }
}

impl fmt::Display for Day {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.date().format("%Y-%m-%d"))
    }
}

/// What an enrollment-topic event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentKind {
    Enroll,
    Unenroll,
    Exposure,
}

/// Small ordered list of string pairs (dimensions, experiment tags).
pub type Pairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

/// An event of the `enrollments` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrollmentEvent<'a> {
    pub client_id: Cow<'a, str>,
    pub experiment: Cow<'a, str>,
    pub branch: Cow<'a, str>,
    pub kind: EnrollmentKind,
    pub timestamp: Timestamp,
    pub dimensions: Pairs<'a>,
}

/// An event of the `telemetry` topic.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryEvent<'a> {
    pub client_id: Cow<'a, str>,
    pub submission_timestamp: Timestamp,
    pub data_source: Cow<'a, str>,
    /// Experiment slug -> branch the client reported.
    pub experiments: Pairs<'a>,
    pub dimensions: Pairs<'a>,
    pub metrics: Vec<(Cow<'a, str>, f64)>,
}

/// Either kind of event.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    Enrollment(EnrollmentEvent<'a>),
    Telemetry(TelemetryEvent<'a>),
}

impl Event<'_> {
    pub fn timestamp(&self) -> Timestamp {
        match self {
            Event::Enrollment(e) => e.timestamp,
            Event::Telemetry(t) => t.submission_timestamp,
        }
    }
}

/// Why an event was rejected; each kind is counted separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    InvalidJson,
    InvalidProtobuf,
    MissingField,
    BadTimestamp,
    BadValue,
    Oversized,
    UnknownExperiment,
    UnknownBranch,
    UnknownEventKind,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::InvalidJson,
        RejectReason::InvalidProtobuf,
        RejectReason::MissingField,
        RejectReason::BadTimestamp,
        RejectReason::BadValue,
        RejectReason::Oversized,
        RejectReason::UnknownExperiment,
        RejectReason::UnknownBranch,
        RejectReason::UnknownEventKind,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidJson => "invalid_json",
            RejectReason::InvalidProtobuf => "invalid_protobuf",
            RejectReason::MissingField => "missing_field",
            RejectReason::BadTimestamp => "bad_timestamp",
            RejectReason::BadValue => "bad_value",
            RejectReason::Oversized => "oversized",
            RejectReason::UnknownExperiment => "unknown_experiment",
            RejectReason::UnknownBranch => "unknown_branch",
            RejectReason::UnknownEventKind => "unknown_event_kind",
        }
    }
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap()
    }
}

/// A rejected event: the counted kind plus a human-readable detail for the log.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Reject {
    pub reason: RejectReason,
    pub detail: String,
}

fn reject(reason: RejectReason, detail: impl Into<String>) -> Reject {
    Reject {
        reason,
        detail: detail.into(),
    }
}

// ---- timestamps ----------------------------------------------------------------------

/// Parses RFC 3339 (`2026-11-02T08:00:00Z`, fractions and offsets allowed) to UTC micros.
/// The common `...Z` shape is parsed by hand; anything else goes through chrono.
pub fn parse_timestamp(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() == 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
    {
        let num = |r: std::ops::Range<usize>| -> Option<u32> {
            b[r].iter().try_fold(0u32, |acc, &c| {
                c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
            })
        };
        let date = chrono::NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
        let (h, m, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if h > 23 || m > 59 || sec > 59 {
            return None;
        }
        let day = Day::from_date(date);
        return Some(Timestamp(
            Timestamp::from_day(day).0 + i64::from(h * 3600 + m * 60 + sec) * 1_000_000,
        ));
    }
    let dt = chrono::DateTime::parse_from_rfc3339(s).ok()?;
    Some(Timestamp(dt.timestamp_micros()))
}

/// Formats micros as `YYYY-MM-DDTHH:MM:SSZ` (whole seconds).
pub fn format_timestamp(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_micros(t.0)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

// ---- JSON ----------------------------------------------------------------------------

/// Every field either kind of event may carry; the fields decide which kind it is.
#[derive(Deserialize)]
struct RawJson<'a> {
    #[serde(borrow)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow)]
    experiment: Option<Cow<'a, str>>,
    #[serde(borrow)]
    branch: Option<Cow<'a, str>>,
    #[serde(borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    submission_timestamp: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data_source: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "string_pairs")]
    experiments: Pairs<'a>,
    #[serde(borrow, default, deserialize_with = "string_pairs")]
    dimensions: Pairs<'a>,
    #[serde(borrow, default = "no_metrics", deserialize_with = "number_pairs")]
    metrics: Result<Vec<(Cow<'a, str>, f64)>, String>,
}

fn no_metrics<'a>() -> Result<Vec<(Cow<'a, str>, f64)>, String> {
    Ok(Vec::new())
}

/// Metric values of an event, or why one of them is unusable.
type MetricsOrBad<'a> = Result<Vec<(Cow<'a, str>, f64)>, String>;

/// Which topic a message came from, when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Enrollment,
    Telemetry,
    /// A line of an event file: decided by the fields present.
    Any,
}

/// Decodes one JSON event. `kind` says which topic it came from (or `Any` for files).
pub fn decode_json(bytes: &[u8], kind: Kind, max_bytes: usize) -> Result<Event<'_>, Reject> {
    if bytes.len() > max_bytes {
        return Err(reject(
            RejectReason::Oversized,
            format!("{} bytes, limit {max_bytes}", bytes.len()),
        ));
    }
    let raw: RawJson<'_> = serde_json::from_slice(bytes)
        .map_err(|e| reject(RejectReason::InvalidJson, e.to_string()))?;
    let kind = match kind {
        Kind::Any if raw.event.is_some() => Kind::Enrollment,
        Kind::Any if raw.submission_timestamp.is_some() => Kind::Telemetry,
        Kind::Any => {
            return Err(reject(
                RejectReason::MissingField,
                "neither `event` (enrollment) nor `submission_timestamp` (telemetry)",
            ))
        }
        k => k,
    };
    let need = |v: Option<Cow<'_, str>>, name: &str| -> Result<(), Reject> {
        match v {
            Some(s) if !s.is_empty() => Ok(()),
            _ => Err(reject(
                RejectReason::MissingField,
                format!("`{name}` is missing or empty"),
            )),
        }
    };
    let client_id = raw.client_id.filter(|c| !c.is_empty()).ok_or_else(|| {
        reject(
            RejectReason::MissingField,
            "`client_id` is missing or empty",
        )
    })?;
    if kind == Kind::Enrollment {
        need(raw.experiment.clone(), "experiment")?;
        need(raw.branch.clone(), "branch")?;
        let ev = raw
            .event
            .ok_or_else(|| reject(RejectReason::MissingField, "`event` is missing"))?;
        let ts = raw
            .timestamp
            .ok_or_else(|| reject(RejectReason::MissingField, "`timestamp` is missing"))?;
        Ok(Event::Enrollment(EnrollmentEvent {
            client_id,
            experiment: raw.experiment.unwrap(),
            branch: raw.branch.unwrap(),
            kind: enrollment_kind(&ev)?,
            timestamp: parse_timestamp(&ts).ok_or_else(|| {
                reject(
                    RejectReason::BadTimestamp,
                    format!("`timestamp` \"{ts}\" is not RFC 3339"),
                )
            })?,
            dimensions: raw.dimensions,
        }))
    } else {
        let ts = raw.submission_timestamp.ok_or_else(|| {
            reject(
                RejectReason::MissingField,
                "`submission_timestamp` is missing",
            )
        })?;
        Ok(Event::Telemetry(TelemetryEvent {
            client_id,
            submission_timestamp: parse_timestamp(&ts).ok_or_else(|| {
                reject(
                    RejectReason::BadTimestamp,
                    format!("`submission_timestamp` \"{ts}\" is not RFC 3339"),
                )
            })?,
            data_source: raw
                .data_source
                .filter(|d| !d.is_empty())
                .unwrap_or(Cow::Borrowed(crate::config::DEFAULT_DATA_SOURCE)),
            experiments: raw.experiments,
            dimensions: raw.dimensions,
            metrics: raw.metrics.map_err(|e| reject(RejectReason::BadValue, e))?,
        }))
    }
}

fn enrollment_kind(s: &str) -> Result<EnrollmentKind, Reject> {
    match s {
        "enroll" => Ok(EnrollmentKind::Enroll),
        "unenroll" => Ok(EnrollmentKind::Unenroll),
        "exposure" => Ok(EnrollmentKind::Exposure),
        other => Err(reject(
            RejectReason::UnknownEventKind,
            format!("`event` \"{other}\"; expected enroll, unenroll or exposure"),
        )),
    }
}

/// `{"k": "v", ...}` as pairs; non-string values are skipped (dimensions are strings).
fn string_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<Pairs<'de>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Pairs<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of strings")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4).min(16));
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                if let StrOrOther::Str(v) = map.next_value::<StrOrOther<'de>>()? {
                    out.push((k, v));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}

enum StrOrOther<'a> {
    Str(Cow<'a, str>),
    Other,
}

/// Visits the value in place: a string is kept, anything else is skipped without being
/// buffered (an untagged enum would buffer it, ~24 bytes per input byte for `[0,0,...]`).
impl<'de> Deserialize<'de> for StrOrOther<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StrOrOther<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any value")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
                Ok(StrOrOther::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(StrOrOther::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
                Ok(StrOrOther::Str(Cow::Owned(s)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(StrOrOther::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
                Ok(StrOrOther::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
                Ok(StrOrOther::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(StrOrOther::Other)
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(StrOrOther::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(StrOrOther::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(StrOrOther::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// One value of the `metrics` object, visited in place (no `serde_json::Value` tree).
enum MetricValue {
    Number(f64),
    Null,
    Bad(&'static str),
}

impl<'de> Deserialize<'de> for MetricValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = MetricValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number, a boolean or null")
            }
            fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
                Ok(MetricValue::Number(if b { 1.0 } else { 0.0 }))
            }
            fn visit_i64<E>(self, i: i64) -> Result<Self::Value, E> {
                Ok(MetricValue::Number(i as f64))
            }
            fn visit_u64<E>(self, u: u64) -> Result<Self::Value, E> {
                Ok(MetricValue::Number(u as f64))
            }
            fn visit_f64<E>(self, x: f64) -> Result<Self::Value, E> {
                Ok(MetricValue::Number(x))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(MetricValue::Null)
            }
            fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
                Ok(MetricValue::Bad("a string"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<Self::Value, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(MetricValue::Bad("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(MetricValue::Bad("an object"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `{"k": 1.5, "b": true, "n": null}` as (name, value); null is skipped, anything else
/// non-numeric makes the event a `bad_value` reject (reported after the whole object parsed).
fn number_pairs<'de, D: Deserializer<'de>>(d: D) -> Result<MetricsOrBad<'de>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = MetricsOrBad<'de>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object of numbers")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Ok(Vec::new()))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4).min(16));
            let mut bad = None;
            while let Some(k) = map.next_key::<Cow<'de, str>>()? {
                match map.next_value::<MetricValue>()? {
                    MetricValue::Number(x) if x.is_finite() => out.push((k, x)),
                    MetricValue::Number(_) => {
                        bad = Some(format!("metric `{k}` is not a finite number"))
                    }
                    MetricValue::Null => {}
                    MetricValue::Bad(what) => {
                        bad = Some(format!(
                            "metric `{k}` is {what}; expected a number or a boolean"
                        ))
                    }
                }
            }
            Ok(match bad {
                Some(b) => Err(b),
                None => Ok(out),
            })
        }
    }
    d.deserialize_any(V)
}

// ---- protobuf ------------------------------------------------------------------------

/// Decodes one protobuf message of the given topic kind (`Any` is not meaningful here).
pub fn decode_protobuf(
    bytes: &[u8],
    kind: Kind,
    max_bytes: usize,
) -> Result<Event<'static>, Reject> {
    use prost::Message;
    if bytes.len() > max_bytes {
        return Err(reject(
            RejectReason::Oversized,
            format!("{} bytes, limit {max_bytes}", bytes.len()),
        ));
    }
    let bad = |e: prost::DecodeError| reject(RejectReason::InvalidProtobuf, e.to_string());
    let required = |s: String, name: &str| -> Result<Cow<'static, str>, Reject> {
        if s.is_empty() {
            Err(reject(
                RejectReason::MissingField,
                format!("`{name}` is missing or empty"),
            ))
        } else {
            Ok(Cow::Owned(s))
        }
    };
    let pairs = |m: std::collections::HashMap<String, String>| -> Pairs<'static> {
        let mut v: Pairs<'static> = m
            .into_iter()
            .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
            .collect();
        v.sort(); // map order on the wire is unspecified; keep ours deterministic
        v
    };
    match kind {
        Kind::Enrollment => {
            let m = proto::EnrollmentEvent::decode(bytes).map_err(bad)?;
            let client_id = required(m.client_id, "client_id")?;
            let ts = parse_timestamp(&m.timestamp).ok_or_else(|| {
                reject(
                    RejectReason::BadTimestamp,
                    format!("`timestamp` \"{}\" is not RFC 3339", m.timestamp),
                )
            })?;
            Ok(Event::Enrollment(EnrollmentEvent {
                client_id,
                experiment: required(m.experiment, "experiment")?,
                branch: required(m.branch, "branch")?,
                kind: enrollment_kind(&m.event)?,
                timestamp: ts,
                dimensions: pairs(m.dimensions),
            }))
        }
        Kind::Telemetry | Kind::Any => {
            let m = proto::TelemetryEvent::decode(bytes).map_err(bad)?;
            let client_id = required(m.client_id, "client_id")?;
            let ts = parse_timestamp(&m.submission_timestamp).ok_or_else(|| {
                reject(
                    RejectReason::BadTimestamp,
                    format!(
                        "`submission_timestamp` \"{}\" is not RFC 3339",
                        m.submission_timestamp
                    ),
                )
            })?;
            let mut metrics: Vec<(Cow<'static, str>, f64)> = Vec::with_capacity(m.metrics.len());
            for (k, v) in m.metrics {
                if !v.is_finite() {
                    return Err(reject(
                        RejectReason::BadValue,
                        format!("metric `{k}` is not a finite number"),
                    ));
                }
                metrics.push((Cow::Owned(k), v));
            }
            metrics.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(Event::Telemetry(TelemetryEvent {
                client_id,
                submission_timestamp: ts,
                data_source: if m.data_source.is_empty() {
                    Cow::Borrowed(crate::config::DEFAULT_DATA_SOURCE)
                } else {
                    Cow::Owned(m.data_source)
                },
                experiments: pairs(m.experiments),
                dimensions: pairs(m.dimensions),
                metrics,
            }))
        }
    }
}

/// RFC 3339 with the fractional digits the timestamp needs (none for whole seconds), so
/// a re-encoded event keeps its time exactly; `format_timestamp` writes whole seconds.
fn format_timestamp_exact(t: Timestamp) -> String {
    chrono::DateTime::from_timestamp_micros(t.0)
        .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_default()
}

/// Encodes an event as protobuf (used by `produce --format protobuf` and tests).
pub fn encode_protobuf(event: &Event<'_>) -> Vec<u8> {
    use prost::Message;
    let map = |p: &Pairs<'_>| {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    match event {
        Event::Enrollment(e) => proto::EnrollmentEvent {
            client_id: e.client_id.to_string(),
            experiment: e.experiment.to_string(),
            branch: e.branch.to_string(),
            event: match e.kind {
                EnrollmentKind::Enroll => "enroll",
                EnrollmentKind::Unenroll => "unenroll",
                EnrollmentKind::Exposure => "exposure",
            }
            .into(),
            timestamp: format_timestamp_exact(e.timestamp),
            dimensions: map(&e.dimensions),
        }
        .encode_to_vec(),
        Event::Telemetry(t) => proto::TelemetryEvent {
            client_id: t.client_id.to_string(),
            submission_timestamp: format_timestamp_exact(t.submission_timestamp),
            data_source: t.data_source.to_string(),
            experiments: map(&t.experiments),
            dimensions: map(&t.dimensions),
            metrics: t.metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
        .encode_to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1 << 20;

    #[test]
    fn timestamps() {
        let t = parse_timestamp("2026-11-02T08:00:00Z").unwrap();
        assert_eq!(Day(t.day().0).to_string(), "2026-11-02");
        assert_eq!(t.0 % 86_400_000_000, 8 * 3600 * 1_000_000);
        assert_eq!(
            parse_timestamp("2026-11-02T10:00:00.5+02:00").unwrap().0,
            t.0 + 500_000
        );
        assert_eq!(format_timestamp(t), "2026-11-02T08:00:00Z");
        for bad in [
            "2026-13-02T08:00:00Z",
            "2026-11-02T25:00:00Z",
            "yesterday",
            "",
            "2026-11-02",
        ] {
            assert!(parse_timestamp(bad).is_none(), "{bad}");
        }
        assert_eq!(
            Day::from_date(chrono::NaiveDate::from_ymd_opt(1970, 1, 2).unwrap()),
            Day(1)
        );
        assert_eq!(Timestamp(-1).day(), Day(-1));
    }

    #[test]
    fn decodes_the_contract_examples() {
        let e = br#"{"client_id": "c-00042", "experiment": "bug-12345-slug", "branch": "treatment",
 "event": "enroll", "timestamp": "2026-11-01T12:34:56Z", "extra": [1,2],
 "dimensions": {"os": "Windows", "channel": "release", "country": "DE"}}"#;
        match decode_json(e, Kind::Any, MAX).unwrap() {
            Event::Enrollment(e) => {
                assert_eq!(e.client_id, "c-00042");
                assert_eq!(e.kind, EnrollmentKind::Enroll);
                assert_eq!(e.dimensions.len(), 3);
            }
            other => panic!("{other:?}"),
        }
        let t = br#"{"client_id": "c-00042", "submission_timestamp": "2026-11-02T08:00:00Z",
 "data_source": "main", "experiments": {"bug-12345-slug": "treatment"},
 "dimensions": {"os": "Windows", "channel": "release", "country": "DE", "app_version": "133"},
 "metrics": {"active_hours": 0.75, "uri_count": 31, "search_count": 2, "flag": true, "gone": null}}"#;
        match decode_json(t, Kind::Any, MAX).unwrap() {
            Event::Telemetry(t) => {
                assert_eq!(
                    t.experiments,
                    vec![(Cow::Borrowed("bug-12345-slug"), Cow::Borrowed("treatment"))]
                );
                assert_eq!(t.metrics.len(), 4);
                assert_eq!(t.metrics[3], (Cow::Borrowed("flag"), 1.0));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_by_kind() {
        let cases: &[(&[u8], RejectReason)] = &[
            (b"{not json", RejectReason::InvalidJson),
            (br#"{"client_id":"a"}"#, RejectReason::MissingField),
            (br#"{"event":"enroll","experiment":"x","branch":"b","timestamp":"2026-11-01T00:00:00Z"}"#, RejectReason::MissingField),
            (br#"{"client_id":"a","submission_timestamp":"soon"}"#, RejectReason::BadTimestamp),
            (br#"{"client_id":"a","submission_timestamp":"2026-11-01T00:00:00Z","metrics":{"x":"many"}}"#, RejectReason::BadValue),
            (br#"{"client_id":"a","experiment":"x","branch":"b","event":"enrol","timestamp":"2026-11-01T00:00:00Z"}"#, RejectReason::UnknownEventKind),
            (br#"[1,2,3]"#, RejectReason::InvalidJson),
        ];
        for (bytes, reason) in cases {
            let err = decode_json(bytes, Kind::Any, MAX).unwrap_err();
            assert_eq!(err.reason, *reason, "{}", String::from_utf8_lossy(bytes));
        }
        let big = vec![b' '; 100];
        assert_eq!(
            decode_json(&big, Kind::Any, 64).unwrap_err().reason,
            RejectReason::Oversized
        );
    }

    #[test]
    fn protobuf_round_trip_and_garbage() {
        let t = br#"{"client_id": "c-1", "submission_timestamp": "2026-11-02T08:00:00Z", "data_source": "main",
 "experiments": {"s": "treatment"}, "dimensions": {"os": "Linux"}, "metrics": {"uri_count": 3}}"#;
        let ev = decode_json(t, Kind::Telemetry, MAX).unwrap();
        let bytes = encode_protobuf(&ev);
        assert_eq!(decode_protobuf(&bytes, Kind::Telemetry, MAX).unwrap(), ev);
        let e = br#"{"client_id": "c-1", "experiment": "s", "branch": "control", "event": "exposure", "timestamp": "2026-11-02T08:00:00Z"}"#;
        let ev = decode_json(e, Kind::Enrollment, MAX).unwrap();
        assert_eq!(
            decode_protobuf(&encode_protobuf(&ev), Kind::Enrollment, MAX).unwrap(),
            ev
        );
        assert_eq!(
            decode_protobuf(&[0xff, 0xff, 0xff], Kind::Telemetry, MAX)
                .unwrap_err()
                .reason,
            RejectReason::InvalidProtobuf
        );
        assert_eq!(
            decode_protobuf(&[], Kind::Telemetry, MAX)
                .unwrap_err()
                .reason,
            RejectReason::MissingField
        );
    }
}
