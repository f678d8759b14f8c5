"""COLO with a NIC: colovmm vs QEMU 7.2 COLO on the test guest, network numbers, same run.

Five setups, booted one at a time, interleaved (the order rotates per round), each in fresh
network namespaces laid out as tests/common/netns.rs's TwoHostNet: host A (the primary, br0
192.168.100.10 + tap0), host B (the secondary, br0 192.168.100.11 + tap0) and a client
(192.168.100.1) on one switch namespace; the guest is 192.168.100.2, 256 MiB, 1 vCPU.

  colovmm          colovmm on host A's tap, no COLO.
  colovmm-colo     colovmm `--colo role=primary,peer=192.168.100.11:PORT,checkpoint-interval=MS`
                   on host A, `--colo role=secondary,listen=...` on host B (its own tap): the
                   primary mirrors client frames to the secondary and holds the PVM's output
                   until the SVM sent the same (docs/colo.md, The network proxy).
  qemu             QEMU 7.2 microvm (virtio-net-device on host A's tap), no COLO.
  qemu-colo        QEMU 7.2 COLO with its network proxy, wired as its docs/COLO-FT.txt: on the
                   primary filter-mirror (tap -> guest frames to the secondary), filter-redirector
                   x2 and colo-compare (with an iothread) holding the PVM's output until the SVM
                   sent the same; on the secondary filter-redirector x2 (mirrored frames in, SVM
                   output to the primary's compare) and filter-rewriter; the chardev sockets cross
                   the switch between the two hosts. x-colo, `x-checkpoint-delay` MS, no bandwidth
                   cap, started with -S and migrated to the secondary's `-incoming`; both QEMUs
                   run with the TCP_NODELAY shim (scripts/nodelay_shim.c) on their sockets.
  qemu-colo-stock  the same without the shim (Debian's QEMU as is: Nagle on its sockets).

Every COLO setup runs at each checkpoint interval of --intervals (default 1000 and 100 ms).
colovmm's binaries are copied at the start, so a build during the run does not mix versions.

Measured in every boot, from the client namespace:
  latency      sequential redis GETs (32-byte value) on one TCP connection with TCP_NODELAY, a
               Python client: p50 / p99 / mean in ms;
  redis        `redis-benchmark -t set,get -n 20000` (50 connections): requests/s;
  download     `GET /bytes/64 MiB` over HTTP, every byte checked (byte i = i % 251): MB/s;
  failover     (COLO setups, last) a Python client does INCR on one connection every ~2 ms and
               checks each reply is the previous + 1; the primary VMM gets kill -9 (QEMU's
               secondary then `x-colo-lost-heartbeat` over QMP: QEMU has no heartbeat of its own);
               the gap is the longest time between two replies from the kill on; a new connection
               then checks the counter equals the loop's last reply (nothing lost or repeated).
"""

import argparse
import atexit
import datetime
import fcntl
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    COLOVMM, GUEST, ROOT, EventTail, Failed, check_alive, processes, update_section)
from bench_migration import Qmp  # noqa: E402

REMOTE = os.path.join(ROOT, "target/release/colovmm-remote")
SHIM_SRC = os.path.join(ROOT, "scripts/nodelay_shim.c")
GUEST_IP = "192.168.100.2"
CLIENT_IP = "192.168.100.1"
HOST_A_IP = "192.168.100.10"
HOST_B_IP = "192.168.100.11"
PORT = 9400          # colovmm's secondary / QEMU's -incoming, on host B
MIRROR_PORT = 9003   # QEMU: primary's filter-mirror -> secondary's redirector (COLO-FT.txt ports)
COMPARE_PORT = 9004  # QEMU: secondary's redirector -> primary's colo-compare
MEM = "256M"
# qemu-colo-stock: QEMU COLO as Debian ships it, without the TCP_NODELAY shim.
SETUPS = ("colovmm", "colovmm-colo", "qemu", "qemu-colo", "qemu-colo-stock")
EXTRA_SETUPS = ()
LABEL = {"colovmm": "colovmm unprotected", "colovmm-colo": "colovmm COLO",
         "qemu": "QEMU unprotected", "qemu-colo": "QEMU COLO TCP_NODELAY",
         "qemu-colo-stock": "QEMU COLO stock"}
# Every VMM runs under `timeout`, so none survives this script even if it is SIGKILLed.
VMM_LIMIT_S = 900
BOOT_S = 90
PROTECT_S = 120
LAT_N = 2000
REDIS_N = 20000
DOWNLOAD = 64 << 20
INCR_PERIOD_MS = 2
INCR_BEFORE = 500     # replies before the kill
INCR_AFTER = 500      # replies after the kill before the loop stops
OTHER_BENCHMARKS = ("bench_io.py", "bench_boot.py", "bench_migration.py", "bench_colo.py")
FOREIGN = ("colovmm", "qemu-system-x86_64", "cargo", "rustc")
FOREIGN_WAIT_S = 120
NS_PREFIX = "cvnb"


