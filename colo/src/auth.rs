//! Mutual authentication of the connections between a primary and a secondary with a
//! pre-shared key, and per-frame MACs for the channels that carry frames (the network proxy).
//!
//! Both hosts are given the same key ([`Psk`]: a hex key or a passphrase, usually from a
//! mode-0600 file). Right after connect (primary) or accept (secondary), before anything else
//! is sent on a connection, both ends run [`authenticate`]: each proves it knows the key for
//! *this* connection, checks the other's proof in constant time, and both derive a per-connection
//! [`SessionKey`]. A peer without the key, a second primary, a peer of another version or a
//! recorded handshake replayed later is refused with an [`AuthError`] that says which.
//!
//! # Wire format (version 2)
//!
//! Integers little-endian. Each side sends a **hello** and then, once it has read and checked
//! the peer's hello, a **proof**; both sides send at the same time (the messages are small
//! enough for the socket buffers, so neither waits for the other to read).
//!
//! Hello, 46 to 77 bytes:
//!
//! | offset | size | field | rule |
//! | --- | --- | --- | --- |
//! | 0 | 8 | magic | `COLOAUTH` |
//! | 8 | 2 | version | `2`; any other is refused (checked before the rest is read) |
//! | 10 | 1 | role | 1 primary, 2 secondary; must be the opposite of the reader's |
//! | 11 | 1 | flags | must be 0 |
//! | 12 | 32 | nonce | fresh random bytes for every handshake |
//! | 44 | 1 | purpose_len | 1 to 32, checked before the purpose is read |
//! | 45 | purpose_len | purpose | `[a-z0-9.-]`, what the connection is for (`heartbeat`, `checkpoint`, `proxy`); must equal the reader's |
//!
//! Proof, 32 bytes: `HMAC-SHA256(K, "colovmm-auth/1 proof\0" || role || H_p || H_s)`, where
//! `role` is the prover's role byte and `H_p`, `H_s` are the primary's and the secondary's
//! hello exactly as sent (the transcript: both nonces, both roles, the purpose, the version).
//! `K` is the key: `SHA-256("colovmm-psk/1\0" || kind || material)`, `kind` `h` for a hex key
//! (material = the decoded bytes) or `p` for a passphrase (material = its UTF-8 bytes).
//!
//! Session keys, one per direction: `HMAC-SHA256(K, "colovmm-auth/1 frame\0" || role || H_p ||
//! H_s)` for the frames sent by `role`. A frame MAC is `BLAKE3-keyed(direction key, seq u64 ||
//! payload)` (BLAKE3's keyed hash, 32 bytes), `seq` counting the frames of one direction from
//! 0: a PRF as HMAC-SHA-256 is, at several times its speed on the disk channel's bulk data.
//!
//! Nothing is allocated from a length the peer sent: a handshake reads at most
//! [`MAX_PEER_BYTES`] bytes into buffers on the stack, and the whole of it is bounded by a
//! deadline ([`HANDSHAKE_TIMEOUT`]) on top of the socket's own read and write timeouts. A side
//! that refuses the peer closes the connection without saying why (the peer, if it is a
//! colovmm, finds the same fault in most cases: a wrong key, two primaries and a purpose
//! mismatch are seen by both ends).
//!
//! # What it protects against
//!
//! - **No key, wrong key**: the proof does not verify; the peer never sees our proof unless its
//!   hello was well formed, and a proof is only good for one transcript.
//! - **Replay**: both nonces are fresh for every handshake, so a recorded hello and proof do not
//!   verify against either side's new nonce (tested below). Within a connection, frame MACs
//!   cover the sequence number: a replayed, dropped or reordered frame fails.
//! - **Reflection**: proofs and frame keys are bound to the sender's role, so a side's own proof
//!   or frame sent back to it does not verify; a hello with our own nonce is refused.
//! - **Splicing connections of another purpose**: the purpose is in the transcript.
//!
//! Not covered: confidentiality (nothing is encrypted), and an active man-in-the-middle that
//! relays a genuine handshake and then alters the bytes of a connection that carries no frame
//! MACs (the checkpoint streams are protected against that only by their CRCs). A passphrase is
//! only as strong as its guessability: an eavesdropper who records a handshake can test guesses
//! offline, so prefer a random hex key (`openssl rand -hex 32`).

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

pub use crate::status::Role as Side;

