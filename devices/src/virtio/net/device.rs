//! The virtio-net device: features, config space, state, and the worker thread's lifecycle.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as vn;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::filter::{FilterChain, FilterSlot, Injector};
use super::tap::{Tap, TapIo};
use super::worker::{Worker, WorkerExit, WorkerSetup};
use crate::state::{ComponentState, StateError, Stateful};
use crate::virtio::{
    device_type, features, read_config_bytes, ActivateContext, ActivateError, VirtioDevice,
};

/// Size of the rx and tx queues.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const STATE_KIND: &str = "virtio-net";
const STATE_VERSION: u32 = 1;

const fn bit(n: u32) -> u64 {
    1 << n
}

/// Virtio-net feature bits this device may offer.
pub mod net_features {
    use super::{bit, vn};
    /// The guest may hand us partially checksummed packets.
    pub const CSUM: u64 = bit(vn::VIRTIO_NET_F_CSUM);
    /// The guest accepts partially checksummed packets.
    pub const GUEST_CSUM: u64 = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
    /// The config space carries a MAC address.
    pub const MAC: u64 = bit(vn::VIRTIO_NET_F_MAC);
    /// The guest accepts TCPv4 GSO frames.
    pub const GUEST_TSO4: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    /// The guest accepts TCPv6 GSO frames.
    pub const GUEST_TSO6: u64 = bit(vn::VIRTIO_NET_F_GUEST_TSO6);
    /// The guest accepts UDP fragmentation-offload frames.
    pub const GUEST_UFO: u64 = bit(vn::VIRTIO_NET_F_GUEST_UFO);
    /// The guest may send TCPv4 GSO frames.
    pub const HOST_TSO4: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO4);
    /// The guest may send TCPv6 GSO frames.
    pub const HOST_TSO6: u64 = bit(vn::VIRTIO_NET_F_HOST_TSO6);
    /// The guest may send UFO frames.
    pub const HOST_UFO: u64 = bit(vn::VIRTIO_NET_F_HOST_UFO);
    /// A received frame may span several rx buffers.
    pub const MRG_RXBUF: u64 = bit(vn::VIRTIO_NET_F_MRG_RXBUF);
    /// The config space carries the link status.
    pub const STATUS: u64 = bit(vn::VIRTIO_NET_F_STATUS);
}
use net_features as nf;

/// Features that do not depend on the tap. The HOST_* (guest → tap) offloads only need a vnet
/// header: the kernel segments or checksums in software whatever the tap's own settings.
const BASE_FEATURES: u64 = features::VERSION_1
    | features::RING_EVENT_IDX
    | nf::MAC
    | nf::MRG_RXBUF
    | nf::STATUS
    | nf::CSUM
    | nf::HOST_TSO4
    | nf::HOST_TSO6
    | nf::HOST_UFO;

/// The `TUN_F_*` offloads that let the tap hand us what a guest with `acked` features accepts.
pub fn tap_offload_flags(acked: u64) -> u32 {
    // Every TUN_F_* offload implies partial checksums, which the guest must accept first.
    if acked & nf::GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & nf::GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & nf::GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    if acked & nf::GUEST_UFO != 0 {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// The guest (tap → guest) offloads the tap accepts, found by asking for the most and backing off.
fn probe_guest_offloads(tap: &dyn TapIo) -> u64 {
    let candidates = [
        nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6 | nf::GUEST_UFO,
        nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6,
        nf::GUEST_CSUM,
    ];
    let found = candidates
        .into_iter()
        .find(|&f| tap.set_offload(tap_offload_flags(f)).is_ok())
        .unwrap_or(0);
    // No offload until a driver asks: the tap must not hand GSO frames to nobody.
    if let Err(e) = tap.set_offload(0) {
        log::warn!("net: cannot clear the tap's offloads: {e}");
    }
    found
}

/// Errors building a [`Net`].
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address cannot be a NIC's (multicast or all zero) or does not parse.
    #[error("invalid MAC address {0:?}")]
    InvalidMac(String),
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let bad = || NetError::InvalidMac(s.to_string());
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next().ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A MAC a NIC can own: unicast and not all zero.
fn valid_mac(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

/// Per-device traffic counters, updated by the worker (relaxed atomics: statistics only).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Ethernet bytes (vnet header excluded) delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Frames for the guest that were dropped (filter verdict, no fit, malformed).
    pub rx_dropped: AtomicU64,
    /// Frames for the guest held by a filter.
    pub rx_held: AtomicU64,
    /// Frames injected towards the guest.
    pub rx_injected: AtomicU64,
    /// Malformed rx descriptor chains handed back empty.
    pub rx_bad_chains: AtomicU64,
    /// Frames written to the tap.
    pub tx_packets: AtomicU64,
    /// Ethernet bytes (vnet header excluded) written to the tap.
    pub tx_bytes: AtomicU64,
    /// Frames from the guest that were dropped (filter verdict, tap error).
    pub tx_dropped: AtomicU64,
    /// Frames from the guest held by a filter.
    pub tx_held: AtomicU64,
    /// Frames injected towards the tap.
    pub tx_injected: AtomicU64,
    /// Malformed tx descriptor chains refused.
    pub tx_bad_chains: AtomicU64,
}

/// A plain copy of [`NetCounters`], for the API.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub rx_held: u64,
    pub rx_injected: u64,
    pub rx_bad_chains: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub tx_held: u64,
    pub tx_injected: u64,
    pub tx_bad_chains: u64,
}

impl NetCounters {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_held: get(&self.rx_held),
            rx_injected: get(&self.rx_injected),
            rx_bad_chains: get(&self.rx_bad_chains),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_held: get(&self.tx_held),
            tx_injected: get(&self.tx_injected),
            tx_bad_chains: get(&self.tx_bad_chains),
        }
    }
}

