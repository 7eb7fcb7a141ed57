//! Synthetic events for an experiment config: enrollments, exposures, unenrollments and
//! daily telemetry, with a true effect in the non-reference branches, and the awkward
//! cases real pipelines see: contradictory branch tags, untagged pings, pre-enrollment
//! data, enrollments after the period, late arrivals and malformed lines.
//!
//! Output is in arrival order, day by day, so memory stays bounded by one day of events.
//! Every draw comes from a splitmix64 stream seeded by (seed, client, day), so the same
//! seed gives the same bytes on every machine and every release of this crate's
//! dependencies.

use std::collections::BTreeMap;
use std::io::Write;

use crate::config::{Config, Experiment};
use crate::event::{format_timestamp, Day, Timestamp};

/// Knobs of the generator; the defaults are what `slipstream generate` uses.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub clients: u64,
    pub seed: u64,
    /// Relative change of active_hours and uri_count in every non-reference branch.
    pub effect: f64,
    /// Fraction of events that arrive 1-3 days late.
    pub late_fraction: f64,
    /// Fraction of lines that are malformed.
    pub malformed_fraction: f64,
    /// Fraction of clients that report a branch other than their own.
    pub contradictory_fraction: f64,
    /// Fraction of pings with no experiment tag.
    pub untagged_fraction: f64,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            clients: 1000,
            seed: 1,
            effect: 0.1,
            late_fraction: 0.01,
            malformed_fraction: 0.001,
            contradictory_fraction: 0.01,
            untagged_fraction: 0.02,
        }
    }
}

/// Counts of what was written.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GenerateSummary {
    pub lines: u64,
    pub enrollments: u64,
    pub telemetry: u64,
    pub late: u64,
    pub malformed: u64,
}

/// splitmix64: tiny, fast, and fixed forever.
struct Rng(u64);

impl Rng {
    fn new(parts: &[u64]) -> Rng {
        let mut r = Rng(0x9E37_79B9_7F4A_7C15);
        for p in parts {
            r.0 ^= p.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            r.next();
        }
        r
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.f64(), self.f64());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
    fn pick<'a>(&mut self, weighted: &[(&'a str, f64)]) -> &'a str {
        let total: f64 = weighted.iter().map(|w| w.1).sum();
        let mut x = self.f64() * total;
        for (v, w) in weighted {
            if x < *w {
                return v;
            }
            x -= w;
        }
        weighted[weighted.len() - 1].0
    }
}

