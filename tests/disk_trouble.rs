//! Disk trouble at start and while running: a read-only data directory, a full disk, and a
//! store of a newer format version each stop the command with a clear error, exit non-zero
//! and write nothing (the store is unchanged, or none is left behind); a disk that fills up
//! mid-run loses nothing that was stored, and finishing on a larger disk gives the same
//! tables as an uninterrupted run.
//!
//! The tests mount small tmpfs file systems (as root, file permissions would not stop a
//! write); where `mount` is not permitted they print why and skip.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::stream::EXPERIMENT;
use common::*;

/// A mount that is undone on drop.
struct Mount(PathBuf);

impl Mount {
    /// `mount ARGS... TARGET`; None (and the reason printed) when not permitted here.
    fn new(target: &Path, args: &[&str]) -> Option<Mount> {
        std::fs::create_dir_all(target).unwrap();
        let out = Command::new("mount").args(args).arg(target).output();
        match out {
            Ok(o) if o.status.success() => Some(Mount(target.to_owned())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: `mount {args:?}` is not permitted here ({}); disk trouble needs a mount (as root, permissions do not stop writes)",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount: {e}");
                None
            }
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs slipstream expecting a failure; stderr.
fn fails(args: &[&str]) -> String {
    let out: Output = Command::new(bin())
        .args(args)
        .env("SLIPSTREAM_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded:\n{stderr}");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{args:?}: not a clean error exit:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{args:?} panicked:\n{stderr}");
    stderr
}

/// Every file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(
                    path.strip_prefix(dir).unwrap().to_owned(),
                    std::fs::read(&path).unwrap(),
                );
            }
        }
    }
    out
}

fn setup(dir: &Path, clients: &str) -> (PathBuf, PathBuf) {
    let cfg = write(
        dir,
        "c.toml",
        &format!("[pipeline]\nreplicates = 20\nbatch_events = 1000\n{EXPERIMENT}"),
    );
    let events = dir.join("events.ndjson");
    slipstream(&[
        "generate",
        "--config",
        p(&cfg),
        "--clients",
        clients,
        "--seed",
        "3",
        "--out",
        p(&events),
    ]);
    (cfg, events)
}