/// The handshake's magic.
pub const MAGIC: [u8; 8] = *b"COLOAUTH";
/// The handshake's version: 2 since frame MACs are keyed BLAKE3 (1: HMAC-SHA-256), so a peer
/// of the other kind is told at once rather than failing its first frame.
pub const VERSION: u16 = 2;
/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Longest purpose label.
pub const MAX_PURPOSE_LEN: usize = 32;
/// Bytes of a proof (HMAC-SHA256) and of a frame MAC (keyed BLAKE3).
pub const TAG_LEN: usize = 32;
/// Bytes of a hello before the purpose.
const HELLO_FIXED_LEN: usize = 45;
/// Longest hello.
pub const MAX_HELLO_LEN: usize = HELLO_FIXED_LEN + MAX_PURPOSE_LEN;
/// The most a handshake reads from the peer.
pub const MAX_PEER_BYTES: usize = MAX_HELLO_LEN + TAG_LEN;
/// Bound on a whole handshake (each read and write is also bounded by the socket's timeout).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Fewest bytes of a hex key.
pub const MIN_KEY_BYTES: usize = 16;
/// Fewest characters of a passphrase.
pub const MIN_PASSPHRASE_CHARS: usize = 20;
/// Longest key text (and key file).
pub const MAX_KEY_TEXT: usize = 4096;

const ROLE_PRIMARY: u8 = 1;
const ROLE_SECONDARY: u8 = 2;
const PSK_LABEL: &[u8] = b"colovmm-psk/1\0";
const PROOF_LABEL: &[u8] = b"colovmm-auth/1 proof\0";
const FRAME_LABEL: &[u8] = b"colovmm-auth/1 frame\0";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes a key of any length; this cannot fail.
    <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC accepts any key length")
}

fn tag_of(mac: HmacSha256) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

fn role_byte(side: Side) -> u8 {
    match side {
        Side::Primary => ROLE_PRIMARY,
        Side::Secondary => ROLE_SECONDARY,
    }
}

fn other(side: Side) -> Side {
    match side {
        Side::Primary => Side::Secondary,
        Side::Secondary => Side::Primary,
    }
}

/// Why a key could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PskError {
    /// Nothing but whitespace.
    #[error("the COLO key is empty")]
    Empty,
    /// A hex key of fewer than [`MIN_KEY_BYTES`] bytes.
    #[error("the COLO hex key has {0} bytes, at least {MIN_KEY_BYTES} are needed (try `openssl rand -hex 32`)")]
    ShortHexKey(usize),
    /// A passphrase of fewer than [`MIN_PASSPHRASE_CHARS`] characters.
    #[error("the COLO passphrase has {0} characters, at least {MIN_PASSPHRASE_CHARS} are needed (or use a hex key: `openssl rand -hex 32`)")]
    ShortPassphrase(usize),
    /// Longer than [`MAX_KEY_TEXT`] bytes.
    #[error("the COLO key is longer than {MAX_KEY_TEXT} bytes")]
    TooLong,
    /// A control character (a line break inside the key, a NUL).
    #[error("the COLO key contains a control character (one line of text is expected)")]
    ControlCharacter,
    /// The key file could not be read.
    #[error("COLO key file {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The key file is not a regular file.
    #[error("COLO key file {}: not a regular file", .0.display())]
    NotAFile(PathBuf),
    /// Others than the owner may read or write the key file.
    #[error("COLO key file {} has mode {mode:04o}: others than its owner may read it (chmod 600)", .path.display())]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file is not UTF-8 text.
    #[error("COLO key file {}: not UTF-8 text", .0.display())]
    NotText(PathBuf),
}

/// The pre-shared key both hosts are given. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct Psk([u8; 32]);

impl Psk {
    /// Reads a key from text (surrounding whitespace ignored): an even number of hex digits is
    /// a hex key, of at least [`MIN_KEY_BYTES`] bytes (either case); anything else is a
    /// passphrase of at least [`MIN_PASSPHRASE_CHARS`] characters. One line, no control
    /// characters. Both hosts read the same text the same way.
    pub fn parse(text: &str) -> Result<Psk, PskError> {
        if text.len() > MAX_KEY_TEXT {
            return Err(PskError::TooLong);
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(PskError::Empty);
        }
        if text.chars().any(char::is_control) {
            return Err(PskError::ControlCharacter);
        }
        let hex = text.bytes().all(|b| b.is_ascii_hexdigit())
            && text.as_bytes().chunks_exact(2).remainder().is_empty();
        let mut h = Sha256::new();
        h.update(PSK_LABEL);
        if hex {
            if text.len() < 2 * MIN_KEY_BYTES {
                return Err(PskError::ShortHexKey(text.len() / 2));
            }
            h.update(b"h");
            for pair in text.as_bytes().chunks_exact(2) {
                h.update([(hex_val(pair[0]) << 4) | hex_val(pair[1])]);
            }
        } else {
            let chars = text.chars().count();
            if chars < MIN_PASSPHRASE_CHARS {
                return Err(PskError::ShortPassphrase(chars));
            }
            h.update(b"p");
            h.update(text.as_bytes());
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&h.finalize());
        Ok(Psk(key))
    }

