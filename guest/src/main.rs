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
mod smp;
mod sync;
mod time;

use acpi::AcpiInfo;
use boot::BootInfo;
use console::{Input, LineReader, COM1};
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
}

/// Ring-3 entry for every CPU (called from entry.s with the CPU index and, on the BSP,
/// the physical address of hvm_start_info).
#[unsafe(no_mangle)]
extern "C" fn rust_entry(cpu: usize, start_info: u32) -> ! {
    if cpu == 0 { bsp_main(start_info as u64) } else { smp::ap_main(cpu) }
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
    let expected = acpi.cpus.or_else(|| boot.cmdline_value("cpus")?.parse().ok()).unwrap_or(1);
    smp::start_aps(expected);
    time::calibration_end(calibration);

    COM1.enable_rx_irq();
    let serial = irqs.route_isa(&acpi, 4);
    println!("TESTGUEST READY cpus={} mem_mib={}", smp::online(), boot.ram_mib());

    let mut guest = Guest {
        boot,
        acpi,
        layout,
        dirty: commands::Dirtier::new(),
        counter: commands::Counter::new(),
    };
    event_loop(&mut guest, serial.bit)
}

/// Poll everything that may have work, arm the timer for the earliest deadline, halt.
fn event_loop(g: &mut Guest, serial_bit: u64) -> ! {
    let mut reader = LineReader::new();
    let mut alarm = time::Alarm::new();
    let mut pending = serial_bit; // poll the UART once: input may predate the IRQ routing
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
        let now = time::now();
        let next = [g.counter.poll(now), g.dirty.poll(now)].into_iter().flatten().min();
        alarm.set(next, pending);
        arch::halt();
        pending = interrupts::take_pending(0);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC {info}");
    arch::crash()
}
