//! The host end of a guest NIC: a Linux tap device opened through `/dev/net/tun`.
//!
//! Every frame read from or written to the tap starts with a 12-byte `virtio_net_hdr_v1`
//! (`IFF_VNET_HDR` + `TUNSETVNETHDRSZ`), which is exactly the header a VERSION_1 virtio-net driver
//! uses, so frames cross between the guest and the tap without any header translation.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use libc::{c_char, c_int, c_short, c_ulong};

use super::tx::{gather, GuestSlice};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Size of the virtio-net header in front of every frame (`virtio_net_hdr_v1`, with num_buffers).
pub const VNET_HDR_LEN: usize = 12;

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUN_PATH: &str = "/dev/net/tun";

/// Most iovecs one `writev` takes (Linux's IOV_MAX).
const MAX_IOVECS: usize = 1024;

/// Errors opening or configuring a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name cannot be a Linux interface name.
    #[error("invalid tap name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    /// An ioctl on the tap or on the configuration socket failed.
    #[error("tap {name}: {what} failed: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// Which request.
        what: &'static str,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The AF_INET socket used to configure the host side could not be created.
    #[error("cannot create a socket to configure {name}: {source}")]
    Socket {
        /// The interface.
        name: String,
        /// Why.
        source: io::Error,
    },
}

/// What the net worker needs from its host end; a real [`Tap`] in production, a socketpair in tests.
///
/// I/O takes `&self` because it is plain `read(2)`/`write(2)` on a non-blocking fd.
pub trait TapIo: AsRawFd + Send + Sync {
    /// Reads one frame (vnet header included); `WouldBlock` when none is queued.
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (vnet header included); `WouldBlock` when the tap cannot take it now.
    fn write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Writes one frame lying in guest memory, in pieces, as [`TapIo::write`] does. The
    /// default copies it into one buffer first; a [`Tap`] hands the pieces to `writev`.
    fn write_guest(&self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        let mut frame = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
        let n = gather(bufs, &mut frame);
        self.write(&frame[..n])
    }
    /// Tells the tap which offloads the guest accepts (`TUN_F_*` bits) on frames it hands us.
    fn set_offload(&self, flags: u32) -> Result<(), TapError>;
}

/// One `writev` of guest memory pieces to `fd`; more pieces than the kernel takes in one call
/// (never a real tx chain) are copied into one buffer and handed to `write` instead.
fn writev_guest(
    fd: RawFd,
    bufs: &[GuestSlice<'_>],
    write: impl FnOnce(&[u8]) -> io::Result<usize>,
) -> io::Result<usize> {
    if bufs.len() > MAX_IOVECS {
        let mut frame = vec![0u8; bufs.iter().map(|b| b.len()).sum()];
        let n = gather(bufs, &mut frame);
        return write(&frame[..n]);
    }
    // The guards keep the mappings valid across the call (a no-op but for Xen grants).
    let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
    let iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        })
        .collect();
    // SAFETY: each iovec covers a VolatileSlice of guest memory, mapped for as long as `bufs`
    // borrows it (and pinned by `guards`); the kernel only reads from them, and the count is
    // at most MAX_IOVECS.
    let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as c_int) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize) // n >= 0 checked above
}

/// Checks `name` the way the kernel's `dev_valid_name` does, so mistakes fail with a clear message.
pub fn validate_name(name: &str) -> Result<(), TapError> {
    let bad = |why| {
        Err(TapError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("longer than 15 bytes");
    }
    if name.contains('\0') {
        return bad("contains a NUL byte");
    }
    if name == "." || name == ".." {
        return bad("reserved name");
    }
    if name
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return bad("contains '/', ':' or whitespace");
    }
    Ok(())
}

/// An all-zero `ifreq` carrying `name`.
fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a char array and a union of integers, sockaddrs and a
    // pointer); all-zero bytes is a valid value of every field.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // validate_name() guarantees at most 15 bytes, so the array keeps its terminating NUL.
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(MAX_NAME_LEN)) {
        *dst = src as c_char;
    }
    ifr
}

/// The name the kernel put back into `ifr` (it expands patterns such as `tap%d`).
fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// A sockaddr_in for `addr`, laid out in a generic sockaddr as the SIOCSIF* requests expect.
fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let mut sa = libc::sockaddr {
        sa_family: libc::AF_INET as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // sockaddr_in: 2 bytes of port, then the address in network order.
    for (dst, src) in sa.sa_data[2..6].iter_mut().zip(addr.octets()) {
        *dst = src as c_char;
    }
    sa
}