    /// The key of hosts given none: every party can compute it, so it authenticates nothing —
    /// it lets a channel that always MACs its frames (the proxy's) run without a key file,
    /// still catching corruption and framing errors.
    pub fn public() -> Psk {
        let mut key = [0u8; 32];
        key.copy_from_slice(&Sha256::digest(b"colovmm: no pre-shared key given"));
        Psk(key)
    }

    /// Reads a key file: one line of text as [`Psk::parse`] takes it. The file must be a
    /// regular file that only its owner may read or write (mode 0600 or stricter).
    pub fn from_file(path: &Path) -> Result<Psk, PskError> {
        let read = |source| PskError::Read {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(PskError::NotAFile(path.to_path_buf()));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(PskError::Permissions {
                path: path.to_path_buf(),
                mode,
            });
        }
        if meta.len() > MAX_KEY_TEXT as u64 {
            return Err(PskError::TooLong);
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(MAX_KEY_TEXT as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read)?;
        let text = String::from_utf8(bytes).map_err(|_| PskError::NotText(path.to_path_buf()))?;
        Psk::parse(&text)
    }
}

fn hex_val(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        // Best effort: the key should not outlive its owner in freed memory.
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// Why a handshake or a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The handshake did not finish in time (the whole deadline, or one socket read/write).
    #[error("COLO authentication timed out: the peer did not complete the handshake in time (limit {0:?})")]
    Timeout(Duration),
    /// The peer closed the connection during the handshake.
    #[error("the peer closed the connection during COLO authentication (it refused us, or it is not a colovmm COLO peer)")]
    Closed,
    /// A socket call failed.
    #[error("COLO authentication {what}: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The peer's first bytes are not a hello.
    #[error("the peer is not a colovmm COLO endpoint (no authentication hello)")]
    BadMagic,
    /// The peer speaks another version of the handshake.
    #[error("the peer speaks COLO authentication version {0}, this colovmm speaks {VERSION}")]
    Version(u16),
    /// A role byte that names no role.
    #[error("the peer's hello has an invalid role {0}")]
    BadRole(u8),
    /// Both ends claim the same role (two primaries, two secondaries).
    #[error("both ends are {}: a primary must talk to a secondary", .0.as_str())]
    SameRole(Side),
    /// A hello field out of its range.
    #[error("malformed COLO authentication hello: {0}")]
    Malformed(&'static str),
    /// The peer opened the connection for something else.
    #[error("the peer opened this connection for \"{peer}\", this side for \"{ours}\"")]
    Purpose {
        /// Ours.
        ours: String,
        /// The peer's.
        peer: String,
    },
    /// The caller's purpose label is not a valid one.
    #[error(
        "invalid COLO connection purpose {0:?} (1 to {MAX_PURPOSE_LEN} characters of a-z 0-9 . -)"
    )]
    InvalidPurpose(String),
    /// The peer sent our own nonce back.
    #[error("the peer sent back our own nonce (a reflected handshake)")]
    Reflected,
    /// The peer's proof does not verify.
    #[error("wrong pre-shared key: the peer's proof does not verify (the hosts were given different keys, or the peer has none)")]
    BadProof,
    /// No random bytes for the nonce.
    #[error("no random bytes for the COLO authentication nonce: {0}")]
    Random(String),
    /// A frame's MAC does not verify.
    #[error("COLO frame {seq}: MAC does not verify (altered, replayed, reordered or lost frames)")]
    FrameMac {
        /// The sequence number the frame was checked under.
        seq: u64,
    },
}

/// The keys of one authenticated connection: one for the frames this side sends, one for the
/// frames it receives. Its `Debug` never shows the keys.
pub struct SessionKey {
    send: [u8; 32],
    recv: [u8; 32],
    id: u64,
}

impl SessionKey {
    /// A non-secret identifier of the connection, the same on both ends (for logs).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The MAC of the frame numbered `seq` (counting this side's frames from 0) carrying
    /// `payload`.
    pub fn seal(&self, seq: u64, payload: &[u8]) -> [u8; TAG_LEN] {
        self.seal_parts(seq, &[payload])
    }

