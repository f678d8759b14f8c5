//! What the COLO tests share: an `--event-monitor` file read as it grows, and running colovmm
//! inside a namespace.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::TwoHostNet;
use crate::{colovmm_bin, Console};

/// One `--event-monitor` file, read as it grows.
pub struct Events {
    /// The file.
    pub path: PathBuf,
    read: u64,
    partial: Vec<u8>,
    /// Every event so far.
    pub all: Vec<Value>,
    /// Events before this index were already looked at by [`Events::next`].
    cursor: usize,
}

impl Events {
    /// Reads `path` (it may not exist yet).
    pub fn new(path: PathBuf) -> Events {
        Events {
            path,
            read: 0,
            partial: Vec::new(),
            all: Vec::new(),
            cursor: 0,
        }
    }

    /// Reads the complete lines appended since the last call.
    pub fn poll(&mut self) {
        let Ok(mut f) = fs::File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.read)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        self.read += buf.len() as u64;
        self.partial.extend_from_slice(&buf);
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line);
            let text = text.trim();
            if text.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| {
                panic!("{}: not a JSON event ({e}): {text}", self.path.display())
            });
            self.all.push(v);
        }
    }

    /// The next event after the cursor that matches, without waiting.
    pub fn next_now(&mut self, pred: &dyn Fn(&Value) -> bool) -> Option<Value> {
        self.poll();
        while self.cursor < self.all.len() {
            let i = self.cursor;
            self.cursor += 1;
            if pred(&self.all[i]) {
                return Some(self.all[i].clone());
            }
        }
        None
    }

    /// The next event after the cursor that matches, waiting up to `timeout`.
    pub fn next(&mut self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.next_now(&pred) {
                return Some(v);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Moves the cursor past everything written so far.
    pub fn skip_to_end(&mut self) {
        self.poll();
        self.cursor = self.all.len();
    }

    /// The last `n` events, one per line.
    pub fn tail(&self, n: usize) -> String {
        let from = self.all.len().saturating_sub(n);
        self.all[from..]
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A COLO event called `name`.
pub fn is(ev: &Value, name: &str) -> bool {
    ev["source"] == "colo" && ev["event"] == name
}

/// colovmm with `args` inside namespace `ns`; `ip netns exec` execs it, so the Console's pid
/// is colovmm's own.
pub fn vmm_in(ns: &str, args: &[&str]) -> Console {
    let mut cmd = TwoHostNet::cmd_in(ns, colovmm_bin().to_str().expect("utf-8 path"));
    cmd.args(args);
    Console::spawn(cmd)
}

/// `key=path`, as colovmm's options take paths.
pub fn path_arg(key: &str, p: &Path) -> String {
    format!("{key}={}", p.display())
}