/// The saved state: the config the guest sees and what it negotiated.
#[derive(Debug, Serialize, Deserialize)]
struct NetState {
    mac: [u8; 6],
    acked_features: u64,
}

struct Running {
    kill: EventFd,
    handle: JoinHandle<WorkerExit>,
}

/// A virtio-net device on a tap, with a packet-filter chain on its data path.
pub struct Net {
    tap: Arc<dyn TapIo>,
    tap_name: String,
    mac: [u8; 6],
    avail_features: u64,
    acked_features: u64,
    /// None while the worker owns it, or for good if a worker died with it.
    filters: Option<FilterChain>,
    injector: Injector,
    slot: FilterSlot,
    counters: Arc<NetCounters>,
    worker: Option<Running>,
}

impl Net {
    /// A NIC with address `mac` on `tap`, whose frames cross `filters`.
    pub fn new(tap: Tap, mac: [u8; 6], filters: FilterChain) -> Result<Self, NetError> {
        let name = tap.name().to_string();
        Self::with_backend(Arc::new(tap), &name, mac, filters)
    }

    /// Same as [`Net::new`] over any [`TapIo`] (tests use a socketpair); `name` names the thread.
    pub fn with_backend(
        tap: Arc<dyn TapIo>,
        name: &str,
        mac: [u8; 6],
        filters: FilterChain,
    ) -> Result<Self, NetError> {
        if !valid_mac(&mac) {
            return Err(NetError::InvalidMac(format_mac(&mac)));
        }
        let avail_features = BASE_FEATURES | probe_guest_offloads(tap.as_ref());
        Ok(Self {
            tap,
            tap_name: name.to_string(),
            mac,
            avail_features,
            acked_features: 0,
            injector: filters.injector(),
            slot: filters.slot(),
            filters: Some(filters),
            counters: Arc::new(NetCounters::default()),
            worker: None,
        })
    }

    /// The traffic counters (live: they keep counting).
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// A handle to inject packets past the filter chain.
    pub fn injector(&self) -> Injector {
        self.injector.clone()
    }

    /// The slot of the filter chain for a filter added while the device runs (COLO's proxy).
    pub fn filter_slot(&self) -> FilterSlot {
        self.slot.clone()
    }

    /// The MAC address the guest sees.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// The tap's interface name.
    pub fn tap_name(&self) -> &str {
        &self.tap_name
    }

