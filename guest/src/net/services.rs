//! The guest's network services. Every reply is a function of the requests alone (no
//! times, no randomness), so two guests fed the same packets answer byte for byte alike.
//! The one deliberate exception is `GET /uptime`, whose body carries the guest's current
//! TSC: two replicas answer it differently, which is how the tests make COLO's compare see
//! a mismatch and ask for a checkpoint.
//!
//! smoltcp has no accept queue: a TCP socket in Listen takes one connection. Each port
//! therefore has a pool of sockets; one that has closed listens again, and when a port has
//! no listening socket left, one in TIME-WAIT is recycled.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;
use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::{tcp, udp};

const ECHO_PORT: u16 = 7;
const HTTP_PORT: u16 = 80;
const REDIS_PORT: u16 = 6379;

/// (port, sockets, rx buffer, tx buffer) per TCP service.
const ECHO_POOL: (usize, usize, usize) = (8, 16 << 10, 16 << 10);
const HTTP_POOL: (usize, usize, usize) = (32, 8 << 10, 256 << 10);
const REDIS_POOL: (usize, usize, usize) = (128, 8 << 10, 16 << 10);

/// Input buffered per connection before we stop reading (backpressure).
const MAX_INPUT: usize = 64 << 10;
/// Output produced per connection before we stop parsing further requests.
const MAX_OUTPUT: usize = 64 << 10;
/// Largest HTTP request head.
const MAX_HTTP_HEAD: usize = 8 << 10;

/// Which services run (`services=echo,http,redis,udp`; default all).
#[derive(Clone, Copy)]
pub struct Enabled {
    echo: bool,
    http: bool,
    redis: bool,
    udp: bool,
}

impl Enabled {
    /// Parses the `services=` value (unknown names are ignored).
    pub fn parse(v: Option<&str>) -> Enabled {
        match v {
            None => Enabled {
                echo: true,
                http: true,
                redis: true,
                udp: true,
            },
            Some(list) => {
                let has = |n: &str| list.split(',').any(|w| w == n);
                Enabled {
                    echo: has("echo"),
                    http: has("http"),
                    redis: has("redis"),
                    udp: has("udp"),
                }
            }
        }
    }
}

/// `GET /bytes/<n>` body: byte i is `i % 251` (a prime period, so a lost, duplicated or
/// reordered segment changes the checksum). PATTERN holds whole periods.
const PERIOD: usize = 251;
static PATTERN: [u8; PERIOD * 64] = {
    let mut a = [0u8; PERIOD * 64];
    let mut i = 0;
    while i < a.len() {
        a[i] = (i % PERIOD) as u8;
        i += 1;
    }
    a
};

fn fill_pattern(buf: &mut [u8], pos: u64) {
    let mut o = (pos % PERIOD as u64) as usize;
    let mut i = 0;
    while i < buf.len() {
        let n = (buf.len() - i).min(PATTERN.len() - o);
        buf[i..i + n].copy_from_slice(&PATTERN[o..o + n]);
        i += n;
        o = (o + n) % PERIOD;
    }
}

const INDEX_PAGE: &[u8] = b"<!DOCTYPE html>\n<html><head><title>testguest</title></head>\n<body><h1>colovmm testguest</h1>\n<p>GET /bytes/&lt;n&gt; for n deterministic bytes, GET /kv/&lt;key&gt; for a stored value, GET /uptime for the TSC (not deterministic: differs between COLO replicas).</p>\n</body></html>\n";

type Kv = BTreeMap<Vec<u8>, Vec<u8>>;

/// Bytes produced but not yet in the socket.
#[derive(Default)]
struct Output {
    buf: Vec<u8>,
    pos: usize,
    /// A `/bytes/` body still to stream: next offset, end.
    pattern: Option<(u64, u64)>,
}

impl Output {
    fn pending(&self) -> bool {
        self.pos < self.buf.len() || self.pattern.is_some()
    }

