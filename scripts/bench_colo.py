"""COLO checkpoints of the test guest over loopback TCP: colovmm vs QEMU COLO, same guest, same run.

Cells: guest memory (512 MiB, 2 GiB) x workload (idle, `dirty 200 128`: 200 MiB/s over a
128 MiB working set) x memory channels (1, 4), checkpoint interval 600 ms, 1 vCPU, no NIC and
no disk (memory and device-state checkpoints only). Per cell three runs, one VMM pair at a time
(which goes first rotates per cell), primary and secondary both on 127.0.0.1:

  colovmm       secondary `--colo role=secondary,listen=...`, primary `--colo role=primary,peer=...,
                checkpoint-interval=600,channels=N`; protection starts by itself at boot. Per
                checkpoint the primary's event stream has `pause_ms`, `bytes` and `phases_ms`.
  qemu          QEMU 7.2 microvm, x-colo on both, `x-checkpoint-delay` 600, no bandwidth cap,
                `migrate` to a secondary started with `-incoming tcp:...`. It has no multifd under
                COLO: its 4-channel rows run its one migration channel again.
  qemu-nodelay  the same with an LD_PRELOAD shim (scripts/nodelay_shim.c) that sets TCP_NODELAY
                on the migration sockets: stock QEMU 7.2 leaves Nagle on, and two small COLO
                messages per checkpoint each wait ~40 ms for a delayed ACK.

Which checkpoints count: the initial sync and the first periodic checkpoint pass (QEMU's
secondary flushes its whole RAM cache on that one), then the workload starts, and after
SETTLE_S the next N checkpoints are counted.

  pause         colovmm: `pause_ms`. QEMU: the primary's QMP STOP -> RESUME event timestamps.
  transfer      colovmm: `phases_ms.transfer` (pages and device state written to the channels).
                QEMU does not expose it: from its trace events (`-trace`, `-msg timestamp=on`),
                the primary sending the COLO `vmstate-send` message (the guest is stopped, the
                dirty pages follow) to it sending `vmstate-size` (after the last page and the
                device state's save into a buffer): the same writing side. The raw output also
                has it up to the secondary's receipt of `vmstate-size` (one wall clock).
  MiB/ckpt      colovmm: `bytes`. QEMU: bytes acked on the primary's migration socket (`ss -ti`)
                between two samples taken while its guest ran, over the checkpoints in between.
"""

import argparse
import datetime
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
    COLOVMM, GUEST, ROOT, EventTail, Failed, Vm, check_alive, processes, qemu_cmd, update_section)
from bench_migration import Qmp, free_port  # noqa: E402

REMOTE = os.path.join(ROOT, "target/release/colovmm-remote")
SHIM_SRC = os.path.join(ROOT, "scripts/nodelay_shim.c")
INTERVAL_MS = 600
DIRTY = "dirty 200 128"
WORKLOADS = ("idle", DIRTY)
MEMS = ("512M", "2G")
CHANNELS = (1, 4)
KINDS = ("colovmm", "qemu", "qemu-nodelay")
LABEL = {"colovmm": "colovmm", "qemu": "QEMU stock", "qemu-nodelay": "QEMU TCP_NODELAY"}
# After the workload starts (dirty: it goes through its 128 MiB working set in 0.64 s), wait this
# long before counting, so no counted interval has the workload only part of the time.
SETTLE_S = 1.5
QEMU_MAX_BANDWIDTH = 1 << 40  # bytes/s: no cap
# Every VMM process runs under `timeout`, so nothing survives even if this script is killed.
VMM_LIMIT_S = 600
PROTECT_LIMIT_S = 120  # boot + initial sync + first checkpoint (a 2 GiB QEMU secondary: ~10 s)
OTHER_BENCHMARKS = ("bench_io.py", "bench_boot.py", "bench_migration.py")
# VMMs not started by this script (between two runs none of ours is left) and builds: waited for
# up to FOREIGN_WAIT_S, then the run goes ahead and the table says so.
FOREIGN = ("colovmm", "qemu-system-x86_64", "cargo", "rustc")
FOREIGN_WAIT_S = 120


# ---------------------------------------------------------------------------------------------
# Processes and the machine