def sh(*args, check=True, timeout=60):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Failed(f"{' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


# ---------------------------------------------------------------------------------------------
# Namespaces and processes: everything made is registered and removed at exit, also on failure.

_namespaces = set()
_procs = []


def _cleanup():
    for p in list(_procs):
        p.kill()
    for ns in sorted(_namespaces):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    _namespaces.clear()


atexit.register(_cleanup)


def remove_stale_namespaces():
    """Namespaces of an earlier run of this script that was SIGKILLed (its pid is gone)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(rf"^({NS_PREFIX}(\d+)x\d+-[abcs])\b", line)
        if m and not os.path.exists(f"/proc/{m.group(2)}"):
            subprocess.run(["ip", "netns", "del", m.group(1)], capture_output=True)


class Net:
    """tests/common/netns.rs's TwoHostNet: hosts A and B (br0 with an address and tap0 each)
    and a client on one switch namespace."""

    seq = 0

    def __init__(self):
        Net.seq += 1
        base = f"{NS_PREFIX}{os.getpid()}x{Net.seq}"
        self.a, self.b, self.client, self.switch = (f"{base}-{x}" for x in "abcs")

    def __enter__(self):
        try:
            self._create()
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, *exc):
        self.delete()

    def delete(self):
        for ns in (self.a, self.b, self.client, self.switch):
            if ns in _namespaces:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
                _namespaces.discard(ns)

    def _create(self):
        for ns in (self.a, self.b, self.client, self.switch):
            sh("ip", "netns", "add", ns)
            _namespaces.add(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        s = self.switch
        sh("ip", "-n", s, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", s, "link", "set", "br0", "up")
        for ns, port, ip in ((self.a, "pa", HOST_A_IP), (self.b, "pb", HOST_B_IP),
                             (self.client, "pc", None)):
            sh("ip", "link", "add", port, "netns", s, "type", "veth", "peer", "name", "up0",
               "netns", ns)
            sh("ip", "-n", s, "link", "set", port, "master", "br0")
            sh("ip", "-n", s, "link", "set", port, "up")
            if ip:
                sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
                sh("ip", "-n", ns, "link", "set", "up0", "master", "br0")
                sh("ip", "netns", "exec", ns, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap",
                   "vnet_hdr")
                sh("ip", "-n", ns, "link", "set", "tap0", "master", "br0")
                sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "br0")
                for dev in ("br0", "up0", "tap0"):
                    sh("ip", "-n", ns, "link", "set", dev, "up")
            else:
                sh("ip", "-n", ns, "addr", "add", f"{CLIENT_IP}/24", "dev", "up0")
                sh("ip", "-n", ns, "link", "set", "up0", "up")

    def client_run(self, *args, timeout=120):
        try:
            return subprocess.run(["ip", "netns", "exec", self.client] + list(args),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Failed(f"{args[0]} in the client namespace did not finish in {timeout} s")


class Proc:
    """A process in namespace `ns` under `timeout`, in its own process group; stdout and stderr
    go to `log`."""

    def __init__(self, ns, cmd, log, env=None):
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                ["timeout", "-s", "KILL", str(VMM_LIMIT_S), "ip", "netns", "exec", ns] + cmd,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                env=dict(os.environ, **(env or {})))
        _procs.append(self)

    def alive(self):
        return self.proc.poll() is None

    def child_pid(self):
        """The VMM's own pid (`timeout`'s child; `ip netns exec` execs it)."""
        for _ in range(100):
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    return int(kids[0])
            except OSError:
                pass
            time.sleep(0.01)
        raise Failed("no VMM process under `timeout`")

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        if self in _procs:
            _procs.remove(self)

    def tail(self, n=3):
        try:
            with open(self.log, errors="replace") as f:
                lines = [x.strip() for x in f if x.strip() and "nodelay_shim" not in x]
            return " | ".join(lines[-n:])
        except OSError:
            return ""





def wait_console(path, pattern, timeout, *named):
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, errors="replace") as f:
                if rx.search(f.read()):
                    return
        except OSError:
            pass
        check_alive(*named)
        if time.monotonic() > deadline:
            raise Failed(f"no {pattern!r} on {os.path.basename(path)} within {timeout} s")
        time.sleep(0.05)


def wait_ping(net, *named):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if net.client_run("ping", "-c", "1", "-W", "1", GUEST_IP, timeout=10).returncode == 0:
            return
        check_alive(*named)
    raise Failed("the guest never answered ping from the client")


def remote(sock, *args, timeout=10):
    r = subprocess.run([REMOTE, "--api-socket", sock] + list(args), capture_output=True,
                       text=True, timeout=timeout)
    if r.returncode != 0:
        raise Failed(f"colovmm-remote {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


# ---------------------------------------------------------------------------------------------
# The VMMs


class Setup:
    """One booted setup: `pri` (and `sec` for COLO) running the guest on host A."""

    def __init__(self, kind, net, tmp, tag, interval, shim):
        self.kind, self.net, self.tmp, self.tag = kind, net, tmp, tag
        self.interval, self.shim = interval, shim
        self.colo = "-colo" in kind
        self.pri = self.sec = None
        self.a = self.b = None  # QEMU's QMP connections
        self.f = lambda name: os.path.join(tmp, f"{tag}-{name}")
        for name in os.listdir(tmp):  # a kept log directory used again
            if name.startswith(f"{tag}-"):
                os.unlink(os.path.join(tmp, name))

    def procs(self):
        return (("primary", self.pri), ("secondary", self.sec))

    def close(self):
        for q in (self.a, self.b):
            if q:
                q.close()
        self.a = self.b = None
        for p in (self.pri, self.sec):
            if p:
                p.kill()

    # -- colovmm

    def start_colovmm(self):
        f = self.f
        self.pev, self.sev = EventTail(f("pri-events.jsonl")), EventTail(f("sec-events.jsonl"))
        self.psock, self.ssock = f("pri.sock"), f("sec.sock")
        if self.colo:
            self.sec = Proc(self.net.b, [
                COLOVMM, "--net", "tap=tap0", "--colo", f"role=secondary,listen={HOST_B_IP}:{PORT}",
                "--serial", f"file={f('sec-console.log')}", "--api-socket", f"path={self.ssock}",
                "--event-monitor", f"path={self.sev.path}"], f("sec.log"))
            deadline = time.monotonic() + 20
            while not self.sev.colo("started"):
                check_alive(*self.procs())
                if time.monotonic() > deadline:
                    raise Failed("the colovmm secondary never reported `started`")
                time.sleep(0.02)
        colo = ["--colo", f"role=primary,peer={HOST_B_IP}:{PORT},"
                f"checkpoint-interval={self.interval}"] if self.colo else []
        self.pri = Proc(self.net.a, [
            COLOVMM, "--kernel", GUEST, "--memory", f"size={MEM}", "--cpus", "boot=1",
            "--net", "tap=tap0", "--serial", f"file={f('pri-console.log')}",
            "--api-socket", f"path={self.psock}", "--event-monitor", f"path={self.pev.path}"]
            + colo, f("pri.log"))
        wait_console(f("pri-console.log"), r"^TESTGUEST READY", BOOT_S, *self.procs())
        if not self.colo:
            return
        deadline = time.monotonic() + PROTECT_S
        while not (self.pev.colo("protected") and self.sev.colo("protected")):
            self.check_colo()
            if time.monotonic() > deadline:
                raise Failed(f"not protected within {PROTECT_S} s")
            time.sleep(0.05)
        # The first periodic checkpoint passes before measuring (as on QEMU, whose secondary
        # flushes its whole RAM cache on that one).
        while not [e for e in self.pev.colo("checkpoint")
                   if e.get("properties", {}).get("reason") != "initial"]:
            self.check_colo()
            if time.monotonic() > deadline:
                raise Failed("no periodic checkpoint")
            time.sleep(0.05)

    def check_colo(self):
        check_alive(*self.procs())
        for ev in (self.pev, self.sev):
            exits = ev.colo("colo_exit")
            if exits:
                raise Failed(f"protection ended: {json.dumps(exits[0].get('properties'))}")
        check_alive(*self.procs())

    # -- QEMU

    def qemu_cmd(self, side):
        f = self.f
        return ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
                "-cpu", "host,-arch-capabilities", "-global", "virtio-mmio.force-legacy=false",
                "-m", MEM, "-smp", "1", "-nographic", "-nodefaults", "-no-reboot",
                "-serial", f"file:{f(side + '-console.log')}", "-kernel", GUEST, "-append", "",
                "-qmp", f"unix:{f(side + '.qmp')},server=on,wait=off",
                "-netdev", "tap,id=hn0,ifname=tap0,script=no,downscript=no",
                "-device", "virtio-net-device,netdev=hn0"]

    def start_qemu(self):
        f = self.f
        if not self.colo:
            self.pri = Proc(self.net.a, self.qemu_cmd("pri"), f("pri.log"))
            wait_console(f("pri-console.log"), r"^TESTGUEST READY", BOOT_S, *self.procs())
            return
        env = {"LD_PRELOAD": self.shim} if self.kind == "qemu-colo" else None
        vh = ",vnet_hdr_support=on"
        lo = "127.0.0.1"
        pri_net = [
            "-chardev", f"socket,id=mirror0,host={HOST_A_IP},port={MIRROR_PORT},server=on,wait=off",
            "-chardev",
            f"socket,id=compare1,host={HOST_A_IP},port={COMPARE_PORT},server=on,wait=off",
            "-chardev", f"socket,id=compare0,host={lo},port=9001,server=on,wait=off",
            "-chardev", f"socket,id=compare0-0,host={lo},port=9001",
            "-chardev", f"socket,id=compare_out,host={lo},port=9005,server=on,wait=off",
            "-chardev", f"socket,id=compare_out0,host={lo},port=9005",
            "-object", "filter-mirror,id=m0,netdev=hn0,queue=tx,outdev=mirror0" + vh,
            "-object", "filter-redirector,id=redire0,netdev=hn0,queue=rx,indev=compare_out" + vh,
            "-object", "filter-redirector,id=redire1,netdev=hn0,queue=rx,outdev=compare0" + vh,
            "-object", "iothread,id=iothread1",
            "-object", "colo-compare,id=comp0,primary_in=compare0-0,secondary_in=compare1,"
                       "outdev=compare_out0,iothread=iothread1" + vh,
            "-S"]
        sec_net = [
            "-chardev", f"socket,id=red0,host={HOST_A_IP},port={MIRROR_PORT},reconnect=1",
            "-chardev", f"socket,id=red1,host={HOST_A_IP},port={COMPARE_PORT},reconnect=1",
            "-object", "filter-redirector,id=f1,netdev=hn0,queue=tx,indev=red0" + vh,
            "-object", "filter-redirector,id=f2,netdev=hn0,queue=rx,outdev=red1" + vh,
            "-object", "filter-rewriter,id=rew0,netdev=hn0,queue=all" + vh,
            "-incoming", f"tcp:{HOST_B_IP}:{PORT}"]
        self.pri = Proc(self.net.a, self.qemu_cmd("pri") + pri_net, f("pri.log"), env)
        self.a = self.qmp("pri")
        self.sec = Proc(self.net.b, self.qemu_cmd("sec") + sec_net, f("sec.log"), env)
        self.b = self.qmp("sec")
        # The secondary's redirectors connect to the primary's mirror and compare sockets.
        deadline = time.monotonic() + 30
        while True:
            chardevs = {c["label"]: c["filename"] for c in self.a.cmd("query-chardev")}
            if all("<-" in chardevs.get(k, "") for k in ("mirror0", "compare1")):
                break
            check_alive(*self.procs())
            if time.monotonic() > deadline:
                raise Failed(f"the secondary never connected its redirectors: {chardevs}")
            time.sleep(0.05)
        for q in (self.b, self.a):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "x-colo", "state": True}])
        self.a.cmd("migrate-set-parameters", **{"x-checkpoint-delay": self.interval,
                                                "max-bandwidth": 1 << 40})
        self.a.cmd("migrate", uri=f"tcp:{HOST_B_IP}:{PORT}")
        deadline = time.monotonic() + PROTECT_S
        while True:
            st = self.a.cmd("query-migrate").get("status")
            if st == "colo":
                break
            if st in ("failed", "cancelled"):
                raise Failed(f"QEMU migration {st}")
            check_alive(*self.procs())
            if time.monotonic() > deadline:
                raise Failed(f"QEMU not in COLO after {PROTECT_S} s (status {st})")
            time.sleep(0.05)
        wait_console(f("pri-console.log"), r"^TESTGUEST READY", BOOT_S, *self.procs())
        # The initial stop and the first periodic checkpoint pass before measuring.
        while self.qemu_checkpoints() < 2:
            self.check_colo_qemu()
            if time.monotonic() > deadline:
                raise Failed("QEMU's first periodic checkpoint did not come")
            time.sleep(0.05)

    def qmp(self, side):
        path = self.f(side + ".qmp")
        deadline = time.monotonic() + 30
        while not os.path.exists(path):
            check_alive(*self.procs())
            if time.monotonic() > deadline:
                raise Failed(f"no QMP socket {path} after 30 s")
            time.sleep(0.02)
        return Qmp(path, timeout=30)

    def qemu_checkpoints(self):
        """STOPs of the primary so far (the initial one of the migration included)."""
        self.a.cmd("query-status")  # reads the events QEMU sent meanwhile
        return sum(1 for e in self.a.events if e["event"] == "STOP")

    def qemu_pauses(self):
        out, stop = [], None
        for e in self.a.events:
            t = e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
            if e["event"] == "STOP":
                stop = t
            elif e["event"] == "RESUME" and stop is not None:
                out.append((t - stop) * 1000)
                stop = None
        return out

    def check_colo_qemu(self):
        check_alive(*self.procs())
        if self.a.cmd("query-migrate").get("status") != "colo":
            raise Failed("QEMU's COLO ended on the primary")

    # -- both

    def start(self):
        if self.kind.startswith("colovmm"):
            self.start_colovmm()
        else:
            self.start_qemu()
        wait_ping(self.net, *self.procs())

    def check(self):
        if not self.colo:
            check_alive(*self.procs())
        elif self.kind == "colovmm-colo":
            self.check_colo()
        else:
            self.check_colo_qemu()

    def counters(self):
        """Checkpoints so far (colovmm: also per reason and the compare's counters)."""
        if not self.colo:
            return {}
        if self.kind == "colovmm-colo":
            self.check()
            st = json.loads(remote(self.psock, "--json", "colo-status"))
            cmp_ = (((st.get("proxy") or {}).get("primary") or {}).get("compare") or {})
            return {"checkpoints": st.get("checkpoints"), "reasons": st.get("reasons") or {},
                    "mismatches": cmp_.get("mismatches"), "timeouts": cmp_.get("timeouts"),
                    "t": time.monotonic(), "status": st}
        self.check()
        return {"checkpoints": self.qemu_checkpoints(), "t": time.monotonic()}

    def kill_primary(self):
        pid = self.pri.child_pid()
        os.kill(pid, signal.SIGKILL)
        t = time.monotonic()
        if self.kind.startswith("qemu"):
            # QEMU has no heartbeat: the secondary takes over only on this command.
            self.b.cmd("x-colo-lost-heartbeat")
        return t, time.monotonic()


def delta(c0, c1):
    if not c0 or not c1:
        return {}
    out = {}
    for k in ("checkpoints", "mismatches", "timeouts", "t"):
        if c0.get(k) is not None and c1.get(k) is not None:
            out[k] = c1[k] - c0[k]
    r0, r1 = c0.get("reasons") or {}, c1.get("reasons") or {}
    for k in r1:
        if isinstance(r1[k], int) and r1[k] - r0.get(k, 0):
            out[f"reason_{k}"] = r1[k] - r0.get(k, 0)
    return out


# ---------------------------------------------------------------------------------------------
# The clients (run in the client namespace)

RESP = r'''
def cmd(*a):
    return b"*%d\r\n" % len(a) + b"".join(b"$%d\r\n%s\r\n" % (len(x), x) for x in a)
def expect(s, want):
    got = b""
    while len(got) < len(want):
        c = s.recv(len(want) - len(got))
        if not c:
            raise SystemExit("connection closed after %r" % got)
        got += c
    if got != want:
        raise SystemExit("reply %r, expected %r" % (got, want))
'''

LATENCY = RESP + r'''
import json, socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
s = socket.create_connection((host, 6379), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
val = b"v" * 32
s.sendall(cmd(b"SET", b"bench:lat", val))
expect(s, b"+OK\r\n")
get, want = cmd(b"GET", b"bench:lat"), b"$32\r\n" + val + b"\r\n"
for _ in range(100):  # warm-up
    s.sendall(get)
    expect(s, want)
lat = []
for _ in range(n):
    t = time.perf_counter()
    s.sendall(get)
    expect(s, want)
    lat.append((time.perf_counter() - t) * 1000)
print(json.dumps(lat))
'''

DOWNLOAD_CLIENT = r'''
import json, socket, sys, time
host, n = sys.argv[1], int(sys.argv[2])
P = 251
pat = bytes(i % P for i in range(P)) * ((1 << 20) // P + 2)
t0 = time.perf_counter()
s = socket.create_connection((host, 80), timeout=60)
s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: guest\r\n\r\n" % n)
buf = b""
while b"\r\n\r\n" not in buf:
    c = s.recv(65536)
    if not c:
        raise SystemExit("closed before the headers end")
    buf += c
head, body = buf.split(b"\r\n\r\n", 1)
if not head.startswith(b"HTTP/1.1 200"):
    raise SystemExit("status %r" % head.split(b"\r\n")[0])
clen = [int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")]
if clen != [n]:
    raise SystemExit("Content-Length %r" % clen)
got = 0
def check(chunk):
    global got
    o = got % P
    if chunk != pat[o:o + len(chunk)]:
        i = next(k for k in range(len(chunk)) if chunk[k] != (got + k) % P)
        raise SystemExit("byte %d is %d, expected %d" % (got + i, chunk[i], (got + i) % P))
    got += len(chunk)
if body:
    check(body[:n])
while got < n:
    c = s.recv(min(1 << 20, n - got))
    if not c:
        raise SystemExit("closed after %d of %d bytes" % (got, n))
    check(c)
t = time.perf_counter() - t0
s.close()
print(json.dumps({"bytes": got, "s": t, "mb_s": got / t / 1e6}))
'''

INCR_CLIENT = r'''
import json, os, socket, sys, time
host, stop, out, period = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) / 1000
key = b"bench:incr"
req = b"*2\r\n$4\r\nINCR\r\n$%d\r\n%s\r\n" % (len(key), key)
times, sent, prev, err, buf = [], [], 0, None, b""
try:
    s = socket.create_connection((host, 6379), timeout=60)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while not os.path.exists(stop):
        sent.append(time.monotonic())
        s.sendall(req)
        while b"\r\n" not in buf:
            c = s.recv(4096)
            if not c:
                raise ConnectionError("connection closed by the guest")
            buf += c
        t = time.monotonic()
        line, buf = buf.split(b"\r\n", 1)
        if buf:
            raise ValueError("unexpected bytes after reply %d: %r" % (prev + 1, buf))
        if line != b":%d" % (prev + 1):
            raise ValueError("reply %r, expected :%d" % (line, prev + 1))
        prev += 1
        times.append(t)
        if prev % 50 == 0:
            print(prev, flush=True)
        time.sleep(period)
except Exception as e:
    err = "%s: %s" % (type(e).__name__, e)
with open(out, "w") as f:
    json.dump({"times": times, "sent": sent, "last": prev, "error": err}, f)
print("done", flush=True)
'''

GET_CLIENT = RESP + r'''
import socket, sys
s = socket.create_connection((sys.argv[1], 6379), timeout=30)
s.sendall(cmd(b"GET", sys.argv[2].encode()))
buf = b""
while buf.count(b"\r\n") < 2 and not buf.startswith(b"$-1\r\n"):
    c = s.recv(4096)
    if not c:
        break
    buf += c
print(buf.split(b"\r\n")[1].decode() if buf.startswith(b"$") and not buf.startswith(b"$-1") else "nil")
'''


def client_json(net, code, *args, timeout=300):
    r = net.client_run("python3", "-c", code, *[str(a) for a in args], timeout=timeout)
    if r.returncode != 0:
        raise Failed(f"client failed: {(r.stderr or r.stdout).strip()[-300:]}")
    return json.loads(r.stdout)


def latency(net, n=LAT_N):
    lat = client_json(net, LATENCY, GUEST_IP, n)
    return {"lat_p50_ms": percentile(lat, 50), "lat_p99_ms": percentile(lat, 99),
            "lat_mean_ms": statistics.mean(lat), "lat_max_ms": max(lat)}


def redis_bench(net):
    r = net.client_run("redis-benchmark", "-h", GUEST_IP, "-p", "6379", "-t", "set,get",
                       "-n", str(REDIS_N), "-q", timeout=600)
    found = dict(re.findall(r"(SET|GET): ([\d.]+) requests per second", r.stdout))
    if r.returncode != 0 or set(found) != {"SET", "GET"}:
        raise Failed(f"redis-benchmark: {(r.stderr or r.stdout).strip()[-300:]}")
    return {"redis_set_rps": float(found["SET"]), "redis_get_rps": float(found["GET"])}


def download(net, n=DOWNLOAD):
    d = client_json(net, DOWNLOAD_CLIENT, GUEST_IP, n, timeout=600)
    return {"download_mb_s": d["mb_s"]}


def secondary_state(setup):
    """What the secondary says about itself (for a failover that did not go on)."""
    try:
        if setup.kind.startswith("qemu"):
            return (f"{setup.b.cmd('query-status')}, {setup.b.cmd('query-colo-status')}, "
                    f"events {[e['event'] for e in setup.b.events][-6:]}")
        st = json.loads(remote(setup.ssock, "--json", "colo-status"))
        return f"state {st.get('state')}, exit {st.get('exit')}"
    except (Failed, OSError, RuntimeError, EOFError, ValueError,
            subprocess.SubprocessError) as e:
        return f"no answer ({e})"


def failover(setup, tmp, tag):
    """The INCR loop across a kill -9 of the primary; returns the gap and the checks."""
    net = setup.net
    stop, out, log = (os.path.join(tmp, f"{tag}-incr-{x}") for x in ("stop", "out.json", "log"))
    progress = [0]
    with open(log, "ab") as err:
        cl = subprocess.Popen(["ip", "netns", "exec", net.client, "python3", "-c", INCR_CLIENT,
                               GUEST_IP, stop, out, str(INCR_PERIOD_MS)],
                              stdout=subprocess.PIPE, stderr=err, start_new_session=True)

    def read():
        for line in cl.stdout:
            line = line.strip()
            if line.isdigit():
                progress[0] = int(line)
    th = threading.Thread(target=read, daemon=True)
    th.start()

    def wait_progress(target, what):
        deadline = time.monotonic() + 60
        while progress[0] < target:
            if cl.poll() is not None:
                raise Failed(f"the INCR loop ended {what}: {read_out()}")
            if time.monotonic() > deadline:
                raise Failed(f"the INCR loop reached only {progress[0]} of {target} {what}")
            time.sleep(0.01)

    def read_out():
        try:
            with open(out) as f:
                d = json.load(f)
            return d.get("error") or f"last reply {d.get('last')}"
        except (OSError, ValueError):
            return "(no result file)"

    try:
        wait_progress(INCR_BEFORE, "before the kill")
        setup.check()
        t_kill, t_cmd = setup.kill_primary()
        at_kill = progress[0]
        exit_props, exit_after = None, None
        if setup.kind == "colovmm-colo":
            deadline = time.monotonic() + 30
            while not setup.sev.colo("colo_exit"):
                check_alive(("secondary", setup.sec))
                if time.monotonic() > deadline:
                    raise Failed("the colovmm secondary did not fail over within 30 s")
                time.sleep(0.005)
            exit_after = time.monotonic() - t_kill
            exit_props = setup.sev.colo("colo_exit")[0].get("properties")
        try:
            wait_progress(at_kill + INCR_AFTER, "after the kill")
        except Failed as e:
            raise Failed(f"{e}; the secondary: {secondary_state(setup)}")
        with open(stop, "w"):
            pass
        try:
            cl.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise Failed("the INCR loop did not stop")
    finally:
        if cl.poll() is None:
            os.killpg(cl.pid, signal.SIGKILL)
            cl.wait()
    th.join(timeout=5)
    with open(out) as f:
        d = json.load(f)
    if d["error"]:
        raise Failed(f"the INCR loop across the failover: {d['error']} (kill at {at_kill})")
    ts = d["times"]
    value = net.client_run("python3", "-c", GET_CLIENT, GUEST_IP, "bench:incr",
                           timeout=60).stdout.strip()
    if value != str(d["last"]):
        raise Failed(f"after the failover the counter is {value}, the loop's last reply was "
                     f"{d['last']}: an INCR was lost or counted twice")
    gaps_after = [(b - a) * 1000 for a, b in zip(ts, ts[1:]) if b >= t_kill]
    # The request whose reply ended the gap: sent before the kill (its reply died with the
    # primary, or it did) or after (it reached the dead primary).
    end = next(i + 1 for i, (a, b) in enumerate(zip(ts, ts[1:]))
               if b >= t_kill and (b - a) * 1000 == max(gaps_after))
    before = [(b - a) * 1000 for a, b in zip(ts, ts[1:]) if b < t_kill and a >= t_kill - 1.0]
    first_after = next((t for t in ts if t >= t_kill), None)
    st = None
    if setup.kind.startswith("qemu"):
        st = setup.b.cmd("query-status").get("status")
        if st != "running":
            raise Failed(f"QEMU's secondary is {st} after the failover")
    return {
        "failover_gap_ms": max(gaps_after),
        "failover_first_reply_ms": (first_after - t_kill) * 1000,
        "failover_gap_request_sent_ms": (d["sent"][end] - t_kill) * 1000,
        "failover_max_gap_before_ms": max(before) if before else None,
        "failover_replies": d["last"], "failover_at_kill": at_kill,
        "failover_heartbeat_cmd_ms": (t_cmd - t_kill) * 1000 if setup.kind.startswith("qemu")
        else None,
        "failover_exit_after_ms": exit_after * 1000 if exit_after is not None else None,
        "failover_exit": exit_props, "failover_secondary_status": st,
    }


# ---------------------------------------------------------------------------------------------
# One setup, one boot


def percentile(xs, q):
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def run_setup(kind, tmp, tag, interval, shim, do_failover=True):
    r = {"kind": kind, "interval_ms": interval if "-colo" in kind else None}
    with Net() as net:
        setup = Setup(kind, net, tmp, tag, interval, shim)
        try:
            t = time.monotonic()
            setup.start()
            r["start_s"] = time.monotonic() - t
            # Warm-up, unmeasured: first touches of guest buffers, ARP, the switch's learning.
            latency(net, 200)
            client_json(net, DOWNLOAD_CLIENT, GUEST_IP, 4 << 20, timeout=300)
            for name, fn in (("latency", lambda: latency(net)), ("redis", lambda: redis_bench(net)),
                             ("download", lambda: download(net))):
                c0 = setup.counters()
                t = time.monotonic()
                r.update(fn())
                r[f"{name}_s"] = time.monotonic() - t
                setup.check()
                r[f"{name}_colo"] = delta(c0, setup.counters())
            if setup.colo:
                # Pause per checkpoint while measuring (the initial sync and the first periodic
                # checkpoint left out, as in the bench-colo section).
                if kind.startswith("qemu"):
                    p = setup.qemu_pauses()[2:]
                else:
                    p = [e["properties"]["pause_ms"] for e in setup.pev.colo("checkpoint")
                         if e["properties"].get("reason") != "initial"][1:]
                    r["colo_status_end"] = setup.counters()["status"]
                r["pause_mean_ms"] = statistics.mean(p) if p else None
                r["pause_max_ms"] = max(p) if p else None
                if do_failover:
                    t = time.monotonic()
                    r.update(failover(setup, tmp, tag))
                    r["failover_s"] = time.monotonic() - t
        finally:
            setup.close()
    return r



# ---------------------------------------------------------------------------------------------
# The run


def build_shim(tmp):
    out = os.path.join(tmp, "nodelay_shim.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", out, SHIM_SRC, "-ldl"],
                   check=True)
    return out


