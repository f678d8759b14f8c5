"""Live migration over loopback TCP: colovmm vs QEMU microvm, same guest, same run.

Cells: guest memory (512 MiB, 2 GiB) x workload (idle, `dirty 200 256`: 200 MiB/s over a
256 MiB working set) x memory channels (1, 4; QEMU: multifd with 4 channels). Per run, each VMM
boots the test guest, (for `dirty`) lets the dirtier cycle its working set once so it holds data,
starts `count 100`, migrates to a second process of the same VMM on 127.0.0.1, and the run only
counts if the destination's guest goes on (prints the next `count=` and answers `uptime` with a
value past the source's). The two VMMs alternate, and which goes first alternates per run;
before the first case of each guest size, both do one unrecorded idle migration (warm-up).

  colovmm: `colovmm-remote send-migration --wait --json`, whose last status has `elapsed_ms` and
           `downtime_ms` (pause -> last pages, state, destination resumed and acked).
  QEMU:    QMP `migrate` with `downtime-limit` 300 and no bandwidth cap; `total-time` from
           `query-migrate`; downtime is the guest pause, source STOP event -> destination RESUME
           event (QEMU's own `downtime` field stops at the source's last byte, it leaves out the
           destination's load and restart; it is kept in the raw output).

Plus the loopback TCP bandwidth of this machine, measured in the same run.
"""

import argparse
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import COLOVMM, GUEST, ROOT, Vm, median, processes, qemu_cmd, update_section  # noqa: E402

REMOTE = os.path.join(ROOT, "target/release/colovmm-remote")
DIRTY = "dirty 200 256"
DOWNTIME_MS = 300
# A migration that has not completed by then is reported as not converging (and cancelled).
MIGRATION_LIMIT_S = 60
# Every VMM process runs under `timeout`, so nothing survives even if this script is killed.
VMM_LIMIT_S = 240
OTHER_BENCHMARKS = ("bench_io.py", "bench_boot.py")


# ---------------------------------------------------------------------------------------------
# Sharing the machine


def other_benchmarks():
    """Command lines of other benchmark scripts running on this machine."""
    return processes(OTHER_BENCHMARKS)


def wait_for_quiet_machine():
    """Measuring while another benchmark runs would skew both: wait for it to finish.
    Returns the seconds waited."""
    said, t0 = 0.0, time.monotonic()
    while True:
        busy = other_benchmarks()
        if not busy:
            return time.monotonic() - t0
        if time.monotonic() - said > 60:
            print("waiting for other benchmarks to finish: " + "; ".join(busy), flush=True)
            said = time.monotonic()
        time.sleep(5)


# ---------------------------------------------------------------------------------------------
# Processes