/// A tap interface in `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` mode, non-blocking.
///
/// Closing it (drop) deletes the interface unless it was made persistent beforehand (for example
/// by `ip tuntap add`).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates the tap `name` (or attaches to the existing one); `tap%d` picks a free name.
    pub fn open(name: &str) -> Result<Self, TapError> {
        validate_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut ifr = ifreq_for(name);
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short;
        // SAFETY: `file` is an open tun fd and `ifr` a valid ifreq that outlives the call;
        // TUNSETIFF reads the name and flags and writes the final name back into it.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as c_ulong, &mut ifr) };
        let mut tap = Self {
            file,
            name: name.to_string(),
        };
        tap.check(ret, "TUNSETIFF")?;
        tap.name = ifreq_name(&ifr);
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: valid tap fd; the kernel reads one int through the reference, which outlives
        // the call.
        let ret = unsafe { ioctl_with_ref(&tap.file, libc::TUNSETVNETHDRSZ as c_ulong, &hdr_len) };
        tap.check(ret, "TUNSETVNETHDRSZ")?;
        // Until a driver negotiates offloads, the tap must hand us plain, checksummed frames.
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// The interface name (after pattern expansion).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the interface outlives this fd (it was made persistent by someone else).
    pub fn is_persistent(&self) -> Result<bool, TapError> {
        let mut ifr = ifreq_for(&self.name);
        // SAFETY: valid tap fd; TUNGETIFF writes the name and flags into `ifr`, which outlives
        // the call.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, libc::TUNGETIFF as c_ulong, &mut ifr) };
        self.check(ret, "TUNGETIFF")?;
        // SAFETY: TUNGETIFF filled the flags member of the union.
        let flags = c_int::from(unsafe { ifr.ifr_ifru.ifru_flags });
        Ok(flags & libc::IFF_PERSIST != 0)
    }

    /// Gives the host side of the tap the IPv4 address `addr` with `netmask`.
    pub fn set_ipv4(&self, addr: Ipv4Addr, netmask: Ipv4Addr) -> Result<(), TapError> {
        let sock = self.config_socket()?;
        let mut ifr = ifreq_for(&self.name);
        ifr.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        // SAFETY: `sock` is an open AF_INET socket; the kernel reads the ifreq, which outlives
        // the call.
        let ret = unsafe { ioctl_with_ref(&sock, libc::SIOCSIFADDR as c_ulong, &ifr) };
        self.check(ret, "SIOCSIFADDR")?;
        ifr.ifr_ifru.ifru_netmask = sockaddr_v4(netmask);
        // SAFETY: as above.
        let ret = unsafe { ioctl_with_ref(&sock, libc::SIOCSIFNETMASK as c_ulong, &ifr) };
        self.check(ret, "SIOCSIFNETMASK")
    }

    /// Brings the interface up (IFF_UP), keeping its other flags.
    pub fn set_link_up(&self) -> Result<(), TapError> {
        let sock = self.config_socket()?;
        let mut ifr = ifreq_for(&self.name);
        // SAFETY: `sock` is an open AF_INET socket; SIOCGIFFLAGS writes the flags into `ifr`,
        // which outlives the call.
        let ret = unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS as c_ulong, &mut ifr) };
        self.check(ret, "SIOCGIFFLAGS")?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as c_short;
        // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
        let ret = unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS as c_ulong, &ifr) };
        self.check(ret, "SIOCSIFFLAGS")
    }

    fn config_socket(&self) -> Result<OwnedFd, TapError> {
        // SAFETY: plain socket(2) call with constant arguments; the result is checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(TapError::Socket {
                name: self.name.clone(),
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn check(&self, ret: c_int, what: &'static str) -> Result<(), TapError> {
        if ret < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

impl TapIo for Tap {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    fn write_guest(&self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        writev_guest(self.file.as_raw_fd(), bufs, |frame| self.write(frame))
    }

    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: valid tap fd; TUNSETOFFLOAD takes its argument by value.
        let ret = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as c_ulong,
                c_ulong::from(flags),
            )
        };
        self.check(ret, "TUNSETOFFLOAD")
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Tests stand a datagram socketpair in for the tap: one datagram per frame, like a tap.
#[cfg(test)]
impl TapIo for std::os::unix::net::UnixDatagram {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf)
    }

    /// The real tap's `writev` path: one datagram from several pieces.
    fn write_guest(&self, bufs: &[GuestSlice<'_>]) -> io::Result<usize> {
        writev_guest(self.as_raw_fd(), bufs, |frame| self.send(frame))
    }

    fn set_offload(&self, _flags: u32) -> Result<(), TapError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn name_validation() {
        assert!(validate_name("tap0").is_ok());
        assert!(validate_name("abcdefghijklmno").is_ok(), "15 bytes fit");
        assert!(validate_name("tap%d").is_ok(), "kernel pattern");
        for bad in [
            "",
            "abcdefghijklmnop",
            "ta\0p",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "ééééééééé",
        ] {
            assert!(
                matches!(validate_name(bad), Err(TapError::InvalidName { .. })),
                "{bad:?} accepted"
            );
        }
        assert!(matches!(
            Tap::open("much-too-long-name"),
            Err(TapError::InvalidName { .. })
        ));
    }

    /// Guest memory pieces leave as one frame, by `writev` or (past IOV_MAX) by one copy.
    #[test]
    fn guest_pieces_make_one_frame() {
        use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
        let mem = crate::GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let bytes: Vec<u8> = (0..4000u32).map(|i| (i % 253) as u8).collect();
        mem.write_slice(&bytes, GuestAddress(0x1000)).unwrap();
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut got = vec![0u8; 8192];
        for piece in [1000usize, 3] {
            let slices: Vec<GuestSlice<'_>> = (0..bytes.len())
                .step_by(piece)
                .map(|at| {
                    let len = piece.min(bytes.len() - at);
                    GuestMemoryBackend::get_slice(&mem, GuestAddress(0x1000 + at as u64), len)
                        .unwrap()
                })
                .collect();
            assert_eq!(slices.len() > MAX_IOVECS, piece == 3);
            assert_eq!(TapIo::write_guest(&a, &slices).unwrap(), bytes.len());
            let n = b.recv(&mut got).unwrap();
            assert_eq!(got[..n], bytes[..], "pieces of {piece}");
        }
    }

    #[test]
    fn ifreq_helpers() {
        let ifr = ifreq_for("vmtap7");
        assert_eq!(ifreq_name(&ifr), "vmtap7");
        let sa = sockaddr_v4(Ipv4Addr::new(192, 168, 7, 1));
        assert_eq!(sa.sa_family, libc::AF_INET as libc::sa_family_t);
        let bytes: Vec<u8> = sa.sa_data.iter().map(|&c| c as u8).collect();
        assert_eq!(&bytes[..6], &[0, 0, 192, 168, 7, 1]);
    }

    fn unique_name() -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        format!(
            "cvt{}x{}",
            std::process::id() % 1_000_000,
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Opens a fresh tap, or says why this machine cannot and returns None.
    fn try_open() -> Option<Tap> {
        let name = unique_name();
        match Tap::open(&name) {
            Ok(tap) => Some(tap),
            Err(e) => {
                println!("skipping: no usable /dev/net/tun here ({e})");
                None
            }
        }
    }

    fn wait_for(cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        cond()
    }

    #[test]
    fn real_tap_lifecycle() {
        let Some(tap) = try_open() else { return };
        let sys = Path::new("/sys/class/net").join(tap.name());
        assert!(sys.exists(), "{} missing", sys.display());
        assert!(!tap.is_persistent().unwrap());
        // A virtio-net driver's usual set: the kernel must accept it on a vnet-header tap.
        tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
            .unwrap();
        tap.set_offload(0).unwrap();
        // Nothing is queued on a fresh tap: non-blocking read says so instead of hanging.
        let mut buf = [0u8; 2048];
        let err = TapIo::read(&tap, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(tap);
        assert!(wait_for(|| !sys.exists()), "tap survived its fd");
    }

    #[test]
    fn real_tap_pattern_name() {
        let Some(probe) = try_open() else { return };
        drop(probe);
        let tap = Tap::open("cvtp%d").unwrap();
        assert!(tap.name().starts_with("cvtp") && !tap.name().contains('%'));
        assert!(Path::new("/sys/class/net").join(tap.name()).exists());
    }

    /// With an address and the link up, the host ARPs for a neighbour through the tap: the frame
    /// must arrive behind exactly 12 bytes of vnet header.
    #[test]
    fn real_tap_host_config_and_vnet_header() {
        let Some(tap) = try_open() else { return };
        // 198.18.0.0/15 is reserved for benchmarking: no real route on the host to shadow.
        let pid = std::process::id();
        let host = Ipv4Addr::new(198, 18 + (pid % 2) as u8, (pid / 2 % 250) as u8, 1);
        let o = host.octets();
        let peer = Ipv4Addr::new(o[0], o[1], o[2], 2);
        if let Err(e) = tap.set_ipv4(host, Ipv4Addr::new(255, 255, 255, 0)) {
            println!("skipping: cannot configure an address here ({e})");
            return;
        }
        tap.set_link_up().unwrap();
        let flags =
            std::fs::read_to_string(Path::new("/sys/class/net").join(tap.name()).join("flags"))
                .unwrap();
        let flags = u32::from_str_radix(flags.trim().trim_start_matches("0x"), 16).unwrap();
        assert_ne!(flags & libc::IFF_UP as u32, 0, "link not up");

        let sock = std::net::UdpSocket::bind((host, 0)).unwrap();
        let mut buf = vec![0u8; 65562];
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            // Resend: the first attempt may race with the link coming up.
            let _ = sock.send_to(b"ping", (peer, 9));
            std::thread::sleep(Duration::from_millis(20));
            while let Ok(n) = TapIo::read(&tap, &mut buf) {
                let frame = &buf[VNET_HDR_LEN..n];
                // ARP request for the peer: ethertype 0x0806, target IP at bytes 38..42.
                if frame.len() >= 42
                    && frame[12..14] == [0x08, 0x06]
                    && frame[38..42] == peer.octets()
                {
                    return;
                }
            }
        }
        panic!("no ARP request for {peer} came out of the tap");
    }
}
