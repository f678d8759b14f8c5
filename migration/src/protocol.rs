//! The migration stream's wire format: a stream header, then length-prefixed, checksummed
//! messages. [`StreamWriter`] encodes, [`StreamReader`] decodes and validates every header,
//! length and range before it allocates or hands anything on. `docs/migration.md` describes
//! the format byte by byte.

use std::borrow::Cow;
use std::io::{self, IoSlice, Read, Write};

use super::ranges::{check_ranges, MemRange, MemoryLayout, RangeError};

/// First 8 bytes of every stream.
pub const MAGIC: [u8; 8] = *b"CLVM-MIG";
/// The protocol version this code writes and the only one it reads.
pub const VERSION: u16 = 1;
/// Bytes in the stream header.
pub const STREAM_HEADER_LEN: usize = 32;
/// Bytes in a message's header: type, flags, payload length.
pub const FRAME_HEADER_LEN: usize = 12;
/// Bytes in a message's trailing checksum.
pub const CHECKSUM_LEN: usize = 4;
/// Most channels one transfer may use.
pub const MAX_CHANNELS: u16 = 64;
/// Bytes of one encoded range: gpa and length, both u64.
const RANGE_LEN: usize = 16;
/// Payload bytes read per step: a short stream costs at most this much memory, whatever its
/// header claims.
const READ_STEP: usize = 64 * 1024;

/// Errors reading or writing the stream.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The transport failed.
    #[error("migration stream I/O: {0}")]
    Io(#[source] io::Error),
    /// A read or write made no progress within the transport's timeout.
    #[error("migration stream timed out")]
    Timeout,
    /// No message began within the transport's timeout; the stream is still usable.
    #[error("no migration message within the I/O timeout")]
    Idle,
    /// The peer closed the stream between two messages.
    #[error("migration stream closed by the peer")]
    Closed,
    /// The stream ended in the middle of something.
    #[error("migration stream truncated inside {what}: {got} of {expected} bytes")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        expected: u64,
        /// Bytes there were.
        got: u64,
    },
    /// Not a colovmm migration stream.
    #[error("not a colovmm migration stream (magic {found:02x?})")]
    BadMagic {
        /// The first 8 bytes.
        found: [u8; 8],
    },
    /// A version this code does not speak.
    #[error("migration stream version {found} is not supported (this build speaks {VERSION})")]
    UnsupportedVersion {
        /// Version in the stream.
        found: u16,
    },
    /// The stream header's checksum does not match.
    #[error("migration stream header is corrupt (checksum mismatch)")]
    HeaderChecksum,
    /// Stream header flags this version does not define.
    #[error("migration stream header has unknown flags {0:#06x}")]
    UnknownStreamFlags(u16),
    /// Reserved stream header bytes are not zero.
    #[error("migration stream header has non-zero reserved bytes")]
    ReservedNonZero,
    /// Channel index or count out of range.
    #[error(
        "migration stream header names channel {channel} of {channels} (at most {MAX_CHANNELS})"
    )]
    BadChannel {
        /// Index.
        channel: u16,
        /// Count.
        channels: u16,
    },
    /// A message type this version does not define.
    #[error("unknown migration message type {0}")]
    UnknownType(u16),
    /// Message flags this version does not define.
    #[error("{ty:?} message has unknown flags {flags:#06x}")]
    UnknownMessageFlags {
        /// Message type.
        ty: MessageType,
        /// Flags.
        flags: u16,
    },
    /// A payload longer than the limit for its type.
    #[error("{ty:?} message of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Message type.
        ty: MessageType,
        /// Claimed length.
        len: u64,
        /// Limit.
        max: u64,
    },
    /// A payload whose length does not fit its contents.
    #[error("{ty:?} message of {len} bytes is malformed: {why}")]
    BadLength {
        /// Message type.
        ty: MessageType,
        /// Payload length.
        len: u64,
        /// What does not fit.
        why: &'static str,
    },
    /// The message's checksum does not match.
    #[error("{ty:?} message is corrupt: checksum {found:#010x}, computed {computed:#010x}")]
    Checksum {
        /// Message type.
        ty: MessageType,
        /// Checksum in the stream.
        found: u32,
        /// Checksum of what arrived.
        computed: u32,
    },
    /// A bad range in a message.
    #[error("{ty:?} message: {source}")]
    Range {
        /// Message type.
        ty: MessageType,
        /// What is wrong.
        source: RangeError,
    },
    /// Page messages before the memory layout is known (no Start yet).
    #[error("{0:?} message before the memory layout is known")]
    NoLayout(MessageType),
    /// A text field is not UTF-8.
    #[error("{0:?} message has a text field that is not UTF-8")]
    Utf8(MessageType),
    /// A Start message that makes no sense.
    #[error("invalid Start message: {0}")]
    BadStart(&'static str),
}

