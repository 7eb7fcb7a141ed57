//! HLL queries over HTTP under load (issue 7, part 5), in two steps:
//!
//! - `build --config CONFIG --data-dir DIR`: writes the activity sketches of the synthetic
//!   population of `bench/activity.rs` (scale: HTTP_BENCH_CLIENTS active a day, default
//!   1,000,000; HTTP_BENCH_COMBOS, default 20,000; HTTP_BENCH_DAYS, default 28) into a sled
//!   state directory, through the same write buffer and key layout as the fold, one atomic
//!   batch per day. `slipstream serve` then answers over it.
//! - `load --url URL [--secs S] [--requests R] [--runs K] [--concurrency 1,16]`: for every
//!   query type and concurrency, N connections (one keep-alive HTTP/1.1 connection each, a
//!   closed loop: the next request leaves when the answer is read) send requests until R
//!   requests or S seconds, after a short warm-up. The cells are run K times in turn; the
//!   Markdown table reports the medians over the K runs of p50, p99 and requests/s.
//!
//! Run: `cargo bench --bench http_load -- build ...` then `-- load ...`; under `cargo test`
//! (no `--bench` argument) it returns at once.

#[path = "activity.rs"]
mod activity;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use activity::{env, Population, OS};
use slipstream::event::Day;
use slipstream::sketch::SketchBuffer;
use slipstream::state::{keys, Store, SKETCH_PREFIX};

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
    match args.get(1).map(String::as_str) {
        Some("build") => build(&args),
        Some("load") => load(&args),
        _ => {
            eprintln!("usage: http_load (build --config C --data-dir D | load --url U [--secs S] [--requests R] [--runs K] [--concurrency 1,16])");
            std::process::exit(2);
        }
    }
}

fn build(args: &[String]) {
    let config = PathBuf::from(arg(args, "--config").expect("--config"));
    let dir = PathBuf::from(arg(args, "--data-dir").expect("--data-dir"));
    let cfg = slipstream::config::load(&config).unwrap_or_else(|e| panic!("{e}"));
    let pop = Population::new(
        env("HTTP_BENCH_CLIENTS", 1_000_000),
        env("HTTP_BENCH_COMBOS", 20_000),
        env("HTTP_BENCH_DAYS", 28),
    );
    let store = Store::open(&dir, &cfg).expect("open state");
    let sketch_cfg = cfg.pipeline.sketch_config();
    let mut buf = SketchBuffer::new(&sketch_cfg);
    let started = Instant::now();
    let (mut events, mut keys_written, mut bytes) = (0u64, 0usize, 0usize);
    for d in 0..pop.days {
        let date = pop.date(d);
        pop.for_each_event(d, |_, id, pairs, _| {
            buf.record_activity(date, id, pairs);
            events += 1;
        });
        let writes = buf.prepare_flush(&store).expect("prepare sketches");
        let mut batch = sled::Batch::default();
        for (key, value) in writes {
            keys_written += 1;
            bytes += key.len() + value.len();
            batch.insert([&[SKETCH_PREFIX][..], &key].concat(), value);
        }
        batch.insert(keys::activity_day(Day::from_date(date)), &[]);
        store.apply(batch).expect("write batch");
        buf.clear();
    }
    store.flush().expect("flush");
    println!(
        "built {} days x {} active clients ({} pool, {} combinations): {events} events, {keys_written} sketches, {:.0} MB of keys and values ({:.1} MB a day), {:.0} MB on disk, in {:.1} s; last date {}",
        pop.days,
        pop.per_day,
        pop.pool,
        pop.combos,
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / pop.days as f64,
        store.size_on_disk() as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        pop.date(pop.days - 1)
    );
}

/// One query type: a name and the URL path of request number `i` (varied so the answers
/// do not come from one cached key).
struct Kind {
    name: &'static str,
    path: Box<dyn Fn(usize) -> String>,
}

fn kinds(last: chrono::NaiveDate, days: u64) -> Vec<Kind> {
    let day = move |i: usize| last - chrono::Days::new(i as u64 % days);
    let country = |i: usize| format!("C{:02}", i % 50);
    vec![
        Kind {
            name: "DAU, unfiltered",
            path: Box::new(move |i| format!("/v1/dau?date={}", day(i))),
        },
        Kind {
            name: "DAU, country=X",
            path: Box::new(move |i| format!("/v1/dau?date={}&country={}", day(i), country(i))),
        },
        Kind {
            name: "MAU, unfiltered",
            path: Box::new(move |_| format!("/v1/mau?date={last}")),
        },
        Kind {
            name: "MAU, country=X",
            path: Box::new(move |i| format!("/v1/mau?date={last}&country={}", country(i))),
        },
        Kind {
            name: "MAU, os=X and country=Y",
            path: Box::new(move |i| {
                format!(
                    "/v1/mau?date={last}&os={}&country={}",
                    OS[i % 5],
                    country(i / 5)
                )
            }),
        },
        Kind {
            name: "DAU group_by country",
            path: Box::new(move |i| format!("/v1/dau?date={}&group_by=country", day(i))),
        },
        Kind {
            name: "MAU group_by os",
            path: Box::new(move |_| format!("/v1/mau?date={last}&group_by=os")),
        },
    ]
}

