//! The synthetic activity population of the HLL benchmarks (issue 4's scale), shared by
//! `bench/sketch.rs` (in-memory queries) and `bench/http_load.rs` (sled state served over
//! HTTP), so both measure the same data.
//!
//! A pool of `2 × per_day` clients; each is active on a given day with probability 1/2 and
//! belongs to one of `combos` dimension combinations drawn with Zipf(1) popularity from a
//! space of 5 os × 4 channels × 50 countries × 25 versions; 2% of active clients also send
//! an event under the next version that day (an upgrade).

use chrono::{Days, NaiveDate};
use std::fmt::Write as _;

pub const OS: [&str; 5] = ["Windows", "Darwin", "Linux", "Android", "iOS"];
pub const CHANNEL: [&str; 4] = ["release", "beta", "nightly", "esr"];

/// splitmix64's finalizer: a deterministic hash for "random" choices.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Combination `code` of 5 × 4 × 50 × 25 = 25,000 possible ones.
fn dims_of(code: u64) -> [String; 4] {
    [
        OS[(code % 5) as usize].to_string(),
        CHANNEL[(code / 5 % 4) as usize].to_string(),
        format!("C{:02}", code / 20 % 50),
        format!("{}", 100 + code / 1000 % 25),
    ]
}

/// A number from the environment variable `name`, else `default`.
pub fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub struct Population {
    pub per_day: u64,
    pub pool: u64,
    pub combos: u64,
    pub days: u64,
    start: NaiveDate,
    combo_dims: Vec<[String; 4]>,
    client_combo: Vec<u32>,
}

impl Population {
    pub fn new(per_day: u64, combos: u64, days: u64) -> Population {
        let combos = combos.min(25_000);
        let pool = per_day * 2;
        // Zipf(1) popularity over the combinations, each mapped to a distinct
        // point of the 25,000-combination space.
        let mut cdf = Vec::with_capacity(combos as usize);
        let mut acc = 0.0;
        for k in 0..combos {
            acc += 1.0 / (k + 1) as f64;
            cdf.push(acc);
        }
        let total = acc;
        let code_of = |k: u64| (k * 7919 + 13) % 25_000;
        let combo_dims = (0..combos).map(|k| dims_of(code_of(k))).collect();
        let combo_of = |c: u64| {
            let u = (mix(c ^ 0xc0ffee) >> 11) as f64 / (1u64 << 53) as f64 * total;
            cdf.partition_point(|&x| x < u).min(combos as usize - 1)
        };
        let client_combo = (0..pool).map(|c| combo_of(c) as u32).collect();
        Population {
            per_day,
            pool,
            combos,
            days,
            start: NaiveDate::from_ymd_opt(2026, 10, 1).unwrap(),
            combo_dims,
            client_combo,
        }
    }

    /// Day `d` (0-based) as a date.
    pub fn date(&self, d: u64) -> NaiveDate {
        self.start + Days::new(d)
    }

    /// Calls `f(client, client_id, dimensions, first)` for every event of day `d`, in
    /// client order; `first` is false for the second event of an upgrading client.
    pub fn for_each_event(&self, d: u64, mut f: impl FnMut(u64, &str, &[(&str, &str)], bool)) {
        let mut id = String::new();
        for c in 0..self.pool {
            if mix(c ^ (d << 40) ^ 0x5eed) & 1 != 0 {
                continue;
            }
            id.clear();
            write!(id, "client-{c:08}").unwrap();
            let dims = &self.combo_dims[self.client_combo[c as usize] as usize];
            let pairs = [
                ("os", dims[0].as_str()),
                ("channel", dims[1].as_str()),
                ("country", dims[2].as_str()),
                ("app_version", dims[3].as_str()),
            ];
            f(c, &id, &pairs, true);
            if mix(c ^ (d << 40) ^ 0xface).is_multiple_of(50) {
                let next = format!("{}", dims[3].parse::<u32>().unwrap() + 1);
                f(
                    c,
                    &id,
                    &[pairs[0], pairs[1], pairs[2], ("app_version", &next)],
                    false,
                );
            }
        }
    }
}
