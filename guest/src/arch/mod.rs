//! Ring-3 view of the machine: the ring-0 stub (entry.s), its int3 call gate, port I/O,
//! MMIO and the TSC. All memory is identity mapped with U/S=1, so ring 3 reads and writes
//! physical addresses directly.

pub mod libc;

use core::arch::{asm, global_asm};

/// Most CPUs brought up; later ones park in ring 0.
pub const MAX_CPUS: usize = 16;
/// Per-CPU ring-0 area (pending word, TSS, ring-0 stack), aligned to its size.
pub const PERCPU_SIZE: usize = 1 << 14;
/// Offset of the TSS inside the per-CPU area.
const PERCPU_TSS: usize = 0x40;
/// Ring-3 stack per CPU.
pub const R3_STACK: usize = 1 << 18;
/// Physical address the AP real-mode trampoline is copied to (SIPI vector 0x08).
pub const TRAMPOLINE: usize = 0x8000;
/// First vector whose stub sets a pending bit; vector `EVENT_BASE + n` sets bit n.
pub const EVENT_BASE: u8 = 0x20;
/// Number of event vectors (one bit each in a u64).
pub const EVENT_COUNT: usize = 64;
/// LAPIC spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

// entry.s hard-codes these as shifts.
const _: () = assert!(PERCPU_SIZE == 1 << 14 && R3_STACK == 1 << 18);
const _: () = assert!(PERCPU_TSS + 104 + 8192 < PERCPU_SIZE - 1024);

global_asm!(
    include_str!("entry.s"),
    max_cpus = const MAX_CPUS,
    percpu_size = const PERCPU_SIZE,
    percpu_tss = const PERCPU_TSS,
    r3_stack = const R3_STACK,
    trampoline = const TRAMPOLINE,
    event_base = const EVENT_BASE,
    event_count = const EVENT_COUNT,
    options(att_syntax)
);

unsafe extern "C" {
    static entry_tsc: u64;
    static percpu: u8;
    static mut idt: [u64; 512];
    static exc_stubs: [u64; 32];
    static event_stubs: [u64; EVENT_COUNT];
    fn gate_entry();
    fn spurious_entry();
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static __image_end: u8;
}

const CALL_HALT: u64 = 0;
const CALL_CRASH: u64 = 1;
const CALL_OUTSB: u64 = 2;

/// Sleeps until the next interrupt (returns at once if one is already pending for this CPU).
pub fn halt() {
    // SAFETY: gate call 0 only runs sti/hlt/cli in ring 0; the declared registers are the
    // gate ABI's clobbers, and the ring-3 stack is untouched (the CPU switches to RSP0).
    unsafe {
        asm!("int3", inout("rax") CALL_HALT => _, out("rcx") _, out("rdx") _, out("rsi") _,
             out("rdi") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
             options(nostack));
    }
}

/// Stops the guest with a triple fault (the VMM sees a shutdown).
pub fn crash() -> ! {
    // SAFETY: gate call 1 never returns: it loads an empty IDT and faults.
    unsafe { asm!("int3", in("rax") CALL_CRASH, options(nostack, noreturn)) }
}

/// Writes `buf` to an I/O port with one ring-0 `rep outsb` (cheaper than one `out` per byte).
pub fn outsb(port: u16, buf: &[u8]) {
    // SAFETY: gate call 2 reads exactly buf.len() bytes from buf.as_ptr() and writes them
    // to the port; registers as in the gate ABI.
    unsafe {
        asm!("int3", inout("rax") CALL_OUTSB => _, inout("rdi") port as u64 => _,
             inout("rsi") buf.as_ptr() => _, inout("rdx") buf.len() => _,
             out("rcx") _, out("r8") _, out("r9") _, out("r10") _, out("r11") _,
             options(nostack, readonly));
    }
}

/// Reads a byte from an I/O port (allowed in ring 3 by the TSS I/O bitmap).
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: port I/O has no memory effects; the guest owns all ports it touches.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: as for inb.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for inb.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for inb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads a 32-bit MMIO register.
pub fn mmio_read32(addr: usize) -> u32 {
    // SAFETY: callers pass device register addresses inside the identity map.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes a 32-bit MMIO register.
pub fn mmio_write32(addr: usize, v: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

/// Reads the time-stamp counter (native in ring 3).
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no side effects and CR4.TSD is clear.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC value captured by the first instruction of the PVH entry.
pub fn boot_tsc() -> u64 {
    // SAFETY: written once in ring 0 before any Rust code runs.
    unsafe { core::ptr::read_volatile(&raw const entry_tsc) }
}

/// First byte after the loaded image (end of .bss).
pub fn image_end() -> usize {
    &raw const __image_end as usize
}

/// The AP real-mode trampoline code, to be copied to `TRAMPOLINE`.
pub fn trampoline_code() -> &'static [u8] {
    // SAFETY: both symbols delimit one contiguous run of bytes in .text.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let len = (&raw const ap_trampoline_end).offset_from(start) as usize;
        core::slice::from_raw_parts(start, len)
    }
}

/// Base of the per-CPU ring-0 area of `cpu`; offset 0 is the pending-event word.
pub fn percpu_area(cpu: usize) -> usize {
    assert!(cpu < MAX_CPUS);
    &raw const percpu as usize + cpu * PERCPU_SIZE
}

/// Fills the IDT (the ring-0 stub only loaded IDTR). Must run before any interrupt source
/// is enabled; vectors left empty fault (#NP) into the fatal path.
pub fn init_idt() {
    // SAFETY: the stub tables hold code addresses from entry.s; the IDT is only read by the
    // CPU on delivery, and nothing can be delivered yet (LAPIC still software-disabled).
    unsafe {
        let set = |vector: usize, handler: u64, dpl: u64| {
            let low = (handler & 0xffff)
                | (0x08 << 16)                      // ring-0 code selector
                | ((0x8e | dpl << 5) << 40)         // present 64-bit interrupt gate
                | ((handler >> 16) & 0xffff) << 48;
            let base = &raw mut idt as *mut u64;
            core::ptr::write_volatile(base.add(vector * 2), low);
            core::ptr::write_volatile(base.add(vector * 2 + 1), handler >> 32);
        };
        for (v, &stub) in exc_stubs.iter().enumerate() {
            set(v, stub, 0);
        }
        set(3, gate_entry as *const () as u64, 3); // the int3 call gate, callable from ring 3
        for (n, &stub) in event_stubs.iter().enumerate() {
            set(EVENT_BASE as usize + n, stub, 0);
        }
        set(
            SPURIOUS_VECTOR as usize,
            spurious_entry as *const () as u64,
            0,
        );
    }
}