def wait_for_quiet_machine():
    """Another benchmark at the same time would skew both: wait for it. Other VMMs and builds
    are waited for up to FOREIGN_WAIT_S. Returns (seconds waited, the foreign ones left)."""
    said, t0 = 0.0, time.monotonic()
    while True:
        busy = processes(OTHER_BENCHMARKS)
        foreign = processes(FOREIGN, argc=1)
        if not busy and (not foreign or time.monotonic() - t0 > FOREIGN_WAIT_S):
            if foreign:
                print(f"warning: measuring alongside {len(foreign)} other VMM or build "
                      "process(es): " + "; ".join(foreign), flush=True)
            return time.monotonic() - t0, foreign
        if time.monotonic() - said > 60 or not said:
            print("waiting for " + "; ".join(busy + foreign), flush=True)
            said = time.monotonic()
        time.sleep(2)


class Lock:
    """flock(2) on FILE around one boot, if asked for (--lock): for sharing the machine with
    others who take the same lock around their heavy runs."""

    def __init__(self, path):
        self.path, self.f = path, None

    def __enter__(self):
        if self.path:
            self.f = open(self.path, "a")
            t = time.monotonic()
            fcntl.flock(self.f, fcntl.LOCK_EX)
            self.waited = time.monotonic() - t
        else:
            self.waited = 0.0
        return self

    def __exit__(self, *exc):
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def boots(kinds, intervals):
    """(kind, interval) of one round: each COLO kind once per interval."""
    out = []
    for iv in intervals:
        for k in kinds:
            if "-colo" in k or iv == intervals[0]:
                out.append((k, iv if "-colo" in k else None))
    # Unprotected first, then COLO per interval, VMMs alternating.
    return sorted(out, key=lambda b: (b[1] is not None, -(b[1] or 0), b[0].startswith("qemu"),
                                      b[0]))