/// Maps an I/O error, naming timeouts (SO_RCVTIMEO/SO_SNDTIMEO expiry shows as WouldBlock).
fn io_err(e: io::Error) -> ProtocolError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::Timeout,
        _ => ProtocolError::Io(e),
    }
}

/// The header every stream (every channel) starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Protocol version.
    pub version: u16,
    /// Stream flags; none are defined in version 1.
    pub flags: u16,
    /// This stream's channel index; 0 carries the control messages.
    pub channel: u16,
    /// Channels in this transfer.
    pub channels: u16,
    /// Identifies one transfer, so a stray connection cannot join it.
    pub session: u64,
}

impl StreamHeader {
    /// The header of channel `channel` of `channels` in transfer `session`, this version.
    pub fn new(channel: u16, channels: u16, session: u64) -> Self {
        StreamHeader {
            version: VERSION,
            flags: 0,
            channel,
            channels,
            session,
        }
    }

    /// The header's wire form.
    pub fn encode(&self) -> [u8; STREAM_HEADER_LEN] {
        let mut b = [0u8; STREAM_HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..14].copy_from_slice(&self.channel.to_le_bytes());
        b[14..16].copy_from_slice(&self.channels.to_le_bytes());
        b[16..24].copy_from_slice(&self.session.to_le_bytes());
        // 24..28 reserved, zero.
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header's wire form.
    pub fn decode(b: &[u8; STREAM_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&b[0..8]);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        // Version before checksum: magic and version keep their offsets in every version, so
        // a newer peer gets "unsupported version" rather than "corrupt".
        let version = le_u16(&b[8..10]);
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion { found: version });
        }
        if crc32fast::hash(&b[..28]) != le_u32(&b[28..32]) {
            return Err(ProtocolError::HeaderChecksum);
        }
        let flags = le_u16(&b[10..12]);
        if flags != 0 {
            return Err(ProtocolError::UnknownStreamFlags(flags));
        }
        if b[24..28] != [0; 4] {
            return Err(ProtocolError::ReservedNonZero);
        }
        let channel = le_u16(&b[12..14]);
        let channels = le_u16(&b[14..16]);
        if channels == 0 || channels > MAX_CHANNELS || channel >= channels {
            return Err(ProtocolError::BadChannel { channel, channels });
        }
        Ok(StreamHeader {
            version,
            flags,
            channel,
            channels,
            session: le_u64(&b[16..24]),
        })
    }
}

/// Message types and their wire numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    /// Source → destination: what is coming.
    Start = 1,
    /// Source → destination: page contents.
    MemoryPages = 2,
    /// Source → destination: pages that are all zeroes.
    MemoryZero = 3,
    /// Source → destination: end of a round on this channel.
    Barrier = 4,
    /// Source → destination: VM/device state.
    State = 5,
    /// Source → destination: everything is sent.
    Complete = 6,
    /// Source → destination: the source gives up.
    Abandon = 7,
    /// Destination → source: Complete was handled.
    Ack = 8,
    /// Destination → source: the destination failed.
    Error = 9,
}

impl MessageType {
    /// The type with wire number `v`.
    pub fn from_wire(v: u16) -> Option<Self> {
        Some(match v {
            1 => MessageType::Start,
            2 => MessageType::MemoryPages,
            3 => MessageType::MemoryZero,
            4 => MessageType::Barrier,
            5 => MessageType::State,
            6 => MessageType::Complete,
            7 => MessageType::Abandon,
            8 => MessageType::Ack,
            9 => MessageType::Error,
            _ => return None,
        })
    }
}

/// Largest payloads the reader accepts (and the writer sends), per kind of message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// MemoryPages and MemoryZero.
    pub max_pages_payload: u64,
    /// State.
    pub max_state_payload: u64,
    /// Start, Abandon and Error.
    pub max_control_payload: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pages_payload: 64 << 20,
            max_state_payload: 16 << 20,
            max_control_payload: 1 << 20,
        }
    }
}

