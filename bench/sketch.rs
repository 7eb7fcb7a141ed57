//! Sketch layer benchmark: builds `DAYS` days of activity through the write
//! buffer into an in-memory store, then times the queries the HTTP API runs.
//!
//! Scale (env): SKETCH_BENCH_CLIENTS clients active per day (default
//! 1,000,000, out of a pool twice that size), SKETCH_BENCH_COMBOS dimension
//! combinations (default 20,000), SKETCH_BENCH_DAYS (default 28).
//! Run: `cargo bench --bench sketch` (release build); under `cargo test` (no `--bench`
//! argument) it returns at once. The population is `bench/activity.rs`.

#[path = "activity.rs"]
mod activity;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use activity::{env, Population, CHANNEL, OS};
use slipstream::sketch::{
    count, group_by, key::prefix, plan, plan_at, union_with, Level, MemorySource, Query, Scope,
    Sketch, SketchBuffer, SketchConfig, SketchKey, SketchSource,
};

struct Timing(Vec<Duration>);

impl Timing {
    fn measure(reps: usize, mut f: impl FnMut(usize)) -> Timing {
        let mut v = Vec::with_capacity(reps);
        for i in 0..reps {
            let t = Instant::now();
            f(i);
            v.push(t.elapsed());
        }
        v.sort();
        Timing(v)
    }

