//! Guest-physical ranges as the stream carries them, the guest's memory layout, and the checks
//! every received range passes before anything is written.

/// The page size the stream works in: KVM's dirty log has one bit per 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical range: `len` bytes from `gpa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MemRange {
    /// First guest-physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl MemRange {
    /// A range of `len` bytes from `gpa`.
    pub const fn new(gpa: u64, len: u64) -> Self {
        MemRange { gpa, len }
    }

    /// One past the last byte, or `None` if that overflows.
    pub fn end(&self) -> Option<u64> {
        self.gpa.checked_add(self.len)
    }
}

/// Why a range or a list of ranges was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// Start or length not a multiple of [`PAGE_SIZE`].
    #[error("range {gpa:#x}+{len:#x} is not page-aligned")]
    Misaligned {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Zero length: carries nothing and would hide a sender bug.
    #[error("empty range at {gpa:#x}")]
    Empty {
        /// Start.
        gpa: u64,
    },
    /// `gpa + len` does not fit in 64 bits.
    #[error("range {gpa:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Ranges must be sorted and disjoint; this one starts before the previous one ended.
    #[error(
        "range at {gpa:#x} overlaps or precedes the previous range, which ends at {prev_end:#x}"
    )]
    Overlap {
        /// Start of the offending range.
        gpa: u64,
        /// End of the range before it.
        prev_end: u64,
    },
    /// Not inside a single region of guest RAM.
    #[error("range {gpa:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// A layout needs at least one region.
    #[error("memory layout has no regions")]
    NoRegions,
}

/// Checks that `ranges` are page-aligned, non-empty, sorted and disjoint, and (with a layout)
/// each inside one RAM region. Returns their total length.
pub fn check_ranges(ranges: &[MemRange], layout: Option<&MemoryLayout>) -> Result<u64, RangeError> {
    let mut prev_end: Option<u64> = None;
    let mut total: u64 = 0;
    for r in ranges {
        let end = check_one(*r)?;
        if let Some(prev) = prev_end {
            if r.gpa < prev {
                return Err(RangeError::Overlap {
                    gpa: r.gpa,
                    prev_end: prev,
                });
            }
        }
        if let Some(layout) = layout {
            if !layout.contains(*r) {
                return Err(RangeError::OutsideMemory {
                    gpa: r.gpa,
                    len: r.len,
                });
            }
        }
        // Sorted and disjoint ranges cannot add up past u64::MAX, but checking costs nothing.
        total = total.checked_add(r.len).ok_or(RangeError::Overflow {
            gpa: r.gpa,
            len: r.len,
        })?;
        prev_end = Some(end);
    }
    Ok(total)
}

/// Checks one range on its own and returns its end.
fn check_one(r: MemRange) -> Result<u64, RangeError> {
    if r.len == 0 {
        return Err(RangeError::Empty { gpa: r.gpa });
    }
    // PAGE_SIZE is a power of two: a mask tests alignment.
    if r.gpa & (PAGE_SIZE - 1) != 0 || r.len & (PAGE_SIZE - 1) != 0 {
        return Err(RangeError::Misaligned {
            gpa: r.gpa,
            len: r.len,
        });
    }
    r.end().ok_or(RangeError::Overflow {
        gpa: r.gpa,
        len: r.len,
    })
}

/// Guest RAM as sorted, disjoint, page-aligned regions (RAM has a hole below 4 GiB, so one
/// size is not enough to say which addresses are valid).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    regions: Vec<MemRange>,
    total: u64,
}

impl MemoryLayout {
    /// A layout from its regions, which must pass [`check_ranges`].
    pub fn new(regions: Vec<MemRange>) -> Result<Self, RangeError> {
        if regions.is_empty() {
            return Err(RangeError::NoRegions);
        }
        let total = check_ranges(&regions, None)?;
        Ok(MemoryLayout { regions, total })
    }

    /// The regions, in address order.
    pub fn regions(&self) -> &[MemRange] {
        &self.regions
    }

    /// Total bytes of RAM.
    pub fn total_size(&self) -> u64 {
        self.total
    }

    /// Whether `r` lies entirely inside one region.
    pub fn contains(&self, r: MemRange) -> bool {
        let Some(end) = r.end() else {
            return false;
        };
        // The candidate is the last region starting at or below r.gpa.
        let idx = self.regions.partition_point(|reg| reg.gpa <= r.gpa);
        if idx == 0 {
            return false;
        }
        let reg = self.regions[idx - 1];
        reg.end().is_some_and(|reg_end| end <= reg_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE;

    fn layout() -> MemoryLayout {
        MemoryLayout::new(vec![MemRange::new(0, 16 * P), MemRange::new(32 * P, 8 * P)]).unwrap()
    }

    #[test]
    fn accepts_sorted_adjacent_ranges() {
        let r = [
            MemRange::new(0, P),
            MemRange::new(P, 2 * P),
            MemRange::new(33 * P, P),
        ];
        assert_eq!(check_ranges(&r, Some(&layout())), Ok(4 * P));
    }

    #[test]
    fn refuses_misaligned_empty_overlapping_outside() {
        let l = layout();
        let bad = |r: &[MemRange]| check_ranges(r, Some(&l)).unwrap_err();
        assert!(matches!(
            bad(&[MemRange::new(1, P)]),
            RangeError::Misaligned { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(0, P + 1)]),
            RangeError::Misaligned { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(P, 0)]),
            RangeError::Empty { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(0, 2 * P), MemRange::new(P, P)]),
            RangeError::Overlap { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(4 * P, P), MemRange::new(0, P)]),
            RangeError::Overlap { .. }
        ));
        // Straddles the hole between the two regions.
        assert!(matches!(
            bad(&[MemRange::new(15 * P, 2 * P)]),
            RangeError::OutsideMemory { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(20 * P, P)]),
            RangeError::OutsideMemory { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(40 * P, P)]),
            RangeError::OutsideMemory { .. }
        ));
        assert!(matches!(
            bad(&[MemRange::new(u64::MAX - P + 1, P)]),
            RangeError::Overflow { .. }
        ));
    }

    #[test]
    fn layout_needs_valid_regions() {
        assert_eq!(MemoryLayout::new(vec![]), Err(RangeError::NoRegions));
        assert!(MemoryLayout::new(vec![MemRange::new(0, 3)]).is_err());
        assert_eq!(layout().total_size(), 24 * P);
        assert!(layout().contains(MemRange::new(32 * P, 8 * P)));
        assert!(!layout().contains(MemRange::new(32 * P, 9 * P)));
    }
}
