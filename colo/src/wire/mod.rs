//! COLO's data channels: the frames the primary and the secondary exchange over a connection
//! of their own per [`Channel`] — the network proxy's and block replication's — one of each per
//! protection session. Both share the framing, the MACs and the rules below; each message type
//! belongs to one channel (or to both: hello, bye, epoch), and a frame of the other channel's
//! type is refused.
//!
//! **Proxy channel.**
//! The primary mirrors every packet a client sends to the PVM ([`Message::Mirror`], for the
//! SVM's rx) and tells the secondary each TCP sequence offset its rewriter learned
//! ([`Message::IsnOffset`]: after a failover the secondary needs them to keep the client's
//! connections alive). The secondary sends back every packet the SVM sent
//! ([`Message::SvmOutput`], for the primary's compare) and marks where a checkpoint's epoch
//! begins ([`Message::Epoch`]). Each side opens with a [`Message::Hello`] and may end with a
//! [`Message::Bye`].
//!
//! **Disk channel.** At the start the primary announces each disk ([`Message::DiskInfo`]);
//! the secondary answers with its base's region hash list ([`Message::DiskHashes`], in chunks)
//! and the primary sends the regions that differ, then every write of the PVM, as
//! [`Message::DiskWrite`] and [`Message::DiskZeroes`], in the order the PVM's disk took them.
//! The secondary acknowledges what it holds ([`Message::DiskAck`], a running count). At every
//! checkpoint's pause the primary sends [`Message::Epoch`] (the write barrier): the writes
//! after it belong to that checkpoint's epoch. See `docs/colo.md`, "Block replication".
//!
//! The connection is authenticated with [`crate::auth`] (purpose [`PURPOSE`] or
//! [`DISK_PURPOSE`], [`handshake_on`])
//! before any frame. Every frame then carries a MAC under the connection's [`SessionKey`] for
//! its direction, over its sequence number, its header and its body, so a frame cannot be
//! forged, altered, replayed, reordered, dropped (the next one fails) or sent back to its sender.
//!
//! # Frame (version 1)
//!
//! Integers little-endian.
//!
//! | offset | size | field | rule |
//! | --- | --- | --- | --- |
//! | 0 | 4 | body_len | at most the type's limit, checked before anything is allocated or read |
//! | 4 | 2 | type | one of [`MsgType`]; any other is refused |
//! | 6 | 2 | flags | must be 0 |
//! | 8 | 8 | seq | this direction's frame number, from 0; must be the one expected next |
//! | 16 | body_len | body | per type, below |
//! | 16 + body_len | 32 | mac | `BLAKE3-keyed(direction key, seq u64 ‖ header ‖ body)` ([`SessionKey::seal_parts`]) |
//!
//! | type | message | from | body | limit |
//! | --- | --- | --- | --- | --- |
//! | 1 | Hello | both | version u16 = 1, role u8 (1 primary, 2 secondary: the sender's), reserved u8 = 0; frame 0 each way, and only frame 0 | 64 (4 in version 1) |
//! | 2 | Bye | both | a reason: UTF-8 without control characters; the sender's last frame | 256 |
//! | 3 | Mirror | primary | 12-byte vnet header + Ethernet frame, at least 26 bytes (opaque here) | 65 609 |
//! | 4 | SvmOutput | secondary | the same form | 65 609 |
//! | 5 | IsnOffset | primary | connection key (TCP only), guest direction u8 (0 lo→hi, 1 hi→lo), offset u32 (SVM ISN − PVM ISN), checkpoint u64 (the epoch it was learned in) | 57 |
//! | 6 | Epoch | both (disk: primary) | checkpoint u64, ≥ 1 and increasing per direction. From the secondary: the SVM loaded it, what the SVM sends after this belongs to its epoch. From the primary: the PVM paused for it, mirrored frames (or disk writes) after this reached the PVM after the pause | 8 |
//! | 7 | DiskInfo | primary (disk) | disk u16 (index in the VM's configuration), size u64 | 10 |
//! | 8 | DiskHashes | secondary (disk) | disk u16, total u64 (the encoded list's length), then the list's next bytes (not empty) | 10 + 1 MiB |
//! | 9 | DiskWrite | primary (disk) | disk u16, offset u64, data (not empty; offset + length ≤ 2^64) | 10 + 1 MiB |
//! | 10 | DiskZeroes | primary (disk) | disk u16, offset u64, len u64 (not 0, no wrap) | 18 |
//! | 11 | DiskAck | secondary (disk) | writes u64: DiskWrite and DiskZeroes frames held so far, increasing | 8 |
//!
//! The packet limit is the largest frame a virtio-net GSO packet can be: the vnet header, an
//! Ethernet header with two VLAN tags, a 40-byte IPv6 header and a 65 535-byte payload.
//!
//! Connection key (a [`ConnKey`]), 20 bytes for IPv4, 44 for IPv6, 24 for MAC addresses:
//!
//! | offset | size | field | rule |
//! | --- | --- | --- | --- |
//! | 0 | 2 | outer VLAN id | ≤ 4095 (0: untagged, or a priority tag) |
//! | 2 | 2 | inner VLAN id | ≤ 4095 |
//! | 4 | 1 | protocol | 1 TCP, 2 UDP, 3 ICMP, 4 ICMPv6, 5 another IP protocol, 6 a non-IP ethertype |
//! | 5 | 1 | family | 4 IPv4, 6 IPv6, 1 MAC: ICMP needs 4, ICMPv6 6, an ethertype 1, the others 4 or 6 |
//! | 6 | 2 | value | the IP protocol number (protocol 5, ≤ 255) or the ethertype (6); 0 otherwise |
//! | 8 | n | lo address | n = 4, 16 or 6 by family, in network byte order |
//! | 8 + n | 2 | lo port | the echo id for ICMP (the same at both ends); 0 for protocols 5 and 6 |
//! | 10 + n | n | hi address | |
//! | 10 + 2n | 2 | hi port | (lo address, lo port) ≤ (hi address, hi port), as [`ConnKey::new`] sorts them |
//!
//! # Reading
//!
//! [`FrameReader`] checks the header (type, flags, length against the type's limit) before it
//! reads or allocates anything for the body, reads body and MAC into a buffer it keeps for the
//! next frame, verifies the MAC (constant time) under the frame's sequence number and then that
//! this number is the one expected, and only then decodes the body and checks it against the
//! sender's role and the channel's order. Reads are bounded by the stream's own timeouts (the
//! caller sets them): a read that times out keeps what it has and the next call resumes the
//! frame; any other error ends the channel ([`WireError::Failed`] after it). Nothing the peer
//! sends makes it panic.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::auth::{self, AuthError, Psk, SessionKey, Side, TAG_LEN};
use crate::proxy::compare::DEFAULT_VNET_HDR_LEN;
use crate::proxy::packet::{
    Addr, ConnKey, KeyDir, KeyProto, ETH_HDR_LEN, MAX_DATAGRAM, MAX_VLAN_TAGS,
};

