//! ACPI tables (RSDP → XSDT → FADT, MADT; FADT → DSDT) for a hardware-reduced x86 platform.
//!
//! Stock kernels find their CPUs (MADT), how to power off (FADT sleep register + `_S5_`) and,
//! later, virtio-mmio devices (DSDT) here.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use devices::acpi_power::{ACPI_SLEEP_PORT, RESET_VALUE, S5_SLEEP_TYPE};
use devices::legacy::serial::{COM1_BASE, COM1_IRQ, COM1_LEN};

use crate::layout::{ACPI_MAX_SIZE, ACPI_START, IOAPIC_START, LAPIC_START};
use crate::memory::GuestMemory;
use crate::virtio_devices::VirtioSlot;

const OEM_ID: [u8; 6] = *b"COLOVM";
const OEM_TABLE_ID: [u8; 8] = *b"COLOVMM ";
const OEM_REVISION: u32 = 1;

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables did not fit the reserved area.
    #[error("ACPI tables need {0} bytes, more than the {ACPI_MAX_SIZE} reserved")]
    TooLarge(u64),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn virtio_device_aml(index: usize, slot: &VirtioSlot, body: &mut Vec<u8>) {
    // LNRO0005 is the virtio-mmio _HID Linux's ACPI probe knows (QEMU microvm uses it too).
    let mem = aml::Memory32Fixed::new(true, slot.base as u32, slot.size as u32);
    let irq = aml::Interrupt::new(true, true, false, false, slot.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let uid = index;
    aml::Device::new(
        format!("_SB_.V{index:03X}").as_str().into(),
        vec![
            &aml::Name::new("_HID".into(), &"LNRO0005"),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CCA".into(), &aml::ONE),
            &aml::Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(body);
}

fn dsdt(virtio: &[VirtioSlot]) -> Sdt {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let mut body = Vec::new();
    // S5 with SLP_TYP 5: the value our sleep-control register turns into a power-off.
    let s5_type = S5_SLEEP_TYPE as usize;
    aml::Name::new("_S5_".into(), &aml::Package::new(vec![&s5_type])).to_aml_bytes(&mut body);
    let com1_io = aml::IO::new(COM1_BASE, COM1_BASE, 1, COM1_LEN as u8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let uid = 0usize;
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &uid),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, slot) in virtio.iter().enumerate() {
        virtio_device_aml(i, slot, &mut body);
    }
    dsdt.append_slice(&body);
    dsdt
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let sleep_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_PORT.into(),
    );
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = sleep_reg;
    fadt.sleep_status_reg = sleep_reg;
    fadt.reset_reg = sleep_reg;
    fadt.reset_value = RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"COLOVMM\0").into();
    let mut bytes = Vec::new();
    fadt.finalize().to_aml_bytes(&mut bytes);
    bytes
}

fn madt(vcpus: u8) -> Sdt {
    const LOCAL_APIC: u8 = 0;
    const IO_APIC: u8 = 1;
    const INT_SRC_OVERRIDE: u8 = 2;
    const LOCAL_APIC_NMI: u8 = 4;
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    for id in 0..vcpus {
        // uid, APIC id, flags = enabled
        madt.append_slice(&[LOCAL_APIC, 8, id, id, 1, 0, 0, 0]);
    }
    let mut ioapic = vec![IO_APIC, 12, vcpus, 0];
    ioapic.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    madt.append_slice(&ioapic);
    // ISA IRQ 0 (PIT) arrives on IOAPIC pin 2, as on every PC.
    let mut iso = vec![INT_SRC_OVERRIDE, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);
    // NMI on LINT1 of every processor (uid 0xff).
    madt.append_slice(&[LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1]);
    madt
}

/// Writes the tables for `vcpus` processors and the virtio devices; returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemory,
    vcpus: u8,
    virtio: &[VirtioSlot],
) -> Result<GuestAddress, AcpiError> {
    let rsdp_addr = ACPI_START;
    let mut next = rsdp_addr.0 + Rsdp::len() as u64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let addr = next.next_multiple_of(8);
        next = addr + bytes.len() as u64;
        if next - ACPI_START.0 > ACPI_MAX_SIZE {
            return Err(AcpiError::TooLarge(next - ACPI_START.0));
        }
        mem.write_slice(bytes, GuestAddress(addr))?;
        Ok(addr)
    };

    let dsdt_addr = place(dsdt(virtio).as_slice())?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(madt(vcpus).as_slice())?;

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(&xsdt_bytes)?;

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    mem.write_slice(&rsdp, rsdp_addr)?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;

    fn read_table(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let len: u32 = mem.read_obj(GuestAddress(addr + 4)).unwrap();
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        assert_eq!(
            buf.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum"
        );
        buf
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = create_guest_memory(64 << 20).unwrap();
        let slot = VirtioSlot {
            base: 0xd000_0000,
            size: 0x1000,
            irq: 5,
        };
        let rsdp = create_acpi_tables(&mem, 3, &[slot, slot]).unwrap();
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, rsdp).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let xsdt_addr: u64 = mem.read_obj(GuestAddress(rsdp.0 + 24)).unwrap();
        let xsdt = read_table(&mem, xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = xsdt[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let sigs: Vec<Vec<u8>> = entries
            .iter()
            .map(|a| read_table(&mem, *a)[..4].to_vec())
            .collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);

        let madt = read_table(&mem, entries[1]);
        // Walk MADT structures and count enabled local APICs.
        let (mut off, mut cpus) = (44usize, 0);
        while off < madt.len() {
            if madt[off] == 0 && madt[off + 4] & 1 == 1 {
                cpus += 1;
            }
            off += madt[off + 1] as usize;
        }
        assert_eq!(cpus, 3);

        let fadt = read_table(&mem, entries[0]);
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = read_table(&mem, x_dsdt);
        assert_eq!(&dsdt[..4], b"DSDT");
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        let virtio = dsdt.windows(8).filter(|w| w == b"LNRO0005").count();
        assert_eq!(virtio, 2);
    }
}
