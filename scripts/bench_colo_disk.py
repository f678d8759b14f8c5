"""Guest disk writes under COLO: colovmm vs QEMU COLO (quorum + replication + NBD), protected vs
unprotected, same guest, same disk size, one run.

Setups (1 vCPU, 256 MiB, one raw image of --disk-mib MiB, zeroes, written out in full; primary
and secondary of a pair on 127.0.0.1; every boot on fresh images):

  colovmm             one colovmm, `--disk path=IMG`, no COLO.
  colovmm-colo        secondary `--colo role=secondary,listen=... --disk path=COPY`, primary
                      `--disk path=IMG --colo role=primary,peer=...,checkpoint-interval=MS`: a
                      guest write completes once the secondary holds it (disk-completion default,
                      `replicated`); the secondary's hidden/active layers in memory (default).
  colovmm-colo-local  the same with `disk-completion=local` on the primary (a write completes
                      once the primary's image holds it).
  qemu                QEMU 7.2 microvm, `-drive format=raw` + `virtio-blk-device`, no COLO.
  qemu-colo           QEMU COLO with block replication as in QEMU's COLO guide: the primary's
                      disk is a quorum (vote-threshold=1) over the raw image, and after boot an
                      NBD child (the secondary's export) is added with `x-blockdev-change`; the
                      secondary's disk is a quorum over a `replication` node (mode=secondary)
                      whose active and hidden qcow2 images (on /dev/shm, as the guide advises)
                      have the raw copy as their base, which its NBD server exports.
                      x-colo, `x-checkpoint-delay` MS, no bandwidth cap.
  qemu-colo-nodelay   the same with scripts/nodelay_shim.c LD_PRELOADed (TCP_NODELAY on the
                      migration and NBD sockets: stock QEMU 7.2 leaves Nagle on its migration
                      socket, see bench_colo.py).

The secondary's copy is a byte-equal copy of the image made before the boot (QEMU needs it; for
colovmm its initial sync then sends nothing; --fresh-copy leaves colovmm's absent, so its initial
sync creates it).

Per boot, after protection is on and the first periodic checkpoint passed (the guest's console
on the primary's stdin/stdout, times taken on the host):

  latency   `disk write <seq>` (a 512-byte record appended at the disk's start + a flush; the
            answer comes after both completed), at least --records times and for at least
            --lat-s seconds, after 5 warm-up records: the
            round trip of each command on the console, as a synchronous writer sees it (median,
            p99). The same console round trip of a command without disk I/O (`uptime`, median)
            is reported beside it.
  randwrite `disk bench randwrite 2000` (4 KiB at random 4 KiB-aligned offsets in the disk's
            upper half, 32 in flight, ends with a flush) repeated for at least --bench-s seconds:
            IOPS = requests / host wall time of the commands (the guest's own figure, which uses
            its TSC, is kept in the raw output).
  write     `disk bench write 16` (1 MiB sequential requests, 8 in flight, upper half) likewise:
            MB/s (10^6 bytes).

Then `disk check` must find every record intact, and protection must still be on (colovmm: no
`colo_exit` event; QEMU: `query-migrate` still `colo`). The checkpoints during the measurement
(count, mean pause) are recorded. Rounds boot every setup once, rotating the order; the table
has medians over rounds.
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
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (  # noqa: E402
    COLOVMM, GUEST, ROOT, EventTail, Failed, check_alive, median, qemu_cmd, update_section)
from bench_migration import Qmp, free_port  # noqa: E402
from bench_colo import (  # noqa: E402
    Proc, build_shim, listening, pauses, percentile, remote as _remote)

REMOTE = os.path.join(ROOT, "target/release/colovmm-remote")
SETUPS = ("colovmm", "colovmm-colo", "colovmm-colo-local", "qemu", "qemu-colo",
          "qemu-colo-nodelay")
LABEL = {"colovmm": "colovmm unprotected", "colovmm-colo": "colovmm COLO",
         "colovmm-colo-local": "colovmm COLO, disk-completion=local",
         "qemu": "QEMU unprotected", "qemu-colo": "QEMU COLO (stock)",
         "qemu-colo-nodelay": "QEMU COLO (TCP_NODELAY shim)"}
MEM = "256M"
RAND_N = 2000
SEQ_MIB = 16
WARMUP = 5
BOOT_S = 60
PROTECT_S = 120
QEMU_MAX_BANDWIDTH = 1 << 40
# Every process we start is registered here and SIGKILLed (its whole process group) at exit,
# whatever the way out (an exception, SIGTERM, a normal end).
LIVE = []


def kill_all():
    while LIVE:
        p = LIVE.pop()
        try:
            p.kill()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(kill_all)


def start(cmd, log, env=None):
    p = Proc(cmd, log, env=env)
    LIVE.append(p)
    return p


def stop(p):
    if p is None:
        return
    p.kill()
    if p in LIVE:
        LIVE.remove(p)


class Lock:
    """flock(2) on the shared lock file around one boot and its measurements."""

    def __init__(self, path):
        self.path, self.f, self.waited = path, None, 0.0

    def __enter__(self):
        if self.path:
            self.f = open(self.path, "a")
            t = time.monotonic()
            fcntl.flock(self.f, fcntl.LOCK_EX)
            self.waited = time.monotonic() - t
        return self

    def __exit__(self, *exc):
        if self.f:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


def remote(sock, *args, timeout=10):
    return _remote(sock, *args, timeout=timeout)


def make_image(path, mib):
    """A raw image of zeroes, written out (not sparse), like a provisioned disk."""
    chunk = b"\0" * (1 << 20)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def copy_image(src, dst):
    shutil.copyfile(src, dst)
    with open(dst, "rb+") as f:
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# The measurements, on a VM's console


class LostLine(Exception):
    """The guest's answer never came, but it answers the next command: the answer's bytes were
    lost on the console (seen on QEMU COLO's primary), the guest is alive."""


def ask_ok(vm, cmd, pattern, timeout=60.0):
    try:
        text, dt = vm.ask(cmd, r"^(disk|error|uptime_ms=)", timeout)
    except TimeoutError:
        try:
            vm.ask("uptime", r"^uptime_ms=", 5)
        except TimeoutError:
            raise Failed(f"the guest did not answer {cmd!r} within {timeout:g} s, nor "
                         "`uptime` after it") from None
        raise LostLine(cmd) from None
    if not re.search(pattern, text):
        raise Failed(f"guest answered {cmd!r} with {text!r}")
    return text, dt


def measure(vm, args, alive):
    """The latency, randwrite and write figures of one booted VM; `alive()` raises Failed if a
    VMM died or protection ended."""
    r = {}
    text, _ = ask_ok(vm, "disks", r"^disks=1 0:(\d+)")
    sectors = int(re.search(r"0:(\d+)", text).group(1))
    if sectors * 512 != args.disk_mib << 20:
        raise Failed(f"guest sees {sectors} sectors, expected {args.disk_mib} MiB")
    echo = []
    for _ in range(20):
        _, dt = ask_ok(vm, "uptime", r"^uptime_ms=")
        echo.append(dt * 1000)
    r["console_rtt_ms"] = median(echo)
    # Console lines that came garbled (bytes lost; only seen on QEMU COLO's primary) or not at
    # all: a garbled answer still times its command, a lost one is left out.
    r["garbled_lines"] = r["lost_lines"] = 0

    def record(seq):
        try:
            text, dt = ask_ok(vm, f"disk write {seq}", r"^disk write ok", timeout=10)
        except LostLine:
            r["lost_lines"] += 1
            return None
        if not re.match(rf"^disk write ok seq={seq} sector=\d+$", text):
            r["garbled_lines"] += 1
        return dt

    seq = 0
    for _ in range(WARMUP):
        seq += 1
        record(seq)
    lat = []
    t_lat = time.time()
    while seq - WARMUP < args.records or time.time() - t_lat < args.lat_s:
        seq += 1
        dt = record(seq)
        if dt is not None:
            lat.append(dt * 1000)
    r["latency_ms"] = lat
    r["latency_window"] = (t_lat, time.time())
    alive()

    def bench(cmd, per):
        # What counts is the host's time per command; the guest's own figures are kept when
        # its line arrived whole (QEMU COLO's primary at times loses console bytes).
        total, host_s, guest = 0, 0.0, []
        t0 = time.time()
        while not total or host_s < args.bench_s:
            try:
                text, dt = ask_ok(vm, cmd, r"^disk bench", timeout=30)
            except LostLine:
                r["lost_lines"] += 1
                continue
            total += per
            host_s += dt
            m = re.search(r"^disk bench \w+ bytes=\d+ ms=[\d.]+ mb_s=([\d.]+) iops=(\d+)$",
                          text)
            guest.append((float(m.group(1)), int(m.group(2))) if m else text)
            if not m:
                r["garbled_lines"] += 1
            alive()
        return total, host_s, guest, (t0, time.time())

    n, s, guest, win = bench(f"disk bench randwrite {RAND_N}", RAND_N)
    r.update(rand_iops=n / s, rand_guest=guest, rand_s=s, rand_window=win)
    n, s, guest, win = bench(f"disk bench write {SEQ_MIB}", SEQ_MIB)
    r.update(seq_mb_s=n * (1 << 20) / s / 1e6, seq_guest=guest, seq_s=s, seq_window=win)
    text, _ = ask_ok(vm, "disk check", r"^disk records=")
    if text != f"disk records={seq} last={seq} ok":
        raise Failed(f"`disk check` after {seq} records: {text!r}")
    r["records"] = seq
    return r


def in_window(t, w):
    return w[0] <= t <= w[1]


# ---------------------------------------------------------------------------------------------
# colovmm


def run_colovmm(tmp, tag, args, interval, protect=True, local=False, shim=None):
    del shim
    img, copy = os.path.join(tmp, f"{tag}-pri.img"), os.path.join(tmp, f"{tag}-sec.img")
    make_image(img, args.disk_mib)
    ps, ss_ = os.path.join(tmp, f"{tag}-pri.sock"), os.path.join(tmp, f"{tag}-sec.sock")
    pev, sev = (os.path.join(tmp, f"{tag}-{side}-events.jsonl") for side in ("pri", "sec"))
    plog, slog = os.path.join(tmp, f"{tag}-pri.log"), os.path.join(tmp, f"{tag}-sec.log")
    pri = sec = None
    try:
        if not protect:
            pri = start([COLOVMM, "--kernel", GUEST, "--memory", f"size={MEM}", "--cpus", "boot=1",
                         "--disk", f"path={img}", "--serial", "tty"], log=plog)
            pri.line(r"^TESTGUEST READY", timeout=BOOT_S)
            r = measure(pri, args, lambda: check_alive(("VMM", pri)))
            return r
        if not args.fresh_copy:
            copy_image(img, copy)
        port = free_port()
        sec = start([COLOVMM, "--colo", f"role=secondary,listen=127.0.0.1:{port}",
                     "--disk", f"path={copy}",
                     "--serial", f"file={os.path.join(tmp, f'{tag}-sec-console.log')}",
                     "--api-socket", f"path={ss_}", "--event-monitor", f"path={sev}"], log=slog)
        deadline = time.monotonic() + 15
        while not listening(port):
            check_alive(("secondary", sec))
            if time.monotonic() > deadline:
                raise Failed(f"the secondary never listened on 127.0.0.1:{port}")
            time.sleep(0.02)
        spec = f"role=primary,peer=127.0.0.1:{port},checkpoint-interval={interval}"
        if local:
            spec += ",disk-completion=local"
        pri = start([COLOVMM, "--kernel", GUEST, "--memory", f"size={MEM}", "--cpus", "boot=1",
                     "--disk", f"path={img}", "--serial", "tty", "--api-socket", f"path={ps}",
                     "--event-monitor", f"path={pev}", "--colo", spec], log=plog)
        pri.line(r"^TESTGUEST READY", timeout=BOOT_S)
        pe, se = EventTail(pev), EventTail(sev)

        def alive():
            for side, ev in (("primary", pe), ("secondary", se)):
                exits = ev.colo("colo_exit")
                if exits:
                    raise Failed(f"protection ended on the {side}: "
                                 f"{json.dumps(exits[0].get('properties'))}")
            check_alive(("primary", pri), ("secondary", sec))

        def wait_for(what, cond, timeout):
            deadline = time.monotonic() + timeout
            while True:
                alive()
                got = cond()
                if got:
                    return got
                if time.monotonic() > deadline:
                    raise Failed(f"no {what} after {timeout} s")
                time.sleep(0.05)

        t_boot = time.time()
        wait_for("`protected` event on both sides",
                 lambda: pe.colo("protected") and se.colo("protected"), PROTECT_S)
        wait_for("first periodic checkpoint", lambda: [
            e for e in pe.colo("checkpoint") if e["properties"].get("reason") != "initial"],
            interval / 1000 * 3 + 30)
        r = measure(pri, args, alive)
        st = remote(ps, "colo-status", "--json")
        r["colo_status"] = json.loads(st.stdout) if st.returncode == 0 and st.stdout.strip() \
            else {"error": st.stderr.strip()}
        alive()
        ck = [e for e in pe.colo("checkpoint")]
        r["ckpt"] = ckpt_summary([(e["timestamp"], float(e["properties"].get("pause_ms", 0)))
                                  for e in ck], r)
        r["ckpt_reasons"] = {}
        for e in ck:
            k = e["properties"].get("reason")
            r["ckpt_reasons"][k] = r["ckpt_reasons"].get(k, 0) + 1
        sync = [e for e in pe.poll() if e.get("event") == "disk-sync"]
        r["disk_sync"] = sync[-1]["properties"] if sync else None
        prot = pe.colo("protected")
        r["boot_to_protected_s"] = prot[0]["timestamp"] - t_boot if prot else None
        return r
    finally:
        for sock, vm in ((ps, pri), (ss_, sec)):
            if vm is not None and vm.alive() and os.path.exists(sock):
                try:
                    remote(sock, "shutdown-vmm", timeout=5)
                    vm.proc.wait(timeout=5)
                except subprocess.SubprocessError:
                    pass
            stop(vm)


def ckpt_summary(pairs, r):
    """Checkpoints (timestamp, pause ms) during the latency and the bench windows."""
    out = {}
    for name in ("latency", "rand", "seq"):
        w = r[f"{name}_window"]
        ps = [p for t, p in pairs if in_window(t, w)]
        out[name] = {"n": len(ps), "pause_mean_ms": sum(ps) / len(ps) if ps else None,
                     "pause_max_ms": max(ps) if ps else None}
    return out


# ---------------------------------------------------------------------------------------------
# QEMU


def qemu_base(tmp, tag, side):
    cmd = qemu_cmd(mem=MEM) + ["-msg", "timestamp=on", "-global",
                               "virtio-mmio.force-legacy=false"]
    if side == "sec":
        cmd[cmd.index("-serial") + 1] = f"file:{os.path.join(tmp, f'{tag}-sec-console.log')}"
    return cmd


def run_qemu(tmp, tag, args, interval, protect=True, shim=None):
    img, copy = os.path.join(tmp, f"{tag}-pri.img"), os.path.join(tmp, f"{tag}-sec.img")
    make_image(img, args.disk_mib)
    plog, slog = os.path.join(tmp, f"{tag}-pri.log"), os.path.join(tmp, f"{tag}-sec.log")
    pq, sq = os.path.join(tmp, f"{tag}-pri.qmp"), os.path.join(tmp, f"{tag}-sec.qmp")
    pri = sec = a = b = None
    layers = []
    try:
        if not protect:
            pri = start(qemu_base(tmp, tag, "pri") + [
                "-drive", f"id=d0,file={img},format=raw,if=none",
                "-device", "virtio-blk-device,drive=d0"], log=plog)
            pri.line(r"^TESTGUEST READY", timeout=BOOT_S)
            return measure(pri, args, lambda: check_alive(("VMM", pri)))
        copy_image(img, copy)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else tmp
        active, hidden = (os.path.join(shm, f"colovmm-bench-disk-{os.getpid()}-{tag}-{n}.qcow2")
                          for n in ("active", "hidden"))
        layers = [active, hidden]
        for path in layers:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path,
                            f"{args.disk_mib}M"], check=True)
        port, nport = free_port(), free_port()
        env = {"LD_PRELOAD": shim} if shim else None
        sec = start(qemu_base(tmp, tag, "sec") + [
            "-drive", f"if=none,id=parent0,driver=raw,file.filename={copy}",
            "-drive", "if=none,id=childs0,driver=replication,mode=secondary,file.driver=qcow2,"
                      f"top-id=colo-disk0,file.file.filename={active},"
                      f"file.backing.driver=qcow2,file.backing.file.filename={hidden},"
                      "file.backing.backing=parent0",
            "-drive", "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                      "children.0=childs0",
            "-device", "virtio-blk-device,drive=colo-disk0",
            "-qmp", f"unix:{sq},server=on,wait=off", "-incoming", f"tcp:127.0.0.1:{port}"],
            log=slog, env=env)
        pri = start(qemu_base(tmp, tag, "pri") + [
            "-drive", "if=none,id=colo-disk0,driver=quorum,read-pattern=fifo,vote-threshold=1,"
                      f"children.0.file.filename={img},children.0.driver=raw",
            "-device", "virtio-blk-device,drive=colo-disk0",
            "-qmp", f"unix:{pq},server=on,wait=off"], log=plog, env=env)
        pri.line(r"^TESTGUEST READY", timeout=BOOT_S)
        a, b = Qmp(pq), Qmp(sq)
        caps = [{"capability": "x-colo", "state": True}]
        b.cmd("migrate-set-capabilities", capabilities=caps)
        b.cmd("nbd-server-start", addr={"type": "inet", "data": {"host": "127.0.0.1",
                                                                  "port": str(nport)}})
        b.cmd("nbd-server-add", device="parent0", writable=True)
        a.cmd("blockdev-add", driver="nbd", **{
            "node-name": "nbd0", "export": "parent0", "detect-zeroes": "on",
            "server": {"type": "inet", "host": "127.0.0.1", "port": str(nport)}})
        a.cmd("x-blockdev-change", parent="colo-disk0", node="nbd0")
        a.cmd("migrate-set-capabilities", capabilities=caps)
        a.cmd("migrate-set-parameters", **{"x-checkpoint-delay": interval,
                                           "max-bandwidth": QEMU_MAX_BANDWIDTH})
        t_mig = time.time()
        a.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

        def alive():
            check_alive(("primary", pri), ("secondary", sec))
            st = a.cmd("query-migrate").get("status")
            if st != "colo":
                raise Failed(f"QEMU COLO ended on the primary (query-migrate: {st}): "
                             f"{pri.tail()} / secondary: {sec.tail()}")

        deadline = time.monotonic() + PROTECT_S
        while a.cmd("query-migrate").get("status") != "colo":
            st = a.cmd("query-migrate").get("status")
            if st in ("failed", "cancelled"):
                raise Failed(f"migration {st}: {pri.tail()} / secondary: {sec.tail()}")
            check_alive(("primary", pri), ("secondary", sec))
            if time.monotonic() > deadline:
                raise Failed(f"not in COLO after {PROTECT_S} s (status {st})")
            time.sleep(0.02)
        protected = time.time() - t_mig
        # The end of the migration and the first periodic checkpoint pass first.
        while len(pauses(a)) < 2:
            alive()
            if time.monotonic() > deadline + interval / 1000 * 3:
                raise Failed("first checkpoint not done in time")
            time.sleep(0.05)
        try:
            r = measure(pri, args, alive)
        except Failed as e:
            # What QEMU says about a guest whose disk command never answered.
            try:
                st = a.cmd("query-status").get("status")
                mig = a.cmd("query-migrate").get("status")
                sst = b.cmd("query-status").get("status")
            except (OSError, RuntimeError, EOFError) as qe:
                st = mig = sst = f"QMP: {qe}"
            raise Failed(f"{e} (primary: status {st}, migration {mig}; secondary: status "
                         f"{sst})") from None
        alive()
        a.cmd("query-status")
        r["ckpt"] = ckpt_summary([(s, (e - s) * 1000) for s, e in pauses(a)], r)
        r["colo_status"] = a.cmd("query-colo-status")
        r["migrate_to_colo_s"] = protected
        return r
    finally:
        for q in (a, b):
            if q:
                q.close()
        stop(pri)
        stop(sec)
        for path in layers:
            try:
                os.unlink(path)
            except OSError:
                pass


