"""Process start to `TESTGUEST READY`: colovmm vs QEMU microvm, same guest, same run."""

import argparse
import datetime
import os
import platform
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import Vm, colovmm_cmd, median, qemu_cmd, update_section  # noqa: E402


def boot_times(cmd, runs):
    times = []
    for _ in range(runs):
        vm = Vm(cmd)
        try:
            _, t = vm.line(r"^TESTGUEST READY", timeout=60)
            times.append(t * 1000)
        finally:
            vm.stop()
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = max(5, args.runs)
    rows = []
    for cpus in (1, 2):
        # Interleave the two VMMs so drift in machine load hits both alike.
        ours, theirs = [], []
        for _ in range(runs):
            ours += boot_times(colovmm_cmd(cpus=cpus), 1)
            theirs += boot_times(qemu_cmd(cpus=cpus), 1)
        rows.append((cpus, median(ours), min(ours), max(ours), median(theirs), min(theirs), max(theirs)))
    qemu_version = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                                  text=True).stdout.splitlines()[0]
    lines = [
        "## Boot: process start to `TESTGUEST READY`",
        "",
        f"`scripts/bench-boot.sh` ({runs} runs each, interleaved; {datetime.date.today()}, "
        f"{platform.node()}, {os.cpu_count()} cores; {qemu_version}; 256 MiB guest).",
        "Median (min-max) in ms; ratio = QEMU time / colovmm time, above 1.0 means colovmm is faster.",
        "",
        "| vCPUs | colovmm | QEMU microvm | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for cpus, om, omin, omax, qm, qmin, qmax in rows:
        lines.append(f"| {cpus} | {om:.1f} ({omin:.1f}-{omax:.1f}) | {qm:.1f} ({qmin:.1f}-{qmax:.1f}) "
                     f"| {qm / om:.2f}x |")
    body = "\n".join(lines)
    update_section(args.out, "bench-boot", body)
    print(body)


if __name__ == "__main__":
    main()
