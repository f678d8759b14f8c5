"""Disk and network I/O: colovmm vs QEMU microvm on the same guest, disk image and tap set-up.

Each round boots each VMM once (interleaved) in a fresh host namespace whose tap sits on a bridge
with a veth to a client namespace, and measures inside that one boot:
  disk: sequential read/write MB/s and 4 KiB random read/write IOPS (the guest's `disk bench`);
  net:  HTTP download MB/s (curl, guest -> client), TCP echo MB/s (client -> guest -> client),
        64-byte TCP request/response latency p50/p99, redis-benchmark set/get/incr ops/s;
  cost: virtio kicks and interrupts per request as the guest counts them (`virtio` command),
        and for colovmm the VM exits to userspace per request (from its log).
"""

import argparse
import datetime
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import COLOVMM, GUEST, Vm, update_section  # noqa: E402

GUEST_IP = "192.168.100.2"
CLIENT_IP = "192.168.100.1"


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


class Namespaces:
    """host ns (bridge + tap) and client ns (veth), removed on exit."""

    def __init__(self, tag):
        self.host, self.client = f"cvmb-{tag}-h", f"cvmb-{tag}-c"

    def __enter__(self):
        sh("ip", "netns", "add", self.host)
        sh("ip", "netns", "add", self.client)
        sh("ip", "link", "add", "vh", "netns", self.host, "type", "veth", "peer", "name", "vc",
           "netns", self.client)
        h = ["ip", "netns", "exec", self.host]
        sh(*h, "ip", "link", "add", "br0", "type", "bridge")
        sh(*h, "ip", "link", "set", "vh", "master", "br0")
        sh(*h, "ip", "tuntap", "add", "dev", "tap0", "mode", "tap", "vnet_hdr")
        sh(*h, "ip", "link", "set", "tap0", "master", "br0")
        for dev in ("lo", "br0", "vh", "tap0"):
            sh(*h, "ip", "link", "set", dev, "up")
        c = ["ip", "netns", "exec", self.client]
        sh(*c, "ip", "link", "set", "lo", "up")
        sh(*c, "ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "vc")
        sh(*c, "ip", "link", "set", "vc", "up")
        return self

    def __exit__(self, *exc):
        sh("ip", "netns", "del", self.host, check=False)
        sh("ip", "netns", "del", self.client, check=False)

    def client_run(self, *args, timeout=120):
        return sh("ip", "netns", "exec", self.client, *args, timeout=timeout)


def vmm_cmd(kind, ns, image, log):
    pre = ["ip", "netns", "exec", ns.host]
    if kind == "colovmm":
        return pre + [COLOVMM, "--kernel", GUEST, "--cpus", "boot=2", "--memory", "size=512M",
                      "--disk", f"path={image}", "--net", "tap=tap0", "-v", "--log-file", log]
    return pre + ["qemu-system-x86_64", "-M", "microvm", "-enable-kvm",
                  "-cpu", "host,-arch-capabilities", "-global", "virtio-mmio.force-legacy=false",
                  "-m", "512M", "-smp", "2", "-nographic", "-nodefaults", "-no-reboot",
                  "-serial", "stdio", "-kernel", GUEST,
                  "-drive", f"id=d0,file={image},format=raw,if=none",
                  "-device", "virtio-blk-device,drive=d0",
                  "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                  "-device", "virtio-net-device,netdev=n0"]


def virtio_counts(vm):
    """(blk kicks, blk irqs, net kicks, net irqs) from the guest's `virtio` line."""
    line, _ = vm.ask("virtio", r"^virtio ")
    blk = re.search(r"blk0:[^ ]*:kicks=(\d+):irqs=(\d+)", line)
    net = re.search(r"net:[^ ]*:kicks=(\d+):irqs=(\d+)", line)
    return tuple(int(x) for x in (blk.groups() + net.groups()))


def userspace_exits(log):
    """Total vCPU exits to userspace colovmm logged at shutdown."""
    text = open(log).read() if os.path.exists(log) else ""
    m = re.search(r"pio=(\d+) mmio=(\d+)", text)
    return int(m.group(1)) + int(m.group(2)) if m else None


def echo_latency(ns, n=2000):
    code = f"""
import socket, time, statistics
s = socket.create_connection(("{GUEST_IP}", 7), timeout=5)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
msg = b"x" * 64
lat = []
for _ in range({n}):
    t = time.perf_counter(); s.sendall(msg); got = b""
    while len(got) < 64:
        got += s.recv(64 - len(got))
    lat.append((time.perf_counter() - t) * 1e6)
lat.sort()
print(lat[len(lat)//2], lat[int(len(lat)*0.99)])
"""
    out = ns.client_run("python3", "-c", code).stdout.split()
    return float(out[0]), float(out[1])


def echo_throughput(ns, mib=32):
    code = f"""
import socket, threading, time
n = {mib} << 20
s = socket.create_connection(("{GUEST_IP}", 7), timeout=30)
chunk = bytes(range(256)) * 256
def send():
    left = n
    while left:
        k = min(left, len(chunk)); s.sendall(chunk[:k]); left -= k
t0 = time.perf_counter()
th = threading.Thread(target=send); th.start()
got = 0
while got < n:
    b = s.recv(1 << 20)
    if not b: break
    got += len(b)
th.join()
print(got, n / (time.perf_counter() - t0) / 1e6)
"""
    got, mbs = ns.client_run("python3", "-c", code).stdout.split()
    assert int(got) == mib << 20, f"echo returned {got} bytes"
    return float(mbs)


def download(ns, mib=128):
    out = ns.client_run("curl", "-sS", "-o", "/dev/null", "--max-time", "120",
                        "-w", "%{size_download} %{speed_download}",
                        f"http://{GUEST_IP}/bytes/{mib << 20}").stdout.split()
    assert int(out[0]) == mib << 20, f"download returned {out[0]} bytes"
    return float(out[1]) / 1e6


def redis_ops(ns):
    out = ns.client_run("redis-benchmark", "-h", GUEST_IP, "-t", "set,get,incr", "-n", "20000",
                        "-c", "20", "-q").stdout
    ops = [float(x) for x in re.findall(r"([\d.]+) requests per second", out)]
    return statistics.mean(ops) if ops else 0.0


def wait_ping(ns):
    for _ in range(50):
        if ns.client_run("ping", "-c", "1", "-W", "1", GUEST_IP).returncode == 0:
            return
    raise RuntimeError("guest never answered ping")


def one_round(kind, tag, image):
    r = {}
    log = os.path.join(tempfile.gettempdir(), f"colovmm-bench-{tag}.log")
    with Namespaces(tag) as ns:
        vm = Vm(vmm_cmd(kind, ns, image, log))
        try:
            vm.line(r"^TESTGUEST READY", timeout=60)
            # Warm-up, unmeasured: page-cache fill of the image and first touches of guest
            # buffers cost ~0.4 GB/s here and would land on whichever VMM ran first.
            vm.ask("disk bench read 128", r"^disk bench|^error", timeout=120)
            for k, arg in (("read", 128), ("write", 64), ("randread", 20000), ("randwrite", 20000)):
                b0 = virtio_counts(vm)
                line, _ = vm.ask(f"disk bench {k} {arg}", r"^disk bench|^error", timeout=120)
                b1 = virtio_counts(vm)
                m = re.search(r"mb_s=([\d.]+) iops=([\d.]+)", line)
                r[f"disk_{k}"] = float(m.group(2) if k.startswith("rand") else m.group(1))
                if k == "randread":
                    r["blk_kicks_per_req"] = (b1[0] - b0[0]) / arg
                    r["blk_irqs_per_req"] = (b1[1] - b0[1]) / arg
            wait_ping(ns)
            download(ns, 64)  # warm-up
            n0 = virtio_counts(vm)
            r["http_mb_s"] = download(ns)
            r["echo_mb_s"] = echo_throughput(ns)
            p50, p99 = echo_latency(ns)
            n1 = virtio_counts(vm)
            r["rr_p50_us"], r["rr_p99_us"] = p50, p99
            r["net_kicks"] = n1[2] - n0[2]
            r["net_irqs"] = n1[3] - n0[3]
            r["redis_ops"] = redis_ops(ns)
        finally:
            vm.stop()
    if kind == "colovmm":
        r["userspace_exits"] = userspace_exits(log)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    results = {"colovmm": [], "qemu": []}
    with tempfile.TemporaryDirectory() as d:
        image = os.path.join(d, "disk.img")
        with open(image, "wb") as f:
            f.truncate(256 << 20)
        for i in range(args.rounds):
            # Alternate which VMM goes first, so neither always inherits a warm machine.
            for kind in (("colovmm", "qemu") if i % 2 == 0 else ("qemu", "colovmm")):
                results[kind].append(one_round(kind, f"{os.getpid()}-{i}-{kind[0]}", image))
                print(kind, results[kind][-1], flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0] if v[0][m] is not None}
           for k, v in results.items()}
    rows = [
        ("disk sequential read (MB/s)", "disk_read", True),
        ("disk sequential write (MB/s)", "disk_write", True),
        ("disk 4 KiB random read (IOPS)", "disk_randread", True),
        ("disk 4 KiB random write (IOPS)", "disk_randwrite", True),
        ("HTTP download, guest to client (MB/s)", "http_mb_s", True),
        ("TCP echo, client to guest and back (MB/s)", "echo_mb_s", True),
        ("TCP request/response p50 (µs)", "rr_p50_us", False),
        ("TCP request/response p99 (µs)", "rr_p99_us", False),
        ("redis-benchmark set/get/incr (ops/s)", "redis_ops", True),
        ("virtio-blk kicks per 4 KiB read", "blk_kicks_per_req", False),
        ("virtio-blk interrupts per 4 KiB read", "blk_irqs_per_req", False),
    ]
    qv = sh("qemu-system-x86_64", "--version").stdout.splitlines()[0]
    lines = [
        "## I/O: disk and network",
        "",
        f"`scripts/bench-io.sh` ({args.rounds} rounds, each VMM booted once per round, interleaved; "
        f"{datetime.date.today()}; {qv}; 2 vCPUs, 512 MiB, a 256 MiB raw image, a tap on a bridge to a "
        "client namespace). Medians. Ratio: colovmm relative to QEMU, above 1.0 means colovmm is "
        "better (for latencies and per-request costs, QEMU's value divided by colovmm's).",
        "",
        "| metric | colovmm | QEMU microvm | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for name, key, higher_better in rows:
        o, q = med["colovmm"][key], med["qemu"][key]
        ratio = (o / q if higher_better else q / o) if o and q else float("nan")
        lines.append(f"| {name} | {o:,.2f} | {q:,.2f} | {ratio:.2f}x |")
    ex = med["colovmm"].get("userspace_exits")
    lines += ["",
              f"Whole run, per VMM: virtio-net kicks {med['colovmm']['net_kicks']:.0f} (colovmm) vs "
              f"{med['qemu']['net_kicks']:.0f} (QEMU), interrupts {med['colovmm']['net_irqs']:.0f} vs "
              f"{med['qemu']['net_irqs']:.0f} for the same network workload. colovmm's vCPUs exited "
              f"to userspace {ex:,.0f} times in the whole session (kicks go to KVM ioeventfds and "
              "interrupts come from irqfds, so neither reaches userspace)." if ex else ""]
    body = "\n".join(lines)
    update_section(args.out, "bench-io", body)
    print(body)


if __name__ == "__main__":
    main()
