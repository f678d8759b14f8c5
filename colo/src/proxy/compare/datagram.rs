//! One direction of a datagram connection (UDP, ICMP, other protocols, non-IP frames): the
//! n-th datagram from the PVM is compared against the n-th from the SVM.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Held, Outcome, Side};

/// One direction of a datagram connection: the two sides' datagrams, in order.
#[derive(Debug, Default)]
pub(super) struct DgDir {
    pub(super) pvm: VecDeque<(Held, Vec<u8>)>,
    pub(super) svm: VecDeque<(Instant, Vec<u8>)>,
}

impl DgDir {
    pub(super) fn push(
        &mut self,
        side: Side,
        bytes: Vec<u8>,
        held: Option<Held>,
        now: Instant,
    ) -> Outcome {
        match (side, held) {
            (Side::Primary, Some(h)) => self.pvm.push_back((h, bytes)),
            _ => self.svm.push_back((now, bytes)),
        }
        let mut o = Outcome::default();
        while let (Some((_, p)), Some((_, s))) = (self.pvm.front(), self.svm.front()) {
            if p != s {
                let at = p.iter().zip(s).position(|(a, b)| a != b);
                o.mismatch = Some(match at {
                    Some(i) => format!("datagram payloads differ at byte {i}"),
                    None => format!("datagram lengths differ ({} vs {} bytes)", p.len(), s.len()),
                });
                break;
            }
            o.compared += p.len() as u64;
            self.svm.pop_front();
            if let Some((h, _)) = self.pvm.pop_front() {
                o.released.push(h);
            }
        }
        o
    }

    pub(super) fn depth(&self) -> usize {
        let held: usize = self.pvm.iter().map(|(h, _)| h.frames.len()).sum();
        held + self.svm.len()
    }
}