impl Limits {
    /// Checks a payload length against the limit and the fixed size of its type.
    fn check(&self, ty: MessageType, len: u64) -> Result<(), ProtocolError> {
        let max = match ty {
            MessageType::MemoryPages | MessageType::MemoryZero => self.max_pages_payload,
            MessageType::State => self.max_state_payload,
            MessageType::Start | MessageType::Abandon | MessageType::Error => {
                self.max_control_payload
            }
            MessageType::Barrier => return exact(ty, len, 8),
            MessageType::Complete | MessageType::Ack => return exact(ty, len, 0),
        };
        if len > max {
            return Err(ProtocolError::TooLarge { ty, len, max });
        }
        Ok(())
    }
}

/// Refuses a fixed-size message of the wrong length.
fn exact(ty: MessageType, len: u64, want: u64) -> Result<(), ProtocolError> {
    if len != want {
        return Err(ProtocolError::BadLength {
            ty,
            len,
            why: "wrong size for this type",
        });
    }
    Ok(())
}

/// What a Start message announces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartInfo {
    /// Guest RAM regions; the wire also carries their total as `memory_size`.
    pub layout: MemoryLayout,
    /// vCPU count.
    pub vcpus: u32,
    /// The VM configuration, JSON (opaque here).
    pub config_json: String,
}

impl StartInfo {
    /// Total guest RAM in bytes.
    pub fn memory_size(&self) -> u64 {
        self.layout.total_size()
    }
}

/// One message. Bulk fields borrow, so neither side copies page data to encode or decode it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// What is coming: memory layout, vCPUs, configuration.
    Start(StartInfo),
    /// Contents of `ranges` (sorted, disjoint, page-aligned), back to back in `data`.
    MemoryPages {
        /// Where the data goes.
        ranges: Cow<'a, [MemRange]>,
        /// Exactly the ranges' total length.
        data: &'a [u8],
    },
    /// `ranges` are all zeroes.
    MemoryZero {
        /// Zero pages.
        ranges: Cow<'a, [MemRange]>,
    },
    /// Every page message of round `round` on this channel came before this.
    Barrier {
        /// Round number, increasing.
        round: u64,
    },
    /// Serialized VM/device state, opaque here.
    State {
        /// The state.
        blob: &'a [u8],
    },
    /// Everything for this migration or checkpoint is sent; the destination answers Ack.
    Complete,
    /// The source gives up; the destination discards what it received.
    Abandon {
        /// Why.
        reason: &'a str,
    },
    /// The destination handled Complete.
    Ack,
    /// The destination failed.
    Error {
        /// Why.
        message: &'a str,
    },
}

impl Message<'_> {
    /// This message's type.
    pub fn kind(&self) -> MessageType {
        match self {
            Message::Start(_) => MessageType::Start,
            Message::MemoryPages { .. } => MessageType::MemoryPages,
            Message::MemoryZero { .. } => MessageType::MemoryZero,
            Message::Barrier { .. } => MessageType::Barrier,
            Message::State { .. } => MessageType::State,
            Message::Complete => MessageType::Complete,
            Message::Abandon { .. } => MessageType::Abandon,
            Message::Ack => MessageType::Ack,
            Message::Error { .. } => MessageType::Error,
        }
    }
}

/// Appends `ranges` in wire form.
fn put_ranges(out: &mut Vec<u8>, ranges: &[MemRange]) {
    for r in ranges {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.len.to_le_bytes());
    }
}

/// Range count as the wire's u32.
fn range_count(ty: MessageType, n: usize) -> Result<u32, ProtocolError> {
    u32::try_from(n).map_err(|_| ProtocolError::BadLength {
        ty,
        len: n as u64,
        why: "more than 2^32 ranges",
    })
}

