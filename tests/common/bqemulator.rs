//! A real BigQuery emulator (bqemulator 1.4.0, in-memory) for integration tests, started
//! through `deploy/local/start-bqemulator.sh` on free loopback ports.
//!
//! Start it once per test binary with [`BqEmulator::shared`] and give every test its own
//! dataset. Its memory grows with every row and is never freed (DESIGN.md section 11), so
//! keep the tests small. Fault tests own their emulator ([`BqEmulator::start`]) and kill or
//! restart it; dropping it kills it. An in-memory emulator forgets everything when killed;
//! [`BqEmulator::start_persistent`] keeps what it committed across a restart, as BigQuery
//! does across an outage.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use slipstream::publish::bigquery::{BigQueryConfig, BigQuerySink};

/// A running emulator; dropping it kills it.
pub struct BqEmulator {
    pub project: String,
    pub rest_port: u16,
    pub grpc_port: u16,
    /// The emulator process (detached by the script, so a pid rather than a `Child`).
    pid: Option<u32>,
    /// Holds `bqemulator.log`: read it when a test fails.
    pub dir: PathBuf,
    /// Tables kept in a DuckDB file under `dir`, across restarts.
    persistent: bool,
}

/// `deploy/local/` of this crate; `SLIPSTREAM_DEPLOY_DIR` overrides it.
fn deploy_dir() -> PathBuf {
    match std::env::var_os("SLIPSTREAM_DEPLOY_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local"),
    }
}

/// A port that was free a moment ago (the OS picks it; we release it for the emulator).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
        .is_ok()
}

impl BqEmulator {
    /// Starts an emulator for `project` on free ports; retries on other ports if taken.
    pub fn start(project: &str) -> BqEmulator {
        let mut last_error = String::new();
        for _ in 0..5 {
            let (rest, grpc) = (free_port(), free_port());
            if rest == grpc {
                continue;
            }
            let mut emu = BqEmulator::stopped(project, rest, grpc);
            match emu.try_start() {
                Ok(()) => return emu,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start bqemulator: {last_error}");
    }

    /// Starts an emulator that keeps its tables in a file: [`BqEmulator::restart`] (after
    /// [`BqEmulator::kill`] too) finds every table it had committed.
    pub fn start_persistent(project: &str) -> BqEmulator {
        let mut emu = BqEmulator::not_started(project);
        emu.persistent = true;
        let _ = std::fs::remove_dir_all(&emu.dir); // a crashed earlier test's tables
        emu.restart();
        emu
    }

    /// An emulator that is not running yet, on ports chosen now: for tests where the sink
    /// must exist before the service. Start it with [`BqEmulator::restart`].
    pub fn not_started(project: &str) -> BqEmulator {
        let (rest, mut grpc) = (free_port(), free_port());
        while grpc == rest {
            grpc = free_port();
        }
        BqEmulator::stopped(project, rest, grpc)
    }

    fn stopped(project: &str, rest_port: u16, grpc_port: u16) -> BqEmulator {
        BqEmulator {
            project: project.to_string(),
            rest_port,
            grpc_port,
            pid: None,
            dir: std::env::temp_dir().join(format!("slipstream-bqemulator-{rest_port}")),
            persistent: false,
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let script = deploy_dir().join("start-bqemulator.sh");
        let out = Command::new(&script)
            .args([
                &self.rest_port.to_string(),
                &self.grpc_port.to_string(),
                &self.project,
                &self.dir.to_string_lossy().into_owned(),
            ])
            // The emulator dies with this test binary even if Drop never runs (statics).
            .env("WATCH_PID", std::process::id().to_string())
            .env(
                "BQEMULATOR_PERSISTENT",
                if self.persistent { "1" } else { "0" },
            )
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}): {}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let pid = stdout.lines().last().unwrap_or("").trim();
        self.pid = Some(
            pid.parse()
                .map_err(|_| format!("start-bqemulator.sh printed {pid:?}, not a pid"))?,
        );
        Ok(())
    }

    /// One emulator (project `slipstream-test`) for the whole test binary. It is never
    /// dropped; the script's watchdog stops it when the test process exits.
    pub fn shared() -> &'static BqEmulator {
        static EMULATOR: OnceLock<BqEmulator> = OnceLock::new();
        EMULATOR.get_or_init(|| BqEmulator::start("slipstream-test"))
    }

    pub fn rest_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.rest_port)
    }

    pub fn grpc_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// Kills the emulator (SIGKILL, a crash) and waits until its ports are closed. Unless
    /// persistent, it forgets every dataset.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while (port_open(self.rest_port) || port_open(self.grpc_port))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// (Re)starts the emulator on the same ports, killing the running one first.
    pub fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        // The ports can linger for a moment after the old process exits.
        for _ in 0..50 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "could not restart bqemulator on ports {}/{}: {last_error}",
            self.rest_port, self.grpc_port
        );
    }
}

impl Drop for BqEmulator {
    fn drop(&mut self) {
        self.kill();
        // Keep the log of a failed test for reading; otherwise leave nothing behind.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Runs a query on the emulator; its rows.
pub fn query(emu: &BqEmulator, sql: &str) -> Vec<Value> {
    let mut c = BigQueryConfig::new(&emu.project, "unused");
    c.rest_url = Some(emu.rest_url());
    c.grpc_url = Some(emu.grpc_url());
    BigQuerySink::new(c).unwrap().query_rows(sql).unwrap()
}

/// A row as comparable text. Numbers are compared at 12 significant digits: the
/// emulator's JSON answers can be one ulp off the double that was written.
pub fn canonical(row: &Value) -> String {
    let obj: BTreeMap<String, String> = row
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            let v = match v {
                Value::Number(n) => format!("{:.11e}", n.as_f64().unwrap()),
                Value::String(s) => match s.parse::<f64>() {
                    Ok(x) if k == "parameter" => format!("{x:.11e}"),
                    _ => s.clone(),
                },
                other => other.to_string(),
            };
            (k.clone(), v)
        })
        .collect();
    format!("{obj:?}")
}

/// Rows as sorted comparable text.
pub fn sorted(rows: &[Value]) -> Vec<String> {
    let mut v: Vec<String> = rows.iter().map(canonical).collect();
    v.sort();
    v
}

/// Asserts every table of a local-sink directory (at least `min_tables`) is in `dataset`
/// with the same rows, once each.
pub fn assert_bigquery_equals_local(
    emu: &BqEmulator,
    dataset: &str,
    local: &Path,
    min_tables: usize,
) {
    let tables = super::all_tables(local);
    assert!(tables.len() >= min_tables, "only {} tables", tables.len());
    for name in tables.keys() {
        let table = name.trim_end_matches(".ndjson");
        let want = super::table(local, table);
        let got = query(emu, &format!("SELECT * FROM {dataset}.{table}"));
        assert_eq!(got.len(), want.len(), "{table}: row count");
        let (g, w) = (sorted(&got), sorted(&want));
        if let Some(i) = (0..g.len()).find(|&i| g[i] != w[i]) {
            panic!(
                "{table}: rows differ; first difference:\n bigquery: {}\n local:    {}",
                g[i], w[i]
            );
        }
    }
}