def col(kind, iv):
    return kind if iv is None else f"{kind}@{iv}"


def main():
    global COLOVMM, REMOTE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks.md"))
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"comma-separated subset of {','.join(SETUPS + EXTRA_SETUPS)}")
    ap.add_argument("--intervals", default="1000,100",
                    help="checkpoint intervals in ms for the COLO setups (both VMMs)")
    ap.add_argument("--rounds", type=int, default=5, help="boots of each setup (medians)")
    ap.add_argument("--retries", type=int, default=1, help="run a failed boot again this often")
    ap.add_argument("--lock", default="", help="flock this file around each boot")
    ap.add_argument("--logs", default="", help="keep every log, console and event file here")
    ap.add_argument("--raw", default="", help="also write every measurement (JSON) here")
    ap.add_argument("--from-raw", default="", help="measure nothing: rebuild the section from a "
                                                   "--raw file")
    args = ap.parse_args()
    if args.from_raw:
        with open(args.from_raw) as f:
            raw = json.load(f)
        write_report(args.out, raw)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k for k in args.setups.split(",") if k]
    if not kinds or set(kinds) - set(SETUPS + EXTRA_SETUPS):
        ap.error(f"--setups takes a subset of {','.join(SETUPS + EXTRA_SETUPS)}")
    intervals = [int(x) for x in args.intervals.split(",") if x]
    for tool in ("qemu-system-x86_64", "gcc", "timeout", "ip", "ping", "redis-benchmark",
                 "dmesg"):
        if not shutil.which(tool):
            sys.exit(f"bench-colo-net: {tool} is missing")
    for path in (COLOVMM, REMOTE, GUEST):
        if any(k.startswith("colovmm") for k in kinds) and not os.access(path, os.R_OK):
            sys.exit(f"bench-colo-net: {path} is missing")
    if os.geteuid() != 0:
        sys.exit("bench-colo-net: needs root (network namespaces, taps)")
    remove_stale_namespaces()
    plan = boots(kinds, intervals)
    t_start = time.monotonic()
    waited = 0.0
    results = []
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    built = None
    try:
        with tempfile.TemporaryDirectory(prefix="colovmm-bench-colo-net-") as scratch:
            tmp = os.path.abspath(args.logs) if args.logs else scratch
            shim = build_shim(tmp)
            # One colovmm build for the whole run, whatever gets built meanwhile.
            bindir = os.path.join(scratch, "bin")
            os.makedirs(bindir, exist_ok=True)
            built = datetime.datetime.fromtimestamp(os.stat(COLOVMM).st_mtime).strftime(
                "%Y-%m-%d %H:%M")
            COLOVMM, REMOTE = (shutil.copy2(p, os.path.join(bindir, os.path.basename(p)))
                               for p in (COLOVMM, REMOTE))
            for rnd in range(args.rounds):
                order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]
                for kind, iv in order:
                    failures = []
                    for attempt in range(1 + args.retries):
                        w, foreign = wait_for_quiet_machine()
                        with Lock(args.lock) as lk:
                            waited += w + lk.waited
                            t = time.monotonic()
                            tag = f"r{rnd}-{col(kind, iv)}" + (f"-retry{attempt}"
                                                               if attempt else "")
                            try:
                                r = run_setup(kind, tmp, tag, iv or intervals[0], shim)
                                r["error"] = None
                            except (Failed, OSError, ValueError, KeyError, RuntimeError,
                                    EOFError, TimeoutError, subprocess.SubprocessError) as e:
                                r = {"kind": kind, "error": f"{type(e).__name__}: {e}"
                                     if not isinstance(e, Failed) else str(e)}
                        r.update(kind=kind, interval_ms=iv, round=rnd, attempt=attempt,
                                 foreign=foreign, failed_attempts=list(failures),
                                 boot_s=time.monotonic() - t)
                        print(f"round {rnd + 1}/{args.rounds} {col(kind, iv)} "
                              f"({r['boot_s']:.0f} s): " + short(r), flush=True)
                        if not r["error"]:
                            results.append(r)
                            break
                        failures.append(r["error"])
                        if attempt == args.retries:
                            results.append(r)
    finally:
        _cleanup()
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip()
    raw = {"meta": {"date": str(datetime.date.today()), "qemu": qv, "rounds": args.rounds,
                    "colovmm_rev": rev, "colovmm_built": built,
                    "intervals": intervals, "setups": kinds,
                    "elapsed_s": time.monotonic() - t_start - waited, "options": options(args)},
           "results": results}
    text = json.dumps(raw)
    if args.raw:
        with open(args.raw, "w") as f:
            f.write(text + "\n")
    print(text)
    write_report(args.out, raw)