/// The `auth` purpose of the proxy channel's connection.
pub const PURPOSE: &str = "proxy";
/// The `auth` purpose of the disk channel's connection.
pub const DISK_PURPOSE: &str = "disk";
/// Most bytes of disk data in one frame: larger writes go as several.
pub const MAX_DISK_CHUNK: usize = 1 << 20;
/// Most bytes of a disk's region hash list in one frame.
pub const MAX_HASH_CHUNK: usize = 1 << 20;
/// Version of the channel's format (in each side's hello).
pub const VERSION: u16 = 1;
/// Bytes of a frame's header.
pub const HEADER_LEN: usize = 16;
/// Bytes of the virtio-net header in front of each packet.
pub const VNET_HDR_LEN: usize = DEFAULT_VNET_HDR_LEN;
/// Shortest packet: a vnet header and an Ethernet header.
pub const MIN_PACKET_LEN: usize = VNET_HDR_LEN + ETH_HDR_LEN;
/// Longest packet: a vnet header, an Ethernet header with two VLAN tags, an IPv6 header and
/// the largest payload length it can state (a GSO packet).
pub const MAX_PACKET_LEN: usize =
    VNET_HDR_LEN + ETH_HDR_LEN + 4 * MAX_VLAN_TAGS + IPV6_HDR_LEN + MAX_DATAGRAM;
/// Longest reason of a bye, in bytes.
pub const MAX_BYE_REASON: usize = 256;
/// Longest hello body the header may announce: room for a later version's hello, so that one
/// is refused for its version rather than its length.
pub const MAX_HELLO_LEN: usize = 64;

