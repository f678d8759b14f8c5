//! The secondary's proxy at run time: mirrored frames into the SVM by epoch, the SVM's frames
//! to the primary instead of the tap, and after a failover the SVM on this host's tap.

use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use devices::virtio::net::{Direction, Injector, Packet, PacketFilter, Verdict};

use super::{
    accept, spawn_reader, spawn_ticker, spawn_writer, Backlog, Conn, LinkError, LinkStats,
    OnBroken, Outbox, Outgoing, ProxyStatus, Threads,
};
use crate::auth::Psk;
use crate::proxy::session::{SecondaryProxy, SvmTx};
use crate::proxy::wire::Message;
use crate::vm::ProtectedNic;

/// How long a takeover waits for the SVM's replayed segments to find room in the NIC's queue.
const REPLAY_PATIENCE: Duration = Duration::from_millis(200);

struct State {
    proxy: SecondaryProxy,
    backlog: Backlog,
    /// The SVM's NIC, once the SVM exists.
    nic: Option<ProtectedNic>,
    injector: Option<Injector>,
}

struct Shared {
    state: Mutex<State>,
    outbox: Outbox,
    stats: Arc<LinkStats>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The secondary's end of the proxy: accepted with the primary's session, ended with it.
pub struct SecondaryLink {
    shared: Arc<Shared>,
    threads: Threads,
}

impl SecondaryLink {
    /// Takes the primary's proxy connection from `listener` (it comes right after the
    /// checkpoint channels, within `timeout`) and starts the channel's threads.
    pub fn accept(
        listener: &TcpListener,
        psk: &Psk,
        timeout: Duration,
        on_broken: OnBroken,
    ) -> Result<SecondaryLink, LinkError> {
        let opened = accept(listener, psk, timeout, crate::wire::Channel::Proxy)?;
        let chan = Conn::new(opened.stream, on_broken);
        let stats = chan.stats.clone();
        let threads = Threads::new(chan.clone());
        let (outbox, writer) = spawn_writer("colo-proxy-tx", opened.writer, chan.clone())?;
        threads.keep(Ok(writer));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                proxy: SecondaryProxy::new(),
                backlog: Backlog::new(Direction::Rx),
                nic: None,
                injector: None,
            }),
            outbox,
            stats,
        });
        let link = SecondaryLink {
            shared: shared.clone(),
            threads,
        };
        let s = shared.clone();
        let reader = spawn_reader("colo-proxy-rx", opened.reader, chan.clone(), move |msg| {
            let mut st = s.lock();
            let st = &mut *st;
            match msg {
                Message::Mirror { frame } => {
                    if let Some(f) = st.proxy.mirrored(frame.to_vec()) {
                        st.backlog.push(st.injector.as_ref(), f, &s.stats);
                    }
                    Ok(())
                }
                Message::Epoch { checkpoint } => st
                    .proxy
                    .mirror_epoch(checkpoint)
                    .map_err(|e| format!("the primary's epoch marker: {e}")),
                Message::IsnOffset {
                    key,
                    guest_dir,
                    offset,
                    checkpoint,
                } => {
                    st.proxy.learn_offset(checkpoint, key, guest_dir, offset);
                    Ok(())
                }
                other => Err(format!("unexpected {} from the primary", other.ty())),
            }
        });
        link.threads.keep(reader);
        let s = shared;
        let ticker = spawn_ticker("colo-proxy-tick", chan, move || {
            let mut st = s.lock();
            let st = &mut *st;
            if !st.backlog.frames.is_empty() {
                st.backlog.flush(st.injector.as_ref(), &s.stats);
            }
        });
        link.threads.keep(ticker);
        Ok(link)
    }

    /// The SVM exists: its NIC (if any) gets the filter that sends its frames to the primary
    /// and keeps this host's tap out while protected.
    pub fn attach(&self, nics: Vec<ProtectedNic>) -> Result<(), LinkError> {
        if nics.len() > 1 {
            return Err(LinkError::TooManyNics(nics.len()));
        }
        let Some(nic) = nics.into_iter().next() else {
            return Ok(());
        };
        nic.slot
            .install(Box::new(SvmFilter {
                shared: self.shared.clone(),
            }))
            .map_err(|e| LinkError::SlotTaken(e.0))?;
        let mut st = self.shared.lock();
        st.injector = Some(nic.slot.injector());
        st.nic = Some(nic);
        Ok(())
    }

    /// The SVM paused to load a checkpoint (before the flush): mirrored frames of its old
    /// epoch that it has not taken yet, or that still arrive, are covered by the checkpoint.
    pub fn checkpoint_applying(&self) {
        let mut st = self.shared.lock();
        let st = &mut *st;
        st.proxy.checkpoint_applying();
        let mut stale = st.backlog.frames.len();
        st.backlog.frames.clear();
        if let Some(nic) = &st.nic {
            stale += nic.slot.discard_injected(Direction::Rx);
        }
        if stale > 0 {
            log::debug!("COLO proxy: {stale} mirrored frames are in the checkpoint being loaded");
        }
    }

    /// The SVM loaded checkpoint `n` and is still paused: the marker to the primary, then the
    /// mirrored frames that waited for this epoch into its rx.
    pub fn checkpoint_loaded(&self, n: u64) -> Result<(), String> {
        let mut st = self.shared.lock();
        let st = &mut *st;
        let loaded = st
            .proxy
            .checkpoint_loaded(n)
            .map_err(|e| format!("proxy: {e}"))?;
        let Message::Epoch { checkpoint } = loaded.marker else {
            return Err("proxy: a load's marker is not an epoch".into());
        };
        self.shared.outbox.control(Outgoing::Epoch(checkpoint))?;
        for f in loaded.inject {
            st.backlog.push(st.injector.as_ref(), f, &self.shared.stats);
        }
        Ok(())
    }

    /// The primary is gone and the SVM takes over: the channel closes, the SVM's frames go to
    /// this host's tap (connections that need it still rewritten).
    pub fn failover(&self) {
        self.close();
        let (replay, injector) = {
            let mut st = self.shared.lock();
            let replay = st.proxy.failover();
            (replay, st.nic.as_ref().map(|n| n.slot.injector()))
        };
        if replay.is_empty() {
            return;
        }
        log::info!(
            "COLO proxy: sending the SVM's last {} TCP segments to this host's tap",
            replay.len()
        );
        // Outside the lock: the NIC's worker, which takes these, may be in the filter.
        let mut out = Backlog::new(Direction::Tx);
        for f in replay {
            out.push(injector.as_ref(), f, &self.shared.stats);
        }
        let deadline = std::time::Instant::now() + REPLAY_PATIENCE;
        while !out.frames.is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
            out.flush(injector.as_ref(), &self.shared.stats);
        }
        // What still did not fit is left to TCP's own retransmission.
        let left = out.frames.len() as u64;
        self.shared
            .stats
            .inject_dropped
            .fetch_add(left, std::sync::atomic::Ordering::Relaxed);
    }

    /// A second handle on the channel's socket, for the failover switch to shut down: a
    /// writer blocked on a hung peer then fails at once instead of after its timeout.
    pub fn socket(&self) -> std::io::Result<std::net::TcpStream> {
        self.threads.socket()
    }

    /// Closes the channel and waits for its threads.
    pub fn close(&self) {
        self.threads.close(&self.shared.outbox);
    }

    /// The proxy's status.
    pub fn status(&self) -> ProxyStatus {
        status(&self.shared)
    }

    /// The status, as a closure the status document calls while the link runs.
    pub fn status_source(&self) -> Arc<dyn Fn() -> ProxyStatus + Send + Sync> {
        let shared = self.shared.clone();
        Arc::new(move || status(&shared))
    }
}