    /// [`SessionKey::seal`] of a payload given in pieces (a header and a packet), as if they
    /// were one slice.
    pub fn seal_parts(&self, seq: u64, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        *frame_mac(&self.send, seq, parts).as_bytes()
    }

    /// Checks the MAC of the peer's frame: `seq` must be the number this side expects next
    /// (the peer's frames counted from 0), so a replayed, dropped or reordered frame fails.
    pub fn open(&self, seq: u64, payload: &[u8], tag: &[u8]) -> Result<(), AuthError> {
        self.open_parts(seq, &[payload], tag)
    }

    /// [`SessionKey::open`] of a payload given in pieces.
    pub fn open_parts(&self, seq: u64, parts: &[&[u8]], tag: &[u8]) -> Result<(), AuthError> {
        let tag: [u8; TAG_LEN] = tag.try_into().map_err(|_| AuthError::FrameMac { seq })?;
        // `blake3::Hash` compares in constant time.
        if frame_mac(&self.recv, seq, parts) == blake3::Hash::from(tag) {
            Ok(())
        } else {
            Err(AuthError::FrameMac { seq })
        }
    }
}

/// A frame's MAC: BLAKE3 in keyed mode (a PRF under a 32-byte key, like HMAC-SHA-256, at
/// several times its speed on the bulk data the disk channel carries).
fn frame_mac(key: &[u8; 32], seq: u64, parts: &[&[u8]]) -> blake3::Hash {
    let mut mac = blake3::Hasher::new_keyed(key);
    mac.update(&seq.to_le_bytes());
    for p in parts {
        mac.update(p);
    }
    mac.finalize()
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKey({:016x}, <redacted>)", self.id)
    }
}

impl Drop for SessionKey {
    fn drop(&mut self) {
        self.send.fill(0);
        self.recv.fill(0);
        std::hint::black_box((&self.send, &self.recv));
    }
}

/// A hello as it went over the wire.
struct Hello {
    bytes: [u8; MAX_HELLO_LEN],
    len: usize,
}

impl Hello {
    fn new(side: Side, nonce: &[u8; NONCE_LEN], purpose: &[u8]) -> Hello {
        let mut bytes = [0u8; MAX_HELLO_LEN];
        bytes[..8].copy_from_slice(&MAGIC);
        bytes[8..10].copy_from_slice(&VERSION.to_le_bytes());
        bytes[10] = role_byte(side);
        bytes[11] = 0;
        bytes[12..44].copy_from_slice(nonce);
        bytes[44] = purpose.len() as u8;
        bytes[HELLO_FIXED_LEN..HELLO_FIXED_LEN + purpose.len()].copy_from_slice(purpose);
        Hello {
            bytes,
            len: HELLO_FIXED_LEN + purpose.len(),
        }
    }

    fn wire(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    fn nonce(&self) -> &[u8] {
        &self.bytes[12..44]
    }

    fn purpose(&self) -> &[u8] {
        &self.bytes[HELLO_FIXED_LEN..self.len]
    }
}

fn valid_purpose(p: &[u8]) -> bool {
    (1..=MAX_PURPOSE_LEN).contains(&p.len())
        && p.iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The stream under a deadline and a byte budget.
struct Wire<'a, S: ?Sized> {
    stream: &'a mut S,
    deadline: Instant,
    timeout: Duration,
    read: usize,
}

impl<S: Read + Write + ?Sized> Wire<'_, S> {
    fn io(&self, what: &'static str, e: io::Error) -> AuthError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::Timeout(self.timeout),
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => AuthError::Closed,
            _ => AuthError::Io { what, source: e },
        }
    }

    fn check_deadline(&self) -> Result<(), AuthError> {
        if Instant::now() >= self.deadline {
            return Err(AuthError::Timeout(self.timeout));
        }
        Ok(())
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), AuthError> {
        self.check_deadline()?;
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|e| self.io("write", e))
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<(), AuthError> {
        if self.read + buf.len() > MAX_PEER_BYTES {
            return Err(AuthError::Malformed("longer than a handshake"));
        }
        let mut at = 0;
        while at < buf.len() {
            self.check_deadline()?;
            match self.stream.read(&mut buf[at..]) {
                Ok(0) => return Err(AuthError::Closed),
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io("read", e)),
            }
        }
        self.read += buf.len();
        Ok(())
    }

    /// Reads the peer's hello, checking each field before reading what depends on it.
    fn recv_hello(&mut self) -> Result<Hello, AuthError> {
        let mut bytes = [0u8; MAX_HELLO_LEN];
        self.recv(&mut bytes[..8])?;
        if bytes[..8] != MAGIC {
            return Err(AuthError::BadMagic);
        }
        self.recv(&mut bytes[8..10])?;
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(AuthError::Version(version));
        }
        self.recv(&mut bytes[10..HELLO_FIXED_LEN])?;
        if bytes[10] != ROLE_PRIMARY && bytes[10] != ROLE_SECONDARY {
            return Err(AuthError::BadRole(bytes[10]));
        }
        if bytes[11] != 0 {
            return Err(AuthError::Malformed("flags set"));
        }
        let plen = usize::from(bytes[44]);
        if plen == 0 || plen > MAX_PURPOSE_LEN {
            return Err(AuthError::Malformed("purpose length out of range"));
        }
        self.recv(&mut bytes[HELLO_FIXED_LEN..HELLO_FIXED_LEN + plen])?;
        let hello = Hello {
            bytes,
            len: HELLO_FIXED_LEN + plen,
        };
        if !valid_purpose(hello.purpose()) {
            return Err(AuthError::Malformed("purpose is not a-z 0-9 . -"));
        }
        Ok(hello)
    }
}

