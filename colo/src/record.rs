//! The checkpoint record: what the primary puts in the migration stream's State message at
//! every checkpoint. It wraps the VM's saved state (opaque here) with what the secondary needs
//! to apply it: the checkpoint's number, why it was taken, and flags.
//!
//! Wire (little-endian), version 1:
//!
//! ```text
//! 0   magic  "COLOCKPT"
//! 8   version u16 = 1
//! 10  flags u16        bit 0: pause after (both VMs stay paused once it is applied)
//! 12  reason u8        0 initial, 1 interval, 2 request, 3 divergence
//! 13  reserved [u8; 3] zero
//! 16  seq u64          1 for the initial sync, +1 per checkpoint
//! 24  state_len u32    must equal the bytes that follow
//! 28  state [state_len]
//! ```
//!
//! The reader checks every field before it copies the state; unknown versions, flags, reasons
//! or a length that disagrees with the message are refused.

use serde::{Deserialize, Serialize};

const MAGIC: [u8; 8] = *b"COLOCKPT";
/// Version of the record format.
pub const VERSION: u16 = 1;
/// Bytes before the state.
pub const HEADER_LEN: usize = 28;
const FLAG_PAUSE_AFTER: u16 = 1;

/// Why a checkpoint was taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    /// The first one, ending the initial sync.
    Initial,
    /// The checkpoint interval passed.
    Interval,
    /// Asked through the API.
    Request,
    /// The network proxy saw the two VMs' outputs differ.
    Divergence,
}

impl Reason {
    /// All reasons, in wire order.
    pub const ALL: [Reason; 4] = [
        Reason::Initial,
        Reason::Interval,
        Reason::Request,
        Reason::Divergence,
    ];

    /// The name used in the status and in events.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Initial => "initial",
            Reason::Interval => "interval",
            Reason::Request => "request",
            Reason::Divergence => "divergence",
        }
    }

    fn to_wire(self) -> u8 {
        match self {
            Reason::Initial => 0,
            Reason::Interval => 1,
            Reason::Request => 2,
            Reason::Divergence => 3,
        }
    }

    fn from_wire(v: u8) -> Option<Self> {
        Reason::ALL.get(usize::from(v)).copied()
    }
}

/// Errors decoding a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// Shorter than the header.
    #[error("checkpoint record of {0} bytes is shorter than its header")]
    Short(usize),
    /// Not a checkpoint record.
    #[error("not a COLO checkpoint record")]
    Magic,
    /// A version this build does not read.
    #[error("checkpoint record version {0} is not supported (this build reads {VERSION})")]
    Version(u16),
    /// Flags this build does not know.
    #[error("checkpoint record has unknown flags {0:#x}")]
    Flags(u16),
    /// A reason this build does not know.
    #[error("checkpoint record has unknown reason {0}")]
    Reason(u8),
    /// Reserved bytes that are not zero.
    #[error("checkpoint record has non-zero reserved bytes")]
    Reserved,
    /// The state length disagrees with the message.
    #[error("checkpoint record claims {claimed} state bytes but carries {actual}")]
    Length {
        /// From the header.
        claimed: u64,
        /// What follows the header.
        actual: usize,
    },
    /// Sequence numbers start at 1.
    #[error("checkpoint record has sequence number 0")]
    Sequence,
}

/// One checkpoint's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// Checkpoint number.
    pub seq: u64,
    /// Why it was taken.
    pub reason: Reason,
    /// Both VMs stay paused once it is applied.
    pub pause_after: bool,
    /// The VM's saved state.
    pub state: &'a [u8],
}

impl Record<'_> {
    /// The record's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.state.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.pause_after {
            FLAG_PAUSE_AFTER
        } else {
            0
        };
        out.extend_from_slice(&flags.to_le_bytes());
        out.push(self.reason.to_wire());
        out.extend_from_slice(&[0; 3]);
        out.extend_from_slice(&self.seq.to_le_bytes());
        // The migration stream bounds a State message far below 4 GiB.
        let len = u32::try_from(self.state.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(self.state);
        out
    }
}

/// Reads a record, checking every field; the state is borrowed from `bytes`.
pub fn decode(bytes: &[u8]) -> Result<Record<'_>, RecordError> {
    if bytes.len() < HEADER_LEN {
        return Err(RecordError::Short(bytes.len()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
    if bytes[..8] != MAGIC {
        return Err(RecordError::Magic);
    }
    let version = u16_at(8);
    if version != VERSION {
        return Err(RecordError::Version(version));
    }
    let flags = u16_at(10);
    if flags & !FLAG_PAUSE_AFTER != 0 {
        return Err(RecordError::Flags(flags));
    }
    let reason = Reason::from_wire(bytes[12]).ok_or(RecordError::Reason(bytes[12]))?;
    if bytes[13..16] != [0; 3] {
        return Err(RecordError::Reserved);
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&bytes[16..24]);
    let seq = u64::from_le_bytes(seq);
    if seq == 0 {
        return Err(RecordError::Sequence);
    }
    let claimed = u32::from_le_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]);
    let state = &bytes[HEADER_LEN..];
    if u64::from(claimed) != state.len() as u64 {
        return Err(RecordError::Length {
            claimed: claimed.into(),
            actual: state.len(),
        });
    }
    Ok(Record {
        seq,
        reason,
        pause_after: flags & FLAG_PAUSE_AFTER != 0,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        Record {
            seq: 7,
            reason: Reason::Request,
            pause_after: true,
            state: b"{\"vm\":1}",
        }
        .encode()
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let r = decode(&bytes).unwrap();
        assert_eq!(r.seq, 7);
        assert_eq!(r.reason, Reason::Request);
        assert!(r.pause_after);
        assert_eq!(r.state, b"{\"vm\":1}");
    }

    #[test]
    fn every_bad_field_is_named() {
        let good = sample();
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            decode(&b).map(|_| ()).unwrap_err()
        };
        assert_eq!(decode(&good[..10]).unwrap_err(), RecordError::Short(10));
        assert_eq!(with(0, b'X'), RecordError::Magic);
        assert_eq!(with(8, 2), RecordError::Version(2));
        assert_eq!(with(10, 3), RecordError::Flags(3));
        assert_eq!(with(12, 9), RecordError::Reason(9));
        assert_eq!(with(14, 1), RecordError::Reserved);
        assert_eq!(
            with(24, 200),
            RecordError::Length {
                claimed: 200,
                actual: 8
            }
        );
        let mut zero_seq = good.clone();
        zero_seq[16..24].fill(0);
        assert_eq!(decode(&zero_seq).unwrap_err(), RecordError::Sequence);
        assert!(matches!(
            decode(&good[..good.len() - 1]),
            Err(RecordError::Length { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Arbitrary bytes never panic the reader, and whatever it accepts re-encodes to the
        /// same bytes.
        #[test]
        fn arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            if let Ok(r) = decode(&bytes) {
                prop_assert_eq!(r.encode(), bytes);
            }
        }

        /// Damaged records: one flipped byte of a good one is refused or decodes to the same
        /// length of state.
        #[test]
        fn flipped_byte(at in 0usize..36, bit in 0u8..8) {
            let mut b = sample();
            let at = at % b.len();
            b[at] ^= 1 << bit;
            if let Ok(r) = decode(&b) {
                prop_assert_eq!(r.state.len(), 8);
            }
        }
    }
}
