#!/usr/bin/env python3
"""Boots target/guest/testguest under QEMU microvm and drives its console contract.

Usage: guest/qemu-smoke.py [--smp N] [--mem MIB] [--kernel PATH]
Prints one line per check plus timings; exits non-zero on the first failure.
"""
import argparse, os, queue, re, subprocess, sys, threading, time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Guest:
    def __init__(self, kernel, smp, mem, extra=()):
        cmd = ["timeout", "60", "qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
               "-cpu", "host,-arch-capabilities", "-m", f"{mem}M", "-smp", str(smp),
               "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
               "-kernel", kernel, *extra]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.lines = queue.Queue()
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        buf = b""
        while True:
            b = self.p.stdout.read(1)
            if not b:
                self.lines.put((time.monotonic(), None))
                return
            if b == b"\n":
                self.lines.put((time.monotonic(), buf.decode(errors="replace")))
                buf = b""
            else:
                buf += b

    def line(self, timeout=5.0):
        t, l = self.lines.get(timeout=timeout)
        if l is None:
            raise EOFError("guest output closed")
        return t, l

    def send(self, text):
        self.p.stdin.write(text.encode() + b"\n")
        self.p.stdin.flush()
        return time.monotonic()

    def ask(self, text, timeout=10.0):
        t = self.send(text)
        tl, l = self.line(timeout)
        return l, tl - t

    def qemu_cpu_seconds(self):
        # The QEMU process is timeout's child.
        kids = open(f"/proc/{self.p.pid}/task/{self.p.pid}/children").read().split()
        fields = open(f"/proc/{kids[0]}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--mem", type=int, default=256)
    ap.add_argument("--kernel", default=os.path.join(REPO, "target/guest/testguest"))
    a = ap.parse_args()

    g = Guest(a.kernel, a.smp, a.mem)
    t, l = g.line(10)
    m = re.fullmatch(r"TESTGUEST READY cpus=(\d+) mem_mib=(\d+)", l)
    check(m is not None and int(m[1]) == a.smp, f"{l!r} after {1000 * (t - g.t0):.0f} ms")

    l, dt = g.ask("cpus")
    check(l == f"cpus={a.smp}", f"cpus -> {l!r} ({1000 * dt:.1f} ms)")

    l1, _ = g.ask("uptime")
    h1 = time.monotonic()
    time.sleep(2)
    l2, _ = g.ask("uptime")
    h2 = time.monotonic()
    u1, u2 = int(l1.split("=")[1]), int(l2.split("=")[1])
    check(u2 > u1 and abs((u2 - u1) - 1000 * (h2 - h1)) < 50,
          f"uptime {u1} -> {u2}: guest +{u2 - u1} ms, host +{1000 * (h2 - h1):.0f} ms")

    a1, _ = g.ask("hash 64 16")
    a2, _ = g.ask("hash 64 16")
    check(a1 == a2 and re.fullmatch(r"hash=[0-9a-f]{16}", a1), f"hash 64 16 twice: {a1} {a2}")

    check(g.ask("dirty 100 32")[0] == "dirty ok", "dirty 100 32")
    time.sleep(1)
    d1, _ = g.ask("hash 64 32")
    time.sleep(0.3)
    d2, _ = g.ask("hash 64 32")
    check(d1 != d2 and a1 != g.ask("hash 64 16")[0], f"hash changes while dirtying: {d1} {d2}")
    check(g.ask("dirty 0 0")[0] == "dirty ok", "dirty 0 0")
    s1, _ = g.ask("hash 64 32")
    time.sleep(0.3)
    s2, _ = g.ask("hash 64 32")
    check(s1 == s2, f"hash stable after dirty stop: {s1}")
    e, _ = g.ask("dirty 100 100000")
    check(e.startswith("error "), f"dirty too big -> {e!r}")

    check(g.ask("count 100")[0] == "count ok", "count 100")
    counts = []
    while len(counts) < 20:
        t, l = g.line(2)
        counts.append((t, int(l.split("=")[1])))
    check(g.ask("count 0")[0] in ("count ok",), "count 0")
    # A count line may have raced with "count 0"; drain it.
    time.sleep(0.3)
    while not g.lines.empty():
        g.line()
    ks = [k for _, k in counts]
    rate = (len(counts) - 1) / (counts[-1][0] - counts[0][0])
    check(ks == list(range(1, 21)), f"count 1..20 in order, {rate:.2f}/s")

    for cmd in ["frobnicate", "hash 1 x", "hash 0 100000", "count", "cpus 3"]:
        l, _ = g.ask(cmd)
        check(l.startswith("error "), f"{cmd!r} -> {l!r}")

    # Idle CPU: the guest waits for input with no timer armed.
    time.sleep(0.5)
    c0, w0 = g.qemu_cpu_seconds(), time.monotonic()
    time.sleep(3)
    c1, w1 = g.qemu_cpu_seconds(), time.monotonic()
    print(f"info idle QEMU CPU {100 * (c1 - c0) / (w1 - w0):.1f}% over {w1 - w0:.1f} s")

    costs = []
    for _ in range(3):
        l, dt = g.ask("hash 0 64")
        costs.append(1000 * dt)
    print(f"info hash 0 64 -> {l}: " + ", ".join(f"{c:.1f}" for c in costs) + " ms (send to answer)")
    l, dt = g.ask("cpus")
    print(f"info cpus round trip {1000 * dt:.2f} ms")

    t = g.send("poweroff")
    check(g.line()[1] == "poweroff", "poweroff answered")
    rc = g.p.wait(10)
    check(rc == 0, f"QEMU exited {rc} {1000 * (time.monotonic() - t):.0f} ms after poweroff")

    g = Guest(a.kernel, a.smp, a.mem)
    g.line(10)
    t = g.send("crash")
    check(g.line()[1] == "crash", "crash answered")
    rc = g.p.wait(10)
    print(f"info crash: QEMU (-no-reboot) exited {rc} after {1000 * (time.monotonic() - t):.0f} ms")

    g = Guest(a.kernel, a.smp, a.mem)
    g.line(10)
    g.send("fault pf")
    l = g.line()[1]
    check(re.fullmatch(r"EXCEPTION vector=14 rip=[0-9a-f]+ error=4", l) is not None, f"fault pf -> {l!r}")
    g.p.wait(10)


if __name__ == "__main__":
    main()
