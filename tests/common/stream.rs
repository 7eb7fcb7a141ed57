//! Helpers for tests of `slipstream run` through a real broker: a config with topics of its
//! own, event files split into chunks produced over time (a stream that keeps flowing), and
//! a `run` process whose log a test can wait on, signal and kill.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::broker::Broker;
use super::{bin, p, slipstream, write};

/// The experiment every stream test folds (small windows, few replicates: fast).
pub const EXPERIMENT: &str = r#"
[[experiment]]
slug = "stream-test"
branches = ["control", "treatment"]
enrollment_start = "2026-11-01"
enrollment_period = 3
end_date = "2026-11-15"
analysis_bases = ["enrollments", "exposures"]
segments = [{ name = "windows_users", where = 'os = "Windows"' }]
"#;

/// Writes `c.toml` for topics `<name>-enr`/`<name>-tel` (created on `broker` with
/// `partitions` each) and group `<name>-group`; `extra_kafka` adds `[pipeline.kafka]` lines.
pub fn config(
    dir: &Path,
    broker: &Broker,
    name: &str,
    partitions: u32,
    extra_kafka: &str,
) -> PathBuf {
    for t in ["enr", "tel"] {
        broker.create_topic(&format!("{name}-{t}"), partitions);
    }
    write(
        dir,
        "c.toml",
        &format!(
            r#"
[pipeline]
republish_threshold = 0.0
replicates = 50
batch_events = 2000
batch_millis = 200

[pipeline.kafka]
enrollments_topic = "{name}-enr"
telemetry_topic = "{name}-tel"
group_id = "{name}-group"
{extra_kafka}
{EXPERIMENT}"#
        ),
    )
}

/// Generates events for `clients` clients into `<dir>/events.ndjson`.
pub fn generate(dir: &Path, cfg: &Path, clients: u32, seed: u64) -> PathBuf {
    let events = dir.join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(cfg),
        "--clients",
        &clients.to_string(),
        "--seed",
        &seed.to_string(),
        "--out",
        p(&events),
    ]);
    events
}

/// The tables of an uninterrupted `replay` of `events` (the reference).
pub fn replay_tables(dir: &Path, cfg: &Path, events: &Path) -> BTreeMap<String, String> {
    let out = dir.join("replay-out");
    slipstream(&[
        "replay",
        "--config",
        p(cfg),
        "--input",
        p(events),
        "--data-dir",
        p(&dir.join("replay-state")),
        "--out",
        p(&out),
    ]);
    super::all_tables(&out)
}

/// Splits an event file into `n` files of consecutive lines (the stream, in time order).
pub fn split(events: &Path, n: usize) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(events).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let per = lines.len().div_ceil(n);
    lines
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let path = events.with_extension(format!("part{i}.ndjson"));
            std::fs::write(&path, chunk.join("\n") + "\n").unwrap();
            path
        })
        .collect()
}

/// Produces one event file into the config's topics.
pub fn produce(broker: &str, cfg: &Path, events: &Path) {
    slipstream(&[
        "produce",
        "--brokers",
        broker,
        "--input",
        p(events),
        "--config",
        p(cfg),
    ]);
}

/// Produces the chunks one after another with `gap` between them, on a thread: a stream
/// that keeps flowing while the test does something to the service.
pub fn trickle(
    broker: &str,
    cfg: &Path,
    chunks: Vec<PathBuf>,
    gap: Duration,
) -> std::thread::JoinHandle<()> {
    let (broker, cfg) = (broker.to_owned(), cfg.to_owned());
    std::thread::spawn(move || {
        for chunk in chunks {
            produce(&broker, &cfg, &chunk);
            std::thread::sleep(gap);
        }
    })
}

