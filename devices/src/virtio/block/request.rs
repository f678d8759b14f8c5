//! One virtio-blk request: parse the chain, run it against the backend, write the status.
//!
//! Anything the guest gets wrong (addresses outside its memory, wrong descriptor direction,
//! absurd lengths, loops) fails that request, never the device.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemory as _, Permissions};

use super::backend::{gather, scatter, BlockBackend, GuestSlice};
use crate::{warn_limited, GuestMemory};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data payload we serve in one request; the guest is told much less via SEG_MAX.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// The FLUSH request type.
pub const FLUSH: u32 = 4;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = super::FLUSH;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Status byte values.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error (also: bad request, read-only disk).
    pub const IOERR: u8 = 1;
    /// Request type not supported.
    pub const UNSUPP: u8 = 2;
}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct Header {
    type_: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: plain-old-data, every bit pattern is valid.
unsafe impl ByteValued for Header {}

#[derive(Clone, Copy, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}

// SAFETY: plain-old-data, every bit pattern is valid.
unsafe impl ByteValued for DiscardSegment {}

/// What the device knows when serving a request.
pub struct DiskInfo<'a> {
    /// Refuse writes.
    pub readonly: bool,
    /// The GET_ID string (up to 20 bytes).
    pub id: &'a [u8],
}

/// Why a request failed (becomes the status byte; logged with a rate limit).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain could not be mapped (outside guest memory, overflow).
    #[error("bad descriptor chain: {0}")]
    Chain(String),
    /// No writable byte for the status.
    #[error("no writable status byte")]
    NoStatus,
    /// The request header was short.
    #[error("short request header")]
    ShortHeader,
    /// Beyond the end of the disk, or too large.
    #[error("request of {len} bytes at sector {sector} is out of range")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Payload length.
        len: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// The backend failed.
    #[error("backend: {0}")]
    Io(#[from] std::io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => status::UNSUPP,
            _ => status::IOERR,
        }
    }
}

/// What a request did, for the device's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completed {
    /// Read this many bytes.
    Read(u64),
    /// Wrote this many bytes.
    Write(u64),
    /// Flush, GET_ID, discard, write-zeroes.
    Other,
    /// Failed (status IOERR/UNSUPP, or no status could be written).
    Failed,
}

impl Completed {
    /// Data bytes moved (0 for requests without data).
    pub fn bytes(self) -> u64 {
        match self {
            Completed::Read(n) | Completed::Write(n) => n,
            Completed::Other | Completed::Failed => 0,
        }
    }
}

/// The used-ring length of a request (bytes written into guest buffers; 0 when not even the
/// status could be written) and what it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Used-ring length.
    pub used_len: u32,
    /// What happened.
    pub completed: Completed,
}

const FAILED_SILENTLY: Outcome = Outcome {
    used_len: 0,
    completed: Completed::Failed,
};

/// A request's buffers in guest memory, each kind in chain order: the device-readable ones
/// (header, then write data or discard segments) and the device-writable ones (read data,
/// then the status byte).
struct Buffers<'a> {
    readable: Vec<GuestSlice<'a>>,
    readable_len: usize,
    writable: Vec<GuestSlice<'a>>,
    writable_len: usize,
}

/// Maps every descriptor of `chain` into guest memory, in one pass.
fn map_chain<'a, T>(
    mem: &'a GuestMemory,
    chain: DescriptorChain<T>,
) -> Result<Buffers<'a>, RequestError>
where
    T: Deref<Target = GuestMemory>,
{
    let bad = |e: &dyn std::fmt::Debug| RequestError::Chain(format!("{e:?}"));
    let mut b = Buffers {
        readable: Vec::with_capacity(2),
        readable_len: 0,
        writable: Vec::with_capacity(2),
        writable_len: 0,
    };
    for desc in chain {
        let (list, total, access) = if desc.is_write_only() {
            (&mut b.writable, &mut b.writable_len, Permissions::Write)
        } else {
            (&mut b.readable, &mut b.readable_len, Permissions::Read)
        };
        let len = desc.len() as usize;
        *total = total
            .checked_add(len)
            .ok_or_else(|| bad(&"chain length overflows"))?;
        for slice in mem
            .get_slices(desc.addr(), len, access)
            .map_err(|e| bad(&e))?
        {
            list.push(slice.map_err(|e| bad(&e))?);
        }
    }
    Ok(b)
}

/// The `len` bytes of `bufs` starting `from` bytes in, as slices (cut at the edges).
fn sub_range<'a>(
    bufs: &[GuestSlice<'a>],
    mut from: usize,
    mut len: usize,
) -> Result<Vec<GuestSlice<'a>>, RequestError> {
    let mut out = Vec::with_capacity(bufs.len());
    for b in bufs {
        if len == 0 {
            break;
        }
        if from >= b.len() {
            from -= b.len();
            continue;
        }
        let n = (b.len() - from).min(len);
        out.push(
            b.subslice(from, n)
                .map_err(|e| RequestError::Chain(format!("{e:?}")))?,
        );
        from = 0;
        len -= n;
    }
    if len != 0 {
        return Err(RequestError::Chain("buffer shorter than its length".into()));
    }
    Ok(out)
}

