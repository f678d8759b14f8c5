//! Heartbeat between the primary and the secondary, on its own connection (not the
//! checkpoint stream, which can be busy for a whole checkpoint): each side sends a beat every
//! `interval` and declares the peer lost after `timeout` without one, or when the connection
//! breaks. QEMU's COLO has no heartbeat; failover there waits for an operator.
//!
//! Wire: 8-byte frames, version u16 LE (1) at offset 2, sequence u32 LE at offset 4, and a
//! two-byte kind first: `b"HB"` a beat, `b"BY"` a farewell — the peer ends protection on
//! purpose and lives on (the secondary must then stop its SVM rather than take over).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const MAGIC: [u8; 2] = *b"HB";
const FAREWELL: [u8; 2] = *b"BY";
const VERSION: u16 = 1;
const BEAT_LEN: usize = 8;

/// Why the peer was declared lost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LostReason {
    /// No beat for the whole timeout.
    Timeout,
    /// The peer closed the connection (or its process died).
    Closed,
    /// Something that is not a beat, or an I/O error.
    Broken(String),
    /// The peer said farewell: it ended protection on purpose and keeps running.
    Farewell,
}

impl std::fmt::Display for LostReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LostReason::Timeout => write!(f, "no heartbeat within the timeout"),
            LostReason::Closed => write!(f, "the peer closed the heartbeat connection"),
            LostReason::Broken(why) => write!(f, "heartbeat connection broken: {why}"),
            LostReason::Farewell => write!(f, "the peer ended protection"),
        }
    }
}

/// Bytes of one heartbeat frame.
pub const FRAME_LEN: usize = BEAT_LEN;

/// Whether `frame` is a beat (the first thing a heartbeat connection carries).
pub fn is_beat(frame: &[u8; FRAME_LEN]) -> bool {
    frame[..2] == MAGIC && u16::from_le_bytes([frame[2], frame[3]]) == VERSION
}

fn frame(kind: [u8; 2], seq: u32) -> [u8; BEAT_LEN] {
    let mut beat = [0u8; BEAT_LEN];
    beat[..2].copy_from_slice(&kind);
    beat[2..4].copy_from_slice(&VERSION.to_le_bytes());
    beat[4..].copy_from_slice(&seq.to_le_bytes());
    beat
}

/// A connection the heartbeat can run on.
pub trait Link: Read + Write + Send + 'static {
    /// Another handle on the same connection (one thread reads, one writes).
    fn duplicate(&self) -> std::io::Result<Box<dyn Link>>;
    /// Bounds each read.
    fn read_timeout(&self, t: Duration) -> std::io::Result<()>;
    /// Ends the connection both ways (wakes a blocked reader).
    fn close(&self);
}