class Proc(Vm):
    """A VMM under `timeout`, in its own process group, with the console on stdin/stdout."""

    def __init__(self, cmd, log, env=None):
        self.start = time.monotonic()
        self.wall = time.time()
        self.buf = b""
        self.log = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen(
                ["timeout", "-s", "KILL", str(VMM_LIMIT_S)] + cmd, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True,
                env=dict(os.environ, **(env or {})))

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        """Kills the process group `timeout` leads (once `timeout` has exited, so has its VMM:
        it waits for it; its pid is then free and no longer ours to signal)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def tail(self, n=3):
        try:
            with open(self.log, errors="replace") as f:
                lines = [x.strip() for x in f if x.strip() and "nodelay_shim" not in x
                         and not re.match(r"^\d+@\d+\.\d+:colo_", x)]
            return " | ".join(lines[-n:])
        except OSError:
            return ""





def wait_for_quiet_machine():
    """Another benchmark running at the same time would skew both: wait for it to end. Other
    VMMs and builds (FOREIGN) are waited for up to FOREIGN_WAIT_S, then the run goes ahead with
    a warning. Returns (seconds waited, the FOREIGN processes still there)."""
    said, t0 = 0.0, time.monotonic()
    while True:
        busy = processes(OTHER_BENCHMARKS)
        foreign = processes(FOREIGN, argc=1)
        if not busy and (not foreign or time.monotonic() - t0 > FOREIGN_WAIT_S):
            if foreign:
                print(f"warning: measuring alongside {len(foreign)} other VMM or build "
                      "process(es): "
                      + "; ".join(foreign), flush=True)
            return time.monotonic() - t0, foreign
        if time.monotonic() - said > 60 or not said:
            print("waiting for " + "; ".join(busy + foreign), flush=True)
            said = time.monotonic()
        time.sleep(2)


def listening(port):
    r = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() != ""


def acked_bytes(port):
    """bytes_acked of the established TCP connection(s) to 127.0.0.1:port (the primary's side)."""
    r = subprocess.run(["ss", "-tinH", "state", "established", f"dport = :{port}"],
                       capture_output=True, text=True)
    found = [int(x) for x in re.findall(r"bytes_acked:(\d+)", r.stdout)]
    return sum(found) if found else None


def build_shim(tmp):
    out = os.path.join(tmp, "nodelay_shim.so")
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-o", out, SHIM_SRC, "-ldl"],
                   check=True)
    return out


def colovmm_missing():
    """Why the colovmm side cannot run (None if it can)."""
    for path in (COLOVMM, REMOTE):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (cargo build --release --bins)"
    r = subprocess.run([COLOVMM, "--help"], capture_output=True, text=True)
    if "--colo" not in r.stdout:
        return f"{COLOVMM} has no --colo option (COLO is not built into it yet)"
    return None


# ---------------------------------------------------------------------------------------------
# Numbers


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return None
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def mean(xs):
    return sum(xs) / len(xs) if xs else None


def stats(xs):
    xs = [x for x in xs if x is not None]
    return (mean(xs), percentile(xs, 99)) if xs else (None, None)


# ---------------------------------------------------------------------------------------------
# colovmm


def remote(sock, *args, timeout=10):
    return subprocess.run([REMOTE, "--api-socket", sock] + list(args), capture_output=True,
                          text=True, timeout=timeout)


