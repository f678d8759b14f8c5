//! Helpers for the small on-disk headers of the layers' index and the merge journal.

/// FNV-1a (64-bit) of `bytes`: the checksum of the small on-disk headers (index, journal),
/// enough to tell a torn or foreign file from ours.
pub(super) fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Reads the little-endian u32 at `at` of a header already checked to be long enough.
pub(super) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Reads the little-endian u64 at `at` of a header already checked to be long enough.
pub(super) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}
