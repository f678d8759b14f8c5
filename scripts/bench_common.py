"""Shared by the benchmark scripts: run a VMM on the test guest, time console lines, and
update one section of docs/benchmarks.md."""

import json
import os
import re
import select
import signal
import statistics
import subprocess
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLOVMM = os.path.join(ROOT, "target/release/colovmm")
GUEST = os.path.join(ROOT, "target/guest/testguest")


def colovmm_cmd(cpus=1, mem="256M", cmdline=""):
    return [COLOVMM, "--kernel", GUEST, "--cpus", f"boot={cpus}",
            "--memory", f"size={mem}", "--cmdline", cmdline]


def qemu_cmd(cpus=1, mem="256M", cmdline=""):
    # -cpu host aborts QEMU on this KVM (MSR 0x10a); host minus arch-capabilities works.
    return ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities",
            "-m", mem, "-smp", str(cpus), "-nographic", "-nodefaults", "-no-reboot",
            "-serial", "stdio", "-kernel", GUEST, "-append", cmdline]


class Vm:
    """A VMM process with the guest console on its stdin/stdout."""

    def __init__(self, cmd):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.buf = b""

    def line(self, pattern, timeout=30.0):
        """Waits for a line matching `pattern`; returns (line, seconds since start)."""
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                text = raw.decode(errors="replace").rstrip("\r")
                if rx.search(text):
                    return text, time.monotonic() - self.start
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line matching {pattern!r}")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise EOFError(f"VMM exited before {pattern!r}")
                self.buf += chunk

    def send(self, text):
        self.proc.stdin.write((text + "\n").encode())
        self.proc.stdin.flush()

    def ask(self, cmd, pattern, timeout=30.0):
        t0 = time.monotonic()
        self.send(cmd)
        text, _ = self.line(pattern, timeout)
        return text, time.monotonic() - t0

    def stop(self):
        try:
            self.send("poweroff")
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


def median(xs):
    return statistics.median(xs)


def update_section(path, name, body):
    """Replaces the text between <!-- NAME:begin --> and <!-- NAME:end --> (or appends it)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def processes(names, argc=3):
    """'pid: command line' of other processes with one of `names` among their first words."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(os.path.basename(a.decode(errors="replace")) in names for a in args[:argc]):
            found.append(f"{pid}: " + b" ".join(args).decode(errors="replace").strip()[:160])
    return found


class EventTail:
    """Reads the JSON lines an event monitor appends to a file."""

    def __init__(self, path):
        self.path, self.pos, self.rest, self.events = path, 0, b"", []

    def poll(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
        except FileNotFoundError:
            return self.events
        self.pos += len(data)
        lines = (self.rest + data).split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if line.strip():
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    pass
        return self.events

    def colo(self, name):
        return [e for e in self.poll() if e.get("source") == "colo" and e.get("event") == name]


class Failed(Exception):
    """A benchmark run did not give its numbers (a VMM died, protection ended, a client failed)."""


def check_alive(*named):
    """Raises Failed if one of the (name, process) pairs has exited; a process has `alive()`,
    `proc` (its Popen) and `tail()` (its last stderr lines)."""
    for name, p in named:
        if p is not None and not p.alive():
            rc = p.proc.returncode
            how = f"was killed by {signal.Signals(-rc).name} (not by this script)" if rc < 0 \
                else f"exited with {rc}"
            raise Failed(f"the {name} {how}: {p.tail() or 'no message on its stderr'}")