def run_setup(kind, tmp, tag, args, interval, shim):
    # A kept --logs directory may hold files of an earlier run under the same tag (event files
    # are appended to).
    for f in os.listdir(tmp):
        if f.startswith(tag + "-"):
            os.unlink(os.path.join(tmp, f))
    if kind == "colovmm":
        return run_colovmm(tmp, tag, args, interval, protect=False)
    if kind == "colovmm-colo":
        return run_colovmm(tmp, tag, args, interval)
    if kind == "colovmm-colo-local":
        return run_colovmm(tmp, tag, args, interval, local=True)
    if kind == "qemu":
        return run_qemu(tmp, tag, args, interval, protect=False)
    if kind == "qemu-colo":
        return run_qemu(tmp, tag, args, interval)
    if kind == "qemu-colo-nodelay":
        return run_qemu(tmp, tag, args, interval, shim=shim)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# The report


def is_colo(kind):
    return "-colo" in kind


def col(kind, iv):
    return kind if iv is None else f"{kind}@{iv}"


def boots(kinds, intervals):
    out = []
    for k in kinds:
        if is_colo(k):
            out += [(k, iv) for iv in intervals]
        else:
            out.append((k, None))
    return out


def figures(r):
    lat = r["latency_ms"]
    return {"lat_med": median(lat), "lat_p99": percentile(lat, 99), "lat_max": max(lat),
            "iops": r["rand_iops"], "mb_s": r["seq_mb_s"], "rtt": r["console_rtt_ms"]}


