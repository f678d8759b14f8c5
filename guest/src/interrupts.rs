//! Interrupt plumbing, all from ring 3: the local APIC (xAPIC MMIO), the IOAPIC, the
//! legacy PIC (masked), and the per-CPU pending-event word the ring-0 stubs set bits in.
//!
//! Vectors: `EVENT_BASE + n` sets pending bit n. Bit 0 is the LAPIC timer; device IRQs get
//! bits from `FIRST_DEVICE_BIT` up via `IrqRouter::route_*`. The event loop takes the word
//! with one atomic swap and polls whatever it names, then halts.

use crate::acpi::AcpiInfo;
use crate::arch;
use core::sync::atomic::{AtomicU64, Ordering};

const LAPIC: usize = 0xfee0_0000;
const LAPIC_ID: usize = 0x20;
const LAPIC_SVR: usize = 0xf0;
const LAPIC_ICR_LOW: usize = 0x300;
const LAPIC_ICR_HIGH: usize = 0x310;
const LAPIC_LVT_TIMER: usize = 0x320;
const LAPIC_LVT_LINT0: usize = 0x350;
const LAPIC_TIMER_INIT: usize = 0x380;
const LAPIC_TIMER_CUR: usize = 0x390;
const LAPIC_TIMER_DIV: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;

/// Pending bit of the LAPIC timer.
pub const TIMER_BIT: u64 = 1 << 0;
/// First pending bit handed out to device IRQs (bits 1..15 are reserved, e.g. for IPIs).
const FIRST_DEVICE_BIT: u32 = 16;

/// The pending-event word of `cpu` (offset 0 of its ring-0 area).
fn pending(cpu: usize) -> &'static AtomicU64 {
    // SAFETY: the per-CPU area is static, 8-byte aligned and only ever accessed atomically
    // (ring-0 stubs use a single bts, which cannot interleave with this CPU's own xchg).
    unsafe { &*(arch::percpu_area(cpu) as *const AtomicU64) }
}

/// BSP events taken by a nested wait (a disk command sleeping) for the event loop.
static DEFERRED: AtomicU64 = AtomicU64::new(0);

/// Keeps BSP events for the event loop's next round.
pub fn defer(bits: u64) {
    DEFERRED.fetch_or(bits, Ordering::AcqRel);
}

/// Takes the events kept by `defer`.
pub fn take_deferred() -> u64 {
    DEFERRED.swap(0, Ordering::AcqRel)
}

/// Takes and clears the events delivered to `cpu` since the last call.
pub fn take_pending(cpu: usize) -> u64 {
    pending(cpu).swap(0, Ordering::AcqRel)
}

/// Reads a local APIC register of the calling CPU.
pub fn lapic_read(reg: usize) -> u32 {
    arch::mmio_read32(LAPIC + reg)
}

/// Writes a local APIC register of the calling CPU.
pub fn lapic_write(reg: usize, v: u32) {
    arch::mmio_write32(LAPIC + reg, v)
}

/// Enables the calling CPU's LAPIC: LINT0 (ExtINT from the PIC) masked, spurious vector set.
pub fn lapic_enable() {
    lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
    lapic_write(LAPIC_SVR, 0x100 | arch::SPURIOUS_VECTOR as u32);
}

/// LAPIC timer: one-shot, divide by 1, raising the timer event; masked until armed.
pub fn lapic_timer_setup(masked: bool) {
    lapic_write(LAPIC_TIMER_DIV, 0b1011);
    let mask = if masked { LVT_MASKED } else { 0 };
    lapic_write(LAPIC_LVT_TIMER, mask | arch::EVENT_BASE as u32);
}

/// Starts the one-shot countdown (0 stops it).
pub fn lapic_timer_start(count: u32) {
    lapic_write(LAPIC_TIMER_INIT, count);
}

/// Current countdown value.
pub fn lapic_timer_current() -> u32 {
    lapic_read(LAPIC_TIMER_CUR)
}

/// Sends an IPI to every CPU but this one (`icr_low` without the shorthand bits).
pub fn ipi_all_but_self(icr_low: u32) {
    lapic_write(LAPIC_ICR_HIGH, 0);
    lapic_write(LAPIC_ICR_LOW, icr_low | (0b11 << 18));
}

/// Masks both 8259 PICs so only the IOAPIC delivers device interrupts.
fn mask_pic() {
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
}

/// Routes device interrupts through the IOAPIC(s) to the BSP.
pub struct IrqRouter {
    dest_apic_id: u32,
    next_bit: u32,
}

/// A routed IRQ: which pending bit says it fired.
#[derive(Clone, Copy)]
pub struct Irq {
    /// Mask to test against `take_pending`.
    pub bit: u64,
}

impl IrqRouter {
    /// Sets up interrupts on the BSP (IDT must already be filled).
    pub fn init_bsp() -> IrqRouter {
        mask_pic();
        lapic_enable();
        IrqRouter {
            dest_apic_id: lapic_read(LAPIC_ID) >> 24,
            next_bit: FIRST_DEVICE_BIT,
        }
    }

    /// Routes an ISA IRQ (honouring the MADT override's GSI and polarity).
    pub fn route_isa(&mut self, acpi: &AcpiInfo, irq: u8) -> Irq {
        match acpi.isa_override(irq) {
            Some(o) => self.route_gsi(acpi, o.gsi, o.flags & 0x3 == 0x3),
            None => self.route_gsi(acpi, irq as u32, false),
        }
    }

    /// Routes a GSI to the BSP, always edge-triggered: the stubs EOI before ring 3 runs,
    /// so a level-triggered line that is still asserted would be re-delivered forever.
    /// Drivers must therefore acknowledge the device and *then* poll its state (KVM irqfd
    /// injects edges anyway).
    pub fn route_gsi(&mut self, acpi: &AcpiInfo, gsi: u32, active_low: bool) -> Irq {
        let bit = self.next_bit;
        assert!(
            (bit as usize) < arch::EVENT_COUNT,
            "out of interrupt vectors"
        );
        self.next_bit += 1;
        let vector = arch::EVENT_BASE as u32 + bit;
        let low = vector | (active_low as u32) << 13;
        let ioapic = acpi.ioapic_for(gsi);
        let pin = gsi - ioapic.gsi_base;
        let write = |reg: u32, v: u32| {
            arch::mmio_write32(ioapic.addr as usize, reg);
            arch::mmio_write32(ioapic.addr as usize + 0x10, v);
        };
        write(0x11 + 2 * pin, self.dest_apic_id << 24);
        write(0x10 + 2 * pin, low);
        Irq { bit: 1 << bit }
    }
}