fn replay(cfg: &Path, events: &Path, state: &Path, out: &Path) -> Vec<String> {
    [
        "replay",
        "--config",
        p(cfg),
        "--input",
        p(events),
        "--data-dir",
        p(state),
        "--out",
        p(out),
    ]
    .map(String::from)
    .to_vec()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn a_read_only_data_dir_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, events) = setup(dir.path(), "100");
    let out = dir.path().join("out");

    // A store that exists, on a file system that became read-only.
    let state = dir.path().join("state");
    slipstream(&refs(&replay(&cfg, &events, &state, &out)));
    let before = snapshot(&state);
    let Some(bind) = Mount::new(&state, &["--bind", p(&state)]) else {
        return;
    };
    let remounted = Command::new("mount")
        .args(["-o", "remount,ro,bind", p(&state)])
        .status()
        .unwrap();
    assert!(
        remounted.success(),
        "a bind mount was permitted, its read-only remount not"
    );
    for args in [
        replay(&cfg, &events, &state, &out),
        [
            "run",
            "--config",
            p(&cfg),
            "--brokers",
            "127.0.0.1:1",
            "--data-dir",
            p(&state),
            "--out",
            p(&out),
        ]
        .map(String::from)
        .to_vec(),
    ] {
        let stderr = fails(&refs(&args));
        assert!(stderr.contains("cannot open the state store"), "{stderr}");
        assert!(
            stderr.contains("read-only; --data-dir must be on a writable disk"),
            "{stderr}"
        );
    }
    drop(bind);
    assert!(before == snapshot(&state), "the store changed");

    // No store yet, and its directory cannot be created.
    let ro = dir.path().join("ro");
    let Some(_m) = Mount::new(&ro, &["-t", "tmpfs", "-o", "ro,size=1m", "tmpfs"]) else {
        return;
    };
    let stderr = fails(&refs(&replay(&cfg, &events, &ro.join("state"), &out)));
    assert!(stderr.contains("read-only"), "{stderr}");
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, events) = setup(dir.path(), "1000");
    let clean = dir.path().join("clean-out");
    slipstream(&refs(&replay(
        &cfg,
        &events,
        &dir.path().join("clean-state"),
        &clean,
    )));

    // Full before the start: an error, and no half-created store left behind.
    let full = dir.path().join("full");
    let Some(_m) = Mount::new(&full, &["-t", "tmpfs", "-o", "size=512k", "tmpfs"]) else {
        return;
    };
    let _ = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", p(&full.join("fill"))),
            "bs=4k",
        ])
        .output();
    let stderr = fails(&refs(&replay(
        &cfg,
        &events,
        &full.join("state"),
        &dir.path().join("out0"),
    )));
    assert!(
        stderr.contains("the disk is full; free space or move --data-dir"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["fill"], "a partial store was left behind");
    drop(_m);

    // Fills up mid-run: stops with the same message; what was stored is intact, and the
    // run finishes on a larger disk with the same tables as the uninterrupted one.
    let small = dir.path().join("small");
    let Some(_m) = Mount::new(&small, &["-t", "tmpfs", "-o", "size=640k", "tmpfs"]) else {
        return;
    };
    let out = dir.path().join("out");
    let stderr = fails(&refs(&replay(&cfg, &events, &small.join("state"), &out)));
    assert!(stderr.contains("the disk is full"), "{stderr}");
    let moved = dir.path().join("moved-state");
    let cp = Command::new("cp")
        .args(["-a", p(&small.join("state")), p(&moved)])
        .status()
        .unwrap();
    assert!(cp.success());
    drop(_m);
    let finished = slipstream(&refs(&replay(&cfg, &events, &moved, &out)));
    let summary = String::from_utf8_lossy(&finished.stdout);
    assert!(
        !summary.contains("resumed at byte 0)"),
        "nothing was stored before the disk filled: {summary}"
    );
    let (a, b) = (all_tables(&clean), all_tables(&out));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, text) in &a {
        assert!(
            text == &b[name],
            "table {name} differs after the disk filled up"
        );
    }
}

/// Every key and value of a sled store (its logical contents; sled rewrites its files on
/// every open, so bytes are compared only where the store is never opened).
fn sled_contents(state: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let db = sled::Config::new()
        .path(state.join("db"))
        .flush_every_ms(None) // no flusher thread keeping the lock after the drop
        .open()
        .unwrap();
    db.iter()
        .map(|kv| kv.unwrap())
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

#[test]
fn a_newer_format_version_is_refused_without_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, events) = setup(dir.path(), "100");
    let state = dir.path().join("state");
    let out = dir.path().join("out");
    slipstream(&refs(&replay(&cfg, &events, &state, &out)));
    assert_eq!(
        std::fs::read_to_string(state.join("FORMAT")).unwrap(),
        "3\n"
    );

    // The version file says 4: refused before sled opens anything, not a byte changed.
    std::fs::write(state.join("FORMAT"), "4\n").unwrap();
    let before = snapshot(&state);
    let stderr = fails(&refs(&replay(&cfg, &events, &state, &out)));
    assert!(
        stderr.contains("has format version 4, but this binary reads version 3"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert!(before == snapshot(&state), "the store's files changed");

    // The store itself (`M\0format`, state/README.md) says 4 and there is no version file,
    // as in a store written before it existed: refused, and no key or file is written.
    std::fs::remove_file(state.join("FORMAT")).unwrap();
    {
        let db = sled::Config::new()
            .path(state.join("db"))
            .flush_every_ms(None) // no flusher thread keeping the lock after the drop
            .open()
            .unwrap();
        db.insert(b"M\0format", &4u32.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let before = sled_contents(&state);
    let stderr = fails(&refs(&replay(&cfg, &events, &state, &out)));
    assert!(
        stderr.contains("has format version 4, but this binary reads version 3"),
        "{stderr}"
    );
    assert!(!state.join("FORMAT").exists(), "a version file was written");
    assert!(
        before == sled_contents(&state),
        "the store's contents changed"
    );
}
