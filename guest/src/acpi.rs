//! The few ACPI facts the guest needs, read once at boot: CPU count and interrupt routing
//! from the MADT, and how to power off from the FADT. Tables are read in place (identity
//! mapped, below 4 GiB), before the heap or the AP trampoline can overwrite them.

use crate::arch;
use crate::virtio::Location;
use core::ptr::read_unaligned;

const MAX_OVERRIDES: usize = 16;
const MAX_IOAPICS: usize = 4;
const MAX_VIRTIO: usize = 32;

/// An ACPI Generic Address Structure.
#[derive(Clone, Copy)]
pub struct Gas {
    space: u8,
    access: u8,
    addr: u64,
}

/// How to enter S5.
#[derive(Clone, Copy)]
pub enum PowerOff {
    /// Hardware-reduced ACPI: write the sleep control register.
    SleepControl(Gas),
    /// Fixed hardware: write PM1a (and PM1b if present) control.
    Pm1Control(Gas, Option<Gas>),
}

/// An ISA interrupt source override from the MADT.
#[derive(Clone, Copy, Default)]
pub struct Override {
    /// ISA IRQ number.
    pub irq: u8,
    /// Global system interrupt it is wired to.
    pub gsi: u32,
    /// MPS INTI flags: bits 0-1 polarity, 2-3 trigger mode.
    pub flags: u16,
}

/// An IOAPIC: MMIO base and first GSI.
#[derive(Clone, Copy, Default)]
pub struct IoApic {
    /// MMIO base.
    pub addr: u64,
    /// GSI of its pin 0.
    pub gsi_base: u32,
}

/// What the MADT and FADT said.
pub struct AcpiInfo {
    /// Enabled local APICs in the MADT, if there is one.
    pub cpus: Option<u32>,
    ioapics: [IoApic; MAX_IOAPICS],
    nioapics: usize,
    overrides: [Override; MAX_OVERRIDES],
    noverrides: usize,
    /// The S5 path, if a FADT was found.
    pub poweroff: Option<PowerOff>,
    virtio: [Location; MAX_VIRTIO],
    nvirtio: usize,
}

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: ACPI tables live in guest RAM/ROM below 4 GiB, which is identity mapped;
    // callers only read inside a table whose length they checked.
    unsafe { read_unaligned(addr as *const T) }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |s, i| s.wrapping_add(rd::<u8>(addr + i))) == 0
}

/// Finds the RSDP: given by the loader, or by the legacy scan of 0xe0000-0xfffff.
fn find_rsdp(hint: u64) -> Option<u64> {
    let valid = |a: u64| rd::<[u8; 8]>(a) == *b"RSD PTR " && checksum_ok(a, 20);
    if hint != 0 {
        return valid(hint).then_some(hint);
    }
    (0xe0000u64..0x100000).step_by(16).find(|&a| valid(a))
}

/// Physical addresses of all tables listed by the XSDT (or RSDT).
fn tables(rsdp: u64) -> impl Iterator<Item = u64> {
    let revision: u8 = rd(rsdp + 15);
    let xsdt: u64 = if revision >= 2 { rd(rsdp + 24) } else { 0 };
    let (root, width) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (rd::<u32>(rsdp + 16) as u64, 4)
    };
    let ok = root != 0 && root < (1 << 32) && checksum_ok(root, rd::<u32>(root + 4) as u64);
    let count = if ok {
        (rd::<u32>(root + 4) as u64).saturating_sub(36) / width
    } else {
        0
    };
    (0..count).map(move |i| {
        let p = root + 36 + i * width;
        if width == 8 {
            rd::<u64>(p)
        } else {
            rd::<u32>(p) as u64
        }
    })
}

fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    tables(rsdp).find(|&t| {
        t != 0
            && t < (1 << 32)
            && rd::<[u8; 4]>(t) == *sig
            && checksum_ok(t, rd::<u32>(t + 4) as u64)
    })
}

fn gas(at: u64) -> Gas {
    Gas {
        space: rd(at),
        access: rd(at + 3),
        addr: rd(at + 4),
    }
}