/// Asserts two sets of tables are identical, naming the first differing row.
pub fn assert_same(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>, what: &str) {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: different tables"
    );
    for (name, text) in a {
        if text != &b[name] {
            let (x, y): (Vec<&str>, Vec<&str>) =
                (text.lines().collect(), b[name].lines().collect());
            let i = (0..x.len().min(y.len()))
                .find(|&i| x[i] != y[i])
                .unwrap_or(x.len().min(y.len()));
            panic!(
                "{what}: table {name} differs ({} vs {} rows); first difference at row {i}:\n {}\n {}",
                x.len(),
                y.len(),
                x.get(i).unwrap_or(&""),
                y.get(i).unwrap_or(&"")
            );
        }
    }
    assert!(a.len() > 30, "{what}: only {} tables", a.len());
}

/// A running `slipstream run` with its stderr (log) collected line by line.
pub struct Run {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    stdout: Arc<Mutex<String>>,
    /// Who this is, in failure messages.
    pub name: String,
}

impl Run {
    /// Starts `slipstream run` with the given arguments after `run` (log level info).
    pub fn start<S: AsRef<std::ffi::OsStr>>(name: &str, args: &[S]) -> Run {
        Run::start_env(name, args, &[])
    }

    pub fn start_env<S: AsRef<std::ffi::OsStr>>(
        name: &str,
        args: &[S],
        env: &[(&str, &str)],
    ) -> Run {
        let mut cmd = Command::new(bin());
        cmd.arg("run")
            .args(args)
            .env("SLIPSTREAM_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn slipstream run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (l, err) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let (o, mut out) = (stdout.clone(), child.stdout.take().unwrap());
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = out.read_to_string(&mut text);
            o.lock().unwrap().push_str(&text);
        });
        Run {
            child,
            log,
            stdout,
            name: name.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log, shared: it stays readable after [`Run::wait`] consumed the run.
    pub fn log(&self) -> Arc<Mutex<Vec<String>>> {
        self.log.clone()
    }

    /// Lines of the log containing `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits until the log holds `n` lines containing `needle`; false on timeout or exit.
    /// Waits (up to 40 s) until the consumer got its first partition; panics otherwise.
    pub fn assert_assigned(&mut self) {
        assert!(
            self.wait_for("partition assigned", 1, Duration::from_secs(40)),
            "{} got no partition:\n{}",
            self.name,
            self.log_tail(30)
        );
    }

    pub fn wait_for(&mut self, needle: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(needle) >= n {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() {
                std::thread::sleep(Duration::from_millis(100)); // let the reader finish
                return self.count(needle) >= n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().unwrap().is_some()
    }

    /// Sends a signal by name (`TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid());
    }

    /// SIGKILL and reap.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the exit (panics after `timeout`, with the log); the status and stdout.
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(200)); // let the readers finish
                let out = self.stdout.lock().unwrap().clone();
                return (status, out);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "{} did not exit within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` log lines, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `N` from a `run` summary line ("consumed N messages: ...").
pub fn consumed(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("consumed "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `consumed N messages` in {stdout:?}"))
}

/// A small deterministic random source (xorshift), seeded per run and printed, so that a
/// failure can be repeated with `SLIPSTREAM_TEST_SEED`.
pub struct Rng(u64);

impl Rng {
    pub fn from_env_or_time(what: &str) -> Rng {
        let seed = std::env::var("SLIPSTREAM_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{what}: SLIPSTREAM_TEST_SEED={seed}");
        Rng(seed | 1)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Arguments of `slipstream run` on `brokers` with state in `dir/state`, tables in
/// `dir/out`, stopping after `idle_exit_secs` of quiet once caught up.
pub fn run_args(cfg: &Path, brokers: &str, dir: &Path, idle_exit_secs: u32) -> Vec<String> {
    vec![
        "--config".into(),
        p(cfg).into(),
        "--brokers".into(),
        brokers.into(),
        "--data-dir".into(),
        p(&dir.join("state")).into(),
        "--out".into(),
        p(&dir.join("out")).into(),
        "--idle-exit-secs".into(),
        idle_exit_secs.to_string(),
    ]
}