class Proc(Vm):
    """A VMM under `timeout`, in its own process group so the whole group can be killed."""

    def __init__(self, cmd, log=None):
        self.start = time.monotonic()
        self.buf = b""
        err = open(log, "ab") if log else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                ["timeout", "-s", "KILL", str(VMM_LIMIT_S)] + cmd, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, start_new_session=True)
        finally:
            if log:
                err.close()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f:
                try:
                    f.close()
                except OSError:
                    pass

    def exit_within(self, seconds):
        try:
            self.proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_path(path, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


class Qmp:
    """Just enough QMP: greeting, capabilities, commands; events are kept in `events`."""

    def __init__(self, path, timeout=10.0):
        wait_path(path, timeout)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.rfile.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            m = self._read()
            if "event" in m:
                self.events.append(m)
            elif "error" in m:
                raise RuntimeError(f"QMP {name}: {m['error'].get('desc', m['error'])}")
            elif "return" in m:
                return m["return"]

    def event_time(self, name):
        """Wall-clock seconds of the last `name` event seen."""
        for e in reversed(self.events):
            if e["event"] == name:
                return e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        return None

    def close(self):
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# One migration per VMM


class Failed(Exception):
    """The migration did not complete (not converging, an error): reported in the table."""


def prepare_guest(vm, workload):
    """Boot, start the workload, then `count 100`; returns the guest's uptime (ms)."""
    vm.line(r"^TESTGUEST READY", timeout=60)
    if workload != "idle":
        vm.ask(workload, r"^dirty ok|^error")
        # One pass over the working set (256 MiB at 200 MiB/s = 1.3 s), so it holds data
        # instead of zero pages, and the guest dirties at its steady rate when migration starts.
        time.sleep(1.6)
    vm.ask("count 100", r"^count ok")
    text, _ = vm.ask("uptime", r"^uptime_ms=")
    return int(text.split("=")[1])


def check_moved(dst, uptime_before):
    """The destination's guest goes on from where the source's was."""
    dst.line(r"^count=\d+", timeout=10)
    text, _ = dst.ask("uptime", r"^uptime_ms=", timeout=10)
    up = int(text.split("=")[1])
    if up <= uptime_before:
        raise Failed(f"destination guest uptime {up} ms is not past the source's {uptime_before} ms")


def remote(sock, *args, timeout=30):
    return subprocess.run([REMOTE, "--api-socket", sock] + list(args), capture_output=True,
                          text=True, timeout=timeout)


def run_colovmm(tmp, mem, workload, channels):
    s1, s2 = os.path.join(tmp, "src.sock"), os.path.join(tmp, "dst.sock")
    port = free_port()
    src = dst = None
    try:
        src = Proc([COLOVMM, "--kernel", GUEST, "--memory", f"size={mem}", "--api-socket",
                    f"path={s1}"], log=os.path.join(tmp, "colovmm-src.log"))
        dst = Proc([COLOVMM, "--api-socket", f"path={s2}"], log=os.path.join(tmp, "colovmm-dst.log"))
        uptime = prepare_guest(src, workload)
        wait_path(s2)
        r = remote(s2, "receive-migration", f"tcp:127.0.0.1:{port}")
        if r.returncode:
            raise Failed(f"receive-migration: {r.stderr.strip()}")
        try:
            r = remote(s1, "--json", "send-migration", f"tcp:127.0.0.1:{port}", "--channels",
                       str(channels), "--downtime-ms", str(DOWNTIME_MS), "--wait",
                       timeout=MIGRATION_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise Failed(f"not completed after {MIGRATION_LIMIT_S} s") from None
        statuses = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
        last = statuses[-1] if statuses else {}
        if r.returncode or last.get("phase") != "completed":
            why = last.get("error") or r.stderr.strip() or f"exit {r.returncode}"
            raise Failed(why)
        check_moved(dst, uptime)
        info = remote(s1, "--json", "info", timeout=10)
        state = json.loads(info.stdout).get("state") if info.returncode == 0 else None
        if state != "Shutdown":
            raise Failed(f"the source VM is still {state} after the migration")
        return {"total_ms": float(last["elapsed_ms"]), "downtime_ms": float(last["downtime_ms"]),
                "passes": last.get("round")}
    finally:
        for sock, vm in ((s1, src), (s2, dst)):
            if vm is None:
                continue
            if vm.proc.poll() is None and os.path.exists(sock):
                try:
                    remote(sock, "shutdown-vmm", timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                vm.exit_within(5)
            vm.kill()
        for sock in (s1, s2):
            if os.path.exists(sock):
                os.unlink(sock)


def run_qemu(tmp, mem, workload, channels):
    q1, q2 = os.path.join(tmp, "src.qmp"), os.path.join(tmp, "dst.qmp")
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    src = dst = a = b = None
    try:
        base = qemu_cmd(mem=mem)
        src = Proc(base + ["-qmp", f"unix:{q1},server=on,wait=off"],
                   log=os.path.join(tmp, "qemu-src.log"))
        dst = Proc(base + ["-qmp", f"unix:{q2},server=on,wait=off", "-incoming", "defer"],
                   log=os.path.join(tmp, "qemu-dst.log"))
        uptime = prepare_guest(src, workload)
        a, b = Qmp(q1), Qmp(q2)
        for q in (a, b):
            if channels > 1:
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": "multifd", "state": True}])
                q.cmd("migrate-set-parameters", **{"multifd-channels": channels})
        # max-bandwidth: QEMU caps migration at 128 MiB/s by default, under which the dirty
        # workload never converges; 64 GiB/s is "no cap" here.
        a.cmd("migrate-set-parameters", **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": 64 << 30})
        b.cmd("migrate-incoming", uri=uri)
        a.cmd("migrate", uri=uri)
        deadline = time.monotonic() + MIGRATION_LIMIT_S
        while True:
            st = a.cmd("query-migrate")
            status = st.get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise Failed(f"QEMU migration {status}: {st.get('error-desc', '')}".strip())
            if time.monotonic() > deadline:
                ram = st.get("ram", {})
                try:
                    a.cmd("migrate_cancel")
                except Exception:
                    pass
                raise Failed(f"not completed after {MIGRATION_LIMIT_S} s "
                             f"(in pass {ram.get('dirty-sync-count', '?')}, "
                             f"{ram.get('remaining', 0) >> 20} MiB still dirty)")
            time.sleep(0.05)
        check_moved(dst, uptime)
        state = a.cmd("query-status").get("status")
        if state != "postmigrate":
            raise Failed(f"the source VM is {state} after the migration")
        b.cmd("query-status")  # collect the destination's RESUME event
        stop, resume = a.event_time("STOP"), b.event_time("RESUME")
        if stop is None or resume is None:
            raise Failed("no STOP/RESUME events")
        return {"total_ms": float(st["total-time"]), "downtime_ms": (resume - stop) * 1000,
                "qemu_downtime_ms": float(st.get("downtime", 0)),
                # One bitmap sync before the first pass, one per further pass, and the last
                # one with the guest stopped.
                "passes": st.get("ram", {}).get("dirty-sync-count", 1) - 1}
    finally:
        for q in (a, b):
            if q:
                try:
                    q.cmd("quit")
                except Exception:
                    pass
                q.close()
        for vm in (src, dst):
            if vm:
                vm.exit_within(3)
                vm.kill()
        for p in (q1, q2):
            if os.path.exists(p):
                os.unlink(p)


RUNNERS = {"colovmm": run_colovmm, "qemu": run_qemu}


# ---------------------------------------------------------------------------------------------
# Loopback bandwidth


def loopback_bandwidth(nbytes=1 << 30, chunk=4 << 20):
    """MB/s of one TCP stream over 127.0.0.1 moving `nbytes` (a sender thread, a receiver)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]
        payload = memoryview(os.urandom(chunk))
        err = []

        def send():
            try:
                with socket.create_connection(("127.0.0.1", port)) as s:
                    left = nbytes
                    while left:
                        n = min(left, chunk)
                        s.sendall(payload[:n])
                        left -= n
            except OSError as e:
                err.append(e)

        t = threading.Thread(target=send)
        t0 = time.perf_counter()
        t.start()
        conn, _ = lsock.accept()
        buf = bytearray(chunk)
        got = 0
        with conn:
            while got < nbytes:
                n = conn.recv_into(buf)
                if not n:
                    break
                got += n
        elapsed = time.perf_counter() - t0
        t.join()
    if err or got != nbytes:
        raise RuntimeError(f"loopback transfer moved {got} of {nbytes} bytes {err}")
    return nbytes / elapsed / 1e6


# ---------------------------------------------------------------------------------------------
# Report


def fmt_cell(results):
    """(`total / downtime` medians of the successful runs or why they failed, total, downtime,
    passes as min-max)."""
    ok = [r for r in results if r.get("error") is None]
    bad = [r for r in results if r.get("error")]
    if not ok:
        return ("failed: " + bad[0]["error"]) if bad else "not run", None, None, "-"
    total = median([r["total_ms"] for r in ok])
    downs = [r["downtime_ms"] for r in ok]
    down = median(downs)
    text = f"{total:,.0f} / {down:,.1f} ({min(downs):,.1f}-{max(downs):,.1f})"
    if bad:
        text += f" ({len(bad)} of {len(results)} runs failed: {bad[0]['error']})"
    passes = sorted(r["passes"] for r in ok if r.get("passes") is not None)
    span = "-" if not passes else str(passes[0]) if passes[0] == passes[-1] else \
        f"{passes[0]}-{passes[-1]}"
    return text, total, down, span


def ratio(q, o):
    if not (q and o):
        return "-"
    r = q / o
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", type=int, default=5, help="runs per cell with 512 MiB")
    ap.add_argument("--runs-2g", type=int, default=5, help="runs per cell with 2 GiB")
    ap.add_argument("--only", default="", help="comma-separated case filter (testing), e.g. 512M")
    args = ap.parse_args()
    # A plain `kill` should still run the `finally` blocks that stop the VMMs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.monotonic()
    waited = wait_for_quiet_machine()

    cases = [(mem, work, ch) for mem in ("512M", "2G") for work in ("idle", DIRTY) for ch in (1, 4)]
    if args.only:
        cases = [c for c in cases if all(f in f"{c[0]} {c[1]} {c[2]}ch" for f in args.only.split(","))]
    results = {(c, k): [] for c in cases for k in RUNNERS}
    bandwidth = [loopback_bandwidth()]
    print(f"loopback: {bandwidth[-1]:,.0f} MB/s", flush=True)
    with tempfile.TemporaryDirectory(prefix="colovmm-bench-mig-") as tmp:
        warm = set()
        for case in cases:
            mem, work, ch = case
            runs = args.runs if mem == "512M" else args.runs_2g
            if mem not in warm:
                # Unrecorded warm-up per guest size: the first few GiB a process touches after
                # the host has been quiet cost several times more (first-touch of host memory),
                # and would land on whichever VMM happens to go first.
                warm.add(mem)
                for kind in RUNNERS:
                    try:
                        RUNNERS[kind](tmp, mem, "idle", 1)
                    except (Failed, TimeoutError, EOFError, RuntimeError, OSError, ValueError,
                            subprocess.SubprocessError) as e:
                        print(f"warm-up {mem} {kind}: {e}", flush=True)
            for i in range(runs):
                for kind in (("colovmm", "qemu") if i % 2 == 0 else ("qemu", "colovmm")):
                    waited += wait_for_quiet_machine()
                    try:
                        r = RUNNERS[kind](tmp, mem, work, ch)
                        r["error"] = None
                    except Failed as e:
                        r = {"error": str(e)}
                    except (TimeoutError, EOFError, RuntimeError, OSError, ValueError,
                            subprocess.SubprocessError) as e:
                        r = {"error": f"{type(e).__name__}: {e}"}
                    results[(case, kind)].append(r)
                    print(f"{mem} {work} {ch}ch {kind}: {r}", flush=True)
        bandwidth.append(loopback_bandwidth())
        print(f"loopback: {bandwidth[-1]:,.0f} MB/s", flush=True)

    elapsed = time.monotonic() - t_start - waited
    qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                        text=True).stdout.splitlines()[0]
    bw = median(bandwidth)
    full = {m: (m_bytes / (bw * 1e6) * 1000) for m, m_bytes in (("512M", 512 << 20), ("2G", 2 << 30))}
    lines = [
        "## Live migration over loopback TCP",
        "",
        f"`scripts/bench-migration.sh` ({datetime.date.today()}; {qv}; 1 vCPU; downtime budget "
        f"{DOWNTIME_MS} ms on both, QEMU without its bandwidth cap; {args.runs} runs per 512 MiB "
        f"case and {args.runs_2g} per 2 GiB case after an unrecorded warm-up per size, VMMs "
        f"interleaved; the whole benchmark took "
        f"{elapsed / 60:.1f} min). Source and destination are two processes of the same VMM on "
        "127.0.0.1; every run checks that the guest goes on at the destination (next `count=`, "
        "`uptime` past the source's).",
        "",
        "Median total migration time / median downtime (its min-max) in ms. Downtime is the guest's pause: colovmm's "
        "`downtime_ms` (pause until the destination runs and has acked), QEMU's source STOP to "
        "destination RESUME event (QEMU's own `downtime` leaves out the destination's load and "
        "restart). Ratio = QEMU / colovmm, above 1.0 means colovmm is better. `dirty` = the guest "
        "writes 200 MiB/s over a 256 MiB working set (it has cycled through it once before the "
        "migration starts); 4 channels = QEMU multifd with 4 channels. Passes: copy passes over "
        "memory while the guest ran, before the final one with it paused (colovmm's `round`, "
        "QEMU's `dirty-sync-count` - 1), min-max over the runs.",
        "",
        "| case | colovmm total / downtime | QEMU total / downtime | total ratio | downtime ratio "
        "| passes (colovmm / QEMU) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for case in cases:
        mem, work, ch = case
        label = f"{'512 MiB' if mem == '512M' else '2 GiB'}, {'idle' if work == 'idle' else 'dirty'}, " \
                f"{ch} channel{'s' if ch > 1 else ''}"
        o_text, o_total, o_down, o_passes = fmt_cell(results[(case, "colovmm")])
        q_text, q_total, q_down, q_passes = fmt_cell(results[(case, "qemu")])
        lines.append(f"| {label} | {o_text} | {q_text} | {ratio(q_total, o_total)} "
                     f"| {ratio(q_down, o_down)} | {o_passes} / {q_passes} |")
    lines += [
        "",
        f"Loopback TCP, one stream moving 1 GiB (Python, 4 MiB writes), before and after the "
        f"migrations: {' and '.join(f'{b:,.0f}' for b in bandwidth)} MB/s. At {bw:,.0f} MB/s, "
        f"copying every page of a 512 MiB / 2 GiB guest would take {full['512M']:,.0f} / "
        f"{full['2G']:,.0f} ms; both VMMs send runs of zero pages as markers, so an idle guest "
        "(about 64 MiB in use) moves far less than that.",
    ]
    body = "\n".join(lines)
    update_section(args.out, "bench-migration", body)
    print(body)
    raw = {f"{c[0]} {c[1]} {c[2]}ch {k}": v for (c, k), v in results.items()}
    print(json.dumps(raw))


if __name__ == "__main__":
    main()
