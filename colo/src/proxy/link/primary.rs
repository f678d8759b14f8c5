//! The primary's proxy at run time: the PVM's filter (mirror the client's frames, hold the
//! PVM's), the SVM's frames from the channel into the compare, releases to the tap, and a
//! checkpoint asked of the worker when the two VMs' output differs.

use std::net::SocketAddr;
use std::sync::mpsc::Sender as MpscSender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use devices::virtio::net::{Direction, Injector, Packet, PacketFilter, Verdict};

use super::{
    connect, spawn_reader, spawn_ticker, spawn_writer, Backlog, Conn, LinkError, LinkStats,
    OnBroken, Outbox, Outgoing, ProxyStatus, Threads,
};
use crate::auth::Psk;
use crate::protection::Command;
use crate::proxy::compare::{CompareConfig, DEFAULT_SCAN_PERIOD};
use crate::proxy::session::{Output, PrimaryProxy};
use crate::proxy::wire::Message;
use crate::record::Reason;
use crate::vm::ProtectedNic;

/// How long a failover waits for released frames to find room in the NIC's queue.
const FLUSH_PATIENCE: Duration = Duration::from_millis(500);

struct State {
    proxy: PrimaryProxy,
    backlog: Backlog,
    last_divergence: Option<String>,
    last_tick: Instant,
}

struct Shared {
    state: Mutex<State>,
    outbox: Outbox,
    stats: Arc<LinkStats>,
    /// The PVM's NIC's injector (releases go to its tap).
    injector: Option<Injector>,
    commands: MpscSender<Command>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Carries out what the proxy asked for, in order (under the state lock).
    fn route(&self, st: &mut State, outs: Vec<Output>) -> Result<(), String> {
        for o in outs {
            match o {
                Output::ToTap(f) => st.backlog.push(self.injector.as_ref(), f, &self.stats),
                Output::Checkpoint(why) => {
                    log::info!("COLO proxy: asking for a checkpoint: {why}");
                    st.last_divergence = Some(why.to_string());
                    // The worker gone means protection is ending: nothing to ask of it.
                    let _ = self.commands.send(Command::Checkpoint {
                        reason: Reason::Divergence,
                        pause_after: false,
                    });
                }
                Output::SendOffset {
                    epoch,
                    key,
                    guest_dir,
                    offset,
                } => self.outbox.packet(Outgoing::Offset {
                    key,
                    guest_dir,
                    offset,
                    epoch,
                }),
                Output::MirrorEpoch(n) => self.outbox.control(Outgoing::Epoch(n))?,
            }
        }
        Ok(())
    }
}

/// The primary's end of the proxy: created once the checkpoint channels are up, ended with
/// protection.
pub struct PrimaryLink {
    shared: Arc<Shared>,
    nic: Option<ProtectedNic>,
    threads: Threads,
}

