//! Snapshot, live migration and COLO checkpoints share one stream format and one transfer
//! machinery, kept apart from KVM so it can be tested on its own:
//!
//! - [`ranges`]: guest-physical ranges, the memory layout, and range validation;
//! - [`protocol`]: the wire format (stream header, checksummed messages, limits);
//! - [`transport`]: streams with bounded I/O (TCP, Unix, files) and N-channel connect/accept;
//! - [`memory`]: dirty bitmaps to page messages and back, through guest memory traits;
//! - [`channels`]: a [`Sender`] and a [`Receiver`] over N parallel channels with round
//!   barriers, callable once per checkpoint;
//! - [`precopy`]: when to stop iterating and copy the rest.
//!
//! `docs/migration.md` describes the format and the sequences.

pub mod channels;
pub mod guest;
pub mod memory;
pub mod precopy;
pub mod protocol;
pub mod ranges;
pub mod transport;

#[cfg(test)]
mod channels_tests;
#[cfg(test)]
mod protocol_tests;
#[cfg(test)]
mod testutil;

pub use channels::{
    new_session_id, ChannelError, Event, Receiver, ReceiverOptions, RoundStats, Sender,
    SenderOptions,
};
pub use guest::GuestMemory;
pub use memory::{
    dirty_set_ranges, merge_dirty, AccessError, DirtyBitmap, GuestMemoryReader, GuestMemoryWriter,
    MemoryError, PageStats,
};
pub use protocol::{Limits, Message, MessageType, ProtocolError, StartInfo};
pub use ranges::{MemRange, MemoryLayout, RangeError, PAGE_SIZE};
pub use transport::{Transport, TransportError};
