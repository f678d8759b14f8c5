//! Thread count, resident memory and open descriptors of a process, from /proc, to tell
//! whether a server leaks under load.

use std::io;

/// A snapshot of one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStats {
    /// `Threads:` in /proc/PID/status.
    pub threads: u64,
    /// `VmRSS:` in KiB.
    pub rss_kib: u64,
    /// Entries in /proc/PID/fd.
    pub fds: usize,
}

/// Reads the stats of `pid`, or of this process when `None`.
pub fn proc_stats(pid: Option<u32>) -> io::Result<ProcStats> {
    let dir = pid.map_or_else(|| "/proc/self".to_string(), |p| format!("/proc/{p}"));
    let status = std::fs::read_to_string(format!("{dir}/status"))?;
    let field = |name: &str| -> io::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no {name} in {dir}/status")))
    };
    Ok(ProcStats {
        threads: field("Threads:")?,
        rss_kib: field("VmRSS:")?,
        fds: std::fs::read_dir(format!("{dir}/fd"))?.count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_self() {
        let s = proc_stats(None).unwrap();
        assert!(s.threads >= 1 && s.rss_kib > 0 && s.fds >= 3, "{s:?}");
        assert!(proc_stats(Some(std::process::id())).unwrap().threads >= 1);
    }
}