    fn config_bytes(&self) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&(vn::VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        // max_virtqueue_pairs: one rx/tx pair (no MQ).
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    fn start(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        for i in [RX_QUEUE, TX_QUEUE] {
            if !ctx.queues.get(i).is_some_and(|q| q.queue.ready()) {
                return Err(ActivateError::QueueNotReady(i));
            }
        }
        self.tap
            .set_offload(tap_offload_flags(ctx.acked_features))
            .map_err(|e| ActivateError::Worker(e.to_string()))?;
        let (kill, kill_worker) = EventFd::new(libc::EFD_NONBLOCK)
            .and_then(|k| Ok((k.try_clone()?, k)))
            .map_err(|e| ActivateError::Worker(format!("kill eventfd: {e}")))?;
        let mut queues = ctx.queues.into_iter();
        let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueNotReady(TX_QUEUE));
        };
        let filters = self.filters.take().ok_or_else(|| {
            ActivateError::Worker(
                "an earlier worker died with the filter chain; refusing to run unfiltered".into(),
            )
        })?;
        let init = ctx.worker_init.clone();
        let setup = WorkerSetup {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            rx,
            tx,
            acked_features: ctx.acked_features,
            tap: self.tap.clone(),
            filters,
            counters: self.counters.clone(),
            kill: kill_worker,
        };
        let worker = Worker::new(setup).map_err(|failed| {
            let (e, exit) = *failed;
            self.filters = Some(exit.filters);
            ActivateError::Worker(e.to_string())
        })?;
        // If spawning fails the closure, and the filter chain with it, is gone: the device then
        // refuses to restart rather than run without its filters.
        let handle = std::thread::Builder::new()
            // std panics on a NUL in a thread name; a tap name has none, a test backend might.
            .name(format!("net-{}", self.tap_name.replace('\0', "")))
            .spawn(move || {
                if let Some(init) = init {
                    init("virtio-net");
                }
                worker.run()
            })
            .map_err(|e| ActivateError::Worker(format!("cannot spawn the net worker: {e}")))?;
        self.worker = Some(Running { kill, handle });
        self.acked_features = ctx.acked_features;
        Ok(())
    }

    fn stop(&mut self) -> Vec<Queue> {
        let Some(running) = self.worker.take() else {
            return Vec::new();
        };
        if let Err(e) = running.kill.write(1) {
            log::error!("net {}: cannot stop the worker: {e}", self.tap_name);
        }
        match running.handle.join() {
            Ok(exit) => {
                self.filters = Some(exit.filters);
                exit.queues
            }
            Err(_) => {
                log::error!(
                    "net {}: the worker panicked; its filter chain is lost",
                    self.tap_name
                );
                Vec::new()
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data)
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // A restore re-activates without a reset first: never leave two workers on one tap.
        self.stop();
        self.start(ctx)
    }

    fn reset(&mut self) -> Vec<Queue> {
        self.acked_features = 0;
        self.stop()
    }
}

impl Stateful for Net {
    fn save_state(&self) -> Result<ComponentState, StateError> {
        let state = NetState {
            mac: self.mac,
            acked_features: self.acked_features,
        };
        ComponentState::encode(STATE_KIND, STATE_VERSION, &state)
    }