def run_colovmm(tmp, tag, mem, workload, channels, count, shim=None):
    del shim
    port = free_port()
    ps, ss_ = os.path.join(tmp, "pri.sock"), os.path.join(tmp, "sec.sock")
    pev, sev = (os.path.join(tmp, f"{tag}-{side}-events.jsonl") for side in ("pri", "sec"))
    plog, slog = os.path.join(tmp, f"{tag}-pri.log"), os.path.join(tmp, f"{tag}-sec.log")
    for p in (ps, ss_, pev, sev, plog, slog):
        if os.path.exists(p):
            os.unlink(p)
    pri = sec = None
    try:
        sec = Proc([COLOVMM, "--colo", f"role=secondary,listen=127.0.0.1:{port}", "--serial",
                    f"file={os.path.join(tmp, f'{tag}-sec-console.log')}", "--api-socket", f"path={ss_}",
                    "--event-monitor", f"path={sev}"], log=slog)
        deadline = time.monotonic() + 15
        while not listening(port):
            check_alive(("secondary", sec))
            if time.monotonic() > deadline:
                raise Failed(f"the secondary never listened on 127.0.0.1:{port}")
            time.sleep(0.02)
        pri = Proc([COLOVMM, "--kernel", GUEST, "--memory", f"size={mem}", "--cpus", "boot=1",
                    "--serial", "tty", "--api-socket", f"path={ps}", "--event-monitor",
                    f"path={pev}", "--colo",
                    f"role=primary,peer=127.0.0.1:{port},checkpoint-interval={INTERVAL_MS},"
                    f"channels={channels}"], log=plog)
        pri.line(r"^TESTGUEST READY", timeout=60)
        ev = EventTail(pev)
        t_ready = time.time()

        def wait_for(what, cond, timeout):
            deadline = time.monotonic() + timeout
            while True:
                exits = ev.colo("colo_exit")
                if exits:
                    raise Failed(f"protection ended: {json.dumps(exits[0].get('properties'))}")
                got = cond()
                if got:
                    return got
                check_alive(("primary", pri), ("secondary", sec))
                if time.monotonic() > deadline:
                    raise Failed(f"no {what} after {timeout} s")
                time.sleep(0.05)

        def checkpoints():
            return ev.colo("checkpoint")

        protected = wait_for("`protected` event", lambda: ev.colo("protected"), PROTECT_LIMIT_S)
        # The first periodic checkpoint passes before the workload starts, as on QEMU.
        wait_for("first periodic checkpoint", lambda: [
            e for e in checkpoints() if e["properties"].get("reason") != "initial"], 30)
        if workload != "idle":
            text, _ = pri.ask(workload, r"^dirty ok|^error", timeout=10)
            if not text.startswith("dirty ok"):
                raise Failed(f"guest refused {workload!r}: {text}")
        time.sleep(SETTLE_S)
        t0 = time.time()

        def started(e):
            # The event comes at the checkpoint's end: after the secondary's ack, which with
            # staged checkpoints (pages cross the network after the guest resumed) is after the
            # pause, `total_ms` after its start.
            p = e["properties"]
            took = max(float(p.get("pause_ms", 0)), float(p.get("total_ms", 0)))
            return e["timestamp"] - took / 1000 >= t0

        def enough():
            c = [e for e in checkpoints() if started(e)]
            return c[:count] if len(c) >= count else None

        counted = wait_for(f"{count} checkpoints", enough, count * (INTERVAL_MS / 1000 + 3) + 30)
        st = remote(ps, "colo-status", "--json")
        status = json.loads(st.stdout) if st.returncode == 0 and st.stdout.strip() else \
            {"error": st.stderr.strip()}
        if status.get("state") not in (None, "protected", "checkpointing"):
            raise Failed(f"colo-status says {status.get('state')} at the end of the run")
        text, _ = pri.ask("uptime", r"^uptime_ms=", timeout=10)
        check_alive(("secondary", sec))
        all_ckpts = checkpoints()
        props = [e["properties"] for e in counted]
        initial = [e["properties"] for e in all_ckpts if e["properties"].get("reason") == "initial"]
        reasons = {}
        for p in props:
            reasons[p.get("reason")] = reasons.get(p.get("reason"), 0) + 1
        return {
            "pause_ms": [float(p["pause_ms"]) for p in props],
            "transfer_ms": [float(p["phases_ms"]["transfer"]) if "transfer" in p.get("phases_ms", {})
                            else None for p in props],
            "mib": [int(p["bytes"]) / (1 << 20) if "bytes" in p else None for p in props],
            "phases_ms": [p.get("phases_ms") for p in props],
            # Pause start to the secondary's ack (only reported by staged checkpoints).
            "total_ms": [float(p["total_ms"]) if "total_ms" in p else None for p in props],
            "staged": any(p.get("staged") for p in props),
            "reasons": reasons,
            "excluded_pause_ms": [float(e["properties"]["pause_ms"]) for e in all_ckpts
                                  if not started(e)],
            "initial": initial[0] if initial else None,
            "protected_after_start_s": protected[0]["timestamp"] - pri.wall,
            "ready_to_protected_s": protected[0]["timestamp"] - t_ready,
            "colo_status": status,
            "uptime": text,
        }
    finally:
        for sock, vm in ((ps, pri), (ss_, sec)):
            if vm is None:
                continue
            if vm.alive() and os.path.exists(sock):
                try:
                    remote(sock, "shutdown-vmm", timeout=5)
                    vm.proc.wait(timeout=5)
                except subprocess.SubprocessError:
                    pass
            vm.kill()


# ---------------------------------------------------------------------------------------------
# QEMU


TRACE_RE = re.compile(r"^\d+@(\d+\.\d+):(colo_\w+) (.*)$")


def trace(log, event, text="", with_text=False):
    """Timestamps (s) of trace lines `event` whose text contains `text` (with the text if asked)."""
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            m = TRACE_RE.match(line.strip())
            if m and m.group(2) == event and text in m.group(3):
                out.append((float(m.group(1)), m.group(3)) if with_text else float(m.group(1)))
    return out


def qmp_time(e):
    return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6


def pauses(q):
    """(STOP, RESUME) timestamp pairs from the QMP events seen so far, in order."""
    out, stop = [], None
    for e in q.events:
        if e["event"] == "STOP":
            stop = qmp_time(e)
        elif e["event"] == "RESUME" and stop is not None:
            out.append((stop, qmp_time(e)))
            stop = None
    return out


def stops(q):
    return sum(1 for e in q.events if e["event"] == "STOP")


def clean_sample(q, port):
    """Acked bytes on the migration socket, read while the guest runs (no checkpoint under way)."""
    for _ in range(200):
        n = stops(q)
        if q.cmd("query-status")["status"] == "running":
            t, b = time.time(), acked_bytes(port)
            if q.cmd("query-status")["status"] == "running" and stops(q) == n:
                return t, b
        time.sleep(0.01)
    raise Failed("could not sample the migration socket between checkpoints")