/// Authenticates a fresh connection: [`authenticate_within`] with [`HANDSHAKE_TIMEOUT`].
pub fn authenticate<S: Read + Write + ?Sized>(
    stream: &mut S,
    psk: &Psk,
    side: Side,
    purpose: &str,
) -> Result<SessionKey, AuthError> {
    authenticate_within(stream, psk, side, purpose, HANDSHAKE_TIMEOUT)
}

/// Authenticates a fresh connection as `side`, for `purpose` (`heartbeat`, `checkpoint`,
/// `proxy`: the peer must name the same one), before anything else is sent on it. Both ends
/// call it at once. Gives up once `timeout` has passed (checked between reads, so the stream's
/// own read timeout should not be much longer). On an error the caller drops the connection.
pub fn authenticate_within<S: Read + Write + ?Sized>(
    stream: &mut S,
    psk: &Psk,
    side: Side,
    purpose: &str,
    timeout: Duration,
) -> Result<SessionKey, AuthError> {
    if !valid_purpose(purpose.as_bytes()) {
        return Err(AuthError::InvalidPurpose(purpose.to_string()));
    }
    let mut nonce = [0u8; NONCE_LEN];
    getrandom::fill(&mut nonce).map_err(|e| AuthError::Random(e.to_string()))?;
    let ours = Hello::new(side, &nonce, purpose.as_bytes());
    let mut wire = Wire {
        stream,
        deadline: Instant::now() + timeout,
        timeout,
        read: 0,
    };
    wire.send(ours.wire())?;
    let theirs = wire.recv_hello()?;
    let peer_role = theirs.bytes[10];
    if peer_role == role_byte(side) {
        return Err(AuthError::SameRole(side));
    }
    if theirs.purpose() != ours.purpose() {
        return Err(AuthError::Purpose {
            ours: purpose.to_string(),
            // Checked to be a-z 0-9 . - above.
            peer: String::from_utf8_lossy(theirs.purpose()).into_owned(),
        });
    }
    if theirs.nonce() == ours.nonce() {
        return Err(AuthError::Reflected);
    }
    let (hp, hs) = match side {
        Side::Primary => (ours.wire(), theirs.wire()),
        Side::Secondary => (theirs.wire(), ours.wire()),
    };
    let keyed = |label: &[u8], role: Side| {
        let mut mac = hmac(&psk.0);
        mac.update(label);
        mac.update(&[role_byte(role)]);
        mac.update(hp);
        mac.update(hs);
        mac
    };
    wire.send(&tag_of(keyed(PROOF_LABEL, side)))?;
    let mut proof = [0u8; TAG_LEN];
    wire.recv(&mut proof)?;
    keyed(PROOF_LABEL, other(side))
        .verify_slice(&proof)
        .map_err(|_| AuthError::BadProof)?;
    let transcript = Sha256::new().chain_update(hp).chain_update(hs).finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&transcript[..8]);
    Ok(SessionKey {
        send: tag_of(keyed(FRAME_LABEL, side)),
        recv: tag_of(keyed(FRAME_LABEL, other(side))),
        id: u64::from_le_bytes(id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn psk(s: &str) -> Psk {
        Psk::parse(s).unwrap()
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        (a, b)
    }

    type Outcome = Result<SessionKey, AuthError>;

    /// Runs both ends, the secondary in a thread.
    fn both(
        pk: Psk,
        p_purpose: &'static str,
        sk: Psk,
        s_side: Side,
        s_purpose: &'static str,
    ) -> (Outcome, Outcome) {
        let (mut a, mut b) = pair();
        let t = thread::spawn(move || authenticate(&mut b, &sk, s_side, s_purpose));
        let p = authenticate(&mut a, &pk, Side::Primary, p_purpose);
        drop(a);
        (p, t.join().unwrap())
    }

    /// A stream that keeps a copy of what was written to it.
    struct Recorder<S> {
        inner: S,
        sent: Vec<u8>,
    }

    impl<S: Read> Read for Recorder<S> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.inner.read(buf)
        }
    }

    impl<S: Write> Write for Recorder<S> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.sent.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    /// Authenticates as `side` against a peer that sends `bytes` and then closes its writing
    /// half (it never reads: our messages fit the socket buffer).
    fn against(bytes: &[u8], side: Side) -> Result<SessionKey, AuthError> {
        let (mut a, mut b) = pair();
        b.write_all(bytes).unwrap();
        b.shutdown(std::net::Shutdown::Write).unwrap();
        let r = authenticate(&mut a, &psk(KEY), side, "checkpoint");
        drop(b);
        r
    }

    fn hello_bytes(side: Side, purpose: &[u8]) -> Vec<u8> {
        Hello::new(side, &[7u8; NONCE_LEN], purpose).wire().to_vec()
    }

    #[test]
    fn same_key_succeeds_and_both_derive_the_same_keys() {
        let (p, s) = both(
            psk(KEY),
            "heartbeat",
            psk(KEY),
            Side::Secondary,
            "heartbeat",
        );
        let (p, s) = (p.unwrap(), s.unwrap());
        assert_eq!(p.id(), s.id());
        assert_eq!(p.send, s.recv);
        assert_eq!(p.recv, s.send);
        assert_ne!(p.send, p.recv);
        // Frames go both ways.
        let tag = p.seal(0, b"to the secondary");
        s.open(0, b"to the secondary", &tag).unwrap();
        let tag = s.seal(0, b"to the primary");
        p.open(0, b"to the primary", &tag).unwrap();
    }

    #[test]
    fn every_connection_gets_its_own_keys() {
        let (p1, _) = both(psk(KEY), "proxy", psk(KEY), Side::Secondary, "proxy");
        let (p2, _) = both(psk(KEY), "proxy", psk(KEY), Side::Secondary, "proxy");
        let (p1, p2) = (p1.unwrap(), p2.unwrap());
        assert_ne!(p1.send, p2.send);
        assert_ne!(p1.id(), p2.id());
    }

    #[test]
    fn passphrase_keys_work() {
        let phrase = "correct horse battery staple";
        let (p, s) = both(psk(phrase), "proxy", psk(phrase), Side::Secondary, "proxy");
        assert_eq!(p.unwrap().send, s.unwrap().recv);
    }

    #[test]
    fn wrong_key_fails_on_both_sides() {
        let other = "ff112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let (p, s) = both(
            psk(KEY),
            "checkpoint",
            psk(other),
            Side::Secondary,
            "checkpoint",
        );
        assert!(matches!(p, Err(AuthError::BadProof)), "{p:?}");
        assert!(matches!(s, Err(AuthError::BadProof)), "{s:?}");
        assert!(p.unwrap_err().to_string().contains("wrong pre-shared key"));
    }

    #[test]
    fn two_primaries_are_refused() {
        let (p, s) = both(psk(KEY), "heartbeat", psk(KEY), Side::Primary, "heartbeat");
        assert!(
            matches!(p, Err(AuthError::SameRole(Side::Primary))),
            "{p:?}"
        );
        assert!(
            matches!(s, Err(AuthError::SameRole(Side::Primary))),
            "{s:?}"
        );
        assert!(p.unwrap_err().to_string().contains("both ends are primary"));
    }

    #[test]
    fn a_different_purpose_is_refused() {
        let (p, s) = both(psk(KEY), "heartbeat", psk(KEY), Side::Secondary, "proxy");
        assert!(matches!(p, Err(AuthError::Purpose { .. })), "{p:?}");
        assert!(matches!(s, Err(AuthError::Purpose { .. })), "{s:?}");
    }

    #[test]
    fn invalid_purposes_are_refused_before_sending() {
        let (mut a, _b) = pair();
        for bad in ["", "Proxy", "a b", &"x".repeat(MAX_PURPOSE_LEN + 1)] {
            let e = authenticate(&mut a, &psk(KEY), Side::Primary, bad).unwrap_err();
            assert!(matches!(e, AuthError::InvalidPurpose(_)), "{e:?}");
        }
    }

    #[test]
    fn a_replayed_handshake_fails_on_both_sides() {
        // Record what each side sent in a good handshake.
        let (a, mut b) = pair();
        let mut rec = Recorder {
            inner: a,
            sent: Vec::new(),
        };
        let t = thread::spawn(move || {
            let mut rec = Recorder {
                inner: &mut b,
                sent: Vec::new(),
            };
            authenticate(&mut rec, &psk(KEY), Side::Secondary, "checkpoint").unwrap();
            rec.sent
        });
        authenticate(&mut rec, &psk(KEY), Side::Primary, "checkpoint").unwrap();
        let secondary_sent = t.join().unwrap();
        let primary_sent = rec.sent;
        assert!(primary_sent.len() <= MAX_PEER_BYTES && secondary_sent.len() <= MAX_PEER_BYTES);
        // Played back later, to a fresh side with a fresh nonce, the proof does not verify.
        let e = against(&primary_sent, Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::BadProof), "{e:?}");
        let e = against(&secondary_sent, Side::Primary).unwrap_err();
        assert!(matches!(e, AuthError::BadProof), "{e:?}");
    }

    #[test]
    fn our_own_hello_sent_back_is_refused() {
        // A peer that echoes everything: our hello names our own role.
        let (mut a, b) = pair();
        let t = thread::spawn(move || {
            let mut buf = [0u8; 256];
            let (mut r, mut w) = (&b, &b);
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 || w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let e = authenticate(&mut a, &psk(KEY), Side::Secondary, "proxy").unwrap_err();
        assert!(matches!(e, AuthError::SameRole(Side::Secondary)), "{e:?}");
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn bad_hellos_are_named() {
        let good = hello_bytes(Side::Primary, b"checkpoint");
        let with = |at: usize, v: u8| {
            let mut b = good.clone();
            b[at] = v;
            b
        };
        let e = against(&with(0, b'X'), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::BadMagic), "{e:?}");
        // A version-1 peer (HMAC-SHA256 frame MACs) is told, not left to fail its first frame.
        let e = against(&with(8, 1), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::Version(1)), "{e:?}");
        let e = against(&with(10, 9), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::BadRole(9)), "{e:?}");
        let e = against(&with(11, 1), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
        let e = against(&with(44, 0), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
        let e = against(&with(HELLO_FIXED_LEN, b'C'), Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
        // A good hello and then a proof of zeros.
        let mut b = good.clone();
        b.extend_from_slice(&[0u8; TAG_LEN]);
        let e = against(&b, Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::BadProof), "{e:?}");
        // An old colovmm's heartbeat, or a migration stream.
        let e = against(b"HB\x01\x00\x00\x00\x00\x00", Side::Secondary).unwrap_err();
        assert!(matches!(e, AuthError::BadMagic), "{e:?}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let mut full = hello_bytes(Side::Primary, b"checkpoint");
        full.extend_from_slice(&[1u8; TAG_LEN]);
        for cut in 0..full.len() {
            let e = against(&full[..cut], Side::Secondary).unwrap_err();
            assert!(matches!(e, AuthError::Closed), "cut at {cut}: {e:?}");
        }
    }

    #[test]
    fn an_oversized_purpose_is_refused_without_waiting_for_it() {
        // The peer announces 255 bytes of purpose and stays open without sending them.
        let mut b = hello_bytes(Side::Primary, b"checkpoint");
        b.truncate(HELLO_FIXED_LEN);
        b[44] = 255;
        let (mut x, mut y) = pair();
        y.write_all(&b).unwrap();
        let t0 = Instant::now();
        let e = authenticate(&mut x, &psk(KEY), Side::Secondary, "checkpoint").unwrap_err();
        assert!(matches!(e, AuthError::Malformed(_)), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_silent_peer_times_out() {
        let (mut a, _b) = pair();
        a.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let e = authenticate(&mut a, &psk(KEY), Side::Primary, "heartbeat").unwrap_err();
        assert!(matches!(e, AuthError::Timeout(_)), "{e:?}");
    }

    #[test]
    fn a_trickling_peer_hits_the_deadline() {
        // One byte every 50 ms: each read is quick, the whole is not.
        let (mut a, b) = pair();
        let t = thread::spawn(move || {
            for byte in hello_bytes(Side::Secondary, b"heartbeat") {
                if (&b).write_all(&[byte]).is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        let t0 = Instant::now();
        let e = authenticate_within(
            &mut a,
            &psk(KEY),
            Side::Primary,
            "heartbeat",
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(e, AuthError::Timeout(_)), "{e:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        drop(a);
        t.join().unwrap();
    }

    #[test]
    fn frames_round_trip_and_refuse_damage() {
        let (p, s) = both(psk(KEY), "proxy", psk(KEY), Side::Secondary, "proxy");
        let (p, s) = (p.unwrap(), s.unwrap());
        let payload = b"an ethernet frame".to_vec();
        let tag = p.seal(41, &payload);
        s.open(41, &payload, &tag).unwrap();
        s.open_parts(41, &[&payload[..3], &payload[3..]], &tag)
            .unwrap();
        assert_eq!(p.seal_parts(41, &[&payload[..5], &payload[5..]]), tag);
        // Another sequence number: replayed or reordered.
        let e = s.open(42, &payload, &tag).unwrap_err();
        assert!(matches!(e, AuthError::FrameMac { seq: 42 }), "{e:?}");
        // Every flipped bit of the payload or of the tag.
        for i in 0..payload.len() * 8 {
            let mut bad = payload.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(s.open(41, &bad, &tag).is_err());
        }
        for i in 0..TAG_LEN * 8 {
            let mut bad = tag;
            bad[i / 8] ^= 1 << (i % 8);
            assert!(s.open(41, &payload, &bad).is_err());
        }
        // A short tag, an empty one.
        assert!(s.open(41, &payload, &tag[..31]).is_err());
        assert!(s.open(41, &payload, &[]).is_err());
        // A frame sent back to its sender (reflection).
        assert!(p.open(41, &payload, &tag).is_err());
    }

    #[test]
    fn keys_parse() {
        assert!(matches!(Psk::parse("  \n"), Err(PskError::Empty)));
        assert!(matches!(
            Psk::parse("00112233"),
            Err(PskError::ShortHexKey(4))
        ));
        assert!(matches!(
            Psk::parse("too short"),
            Err(PskError::ShortPassphrase(9))
        ));
        assert!(matches!(
            Psk::parse("a long enough line\nand another"),
            Err(PskError::ControlCharacter)
        ));
        assert!(matches!(
            Psk::parse(&"x".repeat(MAX_KEY_TEXT + 1)),
            Err(PskError::TooLong)
        ));
        // Case and surrounding whitespace do not matter to a hex key.
        assert_eq!(psk(KEY).0, psk(&format!(" {}\n", KEY.to_uppercase())).0);
        // A passphrase and a hex key are different keys.
        assert_ne!(psk(KEY).0, psk("correct horse battery staple").0);
    }

    #[test]
    fn debug_never_shows_a_key() {
        let k = psk(KEY);
        let shown = format!("{k:?}");
        assert_eq!(shown, "Psk(<redacted>)");
        let (p, _) = both(k, "proxy", psk(KEY), Side::Secondary, "proxy");
        let p = p.unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("redacted"));
        let hex: String = p.send.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!shown.contains(&hex[..16]));
    }

    #[test]
    fn key_files() {
        let dir = std::env::temp_dir().join(format!("colovmm-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("colo.key");
        std::fs::write(&path, format!("{KEY}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Psk::from_file(&path).unwrap_err();
        assert!(
            matches!(e, PskError::Permissions { mode: 0o644, .. }),
            "{e:?}"
        );
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Psk::from_file(&path).unwrap().0, psk(KEY).0);
        std::fs::write(&path, [0xffu8, 0xfe, 0x00]).unwrap();
        assert!(matches!(Psk::from_file(&path), Err(PskError::NotText(_))));
        assert!(matches!(
            Psk::from_file(&dir.join("missing")),
            Err(PskError::Read { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Arbitrary bytes as the peer's side never panic and never authenticate.
        #[test]
        fn arbitrary_peer_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            prop_assert!(against(&bytes, Side::Secondary).is_err());
        }

        /// A well-formed hello with arbitrary fields and proof never authenticates either.
        #[test]
        fn arbitrary_hello_fields(
            version in prop_oneof![Just(VERSION), any::<u16>()],
            role in 0u8..4,
            flags in prop_oneof![Just(0u8), any::<u8>()],
            purpose in proptest::collection::vec(any::<u8>(), 0..40),
            plen in any::<u8>(),
            proof in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(&[role, flags]);
            b.extend_from_slice(&[3u8; NONCE_LEN]);
            b.push(if plen % 2 == 0 { purpose.len() as u8 } else { plen });
            b.extend_from_slice(&purpose);
            b.extend_from_slice(&proof);
            prop_assert!(against(&b, Side::Secondary).is_err());
        }
    }
}