impl AcpiInfo {
    /// Reads the tables reachable from the RSDP (`hint` from start_info, 0 = scan).
    pub fn parse(hint: u64) -> AcpiInfo {
        let mut info = AcpiInfo {
            cpus: None,
            ioapics: [IoApic::default(); MAX_IOAPICS],
            nioapics: 0,
            overrides: [Override::default(); MAX_OVERRIDES],
            noverrides: 0,
            poweroff: None,
            virtio: [Location {
                base: 0,
                size: 0,
                irq: 0,
                active_low: false,
            }; MAX_VIRTIO],
            nvirtio: 0,
        };
        let Some(rsdp) = find_rsdp(hint) else {
            return info;
        };
        if let Some(madt) = find_table(rsdp, b"APIC") {
            info.parse_madt(madt);
        }
        if let Some(fadt) = find_table(rsdp, b"FACP") {
            info.poweroff = parse_fadt(fadt);
            info.scan_dsdt(fadt);
        }
        info
    }

    fn parse_madt(&mut self, madt: u64) {
        let end = madt + rd::<u32>(madt + 4) as u64;
        let mut p = madt + 44;
        let mut cpus = 0;
        while p + 2 <= end {
            let (kind, len): (u8, u8) = (rd(p), rd(p + 1));
            if len < 2 {
                break;
            }
            match kind {
                0 if rd::<u32>(p + 4) & 1 != 0 => cpus += 1, // processor local APIC
                9 if rd::<u32>(p + 8) & 1 != 0 => cpus += 1, // processor local x2APIC
                1 if self.nioapics < MAX_IOAPICS => {
                    self.ioapics[self.nioapics] = IoApic {
                        addr: rd::<u32>(p + 4) as u64,
                        gsi_base: rd(p + 8),
                    };
                    self.nioapics += 1;
                }
                2 if self.noverrides < MAX_OVERRIDES => {
                    self.overrides[self.noverrides] = Override {
                        irq: rd(p + 3),
                        gsi: rd(p + 4),
                        flags: rd(p + 8),
                    };
                    self.noverrides += 1;
                }
                _ => {}
            }
            p += len as u64;
        }
        self.cpus = Some(cpus);
    }

    /// The IOAPIC serving `gsi` (QEMU microvm has a second one from GSI 24); without a
    /// MADT, the standard one at 0xfec00000.
    pub fn ioapic_for(&self, gsi: u32) -> IoApic {
        self.ioapics[..self.nioapics]
            .iter()
            .filter(|a| a.gsi_base <= gsi)
            .max_by_key(|a| a.gsi_base)
            .copied()
            .unwrap_or(IoApic {
                addr: 0xfec0_0000,
                gsi_base: 0,
            })
    }

