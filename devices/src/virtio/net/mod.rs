//! virtio-net on a Linux tap, with a packet-filter chain (COLO's hook) on its data path.
//!
//! Building one for `--net tap=NAME,mac=..,ip=..,mask=..` (then wrap it in an `MmioTransport`):
//!
//! ```no_run
//! use devices::virtio::net::{parse_mac, FilterChain, Net, Tap};
//! # fn build() -> Result<Net, Box<dyn std::error::Error>> {
//! let tap = Tap::open("tap0")?; // created if missing
//! tap.set_ipv4("192.168.249.1".parse()?, "255.255.255.0".parse()?)?; // only with ip=/mask=
//! tap.set_link_up()?;
//! let net = Net::new(tap, parse_mac("52:54:00:12:34:56")?, FilterChain::new()?)?;
//! let stats = net.counters(); // keep for the API: stats.snapshot()
//! # Ok(net)
//! # }
//! ```

mod device;
mod filter;
mod rx;
mod tap;
#[cfg(test)]
pub(crate) mod testutil;
mod tx;
mod worker;

pub use device::{
    net_features, parse_mac, tap_offload_flags, Net, NetCounters, NetError, NetStats, QUEUE_SIZE,
    RX_QUEUE, TX_QUEUE,
};
pub use filter::{
    Direction, FilterChain, FilterError, FilterSlot, InjectError, Injector, Packet, PacketFilter,
    SlotTaken, Verdict, INJECT_QUEUE_LEN,
};
pub use rx::RxChainError;
pub use tap::{validate_name, Tap, TapError, TapIo, MAX_NAME_LEN, VNET_HDR_LEN};
pub use tx::{GuestSlice, TxChainError};
pub use worker::{WorkerError, MAX_TX_FRAME, RX_BUFFER_LEN};
