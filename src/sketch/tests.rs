//! End-to-end tests of the sketch layer on generated activity with exact
//! distinct counts: write buffer → store → planner → answers.

use std::collections::{BTreeMap, HashSet};

use chrono::{Days, NaiveDate};

use super::testutil::Rng;
use super::*;

fn d(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn cfg() -> SketchConfig {
    SketchConfig::default()
}

/// Flushes a buffer into a store the way the fold does: read, merge, write.
fn flush(buf: &mut SketchBuffer, store: &mut MemorySource) {
    for (k, v) in buf.prepare_flush(store).unwrap() {
        store.insert_raw(k, v);
    }
    buf.clear();
}

const OS: [&str; 4] = ["Windows", "Darwin", "Linux", "Android"];
const CHANNEL: [&str; 3] = ["release", "beta", "nightly"];
const COUNTRY: [&str; 8] = ["US", "DE", "FR", "IN", "BR", "JP", "GB", "CA"];

/// One activity event: day index, client, and dimension values
/// (os, channel, country, app_version); `None` when the event lacks it.
struct Event {
    day: u64,
    client: u32,
    dims: [Option<&'static str>; 4],
}

const VERSIONS: [&str; 6] = ["128", "129", "130", "131", "132", "133"];
const DIM_NAMES: [&str; 4] = ["os", "channel", "country", "app_version"];

struct Data {
    start: NaiveDate,
    events: Vec<Event>,
}

impl Data {
    /// `clients` clients over `days` days; each is active on a day with a
    /// client-specific probability, keeps os/channel/country, and upgrades
    /// its app version on some days (sending events under both versions).
    fn generate(clients: u32, days: u64, seed: u64) -> Data {
        let mut rng = Rng::new(seed);
        let mut events = Vec::new();
        for c in 0..clients {
            let activity = [5, 20, 50][rng.below(3) as usize];
            let os = OS[rng.below(4) as usize];
            let channel = CHANNEL[(rng.below(6) as usize).min(2)];
            let country = COUNTRY[rng.below(8) as usize];
            let mut version = rng.below(3) as usize;
            for day in 0..days {
                if rng.below(100) >= activity {
                    continue;
                }
                let country = if rng.below(50) == 0 {
                    None
                } else {
                    Some(country)
                };
                let mut push = |v: usize| {
                    events.push(Event {
                        day,
                        client: c,
                        dims: [Some(os), Some(channel), country, Some(VERSIONS[v])],
                    })
                };
                push(version);
                if version + 1 < VERSIONS.len() && rng.below(12) == 0 {
                    version += 1;
                    push(version);
                }
            }
        }
        Data {
            start: d("2026-10-01"),
            events,
        }
    }

    fn date(&self, day: u64) -> NaiveDate {
        self.start + Days::new(day)
    }

    /// Writes every event through a buffer, flushing every `every` days.
    fn store(&self, every: u64) -> MemorySource {
        let mut store = MemorySource::default();
        let mut buf = SketchBuffer::new(&cfg());
        let mut last_day = 0;
        for e in &self.events_by_day() {
            if e.day / every != last_day / every {
                flush(&mut buf, &mut store);
            }
            last_day = e.day;
            let dims: Vec<(&str, &str)> = DIM_NAMES
                .iter()
                .zip(e.dims)
                .filter_map(|(n, v)| v.map(|v| (*n, v)))
                .collect();
            buf.record_activity(self.date(e.day), &format!("client-{}", e.client), &dims);
        }
        flush(&mut buf, &mut store);
        store
    }

    fn events_by_day(&self) -> Vec<&Event> {
        let mut v: Vec<&Event> = self.events.iter().collect();
        v.sort_by_key(|e| (e.day, e.client));
        v
    }

    /// Exact distinct clients with an event in the range matching every filter.
    fn exact(&self, q: &Query) -> usize {
        let mut seen = HashSet::new();
        for e in &self.events {
            let date = self.date(e.day);
            if date < q.start || date > q.end {
                continue;
            }
            let ok = q.filters.iter().all(|(dim, val)| {
                let i = DIM_NAMES.iter().position(|n| n == dim).unwrap();
                e.dims[i].unwrap_or(MISSING_VALUE) == val
            });
            if ok {
                seen.insert(e.client);
            }
        }
        seen.len()
    }
}

#[test]
fn a_client_is_counted_once_across_days_and_values() {
    let mut store = MemorySource::default();
    let mut buf = SketchBuffer::new(&cfg());
    // Active on three days; upgrades on the second (two versions that day).
    let days = ["2026-11-01", "2026-11-02", "2026-11-03"];
    for (i, day) in days.iter().enumerate() {
        buf.record_activity(d(day), "c-1", &[("os", "Linux"), ("app_version", "132")]);
        if i == 1 {
            buf.record_activity(d(day), "c-1", &[("os", "Linux"), ("app_version", "133")]);
            flush(&mut buf, &mut store); // a flush between two events of one day
        }
    }
    buf.record_activity(
        d("2026-11-02"),
        "c-2",
        &[("os", "Darwin"), ("app_version", "133")],
    );
    let long = "x".repeat(100);
    buf.record_activity(d("2026-11-05"), "c-3", &[("country", long.as_str())]);
    flush(&mut buf, &mut store);

    // Small counts are sparse: the estimate is the count to within 1e-6.
    let est = |q: Query| count(&cfg(), &store, &q).unwrap().estimate.round();
    assert_eq!(est(Query::mau(d("2026-11-03"))), 2.0);
    assert_eq!(est(Query::mau(d("2026-11-03")).filter("os", "Linux")), 1.0);
    assert_eq!(est(Query::dau(d("2026-11-02"))), 2.0);
    assert_eq!(est(Query::dau(d("2026-11-02")).filter("os", "Linux")), 1.0);
    assert_eq!(
        est(Query::dau(d("2026-11-02")).filter("app_version", "132")),
        1.0
    );
    assert_eq!(
        est(Query::dau(d("2026-11-02")).filter("app_version", "133")),
        2.0
    );
    assert_eq!(
        est(Query::dau(d("2026-11-03")).filter("country", MISSING_VALUE)),
        1.0
    );
    assert_eq!(est(Query::dau(d("2026-11-04"))), 0.0);
    // Values longer than MAX_VALUE_BYTES are cut when stored and when queried.
    assert_eq!(
        est(Query::dau(d("2026-11-05")).filter("country", &long)),
        1.0
    );
    assert_eq!(
        est(Query::dau(d("2026-11-05")).filter("country", &long[..64])),
        1.0
    );
    // Three filters: the finest sketches.
    let q = Query::dau(d("2026-11-02"))
        .filter("os", "Linux")
        .filter("app_version", "133")
        .filter("channel", MISSING_VALUE);
    assert_eq!(plan(&cfg(), &q).unwrap().level, Level::Finest);
    assert_eq!(est(q), 1.0);

    let groups = group_by(
        &cfg(),
        &store,
        &Query::dau(d("2026-11-02")).group("app_version"),
    )
    .unwrap();
    let shown: Vec<(String, f64)> = groups
        .iter()
        .map(|g| (g.values[0].1.clone(), g.answer.estimate.round()))
        .collect();
    assert_eq!(shown, [("132".to_string(), 1.0), ("133".to_string(), 2.0)]);
}

#[test]
fn answers_carry_an_interval() {
    let mut s = Sketch::new(Precision::DEFAULT);
    for i in 0..50_000 {
        s.insert_client(&format!("c{i}"));
    }
    let a = s.answer();
    assert!((a.standard_error / a.estimate - 0.01625).abs() < 1e-9);
    assert!((a.upper - a.estimate - 1.96 * a.standard_error).abs() < 1e-6);
    assert_eq!(s.interval95(), (a.lower, a.upper));
    let r = a.ratio(&a).unwrap();
    assert_eq!(r.estimate, 1.0);
    assert!(CountAnswer::new(0.0, 0.0)
        .ratio(&CountAnswer::new(0.0, 0.0))
        .is_none());
}

/// Rollups are the union of the finest sketches they cover, so each query
/// gives the same bytes (hence the same estimate) at either level.
#[test]
fn rollups_equal_finest_unions_exactly() {
    let data = Data::generate(6_000, 10, 11);
    let store = data.store(3);
    let c = cfg();
    let end = data.date(9);
    let queries = [
        Query::dau(end),
        Query::mau(end),
        Query::wau(end).filter("country", "DE"),
        Query::mau(end).filter("os", "Linux"),
        Query::mau(end).filter("app_version", "130"),
        Query::dau(end)
            .filter("os", "Windows")
            .filter("channel", "beta"),
        Query::mau(end)
            .filter("country", "FR")
            .filter("app_version", "131"),
        Query::mau(end)
            .filter("country", MISSING_VALUE)
            .filter("os", "Darwin"),
    ];
    for q in &queries {
        let natural = plan(&c, q).unwrap();
        assert_ne!(natural.level, Level::Finest);
        let mut a = union_with(&store, &natural).unwrap();
        let finest = plan_at(&c, q, Level::Finest).unwrap();
        let mut b = union_with(&store, &finest).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes(), "{q:?}");
        // The finest level's two ways of reading a day agree too.
        let mut scan = finest.clone();
        scan.max_point_reads = 0;
        assert_eq!(
            union_with(&store, &scan).unwrap().to_bytes(),
            b.to_bytes(),
            "{q:?}"
        );
        assert!(a.estimate() > 0.0, "{q:?}");
    }
    // Three or more dimensions: only the finest level, read both ways.
    for q in [
        Query::mau(end)
            .filter("os", "Linux")
            .filter("channel", "beta")
            .filter("country", "DE"),
        Query::wau(end)
            .filter("os", "Darwin")
            .filter("country", MISSING_VALUE)
            .group("app_version"),
        Query::dau(end)
            .filter("channel", "release")
            .group("os")
            .group("country"),
    ] {
        let mut p = plan(&c, &q).unwrap();
        assert_eq!(p.level, Level::Finest);
        let points = group_by_with(&store, &p).unwrap();
        p.max_point_reads = 0;
        assert_eq!(group_by_with(&store, &p).unwrap(), points, "{q:?}");
        assert!(!points.is_empty());
    }
    let grouped = [
        Query::mau(end).group("country"),
        Query::dau(end).group("os").group("channel"),
        Query::wau(end).filter("os", "Linux").group("app_version"),
        Query::mau(end)
            .filter("channel", "release")
            .group("country"),
    ];
    for q in &grouped {
        let natural = group_by_with(&store, &plan(&c, q).unwrap()).unwrap();
        let mut plan_finest = plan_at(&c, q, Level::Finest).unwrap();
        let finest = group_by_with(&store, &plan_finest).unwrap();
        assert_eq!(natural, finest, "{q:?}");
        plan_finest.max_point_reads = 0;
        assert_eq!(
            group_by_with(&store, &plan_finest).unwrap(),
            finest,
            "{q:?}"
        );
        assert!(natural.len() > 1);
        // And each group equals the filtered count.
        for g in &natural {
            let mut f = q.clone();
            f.group_by.clear();
            for (dim, v) in &g.values {
                f = f.filter(dim, v);
            }
            assert_eq!(count(&c, &store, &f).unwrap(), g.answer, "{f:?}");
        }
    }
}

/// DAU, WAU and MAU over dozens of segments: each error within 3 standard
/// errors (or one whole client in the sparse regime, where the only error is
/// a rare collision of two clients), and the reported errors match the
/// observed spread.
#[test]
fn estimates_are_accurate_and_errors_are_calibrated() {
    let data = Data::generate(40_000, 35, 5);
    let store = data.store(7);
    let c = cfg();
    let mut queries = Vec::new();
    for day in [27u64, 29, 31, 34] {
        let end = data.date(day);
        queries.push(Query::dau(end));
        for country in COUNTRY {
            queries.push(Query::dau(end).filter("country", country));
        }
    }
    let end = data.date(34);
    queries.push(Query::wau(end));
    queries.push(Query::mau(end));
    for country in COUNTRY {
        queries.push(Query::wau(end).filter("country", country));
        queries.push(Query::mau(end).filter("country", country));
        queries.push(
            Query::mau(end)
                .filter("country", country)
                .filter("os", "Linux"),
        );
        queries.push(
            Query::mau(end)
                .filter("country", country)
                .filter("os", "Windows")
                .filter("channel", "release"),
        );
    }
    for os in OS {
        queries.push(Query::wau(data.date(20)).filter("os", os));
        queries.push(
            Query::mau(data.date(30))
                .filter("os", os)
                .filter("channel", "beta"),
        );
    }
    let (mut z2, mut dense, mut by_regime) = (0.0, 0, BTreeMap::new());
    for q in &queries {
        let truth = data.exact(q) as f64;
        let mut s = union_sketch(&c, &store, q).unwrap();
        let regime = s.regime();
        let a = s.answer();
        assert_eq!(a, count(&c, &store, q).unwrap());
        let err = a.estimate - truth;
        *by_regime.entry(format!("{regime:?}")).or_insert(0) += 1;
        if regime == Regime::Sparse {
            assert!(
                err.abs() <= (3.0 * a.standard_error).max(1.0),
                "{q:?}: {a:?} vs {truth}"
            );
        } else {
            let z = err / a.standard_error;
            assert!(z.abs() <= 3.0, "{q:?}: {a:?} vs {truth}, z = {z}");
            z2 += z * z;
            dense += 1;
        }
        assert!(a.lower <= a.estimate && a.estimate <= a.upper);
    }
    let rms = (z2 / dense as f64).sqrt();
    eprintln!(
        "{} queries {by_regime:?}; RMS z over {dense} dense answers = {rms:.3}",
        queries.len()
    );
    assert!(queries.len() >= 60 && dense >= 30, "{by_regime:?}");
    assert!((0.7..=1.4).contains(&rms), "RMS z = {rms}");
}

#[test]
fn experiment_branches_are_counted_per_branch() {
    let mut store = MemorySource::default();
    let mut buf = SketchBuffer::new(&cfg());
    for i in 0..300 {
        let branch = if i % 3 == 0 { "control" } else { "treatment" };
        buf.record_branch(d("2026-11-01"), &format!("c{i}"), "bug-1-slug", branch);
        buf.record_branch(d("2026-11-02"), &format!("c{i}"), "bug-1-slug", branch);
        buf.record_branch(d("2026-11-02"), &format!("c{i}"), "other", "x");
    }
    flush(&mut buf, &mut store);
    let got = experiment_branches(
        &cfg(),
        &store,
        "bug-1-slug",
        d("2026-11-01"),
        d("2026-11-02"),
    )
    .unwrap();
    let shown: Vec<(&str, f64)> = got
        .iter()
        .map(|(b, a)| (b.as_str(), a.estimate.round()))
        .collect();
    assert_eq!(shown, [("control", 100.0), ("treatment", 200.0)]);
    assert!(
        experiment_branches(&cfg(), &store, "bug-1", d("2026-11-01"), d("2026-11-02"))
            .unwrap()
            .is_empty()
    );
}

#[test]
fn bad_queries_say_what_is_wrong() {
    let c = SketchConfig {
        max_range_days: 31,
        ..cfg()
    };
    let day = d("2026-11-02");
    let msg = |q: Query| match plan(&c, &q) {
        Err(SketchError::BadQuery(m)) => m,
        other => panic!("{q:?} gave {other:?}"),
    };
    assert!(msg(Query::dau(day).filter("city", "Paris")).contains("unknown dimension \"city\""));
    assert!(msg(Query::dau(day).filter("os", "a").filter("os", "b")).contains("filtered twice"));
    assert!(msg(Query::dau(day)
        .group("os")
        .group("country")
        .group("channel"))
    .contains("at most 2"));
    assert!(
        msg(Query::dau(day).filter("os", "a").group("os")).contains("both filtered and grouped")
    );
    assert!(msg(Query::window(day, 32)).contains("longer than the maximum of 31"));
    let mut q = Query::dau(day);
    q.start = d("2026-11-03");
    assert!(msg(q).contains("after end"));
    assert!(plan(&c, &Query::window(day, 31)).is_ok());
    assert!(plan_at(&c, &Query::dau(day).filter("os", "a"), Level::Pair).is_err());
    assert!(matches!(
        group_by(&c, &MemorySource::default(), &Query::dau(day)),
        Err(SketchError::BadQuery(_))
    ));
}

#[test]
fn flush_merges_with_stored_sketches_and_reports_corruption() {
    let mut store = MemorySource::default();
    let mut buf = SketchBuffer::new(&cfg());
    let day = d("2026-11-02");
    for i in 0..100 {
        buf.record_activity(day, &format!("c{i}"), &[("os", "Linux")]);
    }
    assert_eq!(buf.len(), 12);
    flush(&mut buf, &mut store);
    assert!(buf.is_empty());
    for i in 50..150 {
        buf.record_activity(day, &format!("c{i}"), &[("os", "Linux")]);
    }
    flush(&mut buf, &mut store);
    assert_eq!(
        count(&cfg(), &store, &Query::dau(day))
            .unwrap()
            .estimate
            .round(),
        150.0
    );

    // A damaged stored sketch stops the flush with the key named, and the
    // pending delta is kept for a retry.
    let key = SketchKey::all(day).encode();
    let mut bad = store.get(&key).unwrap().unwrap();
    bad[20] ^= 1;
    store.insert_raw(key, bad);
    buf.record_activity(day, "c-new", &[("os", "Linux")]);
    let err = buf.prepare_flush(&store).unwrap_err().to_string();
    assert!(
        err.contains("2026-11-02 all") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(buf.len(), 12);
    assert!(count(&cfg(), &store, &Query::dau(day)).is_err());
}

#[test]
fn stored_sketches_of_another_precision_are_refused() {
    let mut store = MemorySource::default();
    let day = d("2026-11-02");
    let mut s = Sketch::new(Precision::new(14).unwrap());
    s.insert_client("c");
    store.insert(&SketchKey::all(day), &mut s);
    assert!(matches!(
        count(&cfg(), &store, &Query::dau(day)),
        Err(SketchError::IncompatiblePrecision {
            left: 12,
            right: 14
        })
    ));
}

#[test]
fn metered_reads_stop_at_the_limit_and_change_no_answer_below_it() {
    let data = Data::generate(300, 40, 7);
    let store = data.store(1);
    let q = Query::mau(data.date(39)).group("os");
    let full = group_by(&cfg(), &store, &q).unwrap();
    let probe = Metered::new(&store, u64::MAX);
    assert_eq!(group_by(&cfg(), &probe, &q).unwrap(), full);
    // One scan of the day's `os` rollups per day, and each of its 4 entries.
    assert_eq!(probe.used(), 28 * (1 + 4));
    let used = probe.used();
    assert_eq!(
        group_by(&cfg(), &Metered::new(&store, used), &q).unwrap(),
        full
    );
    match group_by(&cfg(), &Metered::new(&store, used - 1), &q) {
        Err(SketchError::OverBudget { limit }) => assert_eq!(limit, used - 1),
        other => panic!("{other:?}"),
    }
    // A DAU is one point read.
    let probe = Metered::new(&store, 1);
    count(&cfg(), &probe, &Query::dau(data.date(3))).unwrap();
    assert_eq!(probe.used(), 1);
}