def run_qemu(tmp, tag, mem, workload, channels, count, shim=None):
    del channels  # QEMU 7.2 COLO has no multifd: always its one migration channel
    port = free_port()
    pq, sq = os.path.join(tmp, "pri.qmp"), os.path.join(tmp, "sec.qmp")
    plog, slog = os.path.join(tmp, f"{tag}-pri.log"), os.path.join(tmp, f"{tag}-sec.log")
    for p in (pq, sq, plog, slog):
        if os.path.exists(p):
            os.unlink(p)
    env = {"LD_PRELOAD": shim} if shim else None
    base = qemu_cmd(mem=mem) + ["-msg", "timestamp=on"]
    sbase = list(base)
    sbase[sbase.index("-serial") + 1] = f"file:{os.path.join(tmp, f'{tag}-sec-console.log')}"
    pri = sec = a = b = None
    try:
        sec = Proc(sbase + ["-qmp", f"unix:{sq},server=on,wait=off", "-incoming",
                            f"tcp:127.0.0.1:{port}", "-trace", "colo_receive_message",
                            "-trace", "colo_flush_ram_cache_begin"],
                   log=slog, env=env)
        pri = Proc(base + ["-qmp", f"unix:{pq},server=on,wait=off", "-trace", "colo_send_message",
                           "-trace", "colo_vm_state_change"], log=plog, env=env)
        pri.line(r"^TESTGUEST READY", timeout=60)
        a, b = Qmp(pq), Qmp(sq)
        for q in (b, a):
            q.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
        a.cmd("migrate-set-parameters", **{"x-checkpoint-delay": INTERVAL_MS,
                                           "max-bandwidth": QEMU_MAX_BANDWIDTH})
        t_mig = time.time()
        a.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        deadline = time.monotonic() + PROTECT_LIMIT_S
        while True:
            st = a.cmd("query-migrate").get("status")
            if st == "colo":
                break
            if st in ("failed", "cancelled"):
                raise Failed(f"migration {st}")
            check_alive(("primary", pri), ("secondary", sec))
            if time.monotonic() > deadline:
                raise Failed(f"not in COLO after {PROTECT_LIMIT_S} s (status {st})")
            time.sleep(0.02)
        # The initial stop (end of the migration) and the first periodic checkpoint (the
        # secondary flushes its whole RAM cache) pass before the workload starts.
        while len(pauses(a)) < 2:
            check_alive(("primary", pri), ("secondary", sec))
            if time.monotonic() > deadline:
                raise Failed(f"first checkpoint not done after {PROTECT_LIMIT_S} s")
            a.cmd("query-status")
            time.sleep(0.05)
        if workload != "idle":
            text, _ = pri.ask(workload, r"^dirty ok|^error", timeout=10)
            if not text.startswith("dirty ok"):
                raise Failed(f"guest refused {workload!r}: {text}")
        time.sleep(SETTLE_S)
        t0, bytes0 = clean_sample(a, port)
        deadline = time.monotonic() + count * (INTERVAL_MS / 1000 + 3) + 30
        while len([p for p in pauses(a) if p[0] >= t0]) < count:
            check_alive(("primary", pri), ("secondary", sec))
            if a.cmd("query-migrate").get("status") != "colo":
                raise Failed("COLO ended on the primary")
            if time.monotonic() > deadline:
                raise Failed(f"fewer than {count} checkpoints in time")
            time.sleep(0.25)
        t1, bytes1 = clean_sample(a, port)
        colo_status = a.cmd("query-colo-status")
        text, _ = pri.ask("uptime", r"^uptime_ms=", timeout=10)
        check_alive(("secondary", sec))
        all_pairs = pauses(a)
    finally:
        for q in (a, b):
            if q:
                q.close()
        for vm in (pri, sec):
            if vm:
                vm.kill()

    counted = [p for p in all_pairs if p[0] >= t0][:count]
    in_window = [p for p in all_pairs if t0 <= p[0] <= t1]
    # Memory transfer, from the trace: the primary sends `vmstate-send`, writes the dirty pages,
    # saves the device state into a buffer and sends `vmstate-size` (what counts: the writing
    # side, as colovmm's `transfer` phase); kept in the raw output, up to the secondary's receipt
    # of `vmstate-size` (it includes the last socket buffer's drain and any Nagle wait).
    p_send = trace(plog, "colo_send_message", "'vmstate-send'")
    p_size = trace(plog, "colo_send_message", "'vmstate-size'")
    s_size = trace(slog, "colo_receive_message", "'vmstate-size'")
    p_stop = trace(plog, "colo_vm_state_change", "'run' => 'stop'")
    flushes = trace(slog, "colo_flush_ram_cache_begin", with_text=True)
    transfer, transfer_rx, skew, flushed = [], [], [], []
    for stop, resume in counted:
        snd = next((t for t in p_send if stop - 0.005 <= t <= resume), None)
        rcv = next((t for t in s_size if snd is not None and snd <= t <= resume + 0.005), None)
        tx = next((t for t in p_size if snd is not None and snd <= t <= resume), None)
        transfer.append((tx - snd) * 1000 if tx is not None else None)
        transfer_rx.append((rcv - snd) * 1000 if rcv is not None else None)
        ts = next((t for t in p_stop if abs(t - stop) < 0.05), None)
        skew.append(abs(ts - stop) * 1000 if ts is not None else None)
        # Pages the secondary copies from its cache into its guest: sent by the primary, or
        # dirtied by the secondary's own guest since the last checkpoint (a cross-check only).
        fl = next((t for t in flushes if stop <= t[0] <= resume + 0.005), None)
        m = re.search(r"dirty_pages (\d+)", fl[1]) if fl else None
        flushed.append(int(m.group(1)) * 4096 / (1 << 20) if m else None)
    shim_lines = [sum(1 for x in open(f, errors="replace") if "nodelay_shim" in x) for f in (plog, slog)]
    mib = None
    if bytes0 is not None and bytes1 is not None and in_window:
        mib = (bytes1 - bytes0) / len(in_window) / (1 << 20)
    return {
        "pause_ms": [(r - s) * 1000 for s, r in counted],
        "transfer_ms": transfer,
        "transfer_to_receipt_ms": transfer_rx,
        "mib_mean": mib,
        "secondary_flush_mib": flushed,
        "excluded_pause_ms": [(r - s) * 1000 for s, r in all_pairs if s < t0],
        "protected_after_migrate_s": None if not all_pairs else all_pairs[0][1] - t_mig,
        "trace_vs_qmp_stop_ms_max": max([x for x in skew if x is not None], default=None),
        "shim_lines_pri_sec": shim_lines,
        "colo_status": colo_status,
        "uptime": text,
    }


