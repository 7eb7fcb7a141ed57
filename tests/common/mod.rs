//! Helpers shared by the integration tests: run the real binary, read its tables.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_slipstream"))
}

/// Runs `slipstream ARGS` and returns its output; panics with stderr when it failed.
pub fn slipstream(args: &[&str]) -> Output {
    let out = Command::new(bin())
        .args(args)
        .env("SLIPSTREAM_LOG", "warn")
        .output()
        .expect("run slipstream");
    assert!(
        out.status.success(),
        "slipstream {args:?} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Rows of `<dir>/<table>.ndjson`.
pub fn table(dir: &Path, name: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.ndjson")))
        .unwrap_or_else(|e| panic!("table {name}: {e}"));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The row of a client in a table.
pub fn row<'a>(rows: &'a [serde_json::Value], client: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["client_id"] == client)
        .unwrap_or_else(|| panic!("no row for {client}"))
}

/// Every table file of an output directory, name -> contents (for equality checks).
pub fn all_tables(dir: &Path) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.ends_with(".ndjson") {
            out.insert(name, std::fs::read_to_string(e.path()).unwrap());
        }
    }
    out
}

pub mod bqemulator;
pub mod broker;
pub mod proxy;
pub mod server;
pub mod stream;

/// Writes `config` to `dir/c.toml` and `events` to `dir/e.ndjson`, replays them into
/// `dir/state` (tables in `dir/out`) and returns the config and state paths.
pub fn replay_into(dir: &Path, config: &str, events: &str) -> (PathBuf, PathBuf) {
    let cfg = write(dir, "c.toml", config);
    let input = write(dir, "e.ndjson", events);
    let state = dir.join("state");
    slipstream(&[
        "replay",
        "--config",
        p(&cfg),
        "--input",
        p(&input),
        "--data-dir",
        p(&state),
        "--out",
        p(&dir.join("out")),
    ]);
    (cfg, state)
}