    /// Moves as much as fits into the socket. True if anything moved.
    fn flush(&mut self, s: &mut tcp::Socket) -> bool {
        let mut moved = false;
        while self.pos < self.buf.len() && s.can_send() {
            let n = s.send_slice(&self.buf[self.pos..]).unwrap_or(0);
            if n == 0 {
                break;
            }
            self.pos += n;
            moved = true;
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else {
            return moved;
        }
        while let Some((pos, end)) = self.pattern {
            if !s.can_send() {
                break;
            }
            let n = s
                .send(|room| {
                    let n = (room.len() as u64).min(end - pos) as usize;
                    fill_pattern(&mut room[..n], pos);
                    (n, n)
                })
                .unwrap_or(0);
            if n == 0 {
                break;
            }
            moved = true;
            let next = pos + n as u64;
            self.pattern = (next < end).then_some((next, end));
        }
        moved
    }
}

/// Per-connection state of a pooled socket.
enum Conn {
    Echo,
    Http(Stream),
    Redis(Stream),
}

/// Buffered input, pending output, and whether to close once the output is out.
#[derive(Default)]
struct Stream {
    input: Vec<u8>,
    out: Output,
    close_after: bool,
}

struct Slot {
    handle: SocketHandle,
    port: u16,
    conn: Conn,
}

/// All sockets and the shared key-value store.
pub struct Services {
    slots: Vec<Slot>,
    udp: Option<SocketHandle>,
    kv: Kv,
}

fn fresh(port: u16) -> Conn {
    match port {
        HTTP_PORT => Conn::Http(Stream::default()),
        REDIS_PORT => Conn::Redis(Stream::default()),
        _ => Conn::Echo,
    }
}

impl Services {
    /// Creates the listening pools of the enabled services.
    pub fn new(sockets: &mut SocketSet<'static>, on: Enabled) -> Services {
        let mut slots = Vec::new();
        for (enabled, port, (n, rx, tx), nagle) in [
            (on.echo, ECHO_PORT, ECHO_POOL, false),
            (on.http, HTTP_PORT, HTTP_POOL, true),
            (on.redis, REDIS_PORT, REDIS_POOL, false),
        ] {
            if !enabled {
                continue;
            }
            for _ in 0..n {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; rx]),
                    tcp::SocketBuffer::new(vec![0; tx]),
                );
                s.set_nagle_enabled(nagle);
                let _ = s.listen(port);
                slots.push(Slot {
                    handle: sockets.add(s),
                    port,
                    conn: fresh(port),
                });
            }
        }
        let udp = on.udp.then(|| {
            let buf =
                || udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; 32], vec![0; 64 << 10]);
            let mut s = udp::Socket::new(buf(), buf());
            let _ = s.bind(ECHO_PORT);
            sockets.add(s)
        });
        Services {
            slots,
            udp,
            kv: Kv::new(),
        }
    }

    /// Moves data between the sockets and the services. True if anything was produced or
    /// consumed (so the stack should be polled again).
    pub fn run(&mut self, sockets: &mut SocketSet<'static>) -> bool {
        let mut progressed = false;
        let mut listening = [0usize; 3];
        let port_index = |p: u16| match p {
            ECHO_PORT => 0,
            HTTP_PORT => 1,
            _ => 2,
        };
        for slot in self.slots.iter_mut() {
            let s = sockets.get_mut::<tcp::Socket>(slot.handle);
            match s.state() {
                tcp::State::Closed => {
                    let _ = s.listen(slot.port);
                    slot.conn = fresh(slot.port);
                    listening[port_index(slot.port)] += 1;
                }
                tcp::State::Listen => listening[port_index(slot.port)] += 1,
                tcp::State::SynReceived | tcp::State::TimeWait => {}
                _ => {
                    progressed |= match &mut slot.conn {
                        Conn::Echo => echo(s),
                        Conn::Http(st) => stream(s, st, &mut self.kv, http_requests),
                        Conn::Redis(st) => stream(s, st, &mut self.kv, redis_commands),
                    }
                }
            }
        }
        // A port whose pool is all busy takes back one socket from TIME-WAIT.
        for slot in self.slots.iter_mut() {
            let i = port_index(slot.port);
            let s = sockets.get_mut::<tcp::Socket>(slot.handle);
            if listening[i] == 0 && s.state() == tcp::State::TimeWait {
                s.abort();
                let _ = s.listen(slot.port);
                slot.conn = fresh(slot.port);
                listening[i] += 1;
            }
        }
        if let Some(h) = self.udp {
            let s = sockets.get_mut::<udp::Socket>(h);
            while s.can_send() {
                let Ok((data, meta)) = s.recv() else { break };
                let reply = data.to_vec();
                let _ = s.send_slice(&reply, meta);
                progressed = true;
            }
        }
        progressed
    }
}