const IPV6_HDR_LEN: usize = 40;
const HELLO_LEN: usize = 4;
const EPOCH_LEN: usize = 8;
/// Disk number and offset (or size) in front of a disk message's payload.
const DISK_HEAD_LEN: usize = 10;
const KEY_FIXED_LEN: usize = 8;
/// An IPv6 key: two 16-byte addresses and two ports after the fixed part.
const MAX_KEY_LEN: usize = KEY_FIXED_LEN + 2 * (16 + 2);
/// Direction and offset after the key.
const ISN_TAIL_LEN: usize = 13;

const ROLE_PRIMARY: u8 = 1;
const ROLE_SECONDARY: u8 = 2;

const PROTO_TCP: u8 = 1;
const PROTO_UDP: u8 = 2;
const PROTO_ICMP: u8 = 3;
const PROTO_ICMPV6: u8 = 4;
const PROTO_IP: u8 = 5;
const PROTO_ETHER: u8 = 6;

const FAMILY_MAC: u8 = 1;
const FAMILY_IPV4: u8 = 4;
const FAMILY_IPV6: u8 = 6;

mod body;
#[cfg(test)]
mod tests;

use body::{decode_body, encode_body};

/// The two channels this format carries, each over its own connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Channel {
    /// The network proxy's: packets, ISN offsets, epochs.
    Proxy,
    /// Block replication's: disk sync, the primary's writes, write barriers, acks.
    Disk,
}

impl Channel {
    /// The `auth` purpose of its connection.
    pub fn purpose(self) -> &'static str {
        match self {
            Channel::Proxy => PURPOSE,
            Channel::Disk => DISK_PURPOSE,
        }
    }
}

/// The kinds of frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MsgType {
    /// Each side's first frame.
    Hello,
    /// A side's last frame.
    Bye,
    /// A client's packet for the SVM (primary → secondary).
    Mirror,
    /// The SVM's packet for the compare (secondary → primary).
    SvmOutput,
    /// A learned TCP sequence offset (primary → secondary).
    IsnOffset,
    /// The SVM loaded a checkpoint (secondary → primary); the PVM paused for one (primary →
    /// secondary; on the disk channel, the write barrier).
    Epoch,
    /// A disk's size (primary → secondary, disk channel).
    DiskInfo,
    /// Part of the secondary's region hash list of a disk (secondary → primary).
    DiskHashes,
    /// Bytes the PVM wrote to a disk (primary → secondary).
    DiskWrite,
    /// A range of a disk the PVM zeroed or discarded (primary → secondary).
    DiskZeroes,
    /// How many disk writes the secondary holds (secondary → primary).
    DiskAck,
}

impl MsgType {
    /// All types, in wire order.
    pub const ALL: [MsgType; 11] = [
        MsgType::Hello,
        MsgType::Bye,
        MsgType::Mirror,
        MsgType::SvmOutput,
        MsgType::IsnOffset,
        MsgType::Epoch,
        MsgType::DiskInfo,
        MsgType::DiskHashes,
        MsgType::DiskWrite,
        MsgType::DiskZeroes,
        MsgType::DiskAck,
    ];

    /// The type's number on the wire.
    pub fn code(self) -> u16 {
        match self {
            MsgType::Hello => 1,
            MsgType::Bye => 2,
            MsgType::Mirror => 3,
            MsgType::SvmOutput => 4,
            MsgType::IsnOffset => 5,
            MsgType::Epoch => 6,
            MsgType::DiskInfo => 7,
            MsgType::DiskHashes => 8,
            MsgType::DiskWrite => 9,
            MsgType::DiskZeroes => 10,
            MsgType::DiskAck => 11,
        }
    }

    /// The type with this wire number.
    pub fn from_code(code: u16) -> Option<Self> {
        MsgType::ALL.into_iter().find(|t| t.code() == code)
    }

