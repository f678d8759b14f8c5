//! A small `log` backend: timestamped lines to stderr or a file.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

struct Logger {
    level: log::LevelFilter,
    start: Instant,
    out: Mutex<Box<dyn Write + Send>>,
}

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata) -> bool {
        meta.level() <= self.level
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let t = self.start.elapsed();
        if let Ok(mut out) = self.out.lock() {
            let _ = writeln!(
                out,
                "colovmm: [{:>4}.{:06}] {:<5} {}: {}",
                t.as_secs(),
                t.subsec_micros(),
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {
        if let Ok(mut out) = self.out.lock() {
            let _ = out.flush();
        }
    }
}

/// Installs the logger: warnings by default, each `-v` one level more; to `file` if given.
pub fn init(verbosity: u8, file: Option<&Path>) -> std::io::Result<()> {
    let level = match verbosity {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let out: Box<dyn Write + Send> = match file {
        Some(p) => Box::new(File::create(p)?),
        None => Box::new(std::io::stderr()),
    };
    let logger = Logger {
        level,
        start: Instant::now(),
        out: Mutex::new(out),
    };
    // A second init (tests) keeps the first logger.
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    Ok(())
}
