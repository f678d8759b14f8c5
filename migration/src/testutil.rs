//! Test helpers: guest memory in plain vectors, and transports that fail on cue.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use super::memory::{AccessError, GuestMemoryReader, GuestMemoryWriter};
use super::ranges::{MemRange, MemoryLayout};
use super::transport::Transport;

/// Guest memory as one vector per region of a layout.
pub struct VecMemory {
    regions: Vec<(MemRange, Mutex<Vec<u8>>)>,
}

impl VecMemory {
    /// Zeroed memory for `layout`.
    pub fn new(layout: &MemoryLayout) -> Self {
        VecMemory {
            regions: layout
                .regions()
                .iter()
                .map(|r| (*r, Mutex::new(vec![0u8; r.len as usize])))
                .collect(),
        }
    }

    /// Memory filled with a pattern that differs per page, with every `zero_every`-th page
    /// left zero.
    pub fn patterned(layout: &MemoryLayout, seed: u64, zero_every: u64) -> Self {
        let m = Self::new(layout);
        for (r, v) in &m.regions {
            let mut v = v.lock().unwrap();
            for (i, page) in v.chunks_mut(4096).enumerate() {
                let pageno = r.gpa / 4096 + i as u64;
                if zero_every != 0 && pageno.is_multiple_of(zero_every) {
                    continue;
                }
                let mut x = pageno.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed;
                for chunk in page.chunks_mut(8) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
                }
            }
        }
        m
    }

    /// All regions' contents, concatenated.
    pub fn snapshot(&self) -> Vec<u8> {
        self.regions
            .iter()
            .flat_map(|(_, v)| v.lock().unwrap().clone())
            .collect()
    }

    fn locate(&self, gpa: u64, len: usize) -> Result<(usize, usize), AccessError> {
        for (i, (r, _)) in self.regions.iter().enumerate() {
            if gpa >= r.gpa && gpa + len as u64 <= r.gpa + r.len {
                return Ok((i, (gpa - r.gpa) as usize));
            }
        }
        Err(format!("{gpa:#x}+{len:#x} is not in memory").into())
    }
}

impl GuestMemoryReader for VecMemory {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let (i, off) = self.locate(gpa, buf.len())?;
        let v = self.regions[i].1.lock().unwrap();
        buf.copy_from_slice(&v[off..off + buf.len()]);
        Ok(())
    }
}

impl GuestMemoryWriter for VecMemory {
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), AccessError> {
        let (i, off) = self.locate(gpa, data.len())?;
        let mut v = self.regions[i].1.lock().unwrap();
        v[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// What a [`Faulty`] transport does once `after` bytes have been written through it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Shut the stream down and fail the write: a connection that dies.
    Kill,
    /// Pretend to write but send nothing: a connection that hangs.
    Hang,
}

/// A transport that breaks after a number of bytes written.
pub struct Faulty<T> {
    /// The real stream.
    pub inner: T,
    /// Bytes written through so far (shared with clones made for shutdown).
    pub written: std::sync::Arc<AtomicU64>,
    /// Bytes after which the fault strikes.
    pub after: u64,
    /// What happens then.
    pub fault: Fault,
}

impl<T: Transport> Faulty<T> {
    /// `inner`, breaking with `fault` after `after` bytes.
    pub fn new(inner: T, after: u64, fault: Fault) -> Self {
        Faulty {
            inner,
            written: Default::default(),
            after,
            fault,
        }
    }
}

impl<T: Transport> Read for Faulty<T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<T: Transport> Write for Faulty<T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let done = self.written.load(Ordering::Relaxed);
        if done >= self.after {
            return match self.fault {
                Fault::Kill => {
                    let _ = self.inner.shutdown(Shutdown::Both);
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        "killed by test",
                    ))
                }
                Fault::Hang => Ok(buf.len()),
            };
        }
        let n = buf.len().min((self.after - done) as usize);
        let n = self.inner.write(&buf[..n])?;
        self.written.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Transport + 'static> Transport for Faulty<T> {
    fn set_io_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.inner.set_io_timeout(timeout)
    }

    fn try_clone_transport(&self) -> io::Result<Box<dyn Transport>> {
        self.inner.try_clone_transport()
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.inner.shutdown(how)
    }
}