/// TCP echo: everything received is sent back; closes after the peer closed.
fn echo(s: &mut tcp::Socket) -> bool {
    let mut progressed = false;
    let mut tmp = [0u8; 4096];
    while s.can_recv() && s.can_send() {
        let room = s.send_capacity() - s.send_queue();
        let want = room.min(4096);
        let n = s.recv_slice(&mut tmp[..want]).unwrap_or(0);
        if n == 0 {
            break;
        }
        let _ = s.send_slice(&tmp[..n]);
        progressed = true;
    }
    if s.state() == tcp::State::CloseWait && !s.can_recv() {
        s.close();
        progressed = true;
    }
    progressed
}

/// Request/response protocols: `handle` consumes complete requests from `input`, appends
/// replies to the output, and says how many input bytes it used.
type Handler = fn(&[u8], &mut Output, &mut bool, &mut Kv) -> usize;

fn stream(s: &mut tcp::Socket, st: &mut Stream, kv: &mut Kv, handle: Handler) -> bool {
    let mut progressed = false;
    for _ in 0..64 {
        progressed |= st.out.flush(s);
        if st.out.pending() {
            break;
        }
        if st.close_after {
            s.close();
            st.close_after = false;
            st.input.clear();
            return true;
        }
        let used = handle(&st.input, &mut st.out, &mut st.close_after, kv);
        if used > 0 {
            st.input.drain(..used);
            progressed = true;
            continue;
        }
        if st.out.pending() || st.close_after {
            continue;
        }
        if s.can_recv() && st.input.len() < MAX_INPUT {
            let room = MAX_INPUT - st.input.len();
            let input = &mut st.input;
            let _ = s.recv(|data| {
                let n = data.len().min(room);
                input.extend_from_slice(&data[..n]);
                (n, ())
            });
            progressed = true;
            continue;
        }
        if s.state() == tcp::State::CloseWait {
            s.close();
            progressed = true;
        }
        break;
    }
    progressed
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn push_fmt(out: &mut Vec<u8>, args: core::fmt::Arguments) {
    struct W<'a>(&'a mut Vec<u8>);
    impl core::fmt::Write for W<'_> {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }
    let _ = core::fmt::write(&mut W(out), args);
}

/// HTTP/1.1: one request at a time (the next one, if pipelined, once this reply is out).
fn http_requests(input: &[u8], out: &mut Output, close: &mut bool, kv: &mut Kv) -> usize {
    if out.pending() {
        return 0;
    }
    let Some(end) = find(input, b"\r\n\r\n") else {
        if input.len() > MAX_HTTP_HEAD {
            respond(
                out,
                431,
                "text/plain",
                b"request header too large\n",
                false,
                true,
            );
            *close = true;
            return input.len();
        }
        return 0;
    };
    let head = &input[..end];
    let used = end + 4;
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request = lines.next().unwrap_or(b"");
    let mut parts = request.split(|&b| b == b' ').filter(|p| !p.is_empty());
    let (method, target, version) = (parts.next(), parts.next(), parts.next());
    let mut connection: Option<bool> = None; // Some(true) = keep-alive, Some(false) = close
    let mut has_body = false;
    for l in lines {
        let Some(colon) = l.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&l[..colon], l[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                connection = Some(false);
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                connection = Some(true);
            }
        } else if (name.eq_ignore_ascii_case(b"content-length") && value != b"0")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            has_body = true;
        }
    }
    let (Some(method), Some(target), Some(version)) = (method, target, version) else {
        respond(out, 400, "text/plain", b"bad request\n", false, true);
        *close = true;
        return input.len();
    };
    let http10 = version == b"HTTP/1.0";
    let keep = connection.unwrap_or(!http10) && !has_body;
    *close = !keep;
    let head_only = method == b"HEAD";
    if method != b"GET" && !head_only {
        respond(out, 405, "text/plain", b"method not allowed\n", false, true);
        *close = true;
        return input.len();
    }
    let extra_keepalive = http10 && keep;
    if target == b"/" {
        respond(out, 200, "text/html", INDEX_PAGE, head_only, !keep);
    } else if let Some(n) = target.strip_prefix(b"/bytes/") {
        match core::str::from_utf8(n)
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(n) => {
                header(out, 200, "application/octet-stream", n, !keep);
                if !head_only && n > 0 {
                    out.pattern = Some((0, n));
                }
            }
            None => respond(out, 400, "text/plain", b"bad length\n", head_only, !keep),
        }
    } else if target == b"/uptime" {
        // Deliberately nondeterministic (see the module doc).
        let mut body = Vec::new();
        push_fmt(
            &mut body,
            format_args!("uptime-tsc {}\n", crate::time::now()),
        );
        respond(out, 200, "text/plain", &body, head_only, !keep);
    } else if let Some(key) = target.strip_prefix(b"/kv/") {
        match kv.get(key) {
            Some(v) => {
                let v = v.clone();
                respond(out, 200, "application/octet-stream", &v, head_only, !keep)
            }
            None => respond(out, 404, "text/plain", b"no such key\n", head_only, !keep),
        }
    } else {
        respond(out, 404, "text/plain", b"not found\n", head_only, !keep);
    }
    if extra_keepalive {
        // HTTP/1.0 clients need to be told the connection stays open.
        let at = find(&out.buf, b"\r\n\r\n").unwrap_or(0);
        out.buf
            .splice(at..at, b"\r\nConnection: keep-alive".iter().copied());
    }
    used
}