impl Link for UnixStream {
    fn duplicate(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Link for TcpStream {
    fn duplicate(&self) -> std::io::Result<Box<dyn Link>> {
        Ok(Box::new(self.try_clone()?))
    }
    fn read_timeout(&self, t: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(t))
    }
    fn close(&self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

/// A running heartbeat; stopping it (or dropping it) ends both threads without a report.
pub struct Heartbeat {
    stop: Arc<AtomicBool>,
    link: Box<dyn Link>,
    writer: Arc<Mutex<Box<dyn Link>>>,
    threads: Vec<JoinHandle<()>>,
    seen: LastSeen,
}

/// When the peer's last beat arrived (shared with the status).
#[derive(Clone, Debug, Default)]
pub struct LastSeen(Arc<std::sync::atomic::AtomicU64>);

/// Two handles are equal when they watch the same heartbeat.
impl PartialEq for LastSeen {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl LastSeen {
    fn mark(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.0.store(now, Ordering::Relaxed);
    }

    /// Milliseconds since the last beat, if one arrived.
    pub fn ms_ago(&self) -> Option<f64> {
        let at = self.0.load(Ordering::Relaxed);
        if at == 0 {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Some(now.saturating_sub(at) as f64)
    }
}

type OnLost = Box<dyn FnOnce(LostReason) + Send>;

impl Heartbeat {
    /// Beats on `link` every `interval`; calls `on_lost` once if the peer goes quiet for
    /// `timeout` or the connection breaks.
    pub fn start(
        link: Box<dyn Link>,
        interval: Duration,
        timeout: Duration,
        on_lost: impl FnOnce(LostReason) + Send + 'static,
    ) -> std::io::Result<Heartbeat> {
        Self::start_with_grace(link, interval, timeout, timeout, on_lost)
    }

    /// Like [`Self::start`], but the peer's first beat may take `grace` (it may still be
    /// accepting the connection).
    pub fn start_with_grace(
        link: Box<dyn Link>,
        interval: Duration,
        timeout: Duration,
        grace: Duration,
        on_lost: impl FnOnce(LostReason) + Send + 'static,
    ) -> std::io::Result<Heartbeat> {
        let stop = Arc::new(AtomicBool::new(false));
        let report: Arc<Mutex<Option<OnLost>>> = Arc::new(Mutex::new(Some(Box::new(on_lost))));
        let lost = {
            let (stop, report) = (stop.clone(), report.clone());
            move |why: LostReason| {
                if stop.swap(true, Ordering::SeqCst) {
                    return; // stopped on purpose, or already reported
                }
                let cb = report.lock().ok().and_then(|mut r| r.take());
                if let Some(cb) = cb {
                    cb(why);
                }
            }
        };
        let mut reader = link.duplicate()?;
        reader.read_timeout(grace.max(timeout))?;
        let seen = LastSeen::default();
        let r_seen = seen.clone();
        let writer = Arc::new(Mutex::new(link.duplicate()?));
        let w = writer.clone();
        let r_lost = lost.clone();
        let r_stop = stop.clone();
        let read = std::thread::Builder::new()
            .name("colo-hb-recv".into())
            .spawn(move || {
                let mut beat = [0u8; BEAT_LEN];
                let mut first = true;
                loop {
                    match reader.read_exact(&mut beat) {
                        Ok(()) if beat[..2] == MAGIC => {
                            r_seen.mark();
                            if std::mem::take(&mut first) && grace > timeout {
                                if let Err(e) = reader.read_timeout(timeout) {
                                    return r_lost(LostReason::Broken(e.to_string()));
                                }
                            }
                        }
                        Ok(()) if beat[..2] == FAREWELL => return r_lost(LostReason::Farewell),
                        Ok(()) if beat == crate::auth::MAGIC => {
                            return r_lost(LostReason::Broken(
                                "the peer authenticates with a pre-shared key and this side \
                                 has none (key-file)"
                                    .into(),
                            ))
                        }
                        Ok(()) => return r_lost(LostReason::Broken("not a heartbeat".into())),
                        Err(e) if r_stop.load(Ordering::SeqCst) => {
                            log::debug!("heartbeat reader stopping: {e}");
                            return;
                        }
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            return r_lost(LostReason::Timeout)
                        }
                        Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                            return r_lost(LostReason::Closed)
                        }
                        Err(e) => return r_lost(LostReason::Broken(e.to_string())),
                    }
                }
            })?;
        let w_stop = stop.clone();
        let write = std::thread::Builder::new()
            .name("colo-hb-send".into())
            .spawn(move || {
                let mut seq = 0u32;
                while !w_stop.load(Ordering::SeqCst) {
                    let sent = match w.lock() {
                        Ok(mut l) => l.write_all(&frame(MAGIC, seq)),
                        Err(_) => return,
                    };
                    if let Err(e) = sent {
                        // The reader gives the verdict: a farewell may still be waiting
                        // to be read behind the broken pipe.
                        log::debug!("heartbeat writer stopping: {e}");
                        return;
                    }
                    seq = seq.wrapping_add(1);
                    std::thread::sleep(interval);
                }
            })?;
        Ok(Heartbeat {
            seen,
            stop,
            link,
            writer,
            threads: vec![read, write],
        })
    }

    /// Stops beating and watching (protection ended on purpose).
    pub fn stop(self) {}

    /// When the peer last beat.
    pub fn last_seen(&self) -> LastSeen {
        self.seen.clone()
    }

    /// Tells the peer this side ends protection on purpose, then stops (best effort: a dead
    /// peer hears nothing).
    pub fn farewell(self) {
        self.send_farewell();
    }

    /// Sends the farewell and stops reporting, without joining the threads (callable from
    /// the heartbeat's own reader thread, which reports losses; drop the heartbeat elsewhere).
    pub fn send_farewell(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Ok(mut l) = self.writer.lock() {
            let _ = l.write_all(&frame(FAREWELL, 0));
        }
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.link.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    const BEAT: Duration = Duration::from_millis(20);
    const TIMEOUT: Duration = Duration::from_millis(400);

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[test]
    fn live_peers_are_not_declared_lost() {
        let (a, b) = pair();
        let (tx, rx) = channel();
        let tx2 = tx.clone();
        let ha =
            Heartbeat::start(Box::new(a), BEAT, TIMEOUT, move |r| tx.send(r).unwrap()).unwrap();
        let hb =
            Heartbeat::start(Box::new(b), BEAT, TIMEOUT, move |r| tx2.send(r).unwrap()).unwrap();
        assert!(
            rx.recv_timeout(TIMEOUT * 3).is_err(),
            "no loss while both beat"
        );
        ha.stop();
        hb.stop();
    }

    #[test]
    fn a_dead_peer_is_noticed_quickly() {
        let (a, b) = pair();
        let (tx, rx) = channel();
        let ha =
            Heartbeat::start(Box::new(a), BEAT, TIMEOUT, move |r| tx.send(r).unwrap()).unwrap();
        let t = Instant::now();
        drop(b); // the peer's process died: its socket closes
        let why = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("loss reported");
        assert!(
            matches!(why, LostReason::Closed | LostReason::Broken(_)),
            "{why:?}"
        );
        assert!(
            t.elapsed() < TIMEOUT,
            "a closed connection needs no timeout"
        );
        drop(ha);
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (a, b) = pair();
        let (tx, rx) = channel();
        let t = Instant::now();
        let ha =
            Heartbeat::start(Box::new(a), BEAT, TIMEOUT, move |r| tx.send(r).unwrap()).unwrap();
        // `b` stays open but never beats (a hung peer).
        let why = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("loss reported");
        assert_eq!(why, LostReason::Timeout);
        assert!(t.elapsed() >= TIMEOUT);
        drop(ha);
        drop(b);
    }

    #[test]
    fn a_farewell_is_not_a_loss() {
        let (a, b) = pair();
        let (tx, rx) = channel();
        let ha =
            Heartbeat::start(Box::new(a), BEAT, TIMEOUT, move |r| tx.send(r).unwrap()).unwrap();
        let hb = Heartbeat::start(Box::new(b), BEAT, TIMEOUT, |_| {}).unwrap();
        hb.farewell();
        let why = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("farewell reported");
        assert_eq!(why, LostReason::Farewell);
        drop(ha);
    }

    #[test]
    fn garbage_is_not_a_heartbeat() {
        let (a, mut b) = pair();
        let (tx, rx) = channel();
        let ha =
            Heartbeat::start(Box::new(a), BEAT, TIMEOUT, move |r| tx.send(r).unwrap()).unwrap();
        b.write_all(b"GET / HTTP/1.1\r\n").unwrap();
        let why = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("loss reported");
        assert!(matches!(why, LostReason::Broken(_)), "{why:?}");
        drop(ha);
    }
}