    /// Lower-case name, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            MsgType::Hello => "hello",
            MsgType::Bye => "bye",
            MsgType::Mirror => "mirror",
            MsgType::SvmOutput => "svm-output",
            MsgType::IsnOffset => "isn-offset",
            MsgType::Epoch => "epoch",
            MsgType::DiskInfo => "disk-info",
            MsgType::DiskHashes => "disk-hashes",
            MsgType::DiskWrite => "disk-write",
            MsgType::DiskZeroes => "disk-zeroes",
            MsgType::DiskAck => "disk-ack",
        }
    }

    /// Largest body a frame of this type may announce.
    pub fn max_body(self) -> usize {
        match self {
            MsgType::Hello => MAX_HELLO_LEN,
            MsgType::Bye => MAX_BYE_REASON,
            MsgType::Mirror | MsgType::SvmOutput => MAX_PACKET_LEN,
            MsgType::IsnOffset => MAX_KEY_LEN + ISN_TAIL_LEN,
            MsgType::Epoch | MsgType::DiskAck => EPOCH_LEN,
            MsgType::DiskInfo => DISK_HEAD_LEN,
            MsgType::DiskHashes => DISK_HEAD_LEN + MAX_HASH_CHUNK,
            MsgType::DiskWrite => DISK_HEAD_LEN + MAX_DISK_CHUNK,
            MsgType::DiskZeroes => DISK_HEAD_LEN + 8,
        }
    }

    /// The only role that sends this type, or `None` when both do.
    pub fn sender(self) -> Option<Side> {
        match self {
            MsgType::Hello | MsgType::Bye | MsgType::Epoch => None,
            MsgType::Mirror
            | MsgType::IsnOffset
            | MsgType::DiskInfo
            | MsgType::DiskWrite
            | MsgType::DiskZeroes => Some(Side::Primary),
            MsgType::SvmOutput | MsgType::DiskHashes | MsgType::DiskAck => Some(Side::Secondary),
        }
    }

    /// The only channel that carries this type, or `None` when both do.
    pub fn channel(self) -> Option<Channel> {
        match self {
            MsgType::Hello | MsgType::Bye | MsgType::Epoch => None,
            MsgType::Mirror | MsgType::SvmOutput | MsgType::IsnOffset => Some(Channel::Proxy),
            MsgType::DiskInfo
            | MsgType::DiskHashes
            | MsgType::DiskWrite
            | MsgType::DiskZeroes
            | MsgType::DiskAck => Some(Channel::Disk),
        }
    }
}

impl fmt::Display for MsgType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One message of the channel; packets and reasons borrow the reader's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// The first frame each way: the sender's format version and role.
    Hello {
        /// [`VERSION`].
        version: u16,
        /// The sender's role.
        role: Side,
    },
    /// The sender's last frame: it ends the session on purpose.
    Bye {
        /// Why, for the log.
        reason: &'a str,
    },
    /// Primary → secondary: a packet a client sent to the PVM, for the SVM's rx.
    Mirror {
        /// Vnet header + Ethernet frame.
        frame: &'a [u8],
    },
    /// Secondary → primary: a packet the SVM sent, for the compare.
    SvmOutput {
        /// Vnet header + Ethernet frame.
        frame: &'a [u8],
    },
    /// Primary → secondary: a TCP connection's sequence offset (SVM ISN − PVM ISN).
    IsnOffset {
        /// The connection (TCP).
        key: ConnKey,
        /// The direction the guest's segments travel in.
        guest_dir: KeyDir,
        /// The offset, as [`crate::proxy::rewriter::SeqRewriter::learn`] takes it.
        offset: u32,
        /// The checkpoint epoch it was learned in (an offset of an epoch the SVM already left
        /// is stale).
        checkpoint: u64,
    },
    /// Secondary → primary: the SVM loaded this checkpoint, what it sends next is its
    /// epoch's. Primary → secondary: the PVM paused for this checkpoint, the mirrored frames
    /// that follow reached the PVM after it (the SVM gets them once it loaded it).
    Epoch {
        /// The checkpoint's number (≥ 1, increasing).
        checkpoint: u64,
    },
    /// Primary → secondary: disk `disk` of the PVM has `size` bytes; the secondary answers
    /// with its base's hash list.
    DiskInfo {
        /// The disk's index in the VM's configuration.
        disk: u16,
        /// Its size in bytes.
        size: u64,
    },
    /// Secondary → primary: `chunk` of the encoded region hash list
    /// ([`crate::block::sync::RegionHashes::encode`]) of a disk, whose whole length is `total`.
    DiskHashes {
        /// The disk.
        disk: u16,
        /// The encoded list's length.
        total: u64,
        /// The next bytes of it.
        chunk: &'a [u8],
    },
    /// Primary → secondary: the PVM (or the initial sync) wrote `data` at `offset`.
    DiskWrite {
        /// The disk.
        disk: u16,
        /// Byte offset.
        offset: u64,
        /// The bytes (not empty).
        data: &'a [u8],
    },
    /// Primary → secondary: `len` bytes at `offset` now read as zeroes.
    DiskZeroes {
        /// The disk.
        disk: u16,
        /// Byte offset.
        offset: u64,
        /// Length (not 0).
        len: u64,
    },
    /// Secondary → primary: the first `writes` disk writes and zeroings of the channel are
    /// held (applied, or queued for their checkpoint).
    DiskAck {
        /// Writes held, counted from the channel's start; increasing.
        writes: u64,
    },
}