fn header(out: &mut Output, code: u16, ctype: &str, len: u64, close: bool) {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    push_fmt(
        &mut out.buf,
        format_args!(
            "HTTP/1.1 {code} {reason}\r\nServer: testguest\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        ),
    );
}

fn respond(out: &mut Output, code: u16, ctype: &str, body: &[u8], head_only: bool, close: bool) {
    header(out, code, ctype, body.len() as u64, close);
    if !head_only {
        out.buf.extend_from_slice(body);
    }
}

/// RESP (redis) subset: as many complete commands as there are (pipelining), bounded by
/// the output produced.
fn redis_commands(input: &[u8], out: &mut Output, close: &mut bool, kv: &mut Kv) -> usize {
    let mut used = 0;
    while out.buf.len() < MAX_OUTPUT && used < input.len() && !*close {
        match parse_resp(&input[used..]) {
            Ok(Some((args, n))) => {
                let base = used;
                let arg = |i: usize| &input[base + args[i].start..base + args[i].end];
                let argv: Vec<&[u8]> = (0..args.len()).map(arg).collect();
                used += n;
                if !argv.is_empty() {
                    execute(&argv, &mut out.buf, close, kv);
                }
            }
            Ok(None) => break,
            Err(e) => {
                push_fmt(&mut out.buf, format_args!("-ERR Protocol error: {e}\r\n"));
                *close = true;
                used = input.len();
            }
        }
    }
    used
}

/// Reads a decimal line starting at `at`; returns (value, index after CRLF).
fn resp_int(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, &'static str> {
    let Some(nl) = buf[at..].iter().position(|&b| b == b'\n') else {
        return if buf.len() - at > 32 {
            Err("line too long")
        } else {
            Ok(None)
        };
    };
    let line = &buf[at..at + nl];
    let line = line.strip_suffix(b"\r").ok_or("expected CRLF")?;
    let v = core::str::from_utf8(line)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("invalid length")?;
    Ok(Some((v, at + nl + 1)))
}

/// A parsed command: argument ranges (relative to the buffer) and the bytes it took.
type Command = (Vec<Range<usize>>, usize);

/// One command, `None` if it is not complete yet.
fn parse_resp(buf: &[u8]) -> Result<Option<Command>, &'static str> {
    if buf[0] != b'*' {
        // Inline command: one line of space-separated words.
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            return if buf.len() > MAX_INPUT / 2 {
                Err("too big inline request")
            } else {
                Ok(None)
            };
        };
        let mut args = Vec::new();
        let mut i = 0;
        while i < nl {
            while i < nl && (buf[i] == b' ' || buf[i] == b'\r') {
                i += 1;
            }
            let start = i;
            while i < nl && buf[i] != b' ' && buf[i] != b'\r' {
                i += 1;
            }
            if i > start {
                args.push(start..i);
            }
        }
        return Ok(Some((args, nl + 1)));
    }
    let Some((count, mut at)) = resp_int(buf, 1)? else {
        return Ok(None);
    };
    if count > 1024 * 1024 {
        return Err("invalid multibulk length");
    }
    let mut args = Vec::with_capacity(count.max(0) as usize);
    for _ in 0..count.max(0) {
        if at >= buf.len() {
            return Ok(None);
        }
        if buf[at] != b'$' {
            return Err("expected '$'");
        }
        let Some((len, data)) = resp_int(buf, at + 1)? else {
            return Ok(None);
        };
        if !(0..=(MAX_INPUT as i64 / 2)).contains(&len) {
            return Err("invalid bulk length");
        }
        let end = data + len as usize;
        if end + 2 > buf.len() {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err("expected CRLF after bulk string");
        }
        args.push(data..end);
        at = end + 2;
    }
    Ok(Some((args, at)))
}