    fn pct(&self, p: f64) -> f64 {
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i].as_secs_f64() * 1e3
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` runs bench targets too: nothing heavy there.
    }
    let pop = Population::new(
        env("SKETCH_BENCH_CLIENTS", 1_000_000),
        env("SKETCH_BENCH_COMBOS", 20_000),
        env("SKETCH_BENCH_DAYS", 28),
    );
    let (per_day, pool, combos, days) = (pop.per_day, pop.pool, pop.combos, pop.days);
    let cfg = SketchConfig::default();
    let date = |d: u64| pop.date(d);
    println!("scale: {per_day} active clients a day (pool {pool}), {combos} combinations, {days} days, p = {}", cfg.precision.get());

    // Build: every event through the write buffer, one flush per day.
    let mut store = MemorySource::default();
    let mut buf = SketchBuffer::new(&cfg);
    let (mut events, mut record_time, mut flush_time) = (0u64, Duration::ZERO, Duration::ZERO);
    let mut seen = vec![false; pool as usize];
    let mut exact_dau = Vec::new();
    let build = Instant::now();
    for d in 0..days {
        let dt = date(d);
        let t = Instant::now();
        let mut dau = 0u64;
        pop.for_each_event(d, |c, id, pairs, first| {
            if first {
                dau += 1;
                if d + 28 >= days {
                    seen[c as usize] = true;
                }
            }
            buf.record_activity(dt, id, pairs);
            events += 1;
        });
        record_time += t.elapsed();
        exact_dau.push(dau);
        let t = Instant::now();
        let writes = buf.prepare_flush(&store).expect("flush");
        buf.clear();
        for (k, v) in writes {
            store.insert_raw(k, v);
        }
        flush_time += t.elapsed();
    }
    let exact_mau = seen.iter().filter(|s| **s).count() as u64;
    println!(
        "build: {events} events in {:.1} s; record_activity {:.0} ns/event (12 sketch updates each), flush {:.2} s/day",
        build.elapsed().as_secs_f64(),
        record_time.as_nanos() as f64 / events as f64,
        flush_time.as_secs_f64() / days as f64
    );

    if env("SKETCH_BENCH_BUILD_ONLY", 0) == 1 {
        return;
    }

    // Raw sketch insert cost.
    let mut s = Sketch::new(cfg.precision);
    let n = 2_000_000u64;
    let ids: Vec<String> = (0..n).map(|i| format!("client-{i:08}")).collect();
    let t = Instant::now();
    for i in &ids {
        s.insert_client(i);
    }
    println!(
        "Sketch::insert_client: {:.1} ns/insert (dense)",
        t.elapsed().as_nanos() as f64 / n as f64
    );

    // Storage per day, by level.
    let last = date(days - 1);
    let mut by_level: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    store
        .scan_prefix(&prefix::date(last), &mut |k, v| {
            let level = match SketchKey::decode(k)?.scope {
                Scope::All => "all",
                Scope::Single { .. } => "single",
                Scope::Pair { .. } => "pair",
                Scope::Finest(_) => "finest",
                Scope::Branch { .. } => "branch",
            };
            let e = by_level.entry(level).or_default();
            e.0 += 1;
            e.1 += k.len() + v.len();
            Ok(())
        })
        .unwrap();
    let day_bytes: usize = by_level.values().map(|e| e.1).sum();
    println!(
        "storage on {last}: {:.1} MB (keys + values)",
        day_bytes as f64 / 1e6
    );
    for (level, (n, b)) in &by_level {
        println!(
            "  {level:>6}: {n:>6} sketches, {:>8.2} MB, {:>5.0} B mean",
            *b as f64 / 1e6,
            *b as f64 / *n as f64
        );
    }

    // Accuracy check of the headline numbers.
    let dau = count(&cfg, &store, &Query::dau(last)).unwrap();
    let mau = count(&cfg, &store, &Query::mau(last)).unwrap();
    println!(
        "DAU {:.0} ± {:.0} (exact {}), MAU {:.0} ± {:.0} (exact {exact_mau})",
        dau.estimate,
        dau.standard_error,
        exact_dau[days as usize - 1],
        mau.estimate,
        mau.standard_error
    );

    if env("SKETCH_BENCH_GROUP_ONLY", 0) == 1 {
        println!("group phase");
        for _ in 0..40 {
            let t = Instant::now();
            let g = group_by(&cfg, &store, &Query::mau(last).group("os").group("country")).unwrap();
            println!(
                "group_by os, country: {} groups in {:?}",
                g.len(),
                t.elapsed()
            );
        }
        return;
    }

    // Query latencies. Each repetition varies the date or the value so the
    // numbers are not one cached key.
    let countries: Vec<String> = (0..50).map(|i| format!("C{i:02}")).collect();
    let day_of = |i: usize| date(days - 1 - (i as u64 % days));
    let report = |name: &str, t: Timing, extra: String| {
        println!(
            "{name:<46} p50 {:>8.3} ms  p99 {:>8.3} ms  {extra}",
            t.pct(0.5),
            t.pct(0.99)
        );
    };
    let mut sink = 0.0;
    let t = Timing::measure(500, |i| {
        sink += count(&cfg, &store, &Query::dau(day_of(i)))
            .unwrap()
            .estimate
    });
    report("DAU unfiltered (1 rollup)", t, String::new());
    let t = Timing::measure(500, |i| {
        sink += count(
            &cfg,
            &store,
            &Query::dau(day_of(i)).filter("country", &countries[i % 50]),
        )
        .unwrap()
        .estimate
    });
    report("DAU country=X (1 rollup)", t, String::new());
    let t = Timing::measure(100, |i| {
        sink += count(&cfg, &store, &Query::mau(last)).unwrap().estimate + i as f64
    });
    report("MAU unfiltered (28 rollups)", t, String::new());
    let t = Timing::measure(200, |i| {
        sink += count(
            &cfg,
            &store,
            &Query::mau(last).filter("country", &countries[i % 50]),
        )
        .unwrap()
        .estimate
    });
    report("MAU country=X (28 rollups)", t, String::new());
    let t = Timing::measure(200, |i| {
        let q = Query::mau(last)
            .filter("os", OS[i % 5])
            .filter("country", &countries[i % 50]);
        sink += count(&cfg, &store, &q).unwrap().estimate
    });
    report("MAU os=X country=Y (28 pair rollups)", t, String::new());
    let t = Timing::measure(50, |i| {
        let q = Query::mau(last)
            .filter("os", OS[i % 5])
            .filter("channel", CHANNEL[i % 4])
            .filter("country", &countries[(i * 7) % 50]);
        sink += count(&cfg, &store, &q).unwrap().estimate
    });
    report(
        "MAU os, channel, country (finest, point reads)",
        t,
        format!("{} finest sketches a day", by_level["finest"].0),
    );
    let t = Timing::measure(50, |i| {
        let q = Query::dau(day_of(i));
        sink += union_with(&store, &plan_at(&cfg, &q, Level::Finest).unwrap())
            .unwrap()
            .estimate();
    });
    report("DAU unfiltered from finest (no rollups)", t, String::new());
    let t = Timing::measure(10, |_| {
        let q = Query::mau(last);
        sink += union_with(&store, &plan_at(&cfg, &q, Level::Finest).unwrap())
            .unwrap()
            .estimate();
    });
    report("MAU unfiltered from finest (no rollups)", t, String::new());
    let mut groups = 0;
    let t = Timing::measure(50, |i| {
        let g = group_by(&cfg, &store, &Query::dau(day_of(i)).group("country")).unwrap();
        groups = g.len();
    });
    report("DAU group_by country", t, format!("{groups} groups"));
    let t = Timing::measure(20, |_| {
        let g = group_by(&cfg, &store, &Query::mau(last).group("os")).unwrap();
        groups = g.len();
    });
    report(
        "MAU group_by os (28 days of single rollups)",
        t,
        format!("{groups} groups"),
    );
    let t = Timing::measure(10, |_| {
        let g = group_by(&cfg, &store, &Query::mau(last).group("os").group("country")).unwrap();
        groups = g.len();
    });
    report(
        "MAU group_by os, country (pair rollups)",
        t,
        format!("{groups} groups"),
    );
    let t = Timing::measure(20, |i| {
        let g = group_by(
            &cfg,
            &store,
            &Query::mau(last).filter("os", OS[i % 5]).group("channel"),
        )
        .unwrap();
        groups = g.len();
    });
    report(
        "MAU os=X group_by channel (pair scan)",
        t,
        format!("{groups} groups"),
    );
    let t = Timing::measure(1_000, |i| {
        sink += plan(&cfg, &Query::mau(day_of(i)).filter("os", "Linux"))
            .unwrap()
            .reads
            .len() as f64
    });
    report("plan only (MAU, 1 filter)", t, String::new());
    let mut one = store.get(&SketchKey::all(last).encode()).unwrap().unwrap();
    let t = Timing::measure(1_000, |_| {
        sink += Sketch::from_bytes(&one).unwrap().precision().get() as f64
    });
    report("Sketch::from_bytes (dense)", t, format!("{} B", one.len()));
    one.clear();
    println!("(checksum {sink:.0})");
}