def summarize(results, kind, iv):
    good = [r for r in results if r["kind"] == kind and r["interval_ms"] == iv
            and not r.get("error")]
    if not good:
        return None
    fs = [figures(r) for r in good]
    s = {k: median([f[k] for f in fs]) for k in fs[0]}
    s["n"] = len(good)
    for k in ("iops", "mb_s", "lat_med"):
        s[k + "_range"] = (min(f[k] for f in fs), max(f[k] for f in fs))
    ck = [r["ckpt"] for r in good if r.get("ckpt")]
    if ck:
        s["ckpt_n"] = median([c["rand"]["n"] + c["seq"]["n"] + c["latency"]["n"] for c in ck])
        ms = [c[w]["pause_mean_ms"] for c in ck for w in ("latency", "rand", "seq")
              if c[w]["pause_mean_ms"] is not None]
        s["ckpt_pause"] = median(ms) if ms else None
    return s


def fmt(x, nd=1):
    if x is None:
        return "-"
    if x >= 100:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def ratio(a, b, higher_better=True):
    if a is None or b is None or not a or not b:
        return "-"
    return f"{(a / b if higher_better else b / a):.2f}"


def best_qemu(sums, kinds, iv, key, higher_better):
    vals = [(sums.get((k, iv)) or {}).get(key) for k in kinds]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return max(vals) if higher_better else min(vals)