fn bulk(out: &mut Vec<u8>, v: &[u8]) {
    push_fmt(out, format_args!("${}\r\n", v.len()));
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
}

fn execute(argv: &[&[u8]], out: &mut Vec<u8>, close: &mut bool, kv: &mut Kv) {
    let mut name = argv[0].to_vec();
    name.make_ascii_uppercase();
    let arity = |ok: bool, out: &mut Vec<u8>| {
        if !ok {
            out.extend_from_slice(b"-ERR wrong number of arguments for '");
            out.extend_from_slice(argv[0]);
            out.extend_from_slice(b"' command\r\n");
        }
        ok
    };
    match &name[..] {
        b"PING" if arity(argv.len() <= 2, out) => match argv.get(1) {
            Some(m) => bulk(out, m),
            None => out.extend_from_slice(b"+PONG\r\n"),
        },
        b"ECHO" if arity(argv.len() == 2, out) => bulk(out, argv[1]),
        b"GET" if arity(argv.len() == 2, out) => match kv.get(argv[1]) {
            Some(v) => bulk(out, v),
            None => out.extend_from_slice(b"$-1\r\n"),
        },
        b"SET" if arity(argv.len() >= 3, out) => {
            kv.insert(argv[1].to_vec(), argv[2].to_vec());
            out.extend_from_slice(b"+OK\r\n");
        }
        b"INCR" if arity(argv.len() == 2, out) => {
            let cur = match kv.get(argv[1]) {
                None => Some(0i64),
                Some(v) => core::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok()),
            };
            match cur.and_then(|c| c.checked_add(1)) {
                Some(n) => {
                    let mut s = Vec::new();
                    push_fmt(&mut s, format_args!("{n}"));
                    kv.insert(argv[1].to_vec(), s);
                    push_fmt(out, format_args!(":{n}\r\n"));
                }
                None => out.extend_from_slice(b"-ERR value is not an integer or out of range\r\n"),
            }
        }
        b"DEL" if arity(argv.len() >= 2, out) => {
            let n = argv[1..]
                .iter()
                .filter(|k| kv.remove(**k).is_some())
                .count();
            push_fmt(out, format_args!(":{n}\r\n"));
        }
        b"CONFIG" if arity(argv.len() >= 2, out) => {
            if argv[1].eq_ignore_ascii_case(b"GET") {
                out.extend_from_slice(b"*0\r\n");
            } else {
                out.extend_from_slice(b"-ERR unsupported CONFIG subcommand\r\n");
            }
        }
        b"COMMAND" => out.extend_from_slice(b"*0\r\n"),
        b"QUIT" => {
            out.extend_from_slice(b"+OK\r\n");
            *close = true;
        }
        b"PING" | b"ECHO" | b"GET" | b"SET" | b"INCR" | b"DEL" | b"CONFIG" => {} // arity error written
        _ => {
            out.extend_from_slice(b"-ERR unknown command '");
            out.extend_from_slice(&argv[0][..argv[0].len().min(64)]);
            out.extend_from_slice(b"'\r\n");
        }
    }
}
