//! The COLO network proxy: the primary's output goes to clients only once the secondary
//! produced the same.
//!
//! On the primary every frame the PVM sends is held, the frames the SVM sends come back from
//! the secondary, and the two are compared per connection; a matched PVM frame goes to the tap,
//! a difference (or a frame that waits too long) asks for a checkpoint, after which everything
//! held goes out. The pieces here are pure logic — no sockets, no KVM — and plug into the
//! virtio-net filter chain (`devices::virtio::net::filter`) through a filter that feeds them.
//!
//! - [`packet`]: zero-copy parsing of Ethernet frames (VLAN tags, IPv4/IPv6 with extension
//!   headers and fragments, TCP/UDP/ICMP), normalized connection keys, checksum helpers and an
//!   in-place TCP sequence/acknowledgment rewrite for the secondary's rewriter. Our own parser
//!   rather than a crate (etherparse, smoltcp) because we need views that carry their offsets
//!   in the frame, so the same parse serves comparing and rewriting in place.
//! - [`compare`]: [`compare::ColoCompare`], which decides when the PVM's frames are released
//!   and when to ask for a checkpoint.
//! - [`rewriter`]: [`rewriter::SeqRewriter`], which puts the SVM's TCP sequence numbers into
//!   the PVM's space and the client's acknowledgments into the SVM's, per connection opened
//!   since the last checkpoint.
//! - [`wire`] (shared with block replication's disk channel, [`crate::wire`]): the frames of
//!   the proxy channel between primary and secondary (mirrored packets, the SVM's packets, ISN
//!   offsets, epoch markers), each MAC'd under the connection's `auth` session key;
//!   [`wire::FrameWriter`] and [`wire::FrameReader`].
//! - [`session`]: the two sides' proxy logic as synchronous state machines the caller feeds
//!   with frames and checkpoint events: [`session::PrimaryProxy`] (mirror, hold, compare and
//!   release per checkpoint epoch, in order) and [`session::SecondaryProxy`] (mirrored frames
//!   into the SVM by epoch, its output back, the sequence rewriting after a failover).
//! - [`link`]: the sessions at run time — the proxy channel's connection and threads, the
//!   filters on the PVM's and the SVM's NIC, and the hooks the checkpoint workers call.

pub mod compare;
pub mod link;
pub mod packet;
pub mod rewriter;
pub mod session;
pub use crate::wire;
