//! The real `slipstream serve` on an ephemeral port, for HTTP tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use super::{bin, p};

/// A running `slipstream serve`; killed on drop.
pub struct Server {
    child: Child,
    pub base: String,
    token: Option<String>,
}

impl Server {
    pub fn start(cfg: &Path, state: &Path, token: Option<&str>) -> Server {
        let mut cmd = Command::new(bin());
        cmd.args([
            "serve",
            "--config",
            p(cfg),
            "--data-dir",
            p(state),
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("SLIPSTREAM_TOKEN")
        .stderr(Stdio::piped());
        if let Some(t) = token {
            cmd.env("SLIPSTREAM_TOKEN", t);
        }
        let mut child = cmd.spawn().unwrap();
        let (base, _) = listening_address(child.stderr.take().unwrap());
        Server {
            child,
            base,
            token: token.map(String::from),
        }
    }

    /// GET with the server's token (if any) unless `anonymous`; (status, body text).
    pub fn raw(&self, path: &str, auth: Option<&str>) -> (u16, String) {
        let mut req = reqwest::blocking::Client::new().get(format!("{}{path}", self.base));
        if let Some(t) = auth {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let r = req.send().unwrap();
        (r.status().as_u16(), r.text().unwrap())
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.raw(path, self.token.as_deref());
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        body
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a server's stderr until it says where it listens; the address, as a base URL.
pub fn listening_address(
    stderr: impl std::io::Read,
) -> (String, std::io::Lines<BufReader<impl std::io::Read>>) {
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("the server exited before listening")
            .unwrap();
        if let Some(addr) = line.strip_prefix("serving on ") {
            return (addr.trim().to_string(), lines);
        }
    }
}
