//! Connects COM1 to the user: an output sink and an input pump (stdin or a Unix socket) that
//! live as long as the VMM, so a VM rebooted through the API keeps the same console.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{SerialOutput, SerialPort};

use crate::config::SerialConfig;

/// Errors connecting the console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be created.
    #[error("cannot create serial output file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The socket could not be bound.
    #[error("cannot listen on serial socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The input thread could not start, or an output handle could not be duplicated.
    #[error("console: {0}")]
    Io(#[from] io::Error),
}

/// The UART that currently receives console input (none between VMs).
type InputTarget = Arc<Mutex<Option<Arc<Mutex<SerialPort>>>>>;

/// The user's side of COM1.
pub struct Console {
    output: SerialOutput,
    target: InputTarget,
    _raw: Option<RawTerminal>,
}

impl Console {
    /// Opens the sink and starts the input thread for `config`.
    pub fn open(config: &SerialConfig) -> Result<Self, ConsoleError> {
        let target: InputTarget = Arc::new(Mutex::new(None));
        let builder = std::thread::Builder::new().name("console".into());
        let (output, raw) = match config {
            SerialConfig::Tty => {
                let raw = RawTerminal::enter();
                let t = target.clone();
                builder.spawn(move || pump(io::stdin().lock(), &t))?;
                (SerialOutput::Stdout(io::stdout()), Some(raw))
            }
            SerialConfig::Off => (SerialOutput::Sink, None),
            SerialConfig::File(path) => {
                let f = File::create(path).map_err(|source| ConsoleError::File {
                    path: path.display().to_string(),
                    source,
                })?;
                (SerialOutput::File(f), None)
            }
            SerialConfig::Socket(path) => {
                let listener = bind_socket(path).map_err(|source| ConsoleError::Socket {
                    path: path.display().to_string(),
                    source,
                })?;
                let client = Arc::new(Mutex::new(None));
                let (c, t) = (client.clone(), target.clone());
                builder.spawn(move || serve_socket(listener, c, t))?;
                (SerialOutput::Socket(client), None)
            }
        };
        Ok(Self {
            output,
            target,
            _raw: raw,
        })
    }

    /// A handle on the output sink for a new UART.
    pub fn output(&self) -> Result<SerialOutput, ConsoleError> {
        Ok(self.output.try_clone()?)
    }

    /// Sends console input to `serial` from now on.
    pub fn attach(&self, serial: Arc<Mutex<SerialPort>>) {
        if let Ok(mut t) = self.target.lock() {
            *t = Some(serial);
        }
    }

    /// Stops sending input anywhere (the VM is gone); input waits for the next VM.
    pub fn detach(&self) {
        if let Ok(mut t) = self.target.lock() {
            *t = None;
        }
    }
}

fn serve_socket(
    listener: UnixListener,
    client: Arc<Mutex<Option<UnixStream>>>,
    target: InputTarget,
) {
    for stream in listener.incoming().flatten() {
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        if let Ok(mut c) = client.lock() {
            *c = Some(stream);
        }
        pump(reader, &target);
    }
}

fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    // A stale socket from a previous run would make bind fail; only remove sockets.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        }
    }
    UnixListener::bind(path)
}

/// Feeds bytes into the current UART, waiting while its receive FIFO is full.
fn feed(target: &InputTarget, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let serial = match target.lock() {
            Ok(t) => t.clone(),
            Err(_) => return,
        };
        // No VM yet (or between VMs): hold the input until one attaches.
        let Some(serial) = serial else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let taken = match serial.lock() {
            Ok(mut s) => s.enqueue_input(bytes),
            Err(_) => return,
        };
        bytes = &bytes[taken..];
        if taken == 0 {
            // The guest has not drained its FIFO yet.
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn pump(mut src: impl Read, target: &InputTarget) {
    let mut buf = [0u8; 256];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => feed(target, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Puts an interactive stdin in raw mode (keeping Ctrl-C) and restores it on drop or exit.
pub struct RawTerminal {
    saved: Option<libc::termios>,
}

static SAVED_TERMIOS: Mutex<Option<libc::termios>> = Mutex::new(None);

impl RawTerminal {
    /// Enters raw mode if stdin is a terminal; otherwise does nothing.
    pub fn enter() -> Self {
        let fd = io::stdin().as_raw_fd();
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Self { saved: None };
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `t` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
            return Self { saved: None };
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut t) };
        t.c_lflag |= libc::ISIG;
        t.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: fd is a terminal; `t` is a fully initialised termios.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) };
        if let Ok(mut s) = SAVED_TERMIOS.lock() {
            *s = Some(saved);
        }
        Self { saved: Some(saved) }
    }
}

/// Restores the terminal saved by [`RawTerminal::enter`], if any (used before `exit`).
pub fn restore_terminal() {
    if let Ok(mut s) = SAVED_TERMIOS.lock() {
        if let Some(t) = s.take() {
            // SAFETY: restoring attributes read earlier from the same terminal.
            unsafe { libc::tcsetattr(io::stdin().as_raw_fd(), libc::TCSANOW, &t) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if self.saved.is_some() {
            restore_terminal();
        }
    }
}