RUNNERS = {
    "colovmm": run_colovmm,
    "qemu": lambda tmp, tag, mem, work, ch, n, shim: run_qemu(tmp, tag, mem, work, ch, n, None),
    "qemu-nodelay": run_qemu,
}


# ---------------------------------------------------------------------------------------------
# Report


def cell_label(cell):
    mem, work, ch = cell
    return (f"{'512 MiB' if mem == '512M' else '2 GiB'}, {'idle' if work == 'idle' else 'dirty'}, "
            f"{ch} channel{'s' if ch > 1 else ''}")


def summary(r):
    """(pause mean, p99, transfer mean, p99, MiB per checkpoint, n) of one run, or None."""
    if not r or r.get("error"):
        return None
    pm, pp = stats(r["pause_ms"])
    tm, tp = stats(r["transfer_ms"])
    mib = r.get("mib_mean")
    if mib is None and r.get("mib"):
        mib = mean([x for x in r["mib"] if x is not None])
    return {"pm": pm, "pp": pp, "tm": tm, "tp": tp, "mib": mib, "n": len(r["pause_ms"])}


def fmt_pair(a, b):
    if a is None:
        return "n/a"
    return f"{a:,.1f} / {b:,.1f}" if a >= 10 else f"{a:,.2f} / {b:,.2f}"


def fmt_run(r, kind_missing):
    if r is None:
        return kind_missing
    if r.get("error"):
        return "failed: " + r["error"].replace("|", "/")
    return None


def attempts_note(r):
    """' (1 failed attempt before)' and the like, for a run that needed retries."""
    n = len((r or {}).get("failed_attempts") or [])
    if not n or r.get("error"):
        return ""
    return f" ({n} failed attempt{'s' if n > 1 else ''} before)"


def ratio(q, o):
    if q is None or o is None or o <= 0:
        return "-"
    r = q / o
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def best(values):
    vals = [v for v in values if v is not None]
    return min(vals) if vals else None


