//! A real Kafka-protocol broker (tansu, memory engine) for integration tests, started through
//! `deploy/local/start-tansu.sh` on a free loopback port.
//!
//! Start it once per test binary with [`Broker::shared`] and give every test its own topics
//! ([`Broker::create_topic`]) and consumer group, so tests run in parallel (DESIGN.md 7).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A running tansu broker; dropping it stops the broker.
pub struct Broker {
    /// `127.0.0.1:PORT`, for `bootstrap.servers` (the advertised port).
    pub addr: String,
    /// The port tansu listens on (the same as `addr`'s unless behind a proxy).
    listen_port: u16,
    /// The broker process (spawned detached by the script, so we hold its pid, not a `Child`).
    child: u32,
    /// The tansu binary, for creating more topics.
    tansu: PathBuf,
    /// Working directory holding `tansu.log`: read it when a test fails.
    pub dir: PathBuf,
}

/// `deploy/local/` of this crate; `SLIPSTREAM_DEPLOY_DIR` overrides it.
fn deploy_dir() -> PathBuf {
    match std::env::var_os("SLIPSTREAM_DEPLOY_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/local"),
    }
}

/// A port that was free a moment ago (the OS picks it; we release it for tansu to bind).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// Runs a deploy script and returns the last line of its stdout.
fn run_script(script: &str, args: &[&str], envs: &[(&str, String)]) -> Result<String, String> {
    let path = deploy_dir().join(script);
    let mut cmd = Command::new(&path);
    cmd.args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {args:?} failed ({}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .last()
        .map(|l| l.trim().to_owned())
        .ok_or_else(|| format!("{} printed nothing", path.display()))
}

impl Broker {
    /// Starts a broker with the default topics (`enrollments`, `telemetry`, `dead-letter`)
    /// of `partitions` partitions each. Retries on another port if the chosen one was taken.
    pub fn start(partitions: u32) -> Broker {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Broker::start_on(free_port(), partitions) {
                Ok(broker) => return broker,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start tansu: {last_error}");
    }

    /// Starts a broker on a given port (for tests where clients must exist before the broker).
    pub fn start_on(port: u16, partitions: u32) -> Result<Broker, String> {
        Broker::start_with(port, port, partitions)
    }

    /// Starts a broker that tells clients to connect to `advertised` (where a test runs a
    /// [`super::proxy::Proxy`] to this broker), and whose `addr` is that port. Retries on
    /// another listening port if the chosen one was taken.
    pub fn start_advertised(advertised: u16, partitions: u32) -> Broker {
        let mut last_error = String::new();
        for _ in 0..5 {
            match Broker::start_with(free_port(), advertised, partitions) {
                Ok(broker) => return broker,
                Err(e) => last_error = e,
            }
        }
        panic!("could not start tansu: {last_error}");
    }

    /// The port the broker itself listens on (not the advertised one).
    pub fn listen_port(&self) -> u16 {
        self.listen_port
    }

    fn start_with(port: u16, advertised: u16, partitions: u32) -> Result<Broker, String> {
        let tansu = PathBuf::from(run_script("install-tansu.sh", &[], &[])?);
        let dir = std::env::temp_dir().join(format!("slipstream-tansu-{port}"));
        let dir_arg = dir.to_string_lossy().into_owned();
        let envs = [
            ("PARTITIONS", partitions.to_string()),
            // The broker dies with this test binary even if Drop never runs (statics, panics).
            ("WATCH_PID", std::process::id().to_string()),
            ("ADVERTISED_PORT", advertised.to_string()),
        ];
        let pid = run_script("start-tansu.sh", &[&port.to_string(), &dir_arg], &envs)?;
        let child = pid
            .parse()
            .map_err(|_| format!("start-tansu.sh printed {pid:?}, not a pid"))?;
        Ok(Broker {
            addr: format!("127.0.0.1:{advertised}"),
            listen_port: port,
            child,
            tansu,
            dir,
        })
    }

    /// Kills the broker (SIGKILL, a crash: with SIGTERM tansu keeps serving until its clients
    /// disconnect) and starts it again on the same port with the default topics. The memory
    /// engine starts empty: offsets restart at 0.
    pub fn restart(&mut self, partitions: u32) {
        let _ = Command::new("kill")
            .args(["-9", &self.child.to_string()])
            .status();
        let proc_dir = PathBuf::from(format!("/proc/{}", self.child));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while proc_dir.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let port = self.listen_port.to_string();
        let advertised = self
            .addr
            .rsplit(':')
            .next()
            .expect("addr has a port")
            .to_owned();
        let dir_arg = self.dir.to_string_lossy().into_owned();
        let envs = [
            ("PARTITIONS", partitions.to_string()),
            ("WATCH_PID", std::process::id().to_string()),
            ("ADVERTISED_PORT", advertised),
        ];
        // The port can linger for a moment after the old process exits.
        let mut last_error = String::new();
        for _ in 0..50 {
            match run_script("start-tansu.sh", &[&port, &dir_arg], &envs) {
                Ok(pid) => {
                    self.child = pid.parse().expect("start-tansu.sh prints a pid");
                    return;
                }
                Err(e) => last_error = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("could not restart tansu on port {port}: {last_error}");
    }

    /// One broker for the whole test binary (4 partitions per default topic). It is never
    /// dropped; the script's watchdog stops it when the test process exits.
    pub fn shared() -> &'static Broker {
        static BROKER: OnceLock<Broker> = OnceLock::new();
        BROKER.get_or_init(|| Broker::start(4))
    }

    /// Creates a topic on this broker; tests use unique names to stay independent.
    pub fn create_topic(&self, name: &str, partitions: u32) {
        let out = Command::new(&self.tansu)
            .args([
                "topic",
                "create",
                name,
                "--partitions",
                &partitions.to_string(),
            ])
            .args(["--broker", &format!("tcp://{}", self.addr)])
            .output()
            .expect("run tansu topic create");
        assert!(
            out.status.success(),
            "tansu topic create {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // SIGKILL: the memory engine has nothing to flush, and it stops at once.
        let _ = Command::new("kill")
            .args(["-9", &self.child.to_string()])
            .status();
        // Keep the log of a failed test for reading; otherwise leave nothing behind.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
