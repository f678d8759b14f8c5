//! Guest physical memory layout and the global allocator.
//!
//! ```text
//! 0x8000            AP trampoline (copied at boot)
//! 1 MiB             image: text, data (page tables, GDT), bss (per-CPU areas, IDT, stacks)
//! image end..64 MiB heap (2 MiB aligned start), first-fit free list
//! 64 MiB..          workload area (`dirty`), up to the end of that RAM region / 4 GiB
//! ```

use crate::arch;
use crate::boot::BootInfo;
use crate::sync::SpinLock;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::null_mut;

/// Start of the area left to workloads.
pub const WORKLOAD_BASE: u64 = 64 << 20;
/// Only the first 4 GiB are mapped.
pub const MAPPED_END: u64 = 1 << 32;

/// Where the heap and the workload area ended up.
pub struct MemoryLayout {
    /// Heap range.
    pub heap: (u64, u64),
    /// Free RAM for workloads, empty if RAM does not reach WORKLOAD_BASE.
    pub workload: (u64, u64),
}

/// The RAM region containing `addr`, clipped to the mapped range.
fn ram_around(boot: &BootInfo, addr: u64) -> Option<(u64, u64)> {
    boot.ram()
        .find(|r| r.addr <= addr && addr < r.end())
        .map(|r| (r.addr, r.end().min(MAPPED_END)))
}

/// Places the heap after the image and hands it to the allocator.
pub fn init(boot: &BootInfo) -> MemoryLayout {
    let image_end = arch::image_end() as u64;
    let (_, region_end) = ram_around(boot, image_end).expect("image not in RAM");
    let start = image_end.next_multiple_of(2 << 20);
    let end = region_end.min(WORKLOAD_BASE);
    assert!(end > start + (1 << 20), "less than 1 MiB of heap");
    // SAFETY: start..end is RAM not used by the image, the loader data we still need was
    // copied into BootInfo, and the allocator is initialised exactly once.
    unsafe { HEAP.lock().add_free(start as usize, (end - start) as usize) };
    let workload = match ram_around(boot, WORKLOAD_BASE) {
        Some((_, e)) => (WORKLOAD_BASE, e),
        None => (0, 0),
    };
    MemoryLayout {
        heap: (start, end),
        workload,
    }
}

/// Heap blocks are multiples of this, and at least this big (a free-list node).
const UNIT: usize = 16;

struct FreeBlock {
    size: usize,
    next: *mut FreeBlock,
}

/// Address-ordered free list; adjacent free blocks are merged on free.
struct FreeList {
    head: *mut FreeBlock,
}

// SAFETY: the raw pointers only name heap memory owned by the list; access is under the lock.
unsafe impl Send for FreeList {}

impl FreeList {
    /// Adds `addr..addr+size` to the free list.
    ///
    /// # Safety
    /// The range must be unused memory owned by the heap from now on.
    unsafe fn add_free(&mut self, addr: usize, size: usize) {
        let start = addr.next_multiple_of(UNIT);
        let size = (addr + size).saturating_sub(start) & !(UNIT - 1);
        if size < UNIT {
            return;
        }
        let mut prev: *mut FreeBlock = null_mut();
        let mut cur = self.head;
        // SAFETY: every node in the list is a valid FreeBlock in heap memory.
        unsafe {
            while !cur.is_null() && (cur as usize) < start {
                prev = cur;
                cur = (*cur).next;
            }
            let node = start as *mut FreeBlock;
            node.write(FreeBlock { size, next: cur });
            if !cur.is_null() && start + size == cur as usize {
                (*node).size += (*cur).size;
                (*node).next = (*cur).next;
            }
            if prev.is_null() {
                self.head = node;
            } else if prev as usize + (*prev).size == start {
                (*prev).size += (*node).size;
                (*prev).next = (*node).next;
            } else {
                (*prev).next = node;
            }
        }
    }

    fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let size = layout.size().max(UNIT).next_multiple_of(UNIT);
        let align = layout.align().max(UNIT);
        let mut prev: *mut FreeBlock = null_mut();
        let mut cur = self.head;
        // SAFETY: list nodes are valid; split-off pieces are multiples of UNIT, so they can
        // hold a node and every block stays UNIT aligned.
        unsafe {
            while !cur.is_null() {
                let (base, avail, next) = (cur as usize, (*cur).size, (*cur).next);
                let start = base.next_multiple_of(align);
                if start + size <= base + avail {
                    // Unlink, then give back the padding in front and the tail.
                    if prev.is_null() {
                        self.head = next
                    } else {
                        (*prev).next = next
                    }
                    self.add_free(base, start - base);
                    self.add_free(start + size, base + avail - start - size);
                    return start as *mut u8;
                }
                prev = cur;
                cur = next;
            }
        }
        null_mut()
    }
}

static HEAP: SpinLock<FreeList> = SpinLock::new(FreeList { head: null_mut() });

struct Allocator;

// SAFETY: blocks handed out never overlap (they are removed from the free list) and are
// at least as large and aligned as requested.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HEAP.lock().alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let size = layout.size().max(UNIT).next_multiple_of(UNIT);
        // SAFETY: the caller returns a block this allocator handed out with this layout.
        unsafe { HEAP.lock().add_free(ptr as usize, size) }
    }
}

#[global_allocator]
static ALLOCATOR: Allocator = Allocator;