impl PrimaryLink {
    /// Connects the proxy channel to the secondary at `addr` and puts the PVM's filter on
    /// `nic` (none: only the epoch markers cross). `commands` takes the checkpoints the compare
    /// asks for; `on_broken` hears once if the channel breaks.
    pub fn connect(
        addr: SocketAddr,
        psk: &Psk,
        timeout: Duration,
        cfg: CompareConfig,
        nic: Option<ProtectedNic>,
        commands: MpscSender<Command>,
        on_broken: OnBroken,
    ) -> Result<PrimaryLink, LinkError> {
        let opened = connect(addr, psk, timeout, crate::wire::Channel::Proxy)?;
        let chan = Conn::new(opened.stream, on_broken);
        let stats = chan.stats.clone();
        let threads = Threads::new(chan.clone());
        let (outbox, writer) = spawn_writer("colo-proxy-tx", opened.writer, chan.clone())?;
        threads.keep(Ok(writer));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                proxy: PrimaryProxy::new(cfg),
                backlog: Backlog::new(Direction::Tx),
                last_divergence: None,
                last_tick: Instant::now(),
            }),
            outbox,
            stats,
            injector: nic.as_ref().map(|n| n.slot.injector()),
            commands,
        });
        let link = PrimaryLink {
            shared: shared.clone(),
            nic,
            threads,
        };
        let s = shared.clone();
        let reader = spawn_reader("colo-proxy-rx", opened.reader, chan.clone(), move |msg| {
            let mut st = s.lock();
            match msg {
                Message::SvmOutput { frame } => {
                    let outs = st.proxy.from_svm(Instant::now(), frame.to_vec());
                    s.route(&mut st, outs)
                }
                Message::Epoch { checkpoint } => st
                    .proxy
                    .svm_epoch(checkpoint)
                    .map_err(|e| format!("the secondary's epoch marker: {e}")),
                other => Err(format!("unexpected {} from the secondary", other.ty())),
            }
        });
        link.threads.keep(reader);
        let s = shared;
        let ticker = spawn_ticker("colo-proxy-tick", chan, move || {
            let mut st = s.lock();
            let st = &mut *st;
            st.backlog.flush(s.injector.as_ref(), &s.stats);
            let now = Instant::now();
            // The compare's own scan period would add up to a second to its timeout.
            if now.duration_since(st.last_tick) >= DEFAULT_SCAN_PERIOD / 10 {
                st.last_tick = now;
                let outs = st.proxy.tick(now);
                if let Err(e) = s.route(st, outs) {
                    log::warn!("COLO proxy: {e}");
                }
            }
        });
        link.threads.keep(ticker);
        if let Some(nic) = &link.nic {
            let filter = PvmFilter {
                shared: link.shared.clone(),
            };
            if let Err(e) = nic.slot.install(Box::new(filter)) {
                link.close();
                return Err(LinkError::SlotTaken(e.0));
            }
        }
        Ok(link)
    }

    /// The PVM is paused for checkpoint `n`: a new epoch, and its marker into the mirror stream.
    pub fn checkpoint_started(&self, n: u64) -> Result<(), String> {
        let mut st = self.shared.lock();
        let outs = st
            .proxy
            .checkpoint_started(n)
            .map_err(|e| format!("proxy: {e}"))?;
        self.shared.route(&mut st, outs)
    }

    /// The secondary acknowledged checkpoint `n`: the PVM's frames of older epochs go out.
    pub fn checkpoint_done(&self, n: u64) -> Result<(), String> {
        let mut st = self.shared.lock();
        let outs = st
            .proxy
            .checkpoint_done(n)
            .map_err(|e| format!("proxy: {e}"))?;
        self.shared.route(&mut st, outs)
    }

    /// Protection ended: everything held goes to the tap in order, the channel closes and the
    /// PVM's NIC is driven directly again.
    pub fn failover(&self) {
        {
            let mut st = self.shared.lock();
            let outs = st.proxy.failover();
            if let Err(e) = self.shared.route(&mut st, outs) {
                log::warn!("COLO proxy: {e}");
            }
        }
        self.close();
        // Frames released now must leave before those the PVM sends once the filter is out.
        let deadline = Instant::now() + FLUSH_PATIENCE;
        loop {
            let mut st = self.shared.lock();
            st.backlog
                .flush(self.shared.injector.as_ref(), &self.shared.stats);
            if st.backlog.frames.is_empty() || Instant::now() >= deadline {
                break;
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(nic) = &self.nic {
            nic.slot.remove();
        }
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
        status(&self.shared, self.nic.as_ref().map(|n| n.tap.clone()))
    }

    /// The status, as a closure the status document calls while the link runs.
    pub fn status_source(&self) -> Arc<dyn Fn() -> ProxyStatus + Send + Sync> {
        let shared = self.shared.clone();
        let nic = self.nic.as_ref().map(|n| n.tap.clone());
        Arc::new(move || status(&shared, nic.clone()))
    }
}

impl Drop for PrimaryLink {
    fn drop(&mut self) {
        self.close();
    }
}

fn status(shared: &Shared, nic: Option<String>) -> ProxyStatus {
    let st = shared.lock();
    ProxyStatus {
        nic,
        primary: Some(st.proxy.counters()),
        secondary: None,
        last_divergence: st.last_divergence.clone(),
        link: shared.stats.counters(st.backlog.frames.len()),
    }
}

/// The filter on the PVM's NIC.
struct PvmFilter {
    shared: Arc<Shared>,
}

impl PacketFilter for PvmFilter {
    fn name(&self) -> &str {
        "colo-primary"
    }

    fn process(&mut self, dir: Direction, pkt: &mut Packet, _: &Injector) -> Verdict {
        let mut st = self.shared.lock();
        match dir {
            Direction::Rx => {
                if let Some(copy) = st.proxy.from_client(pkt.as_bytes()) {
                    self.shared.outbox.packet(Outgoing::Mirror(copy));
                }
                Verdict::Pass
            }
            Direction::Tx => {
                let outs = st.proxy.from_pvm(Instant::now(), pkt.take().into_bytes());
                if let Err(e) = self.shared.route(&mut st, outs) {
                    log::warn!("COLO proxy: {e}");
                }
                Verdict::Hold
            }
        }
    }
}
