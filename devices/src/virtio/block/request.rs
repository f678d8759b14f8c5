//! One virtio-blk request: parse the chain, run it against the backend, write the status.
//!
//! Anything the guest gets wrong (addresses outside its memory, wrong descriptor direction,
//! absurd lengths, loops) fails that request, never the device.

use std::io::{Read, Write};
use std::ops::Deref;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ByteValued, GuestMemory};

use super::backend::BlockBackend;
use crate::warn_limited;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Largest data payload we serve in one request; the guest is told much less via SEG_MAX.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
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

/// Serves the request in `chain`.
pub fn execute<M, T>(
    mem: &M,
    chain: DescriptorChain<T>,
    backend: &mut dyn BlockBackend,
    disk: &DiskInfo,
    bounce: &mut Vec<u8>,
) -> Outcome
where
    M: GuestMemory,
    for<'a> <M as GuestMemory>::Bitmap: vm_memory::bitmap::WithBitmapSlice<'a>,
    T: Deref + Clone,
    T::Target: GuestMemory + Sized,
{
    let reader = Reader::new(mem, chain.clone());
    let writer = Writer::new(mem, chain);
    let (mut reader, mut writer) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            warn_limited!("virtio-blk: {}", RequestError::Chain(format!("{e:?}")));
            return FAILED_SILENTLY;
        }
    };
    let data_len = match writer.available_bytes().checked_sub(1) {
        Some(n) => n,
        None => {
            warn_limited!("virtio-blk: {}", RequestError::NoStatus);
            return FAILED_SILENTLY;
        }
    };
    let mut status_writer = match writer.split_at(data_len) {
        Ok(s) => s,
        Err(e) => {
            warn_limited!("virtio-blk: cannot split status byte: {e:?}");
            return FAILED_SILENTLY;
        }
    };
    let (status, written, completed) = match serve(&mut reader, &mut writer, backend, disk, bounce)
    {
        Ok((n, done)) => (status::OK, n, done),
        Err(e) => {
            warn_limited!("virtio-blk: request failed: {e}");
            (e.status(), 0, Completed::Failed)
        }
    };
    if status_writer.write_all(&[status]).is_err() {
        return FAILED_SILENTLY;
    }
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

fn serve<B: BitmapSlice>(
    reader: &mut Reader<'_, B>,
    data: &mut Writer<'_, B>,
    backend: &mut dyn BlockBackend,
    disk: &DiskInfo,
    bounce: &mut Vec<u8>,
) -> Result<(usize, Completed), RequestError> {
    let header: Header = reader.read_obj().map_err(|_| RequestError::ShortHeader)?;
    match header.type_ {
        req_type::IN => {
            let len = data.available_bytes();
            let offset = check_range(backend.size(), header.sector, len as u64)?;
            bounce.resize(len, 0);
            backend.read_at(offset, bounce)?;
            data.write_all(bounce)?;
            Ok((len, Completed::Read(len as u64)))
        }
        req_type::OUT => {
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let len = reader.available_bytes();
            let offset = check_range(backend.size(), header.sector, len as u64)?;
            bounce.resize(len, 0);
            reader.read_exact(bounce)?;
            backend.write_at(offset, bounce)?;
            Ok((0, Completed::Write(len as u64)))
        }
        req_type::FLUSH => {
            backend.flush()?;
            Ok((0, Completed::Other))
        }
        req_type::GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = disk.id.len().min(ID_BYTES);
            id[..n].copy_from_slice(&disk.id[..n]);
            let len = data.available_bytes().min(ID_BYTES);
            data.write_all(&id[..len])?;
            Ok((len, Completed::Other))
        }
        t @ (req_type::DISCARD | req_type::WRITE_ZEROES) => {
            if disk.readonly {
                return Err(RequestError::ReadOnly);
            }
            let segments = reader.available_bytes() / std::mem::size_of::<DiscardSegment>();
            for _ in 0..segments {
                let seg: DiscardSegment = reader.read_obj()?;
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
