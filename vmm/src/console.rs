//! Connects COM1 to the user: output sink, and an input pump from stdin or a Unix socket.

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
}

/// How console input will reach the guest once the VM runs.
pub enum ConsoleInput {
    /// No input.
    None,
    /// colovmm's stdin.
    Stdin,
    /// Clients of this listener (one at a time); `client` is shared with the output side.
    Socket {
        /// The bound socket.
        listener: UnixListener,
        /// The connected client, if any.
        client: Arc<Mutex<Option<UnixStream>>>,
    },
}

/// Builds the output sink and the pending input side for `config`.
pub fn open_console(config: &SerialConfig) -> Result<(SerialOutput, ConsoleInput), ConsoleError> {
    match config {
        SerialConfig::Tty => Ok((SerialOutput::Stdout(io::stdout()), ConsoleInput::Stdin)),
        SerialConfig::Off => Ok((SerialOutput::Sink, ConsoleInput::None)),
        SerialConfig::File(path) => {
            let f = File::create(path).map_err(|source| ConsoleError::File {
                path: path.display().to_string(),
                source,
            })?;
            Ok((SerialOutput::File(f), ConsoleInput::None))
        }
        SerialConfig::Socket(path) => {
            let listener = bind_socket(path).map_err(|source| ConsoleError::Socket {
                path: path.display().to_string(),
                source,
            })?;
            let client = Arc::new(Mutex::new(None));
            Ok((
                SerialOutput::Socket(client.clone()),
                ConsoleInput::Socket { listener, client },
            ))
        }
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

/// Feeds bytes into the UART, waiting while its receive FIFO is full.
fn feed(serial: &Mutex<SerialPort>, mut bytes: &[u8]) {
    while !bytes.is_empty() {
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

fn pump(mut src: impl Read, serial: &Mutex<SerialPort>) {
    let mut buf = [0u8; 256];
    loop {
        match src.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => feed(serial, &buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Starts the input thread (if any). It ends at EOF; the VM does not depend on it.
pub fn start_input(input: ConsoleInput, serial: Arc<Mutex<SerialPort>>) -> io::Result<()> {
    let builder = std::thread::Builder::new().name("console".into());
    match input {
        ConsoleInput::None => {}
        ConsoleInput::Stdin => {
            let raw = RawTerminal::enter();
            builder.spawn(move || {
                let _raw = raw;
                pump(io::stdin().lock(), &serial);
            })?;
        }
        ConsoleInput::Socket { listener, client } => {
            builder.spawn(move || {
                for stream in listener.incoming().flatten() {
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    if let Ok(mut c) = client.lock() {
                        *c = Some(stream);
                    }
                    pump(reader, &serial);
                }
            })?;
        }
    }
    Ok(())
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