def plot(path, cells, results, kinds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    mems = [m for m in MEMS if any(c[0] == m for c in cells)]
    works = [w for w in WORKLOADS if any(c[1] == w for c in cells)]
    colors = {"colovmm": "#1f77b4", "qemu": "#d62728", "qemu-nodelay": "#ff7f0e"}
    fig, axes = plt.subplots(len(mems), len(works),
                             figsize=(max(7.0, 5.2 * len(works)), 3.8 * len(mems) + 0.8),
                             squeeze=False)
    for i, mem in enumerate(mems):
        for j, work in enumerate(works):
            ax = axes[i][j]
            data, pos, cols, ticks, tick_pos = [], [], [], [], []
            x = 1.0
            for ch in CHANNELS:
                cell = (mem, work, ch)
                if cell not in cells:
                    continue
                start = x
                for kind in kinds:
                    r = results.get((cell, kind))
                    if r and not r.get("error") and r["pause_ms"]:
                        data.append(r["pause_ms"])
                        pos.append(x)
                        cols.append(colors[kind])
                    x += 1
                ticks.append(f"{ch} channel{'s' if ch > 1 else ''}"
                             + ("\n(QEMU: 1)" if ch > 1 else ""))
                tick_pos.append((start + x - 1) / 2)
                x += 1
            if data:
                bp = ax.boxplot(data, positions=pos, widths=0.7, patch_artist=True,
                                whis=(1, 99), showfliers=False, medianprops={"color": "black"})
                for patch, c in zip(bp["boxes"], cols):
                    patch.set_facecolor(c)
                    patch.set_alpha(0.45)
                # Every checkpoint as a dot, spread sideways a little.
                for k, (xs, p, c) in enumerate(zip(data, pos, cols)):
                    jitter = [p + 0.25 * (((n * 7919 + k) % 11) / 10 - 0.5) for n in range(len(xs))]
                    ax.scatter(jitter, xs, s=6, color=c, alpha=0.8, zorder=3, linewidths=0)
                ax.set_yscale("log")
                fmt = FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(fmt)
                ax.yaxis.set_minor_formatter(FuncFormatter(
                    lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
            ax.set_xticks(tick_pos)
            ax.set_xticklabels(ticks)
            ax.set_title(f"{'512 MiB' if mem == '512M' else '2 GiB'}, "
                         f"{'idle' if work == 'idle' else work}")
            ax.set_ylabel("pause per checkpoint (ms)")
            ax.grid(axis="y", which="both", alpha=0.3)
    # fig.text, not suptitle: tight_layout would reserve room for a suptitle on top of `rect`.
    fig.text(0.5, 1 - 0.08 / fig.get_figheight(),
             f"COLO checkpoint pause per checkpoint, interval {INTERVAL_MS} ms\n"
             "box: quartiles and median, whiskers: 1st-99th percentile, dots: checkpoints",
             ha="center", va="top", fontsize=10)
    h = fig.get_figheight()
    fig.legend(handles=[Patch(facecolor=colors[k], alpha=0.6, label=LABEL[k]) for k in kinds],
               loc="upper center", bbox_to_anchor=(0.5, 1 - 0.5 / h), ncol=len(kinds),
               frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.85 / h))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def options(args):
    """The options that chose what ran, as they would be typed."""
    out = ""
    if args.quick:
        out += " --quick"
    if args.checkpoints:
        out += f" --checkpoints {args.checkpoints}"
    if args.cells:
        out += f" --cells {args.cells}"
    if args.vmms != ",".join(KINDS):
        out += f" --vmms {args.vmms}"
    return out


def report(args, opts, cells, results, elapsed, count_used):
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    plot_rel = os.path.relpath(os.path.abspath(args.plot), os.path.dirname(os.path.abspath(args.out)))
    not_run = "not run"
    sums = {(cell, kind): summary(results.get((cell, kind))) for cell in cells for kind in KINDS}
    colo_runs = [results.get((c, "colovmm")) for c in cells]
    colo_runs = [r for r in colo_runs if r and not r.get("error")]
    staged = any(r.get("staged") for r in colo_runs)
    with_ack = any(any(x is not None for x in r.get("total_ms", [])) for r in colo_runs)
    lines = [
        "## COLO checkpoints over loopback TCP",
        "",
        f"`scripts/bench-colo.sh{opts}` "
        f"({datetime.date.today()}; {qv}; 1 vCPU; no NIC, no disk: memory and device-state "
        f"checkpoints only; checkpoint interval {INTERVAL_MS} ms; {', '.join(count_used)} counted "
        f"checkpoints per cell and VMM; the whole benchmark took {elapsed / 60:.1f} min). Primary "
        "and secondary are two processes of the same VMM on 127.0.0.1, one pair at a time (the "
        "order of the VMMs rotates per cell). Not counted: the initial sync, the first periodic "
        "checkpoint (QEMU's secondary flushes its whole RAM cache on that one), the workload's "
        f"start and {SETTLE_S:g} s after it. `dirty` = the guest is asked to write 200 MiB/s over "
        "a 128 MiB working set (what it achieves: MiB per checkpoint, second table).",
        "",
        "**Pause per checkpoint** (the primary's guest stopped), mean / p99 in ms: colovmm's "
        "`pause_ms` from its checkpoint events, QEMU's STOP → RESUME QMP event timestamps on the "
        "primary. QEMU stock: Debian's binary as is; QEMU TCP_NODELAY: the same with an "
        "LD_PRELOAD shim (`scripts/nodelay_shim.c`) setting TCP_NODELAY on its migration socket, "
        "which QEMU 7.2 leaves off, so two small COLO messages per checkpoint no longer wait ~40 ms "
        "each for a delayed ACK. The bar is the better QEMU on each figure; ratio = that QEMU / "
        "colovmm, above 1.0 means colovmm is better. QEMU 7.2 has no multifd under COLO: in the "
        "4-channel rows QEMU runs again, separately, with its one migration channel; only colovmm "
        "uses 4. p99 interpolates between closest ranks (under 100 checkpoints: between the two "
        "largest).",
    ]
    if with_ack:
        lines += [
            "",
            "colovmm resumes its guest before the secondary has acked the checkpoint"
            + (" (staged checkpoints: the dirty pages are copied into a buffer while the guest is "
               "stopped and cross the network after it resumed)" if staged else "")
            + "; its last column is the time from the pause to the secondary's ack (`total_ms`), "
            "with the ratio of the better QEMU's pause to it: QEMU keeps its guest stopped until "
            "its secondary has loaded the checkpoint, so for QEMU the two are the same.",
        ]
    head = "| case | colovmm | QEMU stock | QEMU TCP_NODELAY | ratio mean | ratio p99 |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if with_ack:
        head += " colovmm pause to the secondary's ack (ratio mean) |"
        rule += " --- |"
    lines += ["", head, rule]
    for cell in cells:
        row = [cell_label(cell)]
        for kind in KINDS:
            r = results.get((cell, kind))
            s = sums[(cell, kind)]
            row.append(fmt_run(r, not_run)
                       or fmt_pair(s["pm"], s["pp"]) + f" (n={s['n']})" + attempts_note(r))
        o = sums[(cell, "colovmm")]
        qs = [sums[(cell, k)] for k in ("qemu", "qemu-nodelay") if sums[(cell, k)]]
        row.append(ratio(best([q["pm"] for q in qs]), o and o["pm"]))
        row.append(ratio(best([q["pp"] for q in qs]), o and o["pp"]))
        if with_ack:
            am = ap = None
            if o:
                am, ap = stats(results[(cell, "colovmm")].get("total_ms", []))
            row.append("-" if am is None else
                       f"{fmt_pair(am, ap)} ({ratio(best([q['pm'] for q in qs]), am)})")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "**Memory transfer per checkpoint**, mean / p99 in ms, and MiB sent per checkpoint "
        "(mean). colovmm: the `transfer` phase of its checkpoint events (the dirty pages and the "
        "device-state record written to its channels; the wait for the secondary's ack is the "
        "next phase)"
        + (", which with staged checkpoints runs after the guest resumed," if staged else "")
        + " and their `bytes` (the dirty pages' size, zero pages included, which travel as "
        "markers). QEMU reports neither; derived here. Transfer: from its "
        "`-trace colo_send_message` lines with `-msg timestamp=on`, the primary sending the COLO "
        "`vmstate-send` message (guest stopped, the dirty pages follow) to it sending "
        "`vmstate-size` (after the last page and the device-state save into a buffer; that state, "
        "a few KiB, follows it): the writing side, as colovmm's. MiB: bytes acked on the "
        "primary's migration socket (`ss -ti`: pages, device state and COLO messages as they go "
        "on the wire) between two samples taken while its guest ran, divided by the checkpoints "
        "in between. The script's raw output also has QEMU's transfer "
        "up to its secondary's receipt of `vmstate-size` (stock QEMU: ~40 ms more, a delayed-ACK "
        "wait) and the pages its secondary flushed. What the guest achieves of its 200 MiB/s "
        "depends on the VMM's dirty tracking and on the two shared cores (the primary's and the "
        "secondary's guests both run it), hence the MiB column.",
        "",
        "| case | colovmm | QEMU stock | QEMU TCP_NODELAY | ratio mean | ratio p99 "
        "| MiB per checkpoint (colovmm / QEMU stock / QEMU TCP_NODELAY) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cell in cells:
        row = [cell_label(cell)]
        mibs = []
        for kind in KINDS:
            r = results.get((cell, kind))
            s = sums[(cell, kind)]
            row.append(fmt_run(r, not_run) or fmt_pair(s["tm"], s["tp"]))
            mibs.append("-" if not s or s["mib"] is None else f"{s['mib']:,.1f}" if s["mib"] >= 1
                        else f"{s['mib']:,.3f}")
        o = sums[(cell, "colovmm")]
        qs = [sums[(cell, k)] for k in ("qemu", "qemu-nodelay") if sums[(cell, k)]]
        row.append(ratio(best([q["tm"] for q in qs]), o and o["tm"]))
        row.append(ratio(best([q["tp"] for q in qs]), o and o["tp"]))
        row.append(" / ".join(mibs))
        lines.append("| " + " | ".join(row) + " |")
    notes = []
    for cell in cells:
        for kind in KINDS:
            r = results.get((cell, kind)) or {}
            for e in r.get("failed_attempts") or []:
                notes.append(f"{cell_label(cell)}, {LABEL[kind]}: an attempt failed and was run "
                             f"again: {e}")
            if r.get("foreign_vmms"):
                notes.append(f"{cell_label(cell)}, {LABEL[kind]}: started while "
                             f"{len(r['foreign_vmms'])} other VMM or build process(es) ran "
                             "(the machine was not quiet)")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}".replace("|", "/") for n in notes]
    lines += [
        "",
        f"![COLO checkpoint pause per cell: colovmm vs QEMU]({plot_rel})",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "docs/benchmarks.md"))
    ap.add_argument("--plot", default=os.path.join(ROOT, "docs/bench-colo-pause.png"))
    ap.add_argument("--checkpoints", type=int, default=None,
                    help="counted checkpoints per cell and VMM (default 30, --quick 12)")
    ap.add_argument("--quick", action="store_true", help="512 MiB cells only, 12 checkpoints")
    ap.add_argument("--cells", default="",
                    help="comma-separated filter, all must match a cell's '512M idle 1ch' / "
                         "'2G dirty 4ch' name, e.g. 512M,dirty")
    ap.add_argument("--retries", type=int, default=1,
                    help="run a failed cell again this many times (failures are reported)")
    ap.add_argument("--logs", default="",
                    help="keep the VMMs' logs, consoles and event files in this directory "
                         "(default: a temporary one, removed)")
    ap.add_argument("--vmms", default=",".join(KINDS),
                    help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--raw", default="",
                    help="also write every measurement (JSON) to this file")
    ap.add_argument("--from-raw", default="",
                    help="measure nothing: rebuild the section and the plot from a --raw file")
    args = ap.parse_args()
    if args.from_raw:
        with open(args.from_raw) as f:
            raw = json.load(f)
        results = {((x["mem"], x["workload"], x["channels"]), x["kind"]): x
                   for x in raw["results"]}
        cells = list(dict.fromkeys(c for c, _ in results))
        kinds = [k for k in KINDS if any(k == kk for _, kk in results)]
        meta = raw["meta"]
        write_report(args, meta["options"], cells, kinds, results, meta["elapsed_s"])
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    kinds = [k for k in KINDS if k in args.vmms.split(",")]
    if not kinds or set(args.vmms.split(",")) - set(KINDS):
        ap.error(f"--vmms takes a subset of {','.join(KINDS)}")
    count = args.checkpoints or (12 if args.quick else 30)
    if "colovmm" in kinds:
        why = colovmm_missing()
        if why:
            print(f"bench-colo: cannot run the colovmm side: {why}.\n"
                  "Measure QEMU alone with --vmms qemu,qemu-nodelay.", file=sys.stderr)
            sys.exit(1)
    for tool in ("qemu-system-x86_64", "gcc", "ss", "timeout"):
        if not shutil.which(tool):
            print(f"bench-colo: {tool} is missing", file=sys.stderr)
            sys.exit(1)
    mems = ("512M",) if args.quick else MEMS
    cells = [(m, w, c) for m in mems for w in WORKLOADS for c in CHANNELS]
    if args.cells:
        def name(c):
            return f"{c[0]} {'idle' if c[1] == 'idle' else 'dirty'} {c[2]}ch"
        cells = [c for c in cells if all(f.strip() in name(c) for f in args.cells.split(","))]
    if not cells:
        ap.error("no cell matches --cells")
    t_start = time.monotonic()
    waited, _ = wait_for_quiet_machine()
    results = {}
    if args.logs:
        os.makedirs(args.logs, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="colovmm-bench-colo-") as scratch:
        tmp = os.path.abspath(args.logs) if args.logs else scratch
        shim = build_shim(tmp) if "qemu-nodelay" in kinds else None
        for i, cell in enumerate(cells):
            mem, work, ch = cell
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            for kind in order:
                failures = []
                for attempt in range(1 + args.retries):
                    w, foreign = wait_for_quiet_machine()
                    waited += w
                    t = time.monotonic()
                    tag = f"{mem}-{'idle' if work == 'idle' else 'dirty'}-{ch}ch-{kind}" + \
                        (f"-retry{attempt}" if attempt else "")
                    try:
                        r = RUNNERS[kind](tmp, tag, mem, work, ch, count, shim)
                        r["error"] = None
                    except Failed as e:
                        r = {"error": str(e)}
                    except (TimeoutError, EOFError, RuntimeError, OSError, ValueError, KeyError,
                            subprocess.SubprocessError) as e:
                        r = {"error": f"{type(e).__name__}: {e}"}
                    r["foreign_vmms"] = foreign
                    r["failed_attempts"] = list(failures)
                    s = summary(r)
                    what = r["error"] if s is None else (
                        f"pause {fmt_pair(s['pm'], s['pp'])} ms, transfer "
                        f"{fmt_pair(s['tm'], s['tp'])} ms, "
                        f"{s['mib'] if s['mib'] is None else round(s['mib'], 2)} MiB/ckpt, n={s['n']}")
                    print(f"{cell_label(cell)} {kind} ({time.monotonic() - t:.0f} s): {what}",
                          flush=True)
                    results[(cell, kind)] = r
                    if not r["error"]:
                        break
                    failures.append(r["error"])
    elapsed = time.monotonic() - t_start - waited
    raw = {"meta": {"options": options(args), "elapsed_s": elapsed,
                    "date": str(datetime.date.today())},
           "results": [dict(r, mem=c[0], workload=c[1], channels=c[2], kind=k)
                       for (c, k), r in results.items()]}
    text = json.dumps(raw)
    if args.raw:
        with open(args.raw, "w") as f:
            f.write(text + "\n")
    print(text)
    write_report(args, options(args), cells, kinds, results, elapsed)


def write_report(args, opts, cells, kinds, results, elapsed):
    ns = sorted({len(r["pause_ms"]) for r in results.values() if not r.get("error")})
    body = report(args, opts, cells, results, elapsed, [str(n) for n in ns] or ["no"])
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    try:
        plot(args.plot, cells, results, kinds)
    except ImportError as e:
        print(f"bench-colo: no plot ({e}); pip install matplotlib", file=sys.stderr)
        body = body.replace(body[body.rindex("\n!["):], "")
    update_section(args.out, "bench-colo", body)
    print(body)
    print(f"wrote {args.out} (section bench-colo) and {args.plot}; {elapsed / 60:.1f} min",
          flush=True)


if __name__ == "__main__":
    main()