const OS: [(&str, f64); 3] = [("Windows", 0.7), ("Mac", 0.18), ("Linux", 0.12)];
const CHANNEL: [(&str, f64); 3] = [("release", 0.8), ("beta", 0.15), ("nightly", 0.05)];
const COUNTRY: [(&str, f64); 8] = [
    ("US", 0.3),
    ("DE", 0.15),
    ("FR", 0.1),
    ("GB", 0.1),
    ("BR", 0.1),
    ("IN", 0.1),
    ("JP", 0.08),
    ("CA", 0.07),
];

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// A client's fixed traits, drawn once from (seed, client).
struct Client {
    id: String,
    exp: usize,
    branch: usize,
    enroll_at: Timestamp,
    /// Enrolls the day after the period ends: never enrolled.
    enrolls_too_late: bool,
    second_enroll: bool,
    exposed_at: Option<Timestamp>,
    unenroll_at: Option<Timestamp>,
    contradictory: bool,
    activity: f64,
    hours_scale: f64,
    upgrade_day: Option<Day>,
    dims: [&'static str; 3],
}

fn client(cfg: &Config, opts: &GenerateOptions, i: u64) -> Client {
    let mut r = Rng::new(&[opts.seed, i]);
    let x = (i % cfg.experiments.len() as u64) as usize;
    let exp = &cfg.experiments[x];
    let total: f64 = exp.branches.iter().map(|b| b.ratio).sum();
    let mut pick = r.f64() * total;
    let branch = exp.branches.iter().position(|b| {
        pick -= b.ratio;
        pick < 0.0
    });
    let start = Day::from_date(exp.enrollment_start);
    let enrolls_too_late = r.chance(0.005);
    let enroll_day = if enrolls_too_late {
        start.plus(i64::from(exp.enrollment_period))
    } else {
        start.plus(r.below(u64::from(exp.enrollment_period)) as i64)
    };
    let enroll_at = Timestamp(
        Timestamp::from_day(enroll_day).0
            + r.below(MICROS_PER_DAY as u64 / 1_000_000) as i64 * 1_000_000,
    );
    let exposed_at = r
        .chance(0.8)
        .then(|| Timestamp(enroll_at.0 + r.below(3 * 86_400) as i64 * 1_000_000));
    let unenroll_at = r
        .chance(0.02)
        .then(|| Timestamp(enroll_at.0 + (1 + r.below(14)) as i64 * MICROS_PER_DAY));
    Client {
        id: format!("c-{i:07}"),
        exp: x,
        branch: branch.unwrap_or(exp.branches.len() - 1),
        enroll_at,
        enrolls_too_late,
        second_enroll: r.chance(0.03),
        exposed_at,
        unenroll_at,
        contradictory: r.chance(opts.contradictory_fraction),
        activity: 0.15 + 0.8 * r.f64(),
        hours_scale: 0.2 + 2.0 * r.f64() * r.f64(),
        upgrade_day: r.chance(0.3).then(|| enroll_day.plus(r.below(20) as i64)),
        dims: [r.pick(&OS), r.pick(&CHANNEL), r.pick(&COUNTRY)],
    }
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn dims_json(c: &Client, day: Day) -> String {
    let version = if c.upgrade_day.is_some_and(|u| day >= u) {
        "134"
    } else {
        "133"
    };
    format!(
        r#"{{"os":"{}","channel":"{}","country":"{}","app_version":"{version}"}}"#,
        c.dims[0], c.dims[1], c.dims[2]
    )
}

fn enrollment_line(c: &Client, exp: &Experiment, kind: &str, at: Timestamp) -> String {
    format!(
        r#"{{"client_id":"{}","experiment":{},"branch":{},"event":"{kind}","timestamp":"{}","dimensions":{}}}"#,
        c.id,
        json_str(&exp.slug),
        json_str(&exp.branches[c.branch].name),
        format_timestamp(at),
        dims_json(c, at.day())
    )
}

/// A malformed variant of a line, cycling through the kinds of damage.
fn malform(line: &str, r: &mut Rng) -> String {
    match r.below(5) {
        0 => line[..line.len() / 2].to_string(),
        1 => line.replacen("\"client_id\"", "\"client\"", 1),
        2 => line.replacen("T", "X", 1),
        3 => line
            .replacen("\"experiment\":\"", "\"experiment\":\"no-such-", 1)
            .replacen(
                "\"data_source\":\"main\"",
                "\"data_source\":\"main\",\"metrics\":{\"active_hours\":\"lots\"}",
                1,
            ),
        _ => "\u{1}not json at all".to_string(),
    }
}

/// Writes the events of every configured experiment to `out`.
pub fn generate(
    cfg: &Config,
    opts: &GenerateOptions,
    out: &mut impl Write,
) -> std::io::Result<GenerateSummary> {
    let clients: Vec<Client> = (0..opts.clients).map(|i| client(cfg, opts, i)).collect();
    let first = cfg
        .experiments
        .iter()
        .map(|e| Day::from_date(e.enrollment_start))
        .min()
        .expect("validated config has experiments")
        .plus(-2);
    let lateness_days = i64::from(cfg.pipeline.allowed_lateness_hours.div_ceil(24));
    let last = cfg
        .experiments
        .iter()
        .map(|e| Day::from_date(e.end_date))
        .max()
        .unwrap()
        .plus(lateness_days + 1);
    let mut summary = GenerateSummary::default();
    // arrival day -> (arrival time, sequence, line)
    let mut delayed: BTreeMap<Day, Vec<(i64, u64, String)>> = BTreeMap::new();
    let mut seq = 0u64;
    let mut day = first;
    while day <= last {
        let mut todays = delayed.remove(&day).unwrap_or_default();
        for (i, c) in clients.iter().enumerate() {
            let exp = &cfg.experiments[c.exp];
            let mut r = Rng::new(&[opts.seed, i as u64, day.0 as u64, 1]);
            let mut emit = |at: Timestamp, line: String, r: &mut Rng, s: &mut GenerateSummary| {
                seq += 1;
                let (line, malformed) = if r.chance(opts.malformed_fraction) {
                    (malform(&line, r), true)
                } else {
                    (line, false)
                };
                s.malformed += u64::from(malformed);
                let delay = if r.chance(opts.late_fraction) {
                    (1 + r.below(3) as i64) * MICROS_PER_DAY
                } else {
                    r.below(600) as i64 * 1_000_000
                };
                let arrival = at.0 + delay;
                if Timestamp(arrival).day() > day {
                    s.late += u64::from(delay >= MICROS_PER_DAY);
                    delayed
                        .entry(Timestamp(arrival).day())
                        .or_default()
                        .push((arrival, seq, line));
                } else {
                    todays.push((arrival, seq, line));
                }
            };
            if c.enroll_at.day() == day {
                emit(
                    c.enroll_at,
                    enrollment_line(c, exp, "enroll", c.enroll_at),
                    &mut r,
                    &mut summary,
                );
                summary.enrollments += 1;
                if c.second_enroll {
                    let again = Timestamp(c.enroll_at.0 + 3_600_000_000);
                    emit(
                        again,
                        enrollment_line(c, exp, "enroll", again),
                        &mut r,
                        &mut summary,
                    );
                    summary.enrollments += 1;
                }
            }
            for (kind, at) in [("exposure", c.exposed_at), ("unenroll", c.unenroll_at)] {
                if let Some(at) = at.filter(|t| t.day() == day && !c.enrolls_too_late) {
                    emit(at, enrollment_line(c, exp, kind, at), &mut r, &mut summary);
                    summary.enrollments += 1;
                }
            }
            let enroll_day = c.enroll_at.day();
            if day < enroll_day.plus(-2) || !r.chance(c.activity) {
                continue;
            }
            let pings = 1 + u64::from(r.chance(0.3));
            for _ in 0..pings {
                let at = Timestamp(Timestamp::from_day(day).0 + r.below(86_400) as i64 * 1_000_000);
                let enrolled = at >= c.enroll_at && !c.enrolls_too_late;
                let tag = if !enrolled || r.chance(opts.untagged_fraction) {
                    String::new()
                } else {
                    let b = if c.contradictory && r.chance(0.5) {
                        (c.branch + 1) % exp.branches.len()
                    } else {
                        c.branch
                    };
                    format!(
                        "{}:{}",
                        json_str(&exp.slug),
                        json_str(&exp.branches[b].name)
                    )
                };
                let lift = if enrolled && exp.branches[c.branch].name != exp.reference_branch {
                    1.0 + opts.effect
                } else {
                    1.0
                };
                let hours = if r.chance(0.2) {
                    0.0
                } else {
                    (c.hours_scale * (0.5 * r.normal()).exp() * lift * 1e4).round() / 1e4
                };
                let uris = (hours * 30.0 * (0.5 + r.f64()) * lift).floor();
                let searches = r.below(4) * u64::from(r.chance(0.5));
                let line = format!(
                    r#"{{"client_id":"{}","submission_timestamp":"{}","data_source":"main","experiments":{{{tag}}},"dimensions":{},"metrics":{{"active_hours":{hours},"uri_count":{uris},"search_count":{searches}}}}}"#,
                    c.id,
                    format_timestamp(at),
                    dims_json(c, day)
                );
                emit(at, line, &mut r, &mut summary);
                summary.telemetry += 1;
            }
        }
        todays.sort_unstable_by_key(|(t, s, _)| (*t, *s));
        for (_, _, line) in todays {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            summary.lines += 1;
        }
        day = day.plus(1);
    }
    for (_, rest) in delayed {
        for (_, _, line) in rest {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            summary.lines += 1;
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            r#"[[experiment]]
slug = "gen-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-10"
"#,
        )
        .unwrap();
        crate::config::load(&p).unwrap()
    }

    #[test]
    fn same_seed_same_bytes_and_every_line_decodes_or_is_meant_bad() {
        let opts = GenerateOptions {
            clients: 200,
            malformed_fraction: 0.01,
            ..Default::default()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let sa = generate(&cfg(), &opts, &mut a).unwrap();
        generate(&cfg(), &opts, &mut b).unwrap();
        assert_eq!(a, b);
        let mut c = Vec::new();
        generate(
            &cfg(),
            &GenerateOptions {
                seed: 2,
                ..opts.clone()
            },
            &mut c,
        )
        .unwrap();
        assert_ne!(a, c);
        let text = String::from_utf8(a).unwrap();
        let bad = text
            .lines()
            .filter(|l| {
                crate::event::decode_json(l.as_bytes(), crate::event::Kind::Any, 1 << 20).is_err()
            })
            .count() as u64;
        assert!(
            bad <= sa.malformed && bad > 0,
            "bad {bad} malformed {}",
            sa.malformed
        );
        assert_eq!(text.lines().count() as u64, sa.lines);
        assert!(sa.late > 0 && sa.enrollments >= 200);
    }
}