    fn restore_state(&mut self, state: &ComponentState) -> Result<(), StateError> {
        let s: NetState = state.decode(STATE_KIND, STATE_VERSION)?;
        let mismatch = |why: String| StateError::Mismatch {
            kind: STATE_KIND.to_string(),
            why,
        };
        if !valid_mac(&s.mac) {
            return Err(mismatch(format!("invalid MAC {}", format_mac(&s.mac))));
        }
        let unknown = s.acked_features & !self.avail_features;
        if unknown != 0 {
            // e.g. migrating to a host whose tap lacks an offload the guest is using.
            return Err(mismatch(format!(
                "features {unknown:#x} were negotiated but this tap cannot offer them"
            )));
        }
        // A different MAC is configuration, not an incompatibility.
        self.mac = s.mac;
        self.acked_features = s.acked_features;
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::{ActiveQueue, Interrupt};
    use crate::GuestMemory;
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A socketpair tap that refuses some offloads, like an old kernel.
    struct Picky {
        sock: UnixDatagram,
        refuse: u32,
    }
    impl std::os::unix::io::AsRawFd for Picky {
        fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
            self.sock.as_raw_fd()
        }
    }
    impl TapIo for Picky {
        fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.sock.recv(buf)
        }
        fn write(&self, buf: &[u8]) -> std::io::Result<usize> {
            self.sock.send(buf)
        }
        fn set_offload(&self, flags: u32) -> Result<(), crate::virtio::net::TapError> {
            if flags & self.refuse != 0 {
                return Err(crate::virtio::net::TapError::InvalidName {
                    name: "picky".into(),
                    why: "refused",
                });
            }
            Ok(())
        }
    }

    fn net_on(tap: Arc<dyn TapIo>) -> Net {
        Net::with_backend(tap, "test0", MAC, FilterChain::new().unwrap()).unwrap()
    }

    fn pair() -> (Arc<UnixDatagram>, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (Arc::new(a), b)
    }

    #[test]
    fn identity_features_and_config() {
        let (tap, _peer) = pair();
        let net = net_on(tap);
        assert_eq!(net.device_type(), 1);
        assert_eq!(net.queue_max_sizes(), &[256, 256]);
        let f = net.avail_features();
        for want in [
            features::VERSION_1,
            features::RING_EVENT_IDX,
            nf::MAC,
            nf::MRG_RXBUF,
            nf::STATUS,
            nf::CSUM,
            nf::GUEST_CSUM,
            nf::GUEST_TSO4,
            nf::GUEST_TSO6,
            nf::GUEST_UFO,
            nf::HOST_TSO4,
            nf::HOST_TSO6,
            nf::HOST_UFO,
        ] {
            assert_ne!(f & want, 0, "missing {want:#x}");
        }
        assert_eq!(f & features::RING_INDIRECT_DESC, 0);
        let mut cfg = [0u8; 12];
        net.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x52, 0x54, 0, 0x12, 0x34, 0x56, 1, 0, 1, 0, 0, 0]);
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), 1, "link up");
    }

    #[test]
    fn guest_offloads_only_if_the_tap_takes_them() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let net = net_on(Arc::new(Picky {
            sock: a,
            refuse: libc::TUN_F_UFO,
        }));
        let f = net.avail_features();
        assert_ne!(f & nf::GUEST_TSO4, 0);
        assert_eq!(f & nf::GUEST_UFO, 0);
        assert_ne!(
            f & nf::HOST_TSO4,
            0,
            "host offloads do not depend on the tap"
        );

        let (a, _b) = UnixDatagram::pair().unwrap();
        let net = net_on(Arc::new(Picky {
            sock: a,
            refuse: libc::TUN_F_CSUM,
        }));
        let f = net.avail_features();
        assert_eq!(f & (nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6), 0);
        assert_ne!(f & nf::MRG_RXBUF, 0);
    }

    #[test]
    fn offload_flags_follow_the_guest() {
        assert_eq!(tap_offload_flags(nf::GUEST_TSO4), 0, "TSO needs GUEST_CSUM");
        assert_eq!(tap_offload_flags(nf::GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(
            tap_offload_flags(nf::GUEST_CSUM | nf::GUEST_TSO4 | nf::GUEST_TSO6 | nf::GUEST_UFO),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn mac_parsing_and_validation() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), MAC);
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "5:54:00:12:34:56",
            "zz:54:00:12:34:56",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
        let (tap, _peer) = pair();
        assert!(Net::with_backend(
            tap.clone(),
            "t",
            [1, 0, 0, 0, 0, 1],
            FilterChain::new().unwrap()
        )
        .is_err());
        assert!(Net::with_backend(tap, "t", [0; 6], FilterChain::new().unwrap()).is_err());
    }

    #[test]
    fn state_round_trip_and_refusals() {
        let (tap, _peer) = pair();
        let mut net = net_on(tap.clone());
        net.acked_features = features::VERSION_1 | nf::MRG_RXBUF | nf::GUEST_CSUM;
        let saved = net.save_state().unwrap();

        let other_mac = [0x52, 0x54, 0, 0, 0, 9];
        let mut fresh =
            Net::with_backend(tap.clone(), "t", other_mac, FilterChain::new().unwrap()).unwrap();
        fresh.restore_state(&saved).unwrap();
        assert_eq!(fresh.mac(), MAC, "a different MAC is restored, not refused");
        assert_eq!(fresh.save_state().unwrap(), saved);

        let mut garbage = saved.clone();
        garbage.data = br#"{"mac":[1,2,3],"acked_features":0}"#.to_vec();
        assert!(matches!(
            fresh.restore_state(&garbage),
            Err(StateError::Encoding { .. })
        ));
        let mut multicast = saved.clone();
        multicast.data = br#"{"mac":[1,2,3,4,5,6],"acked_features":0}"#.to_vec();
        assert!(matches!(
            fresh.restore_state(&multicast),
            Err(StateError::Mismatch { .. })
        ));
        let mut wrong_version = saved.clone();
        wrong_version.version = 2;
        assert!(fresh.restore_state(&wrong_version).is_err());

        // A tap without offloads cannot take a guest that negotiated them.
        let (a, _b) = UnixDatagram::pair().unwrap();
        let mut plain = net_on(Arc::new(Picky {
            sock: a,
            refuse: libc::TUN_F_CSUM,
        }));
        assert!(matches!(
            plain.restore_state(&saved),
            Err(StateError::Mismatch { .. })
        ));
        assert_eq!(plain.mac(), MAC, "refusal changes nothing");
    }

    fn active_queue(mem: &GuestMemory, base: u64) -> (ActiveQueue, EventFd) {
        let vq = MockSplitQueue::create(mem, GuestAddress(base), QUEUE_SIZE);
        let mut queue: Queue = vq.create_queue().unwrap();
        queue.set_event_idx(true);
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = notify.try_clone().unwrap();
        (ActiveQueue { queue, notify }, kick)
    }

    fn wait_until(cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The whole device on a thread: a tx frame reaches the tap, an injected rx packet reaches
    /// the guest, and reset hands back both queues where the worker left them.
    #[test]
    fn activate_run_and_reset() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let (tap, peer) = pair();
        let mut net = net_on(tap);
        let (rxq, _rx_kick) = active_queue(&mem, 0);
        let (txq, tx_kick) = active_queue(&mem, 0x10000);
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ctx = ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq)),
            queues: vec![rxq, txq],
            acked_features: BASE_FEATURES,
            worker_init: None,
        };
        net.activate(ctx).unwrap();

        // The guest sends one frame.
        let frame = [[0u8; 12].as_slice(), b"hello from the guest"].concat();
        mem.write_slice(&frame, GuestAddress(0x100000)).unwrap();
        let txvq = MockSplitQueue::create(&mem, GuestAddress(0x10000), QUEUE_SIZE);
        txvq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x100000,
                frame.len() as u32,
                0,
                0,
            ))],
            0,
        )
        .unwrap();
        tx_kick.write(1).unwrap();
        let mut got = [0u8; 256];
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = peer.recv(&mut got).unwrap();
        assert_eq!(&got[..n], &frame[..]);

        // COLO-style injection from another thread lands in the guest's rx buffer.
        let rxvq = MockSplitQueue::create(&mem, GuestAddress(0), QUEUE_SIZE);
        rxvq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0x200000,
                2048,
                VRING_DESC_F_WRITE as u16,
                0,
            ))],
            0,
        )
        .unwrap();
        let inj = net.injector();
        std::thread::spawn(move || {
            inj.inject(
                crate::virtio::net::Direction::Rx,
                crate::virtio::net::Packet::from_frame(b"injected"),
            )
            .unwrap()
        })
        .join()
        .unwrap();
        let counters = net.counters();
        wait_until(|| counters.snapshot().rx_packets == 1);
        let mut buf = [0u8; 20];
        mem.read_slice(&mut buf, GuestAddress(0x200000)).unwrap();
        assert_eq!(&buf[12..], b"injected");
        assert_eq!(u16::from_le_bytes([buf[10], buf[11]]), 1, "num_buffers");

        let stats = counters.snapshot();
        assert_eq!((stats.tx_packets, stats.tx_bytes), (1, 20));
        assert_eq!(stats.rx_injected, 1);

        let queues = net.reset();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[RX_QUEUE].next_used(), 1);
        assert_eq!(queues[TX_QUEUE].next_avail(), 1);
        assert!(net.reset().is_empty(), "second reset: nothing running");
        // The filter chain came back with the queues: the device can start again.
        assert!(net.filters.is_some());
    }

    /// The device behind the real transport: identity, features and config space.
    #[test]
    fn behind_the_mmio_transport() {
        use crate::bus::BusDevice;
        use crate::virtio::mmio::MmioTransport;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tap, _peer) = pair();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(net_on(tap)), mem, irq).unwrap();
        let mut word = [0u8; 4];
        t.read(0x08, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1, "device id: net");
        t.read(0x10, &mut word);
        assert_ne!(u32::from_le_bytes(word) & (1 << 15), 0, "MRG_RXBUF offered");
        let mut mac = [0u8; 6];
        t.read(0x100, &mut mac);
        assert_eq!(mac, MAC);
        t.write(0x30, &0u32.to_le_bytes());
        t.read(0x34, &mut word);
        assert_eq!(u32::from_le_bytes(word), 256, "queue size max");
    }

    #[test]
    fn activation_needs_both_queues_ready() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (tap, _peer) = pair();
        let mut net = net_on(tap);
        let (rxq, _) = active_queue(&mem, 0);
        let (mut txq, _) = active_queue(&mem, 0x10000);
        txq.queue.set_ready(false);
        let ctx = ActivateContext {
            mem,
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
            queues: vec![rxq, txq],
            acked_features: BASE_FEATURES,
            worker_init: None,
        };
        assert!(matches!(
            net.activate(ctx),
            Err(ActivateError::QueueNotReady(1))
        ));
        assert!(
            net.filters.is_some(),
            "a refused activation keeps the chain"
        );
    }
}