def options(args):
    out = ""
    if args.setups != ",".join(SETUPS):
        out += f" --setups {args.setups}"
    if args.intervals != "1000,100":
        out += f" --intervals {args.intervals}"
    if args.rounds != 5:
        out += f" --rounds {args.rounds}"
    return out


def short(r):
    if r.get("error"):
        return "FAILED: " + r["error"]
    keys = ("lat_p50_ms", "lat_p99_ms", "redis_set_rps", "redis_get_rps", "download_mb_s",
            "failover_gap_ms", "pause_mean_ms")
    return ", ".join(f"{k} {r[k]:.2f}" for k in keys if r.get(k) is not None)


# ---------------------------------------------------------------------------------------------
# Report

METRICS = (
    # key, label, higher is better
    ("lat_p50_ms", "redis GET latency p50 (ms)", False),
    ("lat_p99_ms", "redis GET latency p99 (ms)", False),
    ("lat_max_ms", "redis GET latency max (ms)", False),
    ("redis_set_rps", "redis-benchmark SET (requests/s)", True),
    ("redis_get_rps", "redis-benchmark GET (requests/s)", True),
    ("download_mb_s", "HTTP download, 64 MiB (MB/s)", True),
    ("failover_gap_ms", "failover: longest gap between INCR replies (ms)", False),
)