impl Message<'_> {
    /// This build's hello for `role`.
    pub fn hello(role: Side) -> Message<'static> {
        Message::Hello {
            version: VERSION,
            role,
        }
    }

    /// The message's type.
    pub fn ty(&self) -> MsgType {
        match self {
            Message::Hello { .. } => MsgType::Hello,
            Message::Bye { .. } => MsgType::Bye,
            Message::Mirror { .. } => MsgType::Mirror,
            Message::SvmOutput { .. } => MsgType::SvmOutput,
            Message::IsnOffset { .. } => MsgType::IsnOffset,
            Message::Epoch { .. } => MsgType::Epoch,
            Message::DiskInfo { .. } => MsgType::DiskInfo,
            Message::DiskHashes { .. } => MsgType::DiskHashes,
            Message::DiskWrite { .. } => MsgType::DiskWrite,
            Message::DiskZeroes { .. } => MsgType::DiskZeroes,
            Message::DiskAck { .. } => MsgType::DiskAck,
        }
    }
}

/// Why a frame could not be sent or was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed (a timeout has kind `WouldBlock` or `TimedOut`: see
    /// [`WireError::is_timeout`]; the peer closing inside a frame, `UnexpectedEof`).
    #[error("COLO data channel I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection between two frames.
    #[error("the peer closed the COLO data channel")]
    Closed,
    /// The connection's handshake failed.
    #[error("COLO data channel: {0}")]
    Auth(#[from] AuthError),
    /// A body longer than its type allows.
    #[error("COLO {ty} frame of {len} bytes, at most {max} allowed")]
    TooLarge {
        /// The frame's type.
        ty: MsgType,
        /// Its body's length.
        len: usize,
        /// The type's limit.
        max: usize,
    },
    /// A type this build does not know.
    #[error("unknown COLO data channel frame type {0}")]
    UnknownType(u16),
    /// Flags this build does not know.
    #[error("COLO data channel frame has unknown flags {0:#x}")]
    Flags(u16),
    /// The MAC does not verify: forged or altered, or another connection's key.
    #[error("COLO data channel frame {seq}: MAC does not verify (forged or altered frame, or another connection's key)")]
    BadMac {
        /// The sequence number in the frame's header.
        seq: u64,
    },
    /// An authentic frame out of its place: replayed, reordered, or one before it was lost.
    #[error(
        "COLO data channel frame {got} where {expected} was expected (replayed, reordered or lost frames)"
    )]
    Sequence {
        /// The number expected next.
        expected: u64,
        /// The frame's number.
        got: u64,
    },
    /// The peer speaks another version of the channel.
    #[error("the peer speaks COLO data channel version {0}, this colovmm speaks {VERSION}")]
    Version(u16),
    /// A message the sender's role never sends.
    #[error("a COLO {0} frame from the wrong side")]
    WrongDirection(MsgType),
    /// A message of the other channel.
    #[error("a COLO {0} frame on the {1:?} channel")]
    WrongChannel(MsgType, Channel),
    /// A body or an order of messages that breaks the format.
    #[error("malformed COLO data channel frame: {0}")]
    Malformed(&'static str),
    /// An earlier error ended the channel.
    #[error("the COLO data channel already failed; it must be closed")]
    Failed,
}

