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

/// One side of a COLO pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The host running the protected VM.
    Primary,
    /// The host running the replica.
    Secondary,
}

impl Side {
    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Primary => Side::Secondary,
            Side::Secondary => Side::Primary,
        }
    }

    /// `primary` or `secondary`.
    pub fn role(self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Secondary => "secondary",
        }
    }
}

/// Where a pair's files go: a scratch directory (removed on drop) with each side's event
/// file, API socket and log, and the SVM's console.
pub struct PairFiles {
    /// The primary's `--event-monitor` file.
    pub pev: Events,
    /// The secondary's.
    pub sev: Events,
    /// The primary's API socket.
    pub psock: PathBuf,
    /// The secondary's.
    pub ssock: PathBuf,
    /// The SVM's console (the secondary's `--serial file=`).
    pub svm: PathBuf,
    /// The primary's `--log-file`.
    pub plog: PathBuf,
    /// The secondary's.
    pub slog: PathBuf,
    /// Last, so it goes after everything that points into it.
    pub dir: crate::Scratch,
}

impl PairFiles {
    /// A fresh directory named after `tag`.
    pub fn new(tag: &str) -> PairFiles {
        static CASE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = crate::Scratch::new(&format!("{tag}-{n}"));
        let f = |name: &str| dir.0.join(name);
        PairFiles {
            pev: Events::new(f("primary.jsonl")),
            sev: Events::new(f("secondary.jsonl")),
            psock: f("primary.sock"),
            ssock: f("secondary.sock"),
            svm: f("svm-console.txt"),
            plog: f("primary.log"),
            slog: f("secondary.log"),
            dir,
        }
    }

    /// That side's API socket.
    pub fn sock(&self, side: Side) -> &Path {
        match side {
            Side::Primary => &self.psock,
            Side::Secondary => &self.ssock,
        }
    }

    /// That side's events.
    pub fn events(&mut self, side: Side) -> &mut Events {
        match side {
            Side::Primary => &mut self.pev,
            Side::Secondary => &mut self.sev,
        }
    }

    /// `colovmm-remote args` against `side`: its stdout, or why it failed.
    pub fn remote(&self, side: Side, args: &[&str]) -> Result<String, String> {
        let (code, out, err) = crate::remote(self.sock(side), args);
        if code != 0 {
            return Err(format!(
                "colovmm-remote {args:?} on the {} failed ({code}): {err}",
                side.role()
            ));
        }
        Ok(out)
    }

    /// A `--json` command's reply from `side`.
    pub fn remote_json(&self, side: Side, args: &[&str]) -> Result<Value, String> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.remote(side, &a)?;
        serde_json::from_str(&out).map_err(|e| format!("{args:?}: not JSON ({e}): {out}"))
    }

    /// That side's VM state, as `info` says.
    pub fn vm_state(&self, side: Side) -> Result<String, String> {
        Ok(self.remote_json(side, &["info"])?["state"]
            .as_str()
            .unwrap_or("?")
            .to_string())
    }

    /// The secondary's command line for `--colo spec`, after `extra` (its `--net`, say).
    pub fn secondary_args(&self, spec: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend([
            "--colo".into(),
            spec.into(),
            "--serial".into(),
            path_arg("file", &self.svm),
            "--api-socket".into(),
            path_arg("path", &self.ssock),
            "--event-monitor".into(),
            path_arg("path", &self.sev.path),
            "--log-file".into(),
            self.slog.display().to_string(),
            "-v".into(),
        ]);
        a
    }

    /// The primary's command line: the test guest in 256 MiB, console on stdout, `--colo
    /// spec`, after `extra`.
    pub fn primary_args(&self, spec: &str, extra: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--kernel".into(),
            crate::testguest().display().to_string(),
            "--memory".into(),
            "size=256M".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.extend([
            "--serial".into(),
            "tty".into(),
            "--api-socket".into(),
            path_arg("path", &self.psock),
            "--event-monitor".into(),
            path_arg("path", &self.pev.path),
            "--colo".into(),
            spec.into(),
            "--log-file".into(),
            self.plog.display().to_string(),
            "-v".into(),
        ]);
        a
    }
}

/// colovmm with `args` (owned) inside namespace `ns`.
pub fn vmm_with(ns: &str, args: &[String]) -> Console {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    vmm_in(ns, &refs)
}