impl Drop for SecondaryLink {
    fn drop(&mut self) {
        self.close();
    }
}

fn status(shared: &Shared) -> ProxyStatus {
    let st = shared.lock();
    ProxyStatus {
        nic: st.nic.as_ref().map(|n| n.tap.clone()),
        primary: None,
        secondary: Some(st.proxy.counters()),
        last_divergence: None,
        link: shared.stats.counters(st.backlog.frames.len()),
    }
}

/// The filter on the SVM's NIC.
struct SvmFilter {
    shared: Arc<Shared>,
}

impl PacketFilter for SvmFilter {
    fn name(&self) -> &str {
        "colo-secondary"
    }

    fn process(&mut self, dir: Direction, pkt: &mut Packet, _: &Injector) -> Verdict {
        let mut st = self.shared.lock();
        let out = match dir {
            Direction::Tx => match st.proxy.from_svm(pkt.take().into_bytes()) {
                SvmTx::ToPrimary(f) => {
                    self.shared.outbox.packet(Outgoing::SvmOutput(f));
                    return Verdict::Hold;
                }
                SvmTx::ToTap(f) => Some(f),
            },
            Direction::Rx => st.proxy.from_tap(pkt.take().into_bytes()),
        };
        match out.map(Packet::new) {
            Some(Ok(p)) => {
                *pkt = p;
                Verdict::Pass
            }
            _ => Verdict::Drop,
        }
    }
}