def write_report(out, raw):
    meta, results = raw["meta"], raw["results"]
    kinds, intervals = meta["kinds"], meta["intervals"]
    sums = {(k, iv): summarize(results, k, iv) for k, iv in boots(kinds, intervals)}
    base = {v: sums.get((v, None)) for v in ("colovmm", "qemu")}
    lines = [
        "## Guest disk writes under COLO: colovmm vs QEMU COLO (quorum + replication + NBD)",
        "",
        "`scripts/bench-colo.sh` runs it after the network part (`--disk-only`: this part "
        "alone, `--no-disk`: without it, `--disk-X V`: its option `--X V`); this table came from "
        f"`{meta['command']}` ({meta['date']}; colovmm binary of {meta['built']} (HEAD "
        f"{meta['rev']} at the run); {meta['qemu']}; test guest with {MEM[:-1]} MiB, 1 vCPU, one virtio-blk "
        f"disk: a {meta['disk_mib']} MiB raw image of zeroes on ext4 (QEMU: microvm, "
        "`virtio-blk-device`, default cache=writeback); primary and secondary on 127.0.0.1; "
        f"{meta['rounds']} rounds, each booting every setup once on fresh images, the order "
        "rotating per round; medians over the rounds, [min–max] where it matters; the whole "
        f"benchmark took {meta['elapsed_s'] / 60:.1f} min). Measured once protection is on and "
        "the first periodic checkpoint has passed. A failed boot (a VMM died, protection ended, "
        "the guest stopped answering) is booted again once and listed under the table.",
        "",
        f"- **sync write latency**: the host's round trip of `disk write <seq>` on the primary's "
        f"console (a 512-byte record + a flush; the guest answers after both completed), "
        f"at least {meta['records']} records and {meta.get('lat_s', 0):g} s per boot (so "
        f"checkpoints fall in) after {WARMUP} warm-up ones: median and p99 per "
        "boot, then the median over boots. The console's own round trip (`uptime`, no I/O) is "
        "in its own column.",
        f"- **4 KiB randwrite IOPS**: `disk bench randwrite {RAND_N}` (4 KiB, 32 in flight, "
        f"random offsets in the upper half, a flush at the end) repeated for ≥ "
        f"{meta['bench_s']:g} s; requests / host wall time of the commands.",
        f"- **1 MiB seq write MB/s**: `disk bench write {SEQ_MIB}` (8 in flight, upper half, "
        f"a flush at the end) repeated for ≥ {meta['bench_s']:g} s.",
        "- colovmm COLO: the guest's write completes once the secondary holds it "
        "(`disk-completion=replicated`, the default; the secondary's layers in memory); "
        "`disk-completion=local`: once the primary's image does. QEMU COLO: the primary's disk "
        "is a quorum (vote-threshold=1) of the raw image and an NBD client to the secondary, "
        "whose disk is `replication` (mode=secondary) with active and hidden qcow2 images on "
        "/dev/shm over the raw copy (the setup of QEMU's COLO guide); stock, and with the "
        "TCP_NODELAY LD_PRELOAD shim (`scripts/nodelay_shim.c`) on all its sockets.",
        "- Ratios: \"vs unprotected\" = this row / the same VMM unprotected (IOPS, MB/s: above "
        "1.0 is faster; latency: unprotected / this row, so also the fraction of the "
        "unprotected speed kept); \"colovmm / QEMU\" compares each colovmm row with the QEMU "
        "row of the same kind (the better of stock / shim for COLO), above 1.0 means colovmm "
        "is better.",
        "",
        "| setup | interval | write latency median / p99 (ms) | console RTT (ms) "
        "| randwrite IOPS | seq write MB/s | vs unprotected: latency / IOPS / MB/s "
        "| colovmm / QEMU: latency / IOPS / MB/s | checkpoints in the window (mean pause ms) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    qemu_colo = [k for k in kinds if k.startswith("qemu-colo")]
    for k, iv in boots(kinds, intervals):
        s = sums.get((k, iv))
        row = [LABEL[k], "-" if iv is None else f"{iv} ms"]
        errs = [r["error"] for r in results if r["kind"] == k and r["interval_ms"] == iv
                and r.get("error")]
        if s is None:
            row += [f"failed: {errs[0] if errs else 'not run'}".replace("|", "/")] + ["-"] * 6
            lines.append("| " + " | ".join(row) + " |")
            continue
        lo, hi = s["iops_range"]
        row += [f"{fmt(s['lat_med'], 2)} / {fmt(s['lat_p99'], 2)}", fmt(s["rtt"], 2),
                f"{fmt(s['iops'])} [{fmt(lo)}–{fmt(hi)}]",
                f"{fmt(s['mb_s'])} [{fmt(s['mb_s_range'][0])}–{fmt(s['mb_s_range'][1])}]"]
        b = base["colovmm" if k.startswith("colovmm") else "qemu"]
        if is_colo(k) and b:
            row.append(f"{ratio(s['lat_med'], b['lat_med'], False)} / "
                       f"{ratio(s['iops'], b['iops'])} / {ratio(s['mb_s'], b['mb_s'])}")
        else:
            row.append("-")
        if k.startswith("colovmm"):
            q = ["qemu"] if not is_colo(k) else qemu_colo
            qiv = None if not is_colo(k) else iv
            row.append(f"{ratio(s['lat_med'], best_qemu(sums, q, qiv, 'lat_med', False), False)}"
                       f" / {ratio(s['iops'], best_qemu(sums, q, qiv, 'iops', True))}"
                       f" / {ratio(s['mb_s'], best_qemu(sums, q, qiv, 'mb_s', True))}")
        else:
            row.append("-")
        row.append("-" if s.get("ckpt_n") is None else
                   f"{s['ckpt_n']:g} ({fmt(s.get('ckpt_pause'))})")
        if errs:
            row[0] += f" ({len(errs)} failed boot(s), see notes)"
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for r in results:
        if r.get("error"):
            notes.append(f"round {r['round'] + 1}, {col(r['kind'], r['interval_ms'])}: "
                         f"{r['error']}")
        for e in r.get("failed_attempts") or []:
            notes.append(f"round {r['round'] + 1}, {col(r['kind'], r['interval_ms'])}: a boot "
                         f"failed and was run again: {e}")
        if r.get("garbled_lines") or r.get("lost_lines"):
            notes.append(f"round {r['round'] + 1}, {col(r['kind'], r['interval_ms'])}: "
                         f"{r['garbled_lines']} console answer(s) came with bytes missing "
                         f"(timed all the same), {r['lost_lines']} never came (the guest "
                         "answered the next command; left out)")
        if r.get("foreign"):
            notes.append(f"round {r['round'] + 1}, {col(r['kind'], r['interval_ms'])}: other "
                         f"VMMs or builds were running: {len(r['foreign'])}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}".replace("|", "/") for n in notes]
    body = "\n".join(lines)
    update_section(out, "bench-colo-disk", body)
    return body


# ---------------------------------------------------------------------------------------------


def main():
    global COLOVMM, REMOTE
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks.md"))
    ap.add_argument("--setups", default=",".join(SETUPS),
                    help=f"comma-separated subset of {','.join(SETUPS)}")
    ap.add_argument("--intervals", default="1000,100",
                    help="checkpoint intervals in ms for the COLO setups (both VMMs), e.g. "
                         "1000,100")
    ap.add_argument("--rounds", type=int, default=5, help="boots of each setup (medians)")
    ap.add_argument("--records", type=int, default=300, help="timed `disk write`s per boot")
    ap.add_argument("--lat-s", type=float, default=3.0,
                    help="time `disk write`s for at least this long too (checkpoints fall in)")
    ap.add_argument("--bench-s", type=float, default=4.0,
                    help="seconds of randwrite and of seq write per boot (at least)")
    ap.add_argument("--disk-mib", type=int, default=1024,
                    help="the guest's disk, MiB (large enough that random writes rarely hit a block twice)")
    ap.add_argument("--fresh-copy", action="store_true",
                    help="colovmm's secondary starts without its copy (the sync creates it)")
    ap.add_argument("--retries", type=int, default=1, help="boot a failed setup again this often")
    ap.add_argument("--lock", default="/tmp/hv.lock",
                    help="flock this file around each boot ('' for none)")
    ap.add_argument("--logs", default="", help="keep every log, console and event file here")
    ap.add_argument("--raw", default="", help="also write every measurement (JSON) here")
    ap.add_argument("--from-raw", default="", help="measure nothing: rebuild the section from "
                                                   "a --raw file")
    args = ap.parse_args()
    if args.from_raw:
        with open(args.from_raw) as f:
            print(write_report(args.out, json.load(f)))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    kinds = [k for k in SETUPS if k in args.setups.split(",")]
    if not kinds or set(args.setups.split(",")) - set(SETUPS):
        ap.error(f"--setups takes a subset of {','.join(SETUPS)}")
    intervals = [int(x) for x in args.intervals.split(",") if x]
    tools = ["timeout", "ss"]
    if any(k.startswith("qemu") for k in kinds):
        tools += ["qemu-system-x86_64"]
    if any(k.startswith("qemu-colo") for k in kinds):
        tools += ["qemu-img", "gcc"]
    for tool in tools:
        if not shutil.which(tool):
            sys.exit(f"bench-colo-disk: {tool} is missing (apt-get install qemu-system-x86 "
                     "qemu-utils gcc iproute2)")
    for path in (COLOVMM, REMOTE, GUEST):
        if not os.access(path, os.R_OK):
            sys.exit(f"bench-colo-disk: {path} is missing (cargo build --release --bins; "
                     "scripts/build-guest.sh)")
    plan = boots(kinds, intervals)
    t_start = time.monotonic()
    waited = 0.0
    results = []
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    built = datetime.datetime.fromtimestamp(os.stat(COLOVMM).st_mtime).strftime("%Y-%m-%d %H:%M")
    try:
        with tempfile.TemporaryDirectory(prefix="colovmm-bench-colo-disk-") as scratch:
            tmp = os.path.abspath(args.logs) if args.logs else scratch
            shim = build_shim(tmp) if "qemu-colo-nodelay" in kinds else None
            # One colovmm build for the whole run, whatever gets built meanwhile.
            bindir = os.path.join(scratch, "bin")
            os.makedirs(bindir, exist_ok=True)
            COLOVMM, REMOTE = (shutil.copy2(p, os.path.join(bindir, os.path.basename(p)))
                               for p in (COLOVMM, REMOTE))
            for rnd in range(args.rounds):
                order = plan[rnd % len(plan):] + plan[:rnd % len(plan)]
                for kind, iv in order:
                    failures = []
                    for attempt in range(1 + args.retries):
                        tag = f"r{rnd}-{kind}@{iv or 'off'}" + (f"-retry{attempt}" if attempt
                                                                 else "")
                        with Lock(args.lock) as lk:
                            waited += lk.waited
                            t = time.monotonic()
                            try:
                                r = run_setup(kind, tmp, tag, args, iv or intervals[0], shim)
                                r["error"] = None
                            except (Failed, OSError, ValueError, KeyError, RuntimeError,
                                    EOFError, TimeoutError, subprocess.SubprocessError) as e:
                                r = {"error": str(e) if isinstance(e, Failed)
                                     else f"{type(e).__name__}: {e}"}
                            finally:
                                kill_all()
                                for f in os.listdir(tmp):
                                    if f.startswith(tag) and f.endswith(".img"):
                                        os.unlink(os.path.join(tmp, f))
                        r.update(kind=kind, interval_ms=iv, round=rnd, attempt=attempt,
                                 failed_attempts=list(failures), boot_s=time.monotonic() - t)
                        print(f"round {rnd + 1}/{args.rounds} {col(kind, iv)} "
                              f"({r['boot_s']:.0f} s): " + short(r), flush=True)
                        if not r["error"]:
                            results.append(r)
                            break
                        failures.append(r["error"])
                        if attempt == args.retries:
                            results.append(r)
    finally:
        kill_all()
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    argv = " ".join(sys.argv[1:])
    raw = {"meta": {"date": str(datetime.date.today()), "qemu": qv, "rev": rev, "built": built,
                    "rounds": args.rounds, "records": args.records, "bench_s": args.bench_s,
                    "lat_s": args.lat_s,
                    "disk_mib": args.disk_mib, "kinds": kinds, "intervals": intervals,
                    "elapsed_s": time.monotonic() - t_start - waited,
                    "command": ("python3 scripts/bench_colo_disk.py " + argv).strip()},
           "results": results}
    if args.raw:
        with open(args.raw, "w") as f:
            json.dump(raw, f)
            f.write("\n")
    print(write_report(args.out, raw))
    print(f"wrote {args.out} (section bench-colo-disk); "
          f"{raw['meta']['elapsed_s'] / 60:.1f} min", flush=True)


def short(r):
    if r.get("error"):
        return "FAILED: " + r["error"]
    f = figures(r)
    out = (f"latency median {f['lat_med']:.2f} ms p99 {f['lat_p99']:.2f} max {f['lat_max']:.2f}; "
           f"randwrite {f['iops']:,.0f} IOPS; write {f['mb_s']:.1f} MB/s; "
           f"console {f['rtt']:.2f} ms")
    if r.get("ckpt"):
        c = r["ckpt"]
        out += "; checkpoints lat/rand/seq " + "/".join(
            f"{c[w]['n']}({fmt(c[w]['pause_mean_ms'])} ms)" for w in ("latency", "rand", "seq"))
    return out


if __name__ == "__main__":
    main()