/// Appends the fixed part of `msg`'s payload to `out` and returns its bulk part, which
/// follows it on the wire. Validates what the reader would refuse, so errors show up at the
/// source rather than as a refused stream.
fn encode_body<'m>(msg: &'m Message<'_>, out: &mut Vec<u8>) -> Result<&'m [u8], ProtocolError> {
    let ty = msg.kind();
    let range_err = |source| ProtocolError::Range { ty, source };
    Ok(match msg {
        Message::Start(s) => {
            out.extend_from_slice(&s.memory_size().to_le_bytes());
            out.extend_from_slice(&s.vcpus.to_le_bytes());
            let regions = s.layout.regions();
            out.extend_from_slice(&range_count(ty, regions.len())?.to_le_bytes());
            put_ranges(out, regions);
            s.config_json.as_bytes()
        }
        Message::MemoryPages { ranges, data } => {
            let total = check_ranges(ranges, None).map_err(range_err)?;
            if total != data.len() as u64 {
                return Err(ProtocolError::BadLength {
                    ty,
                    len: data.len() as u64,
                    why: "data length differs from the ranges' total",
                });
            }
            out.extend_from_slice(&range_count(ty, ranges.len())?.to_le_bytes());
            put_ranges(out, ranges);
            data
        }
        Message::MemoryZero { ranges } => {
            check_ranges(ranges, None).map_err(range_err)?;
            out.extend_from_slice(&range_count(ty, ranges.len())?.to_le_bytes());
            put_ranges(out, ranges);
            &[]
        }
        Message::Barrier { round } => {
            out.extend_from_slice(&round.to_le_bytes());
            &[]
        }
        Message::State { blob } => blob,
        Message::Abandon { reason } => reason.as_bytes(),
        Message::Error { message } => message.as_bytes(),
        Message::Complete | Message::Ack => &[],
    })
}

/// Reads `count` ranges from the front of `b`, which holds at least that many.
fn get_ranges(b: &[u8], count: usize) -> Vec<MemRange> {
    b.chunks_exact(RANGE_LEN)
        .take(count)
        .map(|c| MemRange::new(le_u64(&c[0..8]), le_u64(&c[8..16])))
        .collect()
}

/// Splits a payload that starts with a u32 range count into its ranges and what follows them.
/// The count is checked against the payload length before anything is allocated.
fn split_ranges(ty: MessageType, p: &[u8]) -> Result<(Vec<MemRange>, &[u8]), ProtocolError> {
    let bad = |why| ProtocolError::BadLength {
        ty,
        len: p.len() as u64,
        why,
    };
    if p.len() < 4 {
        return Err(bad("shorter than its range count"));
    }
    let count = le_u32(&p[0..4]) as usize;
    let table = count
        .checked_mul(RANGE_LEN)
        .filter(|t| *t <= p.len() - 4)
        .ok_or_else(|| bad("range count exceeds the payload"))?;
    let ranges = get_ranges(&p[4..4 + table], count);
    Ok((ranges, &p[4 + table..]))
}

/// Decodes and validates a payload whose frame has already been checked.
fn decode<'a>(
    ty: MessageType,
    p: &'a [u8],
    layout: Option<&MemoryLayout>,
) -> Result<Message<'a>, ProtocolError> {
    let range_err = |source| ProtocolError::Range { ty, source };
    let text = |b: &'a [u8]| std::str::from_utf8(b).map_err(|_| ProtocolError::Utf8(ty));
    Ok(match ty {
        MessageType::Start => decode_start(p)?,
        MessageType::MemoryPages => {
            let layout = layout.ok_or(ProtocolError::NoLayout(ty))?;
            let (ranges, data) = split_ranges(ty, p)?;
            let total = check_ranges(&ranges, Some(layout)).map_err(range_err)?;
            if total != data.len() as u64 {
                return Err(ProtocolError::BadLength {
                    ty,
                    len: p.len() as u64,
                    why: "data length differs from the ranges' total",
                });
            }
            Message::MemoryPages {
                ranges: Cow::Owned(ranges),
                data,
            }
        }
        MessageType::MemoryZero => {
            let layout = layout.ok_or(ProtocolError::NoLayout(ty))?;
            let (ranges, rest) = split_ranges(ty, p)?;
            if !rest.is_empty() {
                return Err(ProtocolError::BadLength {
                    ty,
                    len: p.len() as u64,
                    why: "bytes after the ranges",
                });
            }
            check_ranges(&ranges, Some(layout)).map_err(range_err)?;
            Message::MemoryZero {
                ranges: Cow::Owned(ranges),
            }
        }
        MessageType::Barrier => {
            exact(ty, p.len() as u64, 8)?;
            Message::Barrier { round: le_u64(p) }
        }
        MessageType::State => Message::State { blob: p },
        MessageType::Complete => Message::Complete,
        MessageType::Abandon => Message::Abandon { reason: text(p)? },
        MessageType::Ack => Message::Ack,
        MessageType::Error => Message::Error { message: text(p)? },
    })
}

