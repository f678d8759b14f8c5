//! colovmm test guest: a PVH kernel whose ring-0 part is a small asm stub and whose
//! everything else runs here, in ring 3 (natively under kvm_pvm). See README.md.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod boot;
mod commands;
mod console;
mod interrupts;
mod memory;
mod net;
mod smp;
mod sync;
mod time;
mod virtio;

use acpi::AcpiInfo;
use alloc::vec::Vec;
use boot::BootInfo;
use console::{COM1, Input, LineReader};
use interrupts::IrqRouter;
use memory::MemoryLayout;

/// State the BSP's event loop and commands share.
pub struct Guest {
    /// Loader-provided memory map and command line.
    pub boot: BootInfo,
    /// Facts from the ACPI tables.
    pub acpi: AcpiInfo,
    /// Heap and workload placement.
    pub layout: MemoryLayout,
    /// The `dirty` workload.
    pub dirty: commands::Dirtier,
    /// The `count` ticker.
    pub counter: commands::Counter,
    /// virtio-blk devices, in discovery order.
    pub disks: Vec<commands::Disk>,
    /// The network stack, if there is a virtio-net device.
    pub net: Option<net::Net>,
    /// Pending bit of the network device's interrupt (0 if none).
    pub net_irq: u64,
    /// The LAPIC one-shot timer, shared by the event loop and nested waits.
    pub alarm: time::Alarm,
}

/// Ring-3 entry for every CPU (called from entry.s with the CPU index and, on the BSP,
/// the physical address of hvm_start_info).
#[unsafe(no_mangle)]
extern "C" fn rust_entry(cpu: usize, start_info: u32) -> ! {
    if cpu == 0 {
        bsp_main(start_info as u64)
    } else {
        smp::ap_main(cpu)
    }
}

fn bsp_main(start_info: u64) -> ! {
    arch::init_idt();
    // Copy out everything the loader left in memory before anything can overwrite it.
    let boot = BootInfo::parse(start_info);
    let acpi = AcpiInfo::parse(boot.rsdp);
    let layout = memory::init(&boot);
    let mut irqs = IrqRouter::init_bsp();

    // Calibrate the TSC over a window that also covers AP start-up.
    let calibration = time::calibration_begin();
    let expected = acpi
        .cpus
        .or_else(|| boot.cmdline_value("cpus")?.parse().ok())
        .unwrap_or(1);
    smp::start_aps(expected);
    time::calibration_end(calibration);

    COM1.enable_rx_irq();
    let serial = irqs.route_isa(&acpi, 4);
    let (disks, net, net_irq) = start_virtio(&boot, &acpi, &mut irqs);
    println!(
        "TESTGUEST READY cpus={} mem_mib={}",
        smp::online(),
        boot.ram_mib()
    );

    let mut guest = Guest {
        boot,
        acpi,
        layout,
        dirty: commands::Dirtier::new(),
        counter: commands::Counter::new(),
        disks,
        net,
        net_irq,
        alarm: time::Alarm::new(),
    };
    event_loop(&mut guest, serial.bit)
}

/// Finds and initialises the virtio-mmio devices; problems are reported on the console
/// (before READY) and the device is left alone.
fn start_virtio(
    boot: &BootInfo,
    acpi: &AcpiInfo,
    irqs: &mut IrqRouter,
) -> (Vec<commands::Disk>, Option<net::Net>, u64) {
    let (mut disks, mut net, mut net_irq) = (Vec::new(), None, 0);
    for loc in virtio::discover(boot, acpi) {
        let dev = match virtio::probe(loc) {
            Ok(Some(dev)) => dev,
            Ok(None) => continue,
            Err(msg) => {
                println!("{msg}");
                continue;
            }
        };
        // Route first: an interrupt raised during set-up then sets our pending bit, and the
        // event loop acknowledges it (an edge-routed line left asserted would never fire again).
        match dev.id {
            virtio::ID_BLK => {
                let irq = irqs.route_gsi(acpi, loc.irq, loc.active_low);
                match virtio::blk::Blk::init(&dev) {
                    Ok(blk) => disks.push(commands::Disk::new(blk, irq.bit)),
                    Err(e) => println!("virtio: {:#x} blk: {e}", loc.base),
                }
            }
            virtio::ID_NET if net.is_none() => {
                let irq = irqs.route_gsi(acpi, loc.irq, loc.active_low);
                match virtio::net::NetDev::init(&dev) {
                    Ok(nd) => {
                        net = Some(net::Net::new(nd, boot));
                        net_irq = irq.bit;
                    }
                    Err(e) => println!("virtio: {:#x} net: {e}", loc.base),
                }
            }
            id => println!(
                "virtio: {:#x} device id={id} has no driver here, ignored",
                loc.base
            ),
        }
    }
    (disks, net, net_irq)
}

/// Poll everything that may have work, arm the timer for the earliest deadline, halt.
fn event_loop(g: &mut Guest, serial_bit: u64) -> ! {
    let mut reader = LineReader::new();
    let mut pending = serial_bit; // poll the UART once: input may predate the IRQ routing
    let disk_bits: u64 = g.disks.iter().map(|d| d.irq).fold(0, |a, b| a | b);
    pending |= disk_bits | g.net_irq; // acknowledge anything raised during set-up
    loop {
        if pending & serial_bit != 0 {
            while let Some(b) = COM1.read_byte() {
                match reader.push(b) {
                    Input::None => {}
                    Input::Line(line) => commands::run(g, line),
                    Input::Bad(reason) => println!("error {reason}"),
                }
            }
        }
        if pending & disk_bits != 0 {
            // Nothing is in flight outside disk commands; just drop the line.
            for d in g.disks.iter_mut().filter(|d| pending & d.irq != 0) {
                d.blk.ack_irq();
            }
        }
        let net_next = match g.net.as_mut() {
            Some(n) => n.poll(pending & g.net_irq != 0),
            None => None,
        };
        let now = time::now();
        let next = [g.counter.poll(now), g.dirty.poll(now), net_next]
            .into_iter()
            .flatten()
            .min();
        g.alarm.set(next, pending);
        pending = interrupts::take_deferred();
        if pending == 0 {
            arch::halt();
        }
        pending |= interrupts::take_pending(0) | interrupts::take_deferred();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC {info}");
    arch::crash()
}