    /// virtio-mmio devices the DSDT describes.
    pub fn virtio_mmio(&self) -> impl Iterator<Item = Location> + '_ {
        self.virtio[..self.nvirtio].iter().copied()
    }

    /// Finds virtio-mmio devices in the DSDT without an AML interpreter: each `LNRO0005`
    /// _HID string (QEMU microvm's `VRnn` devices, also used by Firecracker and ARM virt) is
    /// followed by its _CRS buffer, whose Memory32Fixed descriptor gives the window and whose
    /// Extended Interrupt (or IRQ) descriptor gives the GSI. The search for them stops at
    /// the next `LNRO0005`.
    fn scan_dsdt(&mut self, fadt: u64) {
        let flen = rd::<u32>(fadt + 4) as u64;
        let x_dsdt: u64 = if flen >= 148 { rd(fadt + 140) } else { 0 };
        let dsdt = if x_dsdt != 0 {
            x_dsdt
        } else {
            rd::<u32>(fadt + 40) as u64
        };
        if dsdt == 0 || dsdt >= (1 << 32) || rd::<[u8; 4]>(dsdt) != *b"DSDT" {
            return;
        }
        let len = rd::<u32>(dsdt + 4) as u64;
        if len > (1 << 20) || !checksum_ok(dsdt, len) {
            return;
        }
        let end = dsdt + len;
        let hid = *b"LNRO0005";
        let is_hid = |p: u64| p + 8 <= end && rd::<[u8; 8]>(p) == hid;
        let mut p = dsdt + 36;
        while p + 8 <= end && self.nvirtio < MAX_VIRTIO {
            if !is_hid(p) {
                p += 1;
                continue;
            }
            p += 8;
            let (mut window, mut irq) = (None, None);
            let mut q = p;
            while q + 4 <= end && !is_hid(q) && (window.is_none() || irq.is_none()) {
                match rd::<u8>(q) {
                    // Memory32Fixed: 0x86, length 9, info, base, length.
                    0x86 if q + 12 <= end && rd::<u16>(q + 1) == 9 && window.is_none() => {
                        window = Some((rd::<u32>(q + 4) as u64, rd::<u32>(q + 8) as u64));
                        q += 12;
                        continue;
                    }
                    // Extended Interrupt: 0x89, length, flags, count, GSIs (u32).
                    0x89 if q + 9 <= end
                        && rd::<u8>(q + 4) >= 1
                        && irq.is_none()
                        && window.is_some() =>
                    {
                        let flags: u8 = rd(q + 3);
                        irq = Some((rd::<u32>(q + 5), flags & 0x4 != 0));
                        q += 9;
                        continue;
                    }
                    // IRQ descriptor: 0x22/0x23, 16-bit mask (lowest set bit), [flags].
                    t @ (0x22 | 0x23)
                        if irq.is_none() && window.is_some() && rd::<u16>(q + 1) != 0 =>
                    {
                        let mask: u16 = rd(q + 1);
                        let low = t == 0x23 && rd::<u8>(q + 3) & 0x8 != 0;
                        irq = Some((mask.trailing_zeros(), low));
                        q += 3;
                        continue;
                    }
                    _ => {}
                }
                q += 1;
            }
            if let (Some((base, size)), Some((gsi, active_low))) = (window, irq) {
                self.virtio[self.nvirtio] = Location {
                    base,
                    size,
                    irq: gsi,
                    active_low,
                };
                self.nvirtio += 1;
            }
            p = q;
        }
    }

    /// The override for an ISA IRQ, if the MADT has one.
    pub fn isa_override(&self, irq: u8) -> Option<Override> {
        self.overrides[..self.noverrides]
            .iter()
            .copied()
            .find(|o| o.irq == irq)
    }
}

fn parse_fadt(fadt: u64) -> Option<PowerOff> {
    let len = rd::<u32>(fadt + 4) as u64;
    let flags: u32 = if len >= 116 { rd(fadt + 112) } else { 0 };
    if flags & (1 << 20) != 0 {
        // HW_REDUCED_ACPI
        return (len >= 256).then(|| PowerOff::SleepControl(gas(fadt + 244)));
    }
    let pm1 = |legacy: u64, extended: u64| {
        let x = if len >= extended + 12 {
            gas(fadt + extended)
        } else {
            Gas {
                space: 1,
                access: 2,
                addr: 0,
            }
        };
        if x.addr != 0 {
            return Some(x);
        }
        let port = rd::<u32>(fadt + legacy) as u64;
        (port != 0).then_some(Gas {
            space: 1,
            access: 2,
            addr: port,
        })
    };
    Some(PowerOff::Pm1Control(pm1(64, 172)?, pm1(68, 184)))
}

fn write_gas(g: Gas, value: u32) {
    match (g.space, g.access) {
        (1, 3 | 4) => arch::outl(g.addr as u16, value),
        (1, 2) => arch::outw(g.addr as u16, value as u16),
        (1, _) => arch::outb(g.addr as u16, value as u8),
        (0, _) if g.addr < (1 << 32) => {
            // SAFETY: the FADT names this MMIO register; it lies in the identity map.
            unsafe {
                match g.access {
                    2 => core::ptr::write_volatile(g.addr as *mut u16, value as u16),
                    3 | 4 => core::ptr::write_volatile(g.addr as *mut u32, value),
                    _ => core::ptr::write_volatile(g.addr as *mut u8, value as u8),
                }
            }
        }
        _ => {}
    }
}

/// Enters S5 (SLP_TYP = 5, as QEMU's GED and colovmm expect). Returns if that did nothing.
pub fn poweroff(how: Option<PowerOff>) {
    const SLP_TYP: u32 = 5;
    match how {
        Some(PowerOff::SleepControl(g)) => write_gas(g, (SLP_TYP << 2) | (1 << 5)),
        Some(PowerOff::Pm1Control(a, b)) => {
            let v = (SLP_TYP << 10) | (1 << 13);
            write_gas(a, v);
            if let Some(b) = b {
                write_gas(b, v);
            }
        }
        None => {}
    }
}
