//! The network stack: smoltcp (no_std + alloc) on top of the virtio-net driver, polled from
//! the BSP's event loop. `Net::poll` runs until there is nothing left to do (bounded), then
//! re-enables the device's interrupt and returns smoltcp's next deadline.
//!
//! Determinism (COLO compares two guests' packets byte for byte): the TCP initial sequence
//! numbers come from smoltcp's PRNG with a fixed seed, no TCP timestamps are sent, and the
//! services never emit times or random data — except `GET /uptime`, the deliberate
//! exception COLO's tests use to cause mismatches (see `services`).

mod services;

use crate::boot::BootInfo;
use crate::time;
use crate::virtio::net::{Frame, HDR, MAX_FRAME, NetDev};
use alloc::format;
use alloc::string::String;
use core::cell::RefCell;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, Device, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};

pub use services::Enabled;

/// Rounds of (receive, run services, transmit) per `poll` before returning to the event
/// loop (which then comes straight back), so the console stays responsive under load.
const MAX_ROUNDS: usize = 64;

/// The smoltcp device: the driver behind a RefCell, because smoltcp holds a receive and a
/// transmit token at the same time.
struct Phy {
    dev: RefCell<NetDev>,
}

struct RxToken<'a> {
    dev: &'a RefCell<NetDev>,
    frame: Frame,
}

struct TxToken<'a> {
    dev: &'a RefCell<NetDev>,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        match self.frame {
            Frame::InPlace { buf, len } => {
                // SAFETY: the buffer stays ours (not re-posted) until recycle below; the
                // driver bounded len by the buffer size.
                let bytes =
                    unsafe { core::slice::from_raw_parts((buf + HDR as u64) as *const u8, len) };
                let r = f(bytes);
                self.dev.borrow_mut().recycle(buf);
                r
            }
            Frame::Owned(v) => f(&v),
        }
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.dev.borrow_mut().send(len, f)
    }
}

impl Device for Phy {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let mut d = self.dev.borrow_mut();
        if !d.can_send() {
            return None; // leave the frame queued until we can answer it
        }
        let frame = d.receive()?;
        drop(d);
        Some((
            RxToken {
                dev: &self.dev,
                frame,
            },
            TxToken { dev: &self.dev },
        ))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        self.dev
            .borrow_mut()
            .can_send()
            .then_some(TxToken { dev: &self.dev })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// Microseconds since boot as a smoltcp instant.
fn instant(tsc: u64) -> Instant {
    let hz = time::tsc_hz() as u128;
    let ticks = tsc.saturating_sub(crate::arch::boot_tsc()) as u128;
    Instant::from_micros((ticks * 1_000_000 / hz) as i64)
}

/// Parses `a.b.c.d`.
fn parse_ipv4(s: &str) -> Option<Ipv4Address> {
    let mut o = [0u8; 4];
    let mut parts = s.split('.');
    for b in o.iter_mut() {
        *b = parts.next()?.parse().ok()?;
    }
    parts
        .next()
        .is_none()
        .then(|| Ipv4Address::new(o[0], o[1], o[2], o[3]))
}

/// Asks for the gateway's MAC once at start-up. smoltcp drops the packet that makes it
/// resolve a neighbour, and a peer that still knows our MAC from before a reboot would not
/// ARP for us (which also fills our cache), so without this the first reply after a reboot
/// would be lost. The reply is learnt by smoltcp's normal ARP handling.
fn arp_request(dev: &mut NetDev, ours: Ipv4Address, target: Ipv4Address) {
    if !dev.can_send() {
        return;
    }
    let mac = dev.mac;
    dev.send(60, |f| {
        f.fill(0);
        f[0..6].fill(0xff);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&[0x08, 0x06]); // ARP
        f[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&ours.octets());
        f[38..42].copy_from_slice(&target.octets());
    });
    dev.kick();
}

/// The interface, its sockets and the services on them.
pub struct Net {
    phy: Phy,
    iface: Interface,
    sockets: SocketSet<'static>,
    services: services::Services,
    cidr: IpCidr,
}