/// Latencies and throughput of one cell run.
struct Cell {
    p50_ms: f64,
    p99_ms: f64,
    rps: f64,
    requests: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// `conns` closed-loop connections sending `path(i)` until `max_requests` in all or `secs`.
async fn run_cell(
    base: &str,
    path: &dyn Fn(usize) -> String,
    conns: usize,
    max_requests: usize,
    secs: f64,
) -> Cell {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let clients: Vec<reqwest::Client> = (0..conns)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client")
        })
        .collect();
    let workers = clients.iter().map(|client| {
        let next = &next;
        async move {
            let mut times = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= max_requests || Instant::now() >= deadline {
                    return times;
                }
                let url = format!("{base}{}", path(i));
                let t = Instant::now();
                let r = client.get(&url).send().await.expect("request");
                let status = r.status();
                let body = r.bytes().await.expect("body");
                assert!(
                    status.is_success(),
                    "{url}: {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                times.push(t.elapsed());
            }
        }
    });
    let mut all: Vec<Duration> = futures_join(workers).await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    all.sort();
    Cell {
        p50_ms: percentile(&all, 0.5),
        p99_ms: percentile(&all, 0.99),
        rps: all.len() as f64 / elapsed,
        requests: all.len(),
    }
}

/// Runs the futures concurrently on this (single-threaded) runtime.
async fn futures_join<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let set: Vec<_> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = set.iter().map(|_| None).collect();
    let mut set: Vec<Option<_>> = set.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (slot, fut) in out.iter_mut().zip(set.iter_mut()) {
            if let Some(f) = fut {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *slot = Some(v);
                        *fut = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("finished")).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load(args: &[String]) {
    let base = arg(args, "--url").expect("--url http://127.0.0.1:PORT");
    let secs: f64 = arg(args, "--secs").map_or(5.0, |s| s.parse().expect("--secs"));
    let max_requests: usize =
        arg(args, "--requests").map_or(20_000, |s| s.parse().expect("--requests"));
    let runs: usize = arg(args, "--runs").map_or(3, |s| s.parse().expect("--runs"));
    let concurrency: Vec<usize> = arg(args, "--concurrency")
        .unwrap_or_else(|| "1,16".into())
        .split(',')
        .map(|s| s.parse().expect("--concurrency 1,16"))
        .collect();
    let last: chrono::NaiveDate = arg(args, "--last-date")
        .expect("--last-date YYYY-MM-DD (printed by build)")
        .parse()
        .expect("--last-date");
    let days: u64 = arg(args, "--days").map_or(28, |s| s.parse().expect("--days"));
    // One thread for the load generator, so the server keeps the other core.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let kinds = kinds(last, days);
    let mut results: Vec<Vec<Vec<Cell>>> = kinds
        .iter()
        .map(|_| concurrency.iter().map(|_| Vec::new()).collect())
        .collect();
    rt.block_on(async {
        for k in &kinds {
            // Warm-up: the first reads of each key come from disk.
            run_cell(&base, &*k.path, 4, 200, 2.0).await;
        }
        for run in 0..runs {
            for (ki, k) in kinds.iter().enumerate() {
                for (ci, &c) in concurrency.iter().enumerate() {
                    let cell = run_cell(&base, &*k.path, c, max_requests, secs).await;
                    eprintln!(
                        "run {run}: {:<26} {c:>2} conns: {} requests, p50 {:.3} ms, p99 {:.3} ms, {:.0} req/s",
                        k.name, cell.requests, cell.p50_ms, cell.p99_ms, cell.rps
                    );
                    results[ki][ci].push(cell);
                }
            }
        }
    });
    print!("| query |");
    for c in &concurrency {
        print!(" p50 / p99 at {c} conn. | req/s at {c} |");
    }
    println!();
    print!("|---|");
    for _ in &concurrency {
        print!("---|---|");
    }
    println!();
    for (k, cells) in kinds.iter().zip(&results) {
        print!("| {} |", k.name);
        for runs in cells {
            let p50 = median(runs.iter().map(|c| c.p50_ms).collect());
            let p99 = median(runs.iter().map(|c| c.p99_ms).collect());
            let rps = median(runs.iter().map(|c| c.rps).collect());
            print!(" {} / {} ms | {rps:.0} |", fmt_ms(p50), fmt_ms(p99));
        }
        println!();
    }
}

/// Milliseconds with three significant digits.
fn fmt_ms(ms: f64) -> String {
    if ms >= 100.0 {
        format!("{ms:.0}")
    } else if ms >= 10.0 {
        format!("{ms:.1}")
    } else if ms >= 1.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}