/// Decodes a Start payload: memory_size u64, vcpus u32, region count u32, regions, config.
fn decode_start(p: &[u8]) -> Result<Message<'static>, ProtocolError> {
    let ty = MessageType::Start;
    if p.len() < 12 {
        return Err(ProtocolError::BadLength {
            ty,
            len: p.len() as u64,
            why: "shorter than its fixed fields",
        });
    }
    let memory_size = le_u64(&p[0..8]);
    let vcpus = le_u32(&p[8..12]);
    let (regions, config) = split_ranges(ty, &p[12..])?;
    let layout =
        MemoryLayout::new(regions).map_err(|source| ProtocolError::Range { ty, source })?;
    if layout.total_size() != memory_size {
        return Err(ProtocolError::BadStart(
            "memory_size differs from the regions' total",
        ));
    }
    if vcpus == 0 {
        return Err(ProtocolError::BadStart("no vCPUs"));
    }
    let config_json = std::str::from_utf8(config)
        .map_err(|_| ProtocolError::Utf8(ty))?
        .to_owned();
    Ok(Message::Start(StartInfo {
        layout,
        vcpus,
        config_json,
    }))
}

/// Writes a stream: its header once, then messages.
pub struct StreamWriter<W> {
    inner: W,
    limits: Limits,
    /// Frame header and fixed payload part of the message being written, reused.
    scratch: Vec<u8>,
}

impl<W: Write> StreamWriter<W> {
    /// A writer that refuses to send anything `limits` would make the reader refuse.
    pub fn new(inner: W, limits: Limits) -> Self {
        StreamWriter {
            inner,
            limits,
            scratch: Vec::new(),
        }
    }

    /// Writes the stream header.
    pub fn write_header(&mut self, header: &StreamHeader) -> Result<(), ProtocolError> {
        self.inner.write_all(&header.encode()).map_err(io_err)
    }

    /// Writes one message (not flushed: call [`Self::flush`] when a peer waits for it).
    pub fn write_message(&mut self, msg: &Message<'_>) -> Result<(), ProtocolError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
        let bulk = encode_body(msg, &mut self.scratch)?;
        let len = (self.scratch.len() - FRAME_HEADER_LEN + bulk.len()) as u64;
        let ty = msg.kind();
        self.limits.check(ty, len)?;
        self.scratch[0..2].copy_from_slice(&(ty as u16).to_le_bytes());
        // 2..4: flags, zero in version 1.
        self.scratch[4..12].copy_from_slice(&len.to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.scratch);
        crc.update(bulk);
        let crc = crc.finalize().to_le_bytes();
        // One writev per message: separate small writes of header and checksum around the
        // bulk would each be a syscall, and on TCP could wait on Nagle.
        let mut bufs = [
            IoSlice::new(&self.scratch),
            IoSlice::new(bulk),
            IoSlice::new(&crc),
        ];
        write_all_vectored(&mut self.inner, &mut bufs).map_err(io_err)
    }

    /// Flushes the transport.
    pub fn flush(&mut self) -> Result<(), ProtocolError> {
        self.inner.flush().map_err(io_err)
    }

    /// The transport.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// The transport, back.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// `write_all` over several buffers (std's is unstable).
fn write_all_vectored<W: Write>(w: &mut W, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads as much of `buf` as the stream has; fewer bytes than asked means end of stream.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> Result<usize, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    Ok(got)
}

/// Reads `buf.len()` bytes or fails as truncated.
fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], what: &'static str) -> Result<(), ProtocolError> {
    let got = read_full(r, buf)?;
    if got < buf.len() {
        return Err(ProtocolError::Truncated {
            what,
            expected: buf.len() as u64,
            got: got as u64,
        });
    }
    Ok(())
}

/// Reads and validates a stream.
pub struct StreamReader<R> {
    inner: R,
    limits: Limits,
    layout: Option<MemoryLayout>,
    /// Payload of the last message. Its length is a high-water mark (bytes past the current
    /// payload are stale), so each message does not pay to zero-fill it again.
    buf: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    /// A reader enforcing `limits`. Page messages are refused until the memory layout is
    /// known, from a Start message or [`Self::set_layout`].
    pub fn new(inner: R, limits: Limits) -> Self {
        StreamReader {
            inner,
            limits,
            layout: None,
            buf: Vec::new(),
        }
    }