impl Net {
    /// Brings up the interface with `ip=`/`gw=`/`services=` from the command line.
    pub fn new(dev: NetDev, boot: &BootInfo) -> Net {
        let (mut addr, mut prefix) = (Ipv4Address::new(192, 168, 100, 2), 24u8);
        if let Some(v) = boot.cmdline_value("ip") {
            let (a, p) = v.split_once('/').unwrap_or((v, "24"));
            match (parse_ipv4(a), p.parse::<u8>()) {
                (Some(a), Ok(p)) if p <= 32 => (addr, prefix) = (a, p),
                _ => crate::println!("net: bad ip={v}, using {addr}/{prefix}"),
            }
        }
        let mut gw = Ipv4Address::new(192, 168, 100, 1);
        if let Some(v) = boot.cmdline_value("gw") {
            match parse_ipv4(v) {
                Some(a) => gw = a,
                None => crate::println!("net: bad gw={v}, using {gw}"),
            }
        }
        let enabled = Enabled::parse(boot.cmdline_value("services"));

        let mac = EthernetAddress(dev.mac);
        let mut phy = Phy {
            dev: RefCell::new(dev),
        };
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = 0x636f_6c6f_766d_6d00; // fixed: deterministic ISNs
        let mut iface = Interface::new(config, &mut phy, instant(time::now()));
        let cidr = IpCidr::new(IpAddress::Ipv4(addr), prefix);
        iface.update_ip_addrs(|a| {
            let _ = a.push(cidr);
        });
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
        let mut sockets = SocketSet::new(alloc::vec::Vec::new());
        let services = services::Services::new(&mut sockets, enabled);
        if cidr.contains_addr(&IpAddress::Ipv4(gw)) {
            arp_request(&mut phy.dev.borrow_mut(), addr, gw);
        }
        Net {
            phy,
            iface,
            sockets,
            services,
            cidr,
        }
    }

    /// Handles the device interrupt (if `irq`) and runs the stack and the services until
    /// idle. Returns the TSC deadline of the next timer-driven poll.
    pub fn poll(&mut self, irq: bool) -> Option<u64> {
        if irq {
            self.phy.dev.borrow_mut().ack_irq();
        }
        let mut rounds = 0;
        loop {
            let now = time::now();
            self.iface
                .poll(instant(now), &mut self.phy, &mut self.sockets);
            let progressed = self.services.run(&mut self.sockets);
            let mut d = self.phy.dev.borrow_mut();
            d.kick();
            rounds += 1;
            let busy = progressed || (d.rx_ready() && !d.tx_full()) || d.enable_irq();
            if !busy {
                break;
            }
            if rounds >= MAX_ROUNDS {
                return Some(now); // come back right after the event loop's other work
            }
        }
        let now = time::now();
        let delay = self.iface.poll_delay(instant(now), &self.sockets)?;
        let mut ticks = (delay.total_micros() as u128 * time::tsc_hz() as u128 / 1_000_000) as u64;
        if self.phy.dev.borrow().tx_full() {
            ticks = ticks.max(time::ms_to_tsc(1)); // the tx interrupt wakes us sooner
        }
        Some(now + ticks)
    }

    /// Counters for the `virtio` command.
    pub fn device_stats(&self) -> String {
        let d = self.phy.dev.borrow();
        format!(
            "net:{:#x}:kicks={}:irqs={}:rx={}:tx={}:dropped={}:bogus={}",
            d.base,
            d.kicks,
            d.irqs,
            d.rx_packets,
            d.tx_packets,
            d.rx_dropped,
            d.bogus()
        )
    }

    /// The `net` command's line.
    pub fn status(&self) -> String {
        let d = self.phy.dev.borrow();
        let m = d.mac;
        format!(
            "mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={} rx_packets={} tx_packets={}",
            m[0], m[1], m[2], m[3], m[4], m[5], self.cidr, d.rx_packets, d.tx_packets
        )
    }
}