impl WireError {
    /// Whether this is a stream timeout, after which the call may be repeated.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e)
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

fn role_code(side: Side) -> u8 {
    match side {
        Side::Primary => ROLE_PRIMARY,
        Side::Secondary => ROLE_SECONDARY,
    }
}

fn peer_of(side: Side) -> Side {
    match side {
        Side::Primary => Side::Secondary,
        Side::Secondary => Side::Primary,
    }
}

/// What a direction of the channel has carried so far, for the rules on message order.
#[derive(Clone, Copy, Debug, Default)]
struct Order {
    bye: bool,
    last_epoch: u64,
    last_ack: u64,
}

/// Checks that `sender` may send `msg` as its frame number `seq`; updates `order`.
fn admit(
    order: &mut Order,
    channel: Channel,
    sender: Side,
    seq: u64,
    msg: &Message<'_>,
) -> Result<(), WireError> {
    let ty = msg.ty();
    if ty.channel().is_some_and(|c| c != channel) {
        return Err(WireError::WrongChannel(ty, channel));
    }
    if ty.sender().is_some_and(|s| s != sender)
        || (ty == MsgType::Epoch && channel == Channel::Disk && sender != Side::Primary)
    {
        return Err(WireError::WrongDirection(ty));
    }
    if order.bye {
        return Err(WireError::Malformed("a frame after bye"));
    }
    match *msg {
        Message::Hello { role, .. } => {
            if seq != 0 {
                return Err(WireError::Malformed("a second hello"));
            }
            if role != sender {
                return Err(WireError::Malformed("the hello names the wrong role"));
            }
        }
        _ if seq == 0 => return Err(WireError::Malformed("the first frame is not a hello")),
        Message::Bye { .. } => order.bye = true,
        Message::Epoch { checkpoint } => {
            // Starts at 0, so this also refuses checkpoint 0.
            if checkpoint <= order.last_epoch {
                return Err(WireError::Malformed("epoch does not advance"));
            }
            order.last_epoch = checkpoint;
        }
        Message::DiskAck { writes } => {
            if writes <= order.last_ack {
                return Err(WireError::Malformed("disk ack does not advance"));
            }
            order.last_ack = writes;
        }
        _ => {}
    }
    Ok(())
}

/// Completes a frame in `out` (16 header bytes, then the body): fills the header and appends
/// the MAC.
fn seal_frame(out: &mut Vec<u8>, key: &SessionKey, seq: u64, code: u16, flags: u16) {
    // Callers bound the body by a type's limit, far below 4 GiB.
    let len = u32::try_from(out.len() - HEADER_LEN).unwrap_or(u32::MAX);
    out[0..4].copy_from_slice(&len.to_le_bytes());
    out[4..6].copy_from_slice(&code.to_le_bytes());
    out[6..8].copy_from_slice(&flags.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    let (header, body) = out.split_at(HEADER_LEN);
    let tag = key.seal_parts(seq, &[header, body]);
    out.extend_from_slice(&tag);
}

/// Sends messages as frames: numbers them, seals them, and refuses what the peer would refuse.
pub struct FrameWriter<W> {
    inner: W,
    key: Arc<SessionKey>,
    side: Side,
    channel: Channel,
    seq: u64,
    order: Order,
    out: Vec<u8>,
    failed: bool,
}

impl<W: Write> FrameWriter<W> {
    /// A writer for `side`'s end of a proxy connection authenticated with `key`.
    pub fn new(inner: W, key: Arc<SessionKey>, side: Side) -> Self {
        FrameWriter {
            inner,
            key,
            side,
            channel: Channel::Proxy,
            seq: 0,
            order: Order::default(),
            out: Vec::new(),
            failed: false,
        }
    }

    /// Sends one message as the next frame and flushes it (the compare waits for it). A
    /// message the peer would refuse is not sent and the writer stays usable; after an I/O
    /// error it is not ([`WireError::Failed`]), since part of a frame may have gone out.
    pub fn write(&mut self, msg: &Message<'_>) -> Result<(), WireError> {
        self.queue(msg)?;
        self.flush()
    }

    /// Flushes what [`Self::queue`] left in a buffering stream.
    pub fn flush(&mut self) -> Result<(), WireError> {
        if self.failed {
            return Err(WireError::Failed);
        }
        self.inner.flush().map_err(|e| self.io_failed(e))
    }

    fn io_failed(&mut self, e: io::Error) -> WireError {
        self.failed = true;
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => WireError::Closed,
            _ => WireError::Io(e),
        }
    }

    /// Writes one message as the next frame without flushing the stream: over a buffering
    /// stream several frames then leave in one write ([`Self::flush`] when none follows).
    pub fn queue(&mut self, msg: &Message<'_>) -> Result<(), WireError> {
        if self.failed {
            return Err(WireError::Failed);
        }
        let ty = msg.ty();
        self.out.clear();
        self.out.resize(HEADER_LEN, 0);
        encode_body(msg, &mut self.out)?;
        let len = self.out.len() - HEADER_LEN;
        if len > ty.max_body() {
            return Err(WireError::TooLarge {
                ty,
                len,
                max: ty.max_body(),
            });
        }
        // The reader's own checks, so this side never sends what the peer would refuse.
        let mut order = self.order;
        let decoded = decode_body(ty, &self.out[HEADER_LEN..])?;
        admit(&mut order, self.channel, self.side, self.seq, &decoded)?;
        let next = self
            .seq
            .checked_add(1)
            .ok_or(WireError::Malformed("frame numbers exhausted"))?;
        seal_frame(&mut self.out, &self.key, self.seq, ty.code(), 0);
        if let Err(e) = self.inner.write_all(&self.out) {
            return Err(self.io_failed(e));
        }
        self.seq = next;
        self.order = order;
        Ok(())
    }

    /// The same writer on `channel`'s connection.
    pub fn on(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    /// Frames sent so far (the next one's number).
    pub fn frames(&self) -> u64 {
        self.seq
    }

    /// The stream (to shut it down, say).
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The stream back.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W> fmt::Debug for FrameWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameWriter")
            .field("side", &self.side)
            .field("seq", &self.seq)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Receives frames: checks each before allocating for it, verifies it, and decodes it.
pub struct FrameReader<R> {
    inner: R,
    key: Arc<SessionKey>,
    side: Side,
    channel: Channel,
    seq: u64,
    order: Order,
    /// The frame being read: header, body, MAC. It keeps its size for the next frames.
    buf: Vec<u8>,
    /// Bytes of the frame read so far.
    filled: usize,
    /// Bytes of the frame to read: the header, then the whole frame once the header passed.
    need: usize,
    /// The frame's type, once its header passed.
    pending: Option<MsgType>,
    failed: bool,
}

impl<R: Read> FrameReader<R> {
    /// A reader for `side`'s end of a connection authenticated with `key` (it reads the
    /// other side's frames).
    pub fn new(inner: R, key: Arc<SessionKey>, side: Side) -> Self {
        FrameReader {
            inner,
            key,
            side,
            channel: Channel::Proxy,
            seq: 0,
            order: Order::default(),
            buf: vec![0; HEADER_LEN],
            filled: 0,
            need: HEADER_LEN,
            pending: None,
            failed: false,
        }
    }

    /// Reads the next message. A timeout of the stream ([`WireError::is_timeout`]) keeps the
    /// part of the frame read so far, and the next call goes on with it; after any other error
    /// the reader only answers [`WireError::Failed`].
    pub fn read(&mut self) -> Result<Message<'_>, WireError> {
        if self.failed {
            return Err(WireError::Failed);
        }
        let ty = match self.fill() {
            Ok(ty) => ty,
            Err(e) => {
                self.failed = !e.is_timeout();
                return Err(e);
            }
        };
        // The frame is whole: whatever happens next, the following one starts afresh, and
        // any error below ends the channel.
        self.failed = true;
        let need = self.need;
        self.filled = 0;
        self.need = HEADER_LEN;
        self.pending = None;
        let (header, rest) = self.buf[..need].split_at(HEADER_LEN);
        let (body, tag) = rest.split_at(need - HEADER_LEN - TAG_LEN);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[8..16]);
        let seq = u64::from_le_bytes(seq);
        // Verified under the number the frame claims, so that a Sequence error names an
        // authentic frame out of place; it is accepted only if that number is the expected one.
        self.key
            .open_parts(seq, &[header, body], tag)
            .map_err(|_| WireError::BadMac { seq })?;
        if seq != self.seq {
            return Err(WireError::Sequence {
                expected: self.seq,
                got: seq,
            });
        }
        let msg = decode_body(ty, body)?;
        admit(&mut self.order, self.channel, peer_of(self.side), seq, &msg)?;
        // The writer refuses to number a frame u64::MAX + 1, so this cannot wrap.
        self.seq = seq.saturating_add(1);
        self.failed = false;
        Ok(msg)
    }

    /// Reads until the frame is whole; checks the header as soon as it is in.
    fn fill(&mut self) -> Result<MsgType, WireError> {
        loop {
            while self.filled < self.need {
                match self.inner.read(&mut self.buf[self.filled..self.need]) {
                    Ok(0) if self.filled == 0 => return Err(WireError::Closed),
                    Ok(0) => {
                        return Err(WireError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the peer closed the COLO data channel inside a frame",
                        )))
                    }
                    // `min`: a reader that claims more than it was given cannot push the
                    // position past the frame.
                    Ok(n) => self.filled += n.min(self.need - self.filled),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(WireError::Io(e)),
                }
            }
            if let Some(ty) = self.pending {
                return Ok(ty);
            }
            let ty = self.check_header()?;
            self.pending = Some(ty);
        }
    }

    /// Checks the header in `buf` and sizes the buffer for the frame: the length is checked
    /// against the type's limit before anything is allocated for it.
    fn check_header(&mut self) -> Result<MsgType, WireError> {
        let h = &self.buf[..HEADER_LEN];
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let code = u16::from_le_bytes([h[4], h[5]]);
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let ty = MsgType::from_code(code).ok_or(WireError::UnknownType(code))?;
        if flags != 0 {
            return Err(WireError::Flags(flags));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > ty.max_body() {
            return Err(WireError::TooLarge {
                ty,
                len,
                max: ty.max_body(),
            });
        }
        self.need = HEADER_LEN + len + TAG_LEN;
        if self.buf.len() < self.need {
            self.buf.resize(self.need, 0);
        }
        Ok(ty)
    }

    /// The same reader on `channel`'s connection.
    pub fn on(mut self, channel: Channel) -> Self {
        self.channel = channel;
        self
    }

    /// Frames accepted so far (the next one's number).
    pub fn frames(&self) -> u64 {
        self.seq
    }

    /// The stream (to shut it down, say).
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The stream back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R> fmt::Debug for FrameReader<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameReader")
            .field("side", &self.side)
            .field("seq", &self.seq)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

/// Authenticates a fresh proxy connection as `side` (purpose [`PURPOSE`]), before anything
/// else is sent on it; both ends call it at once.
pub fn handshake<S: Read + Write + ?Sized>(
    stream: &mut S,
    psk: &Psk,
    side: Side,
) -> Result<Arc<SessionKey>, WireError> {
    handshake_on(stream, psk, side, Channel::Proxy)
}

/// Authenticates a fresh connection of `channel` as `side` (its purpose).
pub fn handshake_on<S: Read + Write + ?Sized>(
    stream: &mut S,
    psk: &Psk,
    side: Side,
    channel: Channel,
) -> Result<Arc<SessionKey>, WireError> {
    Ok(Arc::new(auth::authenticate(
        stream,
        psk,
        side,
        channel.purpose(),
    )?))
}

/// A reader and a writer of one authenticated connection (for a socket: it and its
/// `try_clone`), after sending this side's hello and checking the peer's.
pub fn open<R: Read, W: Write>(
    reader: R,
    writer: W,
    key: Arc<SessionKey>,
    side: Side,
) -> Result<(FrameReader<R>, FrameWriter<W>), WireError> {
    open_on(reader, writer, key, side, Channel::Proxy)
}

/// [`open`] for a connection of `channel`.
pub fn open_on<R: Read, W: Write>(
    reader: R,
    writer: W,
    key: Arc<SessionKey>,
    side: Side,
    channel: Channel,
) -> Result<(FrameReader<R>, FrameWriter<W>), WireError> {
    // The hello is small enough for the socket buffer: sending before reading cannot block
    // on the peer doing the same.
    let mut writer = FrameWriter::new(writer, Arc::clone(&key), side).on(channel);
    writer.write(&Message::hello(side))?;
    let mut reader = FrameReader::new(reader, key, side).on(channel);
    // Frame 0 can only be a hello of the right version and role (`admit`).
    reader.read()?;
    Ok((reader, writer))
}

/// One end of a channel: its reader and its writer.
pub type Ends<S> = (FrameReader<S>, FrameWriter<S>);

/// Both ends of a proxy channel over `UnixStream::pair()`, authenticated with `psk` and past
/// the hellos, every read and write bounded by `timeout`: the primary's end first. For tests
/// of what runs on top of the channel.
pub fn stream_pair(
    psk: &Psk,
    timeout: Duration,
) -> Result<(Ends<UnixStream>, Ends<UnixStream>), WireError> {
    let (p, s) = UnixStream::pair()?;
    for end in [&p, &s] {
        end.set_read_timeout(Some(timeout))?;
        end.set_write_timeout(Some(timeout))?;
    }
    fn connect(
        mut stream: UnixStream,
        psk: &Psk,
        side: Side,
    ) -> Result<Ends<UnixStream>, WireError> {
        let key = handshake(&mut stream, psk, side)?;
        let reader = stream.try_clone()?;
        open(reader, stream, key, side)
    }
    // Both handshakes wait for the other's messages, so they run at once; a side that fails
    // drops its stream, which ends the other's wait.
    thread::scope(|scope| {
        let secondary = scope.spawn(|| connect(s, psk, Side::Secondary));
        let primary = connect(p, psk, Side::Primary);
        let secondary = secondary
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        Ok((primary?, secondary?))
    })
}
