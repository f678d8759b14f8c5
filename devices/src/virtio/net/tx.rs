//! Tx descriptor chains: checking them and mapping their buffers, so a frame can go to the tap
//! straight from guest memory (one `writev`) or be copied out when it must wait or be filtered.

use virtio_queue::DescriptorChain;
use vm_memory::bitmap::MS;
use vm_memory::{GuestMemoryBackend, VolatileSlice};

use super::tap::VNET_HDR_LEN;
use super::worker::MAX_TX_FRAME;
use crate::GuestMemory;

/// A piece of guest memory a frame is read from (or written into).
pub type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemory>>;

/// Why a tx descriptor chain was refused (it goes back to the driver, its frame dropped).
#[derive(Debug, thiserror::Error)]
pub enum TxChainError {
    /// Tx buffers are for the device to read.
    #[error("device-writable descriptor in a tx chain")]
    Writable,
    /// More than a maximal GSO frame.
    #[error("frame longer than {MAX_TX_FRAME} bytes")]
    TooLong,
    /// Not even a vnet header.
    #[error("{0} bytes, less than a vnet header")]
    TooShort(usize),
    /// A buffer is not guest RAM.
    #[error("buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The chain iterator stopped on a loop, a bad link or a bad indirect table.
    #[error("chain does not end (loop, bad next index or bad indirect table)")]
    Unterminated,
}

/// Maps a tx chain's buffers (vnet header + frame) into `out`, in order; returns the length.
/// Everything a driver can get wrong is refused here, before any byte moves.
pub(super) fn map_tx<'m>(
    mem: &'m GuestMemory,
    chain: DescriptorChain<&'m GuestMemory>,
    out: &mut Vec<GuestSlice<'m>>,
) -> Result<usize, TxChainError> {
    out.clear();
    let mut total = 0usize;
    let mut open = false;
    for desc in chain {
        open = desc.has_next();
        if desc.is_write_only() {
            return Err(TxChainError::Writable);
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|&t| t <= MAX_TX_FRAME)
            .ok_or(TxChainError::TooLong)?;
        let outside = || TxChainError::OutsideMemory {
            addr: desc.addr().0,
            len: len as u64,
        };
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            out.push(slice.map_err(|_| outside())?);
        }
    }
    // The chain iterator stops silently on a loop or a bad link; a last descriptor that still
    // says NEXT is how that shows.
    if open {
        return Err(TxChainError::Unterminated);
    }
    if total < VNET_HDR_LEN {
        return Err(TxChainError::TooShort(total));
    }
    Ok(total)
}

/// Copies `slices` into the start of `buf` (which holds them: `map_tx` capped their total).
pub(super) fn gather(slices: &[GuestSlice<'_>], buf: &mut [u8]) -> usize {
    let mut at = 0;
    for s in slices {
        let Some(dst) = buf.get_mut(at..) else {
            break;
        };
        at += s.copy_to(dst);
    }
    at
}