    /// Sets the memory layout page messages are checked against (data channels see no Start).
    pub fn set_layout(&mut self, layout: MemoryLayout) {
        self.layout = Some(layout);
    }

    /// The memory layout in force, if known.
    pub fn layout(&self) -> Option<&MemoryLayout> {
        self.layout.as_ref()
    }

    /// Reads and validates the stream header.
    pub fn read_header(&mut self) -> Result<StreamHeader, ProtocolError> {
        let mut b = [0u8; STREAM_HEADER_LEN];
        read_exact(&mut self.inner, &mut b, "the stream header")?;
        StreamHeader::decode(&b)
    }

    /// Reads, checks and decodes the next message. A Start message sets the layout if none
    /// was set.
    pub fn next_message(&mut self) -> Result<Message<'_>, ProtocolError> {
        let mut hdr = [0u8; FRAME_HEADER_LEN];
        // A timeout before the first byte of a message leaves the stream in sync (the peer
        // is just quiet), unlike one inside a message: report it apart, so callers may wait on.
        let first = loop {
            match self.inner.read(&mut hdr) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(match io_err(e) {
                        ProtocolError::Timeout => ProtocolError::Idle,
                        other => other,
                    })
                }
            }
        };
        if first == 0 {
            return Err(ProtocolError::Closed);
        }
        let got = first + read_full(&mut self.inner, &mut hdr[first..])?;
        if got < FRAME_HEADER_LEN {
            return Err(ProtocolError::Truncated {
                what: "a message header",
                expected: FRAME_HEADER_LEN as u64,
                got: got as u64,
            });
        }
        let raw_ty = le_u16(&hdr[0..2]);
        let ty = MessageType::from_wire(raw_ty).ok_or(ProtocolError::UnknownType(raw_ty))?;
        let flags = le_u16(&hdr[2..4]);
        if flags != 0 {
            return Err(ProtocolError::UnknownMessageFlags { ty, flags });
        }
        let len = le_u64(&hdr[4..12]);
        // The limit check comes before any allocation: a claimed 2^40 bytes stops here.
        self.limits.check(ty, len)?;
        let len = usize::try_from(len).map_err(|_| ProtocolError::TooLarge {
            ty,
            len,
            max: usize::MAX as u64,
        })?;
        self.read_payload(len)?;
        let mut crc_bytes = [0u8; CHECKSUM_LEN];
        read_exact(&mut self.inner, &mut crc_bytes, "a message checksum")?;
        let found = u32::from_le_bytes(crc_bytes);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&hdr);
        crc.update(&self.buf[..len]);
        let computed = crc.finalize();
        if found != computed {
            return Err(ProtocolError::Checksum {
                ty,
                found,
                computed,
            });
        }
        let msg = decode(ty, &self.buf[..len], self.layout.as_ref())?;
        if let (Message::Start(start), None) = (&msg, &self.layout) {
            self.layout = Some(start.layout.clone());
        }
        Ok(msg)
    }

    /// Reads `len` payload bytes into `buf`, growing it only as bytes actually arrive.
    fn read_payload(&mut self, len: usize) -> Result<(), ProtocolError> {
        let mut have = 0;
        while have < len {
            // Grow at most by what has arrived so far (doubling), so a lying length in a short
            // stream costs little.
            let step = (len - have).min(have.max(READ_STEP));
            if self.buf.len() < have + step {
                self.buf.resize(have + step, 0);
            }
            let got = read_full(&mut self.inner, &mut self.buf[have..have + step])?;
            have += got;
            if got < step {
                return Err(ProtocolError::Truncated {
                    what: "a message payload",
                    expected: len as u64,
                    got: have as u64,
                });
            }
        }
        Ok(())
    }

    /// The transport.
    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    /// The transport, mutably (to change its timeouts, say).
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Bytes the reader holds for payloads (for tests and memory accounting).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// Little-endian u16 from the first 2 bytes of `b`.
fn le_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_le_bytes(a)
}

/// Little-endian u32 from the first 4 bytes of `b`.
fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Little-endian u64 from the first 8 bytes of `b`.
fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}