/// Serves the request in `chain` (whose memory handle is `mem`, borrowed or shared).
pub fn execute<T>(
    mem: &GuestMemory,
    chain: DescriptorChain<T>,
    backend: &mut dyn BlockBackend,
    disk: &DiskInfo,
) -> Outcome
where
    T: Deref<Target = GuestMemory>,
{
    let bufs = match map_chain(mem, chain) {
        Ok(b) => b,
        Err(e) => {
            warn_limited!("virtio-blk: {e}");
            return FAILED_SILENTLY;
        }
    };
    let Some(data_len) = bufs.writable_len.checked_sub(1) else {
        warn_limited!("virtio-blk: {}", RequestError::NoStatus);
        return FAILED_SILENTLY;
    };
    let status_slice = match sub_range(&bufs.writable, data_len, 1) {
        Ok(s) => s,
        Err(e) => {
            warn_limited!("virtio-blk: cannot find the status byte: {e}");
            return FAILED_SILENTLY;
        }
    };
    let (status, written, completed) = match serve(&bufs, data_len, backend, disk) {
        Ok((n, done)) => (status::OK, n, done),
        Err(e) => {
            warn_limited!("virtio-blk: request failed: {e}");
            (e.status(), 0, Completed::Failed)
        }
    };
    // Marks the status byte dirty like every other guest write.
    scatter(&[status], &status_slice);
    Outcome {
        used_len: written as u32 + 1,
        completed,
    }
}

fn check_range(disk_size: u64, sector: u64, len: u64) -> Result<u64, RequestError> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .filter(|off| off.checked_add(len).is_some_and(|end| end <= disk_size))
        .filter(|_| len <= MAX_REQUEST_BYTES as u64)
        .ok_or(RequestError::OutOfRange { sector, len })?;
    Ok(offset)
}

/// Reads a plain-old-data object from the start of `bytes` (None if too short).
fn read_pod<T: ByteValued + Default>(bytes: &[u8]) -> Option<T> {
    let mut v = T::default();
    let n = std::mem::size_of::<T>();
    v.as_mut_slice().copy_from_slice(bytes.get(..n)?);
    Some(v)
}

/// Runs the request; `data_len` is the writable room before the status byte.
fn serve(
    bufs: &Buffers<'_>,
    data_len: usize,
    backend: &mut dyn BlockBackend,
    disk: &DiskInfo,
) -> Result<(usize, Completed), RequestError> {
    const HEADER_LEN: usize = std::mem::size_of::<Header>();
    let mut head = [0u8; HEADER_LEN];
    let readable_head = sub_range(&bufs.readable, 0, HEADER_LEN.min(bufs.readable_len))?;
    let mut at = 0;
    for s in &readable_head {
        at += s.copy_to(&mut head[at..]);
    }
    let header: Header = read_pod(&head[..at]).ok_or(RequestError::ShortHeader)?;
    // Device-readable bytes after the header: write data, discard segments.
    let payload_len = bufs.readable_len - HEADER_LEN;
    match header.type_ {
        req_type::IN => {
            let offset = check_range(backend.size(), header.sector, data_len as u64)?;
            let data = sub_range(&bufs.writable, 0, data_len)?;
            backend.read_to_guest(offset, &data)?;
            Ok((data_len, Completed::Read(data_len as u64)))
        }
        req_type::OUT => {
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let offset = check_range(backend.size(), header.sector, payload_len as u64)?;
            let data = sub_range(&bufs.readable, HEADER_LEN, payload_len)?;
            backend.write_from_guest(offset, &data)?;
            Ok((0, Completed::Write(payload_len as u64)))
        }
        req_type::FLUSH => {
            backend.flush()?;
            Ok((0, Completed::Other))
        }
        req_type::GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = disk.id.len().min(ID_BYTES);
            id[..n].copy_from_slice(&disk.id[..n]);
            let len = data_len.min(ID_BYTES);
            scatter(&id[..len], &sub_range(&bufs.writable, 0, len)?);
            Ok((len, Completed::Other))
        }
        t @ (req_type::DISCARD | req_type::WRITE_ZEROES) => {
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            const SEG_LEN: usize = std::mem::size_of::<DiscardSegment>();
            let segments = payload_len / SEG_LEN;
            let mut raw = Vec::new();
            for i in 0..segments {
                gather(
                    &sub_range(&bufs.readable, HEADER_LEN + i * SEG_LEN, SEG_LEN)?,
                    &mut raw,
                );
                let seg: DiscardSegment = read_pod(&raw).ok_or(RequestError::ShortHeader)?;
                let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
                let offset = sector_range(backend.size(), seg.sector, len)?;
                if t == req_type::DISCARD {
                    backend.discard(offset, len)?;
                } else {
                    backend.write_zeroes(offset, len)?;
                }
            }
            Ok((0, Completed::Other))
        }
        other => Err(RequestError::Unsupported(other)),
    }
}

/// Like `check_range` but without the payload-size cap (discard ranges carry no data).
fn sector_range(disk_size: u64, sector: u64, len: u64) -> Result<u64, RequestError> {
    sector
        .checked_mul(SECTOR_SIZE)
        .filter(|off| off.checked_add(len).is_some_and(|end| end <= disk_size))
        .ok_or(RequestError::OutOfRange { sector, len })
}