def med(rs, key):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return (statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None


def fmt(x):
    if x is None:
        return "-"
    a = abs(x)
    return f"{x:,.0f}" if a >= 1000 else f"{x:,.1f}" if a >= 10 else f"{x:.2f}" if a >= 1 \
        else f"{x:.3f}"


def fmt_med(m):
    if not m:
        return "-"
    return f"{fmt(m[0])} ({fmt(m[1])}–{fmt(m[2])})"


def quotient(a, b):
    if not a or not b or not b[0]:
        return "-"
    q = a[0] / b[0]
    return f"{q:.2f}x" if q >= 0.1 else f"{q:.3f}x"


def write_report(out, raw):
    body = report(raw)
    update_section(out, "bench-colo-net", body)
    print(body)
    print(f"wrote {out} (section bench-colo-net); {raw['meta']['elapsed_s'] / 60:.1f} min",
          flush=True)


def report(raw):
    meta, results = raw["meta"], raw["results"]
    intervals = meta["intervals"]
    ok = [r for r in results if not r.get("error")]
    by = {}
    for r in ok:
        by.setdefault(col(r["kind"], r["interval_ms"]), []).append(r)
    kinds = meta["setups"]
    unprot = [k for k in kinds if "-colo" not in k]
    colo_kinds = [k for k in kinds if "-colo" in k]
    qcolo = [k for k in ("qemu-colo", "qemu-colo-stock") if k in kinds]
    cols = unprot + [col(k, iv) for iv in intervals for k in colo_kinds]
    cols = sorted(cols, key=lambda c: (not c.startswith("colovmm"), "@" in c,
                                       -int(c.split("@")[1]) if "@" in c else 0,
                                       SETUPS.index(c.split("@")[0])))

    def label(c):
        k, _, iv = c.partition("@")
        return LABEL[k] + (f" {iv} ms" if iv else "")

    n_rounds = sorted({len(v) for v in by.values()})
    lines = [
        "## COLO with a NIC: latency, throughput and failover through the network proxy",
        "",
        f"`scripts/bench-colo.sh` runs it after the checkpoint benchmark above (`--net-only`: this "
        f"part alone; `--no-net`: without it); by itself: `python3 scripts/bench_colo_net.py"
        f"{meta.get('options', '')}`. {meta['date']}; colovmm at "
        f"{meta.get('colovmm_rev') or '?'} (binary of {meta.get('colovmm_built') or '?'}); "
        f"{meta['qemu']}; test guest with 256 MiB, "
        f"1 vCPU, one virtio-net NIC on a tap (QEMU: microvm, `virtio-net-device`); "
        f"{meta['rounds']} rounds, each booting every setup once in fresh network namespaces, "
        "the order rotating per round; medians over the rounds (min–max in brackets; "
        f"{', '.join(map(str, n_rounds))} good boots per setup); the whole benchmark took "
        f"{meta['elapsed_s'] / 60:.1f} min.",
        "",
        "Topology as `tests/common/netns.rs`'s `TwoHostNet`: the primary's host (br0 "
        "192.168.100.10 + tap0), the secondary's host (br0 192.168.100.11 + tap0) and the client "
        "(192.168.100.1) on one switch namespace; checkpoint streams and the proxies' traffic "
        "cross that switch. Unprotected = the primary's command without COLO. colovmm COLO: "
        "`--colo role=primary,peer=192.168.100.11:9400,checkpoint-interval=MS` and a secondary "
        "with its own tap (the proxy of docs/colo.md: client frames mirrored to the SVM, the "
        "PVM's output held until the SVM sent the same). QEMU COLO: its network proxy as its "
        "COLO-FT.txt wires it — on the primary `filter-mirror` (client frames to the secondary), "
        "two `filter-redirector`s and `colo-compare` (in an `iothread`), on the secondary two "
        "`filter-redirector`s and `filter-rewriter`, all with `vnet_hdr_support=on`, the "
        "chardev sockets crossing the switch; `x-colo`, `x-checkpoint-delay` = MS, no bandwidth "
        "cap. Both compares keep their defaults (a held packet waits at most 3 s for its "
        "match). QEMU COLO TCP_NODELAY runs with the LD_PRELOAD shim `scripts/nodelay_shim.c` "
        "setting TCP_NODELAY on all its sockets (migration stream and chardevs; stock QEMU 7.2 "
        "leaves Nagle on, see the section above)"
        + ("; QEMU COLO stock is Debian's binary as is" if "qemu-colo-stock" in kinds else "")
        + ".",
        "",
        "Measured from the client namespace, in this order in every boot after an unmeasured "
        f"warm-up: **latency** — {LAT_N} sequential redis `GET`s of a 32-byte value on one TCP "
        "connection (TCP_NODELAY, a Python client, each reply checked); **throughput** — "
        f"`redis-benchmark -t set,get -n {REDIS_N}` (50 connections), and `GET /bytes/"
        f"{DOWNLOAD}` over HTTP, every byte checked against the pattern (byte i = i % 251); "
        "**failover** (COLO setups, last) — a Python client sends `INCR` on one connection "
        f"every ~{INCR_PERIOD_MS} ms and checks each reply is the previous + 1; after "
        f"{INCR_BEFORE} replies the primary VMM gets `kill -9`"
        ", and QEMU's secondary then gets `x-colo-lost-heartbeat` over QMP at once (QEMU "
        "has no heartbeat: its secondary takes over only on that external command, which here "
        "the benchmark sends right after the kill; colovmm's secondary notices the dead peer "
        "itself); the gap is the longest time between two replies from the kill on; the loop "
        f"goes on for {INCR_AFTER} replies on the same connection, then a new connection checks "
        "the counter equals the last reply (no reset, nothing lost, nothing counted twice).",
        "",
        "| metric | " + " | ".join(label(c) for c in cols) + " |",
        "| --- |" + " --- |" * len(cols),
    ]
    for key, name, _ in METRICS:
        row = [name]
        for c in cols:
            row.append("-" if key.startswith("failover") and "@" not in c
                       else fmt_med(med(by.get(c, []), key)))
        lines.append("| " + " | ".join(row) + " |")

    # Ratios
    lines += [
        "",
        "Ratios of the medians. colovmm vs QEMU: above 1.0 means colovmm is better (QEMU / "
        "colovmm for latencies and the gap, colovmm / QEMU for throughputs)"
        + ("; QEMU COLO is the better of its two variants on each figure" if len(qcolo) > 1
           else "") + ". COLO / "
        "unprotected: the protected figure divided by the same VMM's unprotected one (for "
        "latencies how many times longer, for throughputs the fraction kept).",
        "",
    ]

    def get(c, key, higher):
        """The median of column c; "QEMU@iv" = the better QEMU COLO on this figure."""
        if not c.startswith("QEMU@"):
            return med(by.get(c, []), key)
        ms = [m for m in (med(by.get(f"{k}@{c[5:]}", []), key) for k in qcolo) if m]
        return (max if higher else min)(ms, key=lambda m: m[0]) if ms else None

    rcols = [("colovmm vs QEMU, unprotected", "colovmm", "qemu", True)]
    for iv in intervals:
        rcols.append((f"colovmm vs QEMU, COLO {iv} ms", f"colovmm-colo@{iv}", f"QEMU@{iv}", True))
    for iv in intervals:
        rcols.append((f"COLO {iv} ms / unprotected, colovmm", f"colovmm-colo@{iv}", "colovmm",
                      False))
        rcols.append((f"COLO {iv} ms / unprotected, QEMU", f"QEMU@{iv}", "qemu", False))
    lines += ["| metric | " + " | ".join(x[0] for x in rcols) + " |",
              "| --- |" + " --- |" * len(rcols)]
    for key, name, higher in METRICS:
        row = [name]
        for _, a, b, vs in rcols:
            ma, mb = get(a, key, higher), get(b, key, higher)
            if key.startswith("failover") and not vs:
                row.append("-")
            elif vs and not higher:
                row.append(quotient(mb, ma))
            else:
                row.append(quotient(ma, mb))
        lines.append("| " + " | ".join(row) + " |")

    # What COLO did
    lines += [
        "",
        "What the protection did meanwhile (medians per boot): checkpoints during each "
        "measurement (colovmm: from `colo-status`, with how many its compare asked for, reason "
        "`divergence`; QEMU: STOP events of the primary, which give no reason — what the "
        "interval alone would give is in brackets), the pause per checkpoint (mean per boot; "
        "colovmm `pause_ms`, QEMU STOP → RESUME; the initial sync and the first periodic "
        "checkpoint left out), the longest gap between INCR replies in the second before the "
        "kill (protected, nothing failed yet), every boot's failover gap (sorted), when the "
        "secondary took over (colovmm: its `colo_exit` event after the kill; QEMU: the "
        "`x-colo-lost-heartbeat` command returned), and the INCR replies (at the kill / in all; "
        "every one checked, and the counter read back on a new connection).",
        "",
        "| setup | checkpoints: latency | redis-benchmark | download | pause mean (ms) "
        "| INCR gap before the kill (ms) | failover gaps (ms) | takeover after the kill (ms) "
        "| INCR replies |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in cols:
        if "@" not in c:
            continue
        rs = by.get(c, [])
        iv = int(c.split("@")[1])
        cells = [label(c)]
        for phase in ("latency", "redis", "download"):
            n = med([{"x": (r.get(f"{phase}_colo") or {}).get("checkpoints")} for r in rs], "x")
            div = med([{"x": (r.get(f"{phase}_colo") or {}).get("reason_divergence", 0)}
                       for r in rs if r.get(f"{phase}_colo")], "x")
            secs = med([{"x": (r.get(f"{phase}_colo") or {}).get("t")} for r in rs], "x")
            if n is None:
                cells.append("-")
            elif c.startswith("colovmm"):
                cells.append(f"{n[0]:g}, divergence {div[0]:g}" if div else f"{n[0]:g}")
            else:
                cells.append(f"{n[0]:g} ({secs[0] * 1000 / iv:.1f})" if secs else f"{n[0]:g}")
        cells.append(fmt_med(med(rs, "pause_mean_ms")))
        cells.append(fmt_med(med(rs, "failover_max_gap_before_ms")))
        gaps = sorted((r["failover_gap_ms"], (r.get("failover_gap_request_sent_ms") or 0) < 0)
                      for r in rs if r.get("failover_gap_ms") is not None)
        cells.append(", ".join(f"{g:.0f}" + ("*" if before else "") for g, before in gaps)
                     or "-")
        take = "failover_exit_after_ms" if c.startswith("colovmm") else "failover_heartbeat_cmd_ms"
        cells.append(fmt_med(med(rs, take)))
        fo = [r for r in rs if r.get("failover_replies")]
        cells.append(f"{med(fo, 'failover_at_kill')[0]:g} / "
                     f"{med(fo, 'failover_replies')[0]:g}, {len(fo)} of {len(rs)} boots"
                     if fo else "-")
        lines.append("| " + " | ".join(cells) + " |")

    def classes(prefix):
        gs = [r["failover_gap_ms"] for r in ok if r["kind"].startswith(prefix)
              and r.get("failover_gap_ms") is not None]
        return (f"{sum(g < 100 for g in gs)} / {sum(100 <= g < 900 for g in gs)} / "
                f"{sum(g >= 900 for g in gs)} of {len(gs)}")

    lines += [
        "",
        "Where the failover gap comes from: a request that reached only the primary (sent just "
        "before the kill, or after it while the secondary had not yet taken over) dies with it, "
        "and the client's TCP sends it again after its minimum RTO (200 ms on Linux): gaps of "
        "~210 ms with either VMM. A request the SVM had already answered when the primary died, "
        "its reply held in the primary's compare, is answered again when the secondary puts "
        "the SVM's segments since its last checkpoint on its tap at the takeover (colovmm: "
        "gaps of the takeover time) or else when the guest's TCP retransmits it (the test "
        "guest's smoltcp: RTO at least 1 s; QEMU: gaps of ~1,000 ms). Which case a boot gets "
        "depends on where in the ~2 ms INCR cycle the kill lands. A * marks a gap that ended "
        "with the reply to a request sent before the kill. Gaps under 100 ms / 100–900 ms / "
        f"900 ms or more in this run: colovmm {classes('colovmm')} boots, QEMU "
        f"{classes('qemu')}.",
    ]
    notes = []
    for r in results:
        c = label(col(r["kind"], r["interval_ms"]))
        if r.get("error"):
            notes.append(f"{c}, round {r['round'] + 1}: failed: {r['error']}")
        for e in r.get("failed_attempts") or []:
            if not r.get("error"):
                notes.append(f"{c}, round {r['round'] + 1}: an attempt failed and was run again: "
                             f"{e}")
        if r.get("foreign"):
            notes.append(f"{c}, round {r['round'] + 1}: ran while {len(r['foreign'])} other VMM "
                         "or build process(es) ran")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}".replace("|", "/") for n in notes]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
