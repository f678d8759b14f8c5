#!/usr/bin/env python3
"""Boots target/guest/testguest under QEMU microvm with virtio-blk and virtio-net devices and
checks the drivers, the network services and the disk commands end to end.

Usage (as root: it creates a network namespace and a tap device):
    guest/qemu-virtio.py [--kernel PATH] [--quick]

What it sets up, all removed again on exit (also on failure or Ctrl-C):
  * a temporary directory with disk0.img (64 MiB, read-write) and ro.img (1 MiB pattern,
    attached read-only);
  * a network namespace `tgv<pid>` holding a tap `tgv<pid>` with 192.168.100.1/24. QEMU runs
    inside that namespace (so the tap is its network), and every client (ping, nc, curl,
    redis-cli, redis-benchmark, wrk) runs there too. Nothing else is touched.

Clients needed: ping, nc (openbsd), curl, redis-cli, redis-benchmark; wrk is optional
(`apt-get install iputils-ping netcat-openbsd curl redis-tools wrk`).
Prints one line per check and the measured numbers; exits non-zero on the first failure.
"""
import argparse, atexit, hashlib, os, re, shutil, signal, struct, subprocess, sys, tempfile, time
import importlib.util

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
_spec = importlib.util.spec_from_file_location("qemu_smoke", os.path.join(HERE, "qemu-smoke.py"))
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
check = smoke.check

GUEST_IP = "192.168.100.2"
HOST_IP = "192.168.100.1"
NS = f"tgv{os.getpid()}"
TAP = NS[:15]
FNV_OFFSET, FNV_PRIME, MASK = 0xcbf29ce484222325, 0x100000001b3, (1 << 64) - 1

cleanup_actions = []


def cleanup():
    while cleanup_actions:
        try:
            cleanup_actions.pop()()
        except Exception as e:  # keep tearing down the rest
            print(f"info cleanup: {e}")


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
signal.signal(signal.SIGINT, lambda *_: sys.exit(1))


def sh(*cmd, **kw):
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, **kw)


def ns(cmd, timeout=120, check_rc=True):
    """Runs a shell command inside the test namespace; returns stdout."""
    r = subprocess.run(["ip", "netns", "exec", NS, "bash", "-c", cmd], capture_output=True, text=True,
                       timeout=timeout)
    if check_rc and r.returncode != 0:
        print(f"FAIL {cmd!r} exited {r.returncode}: {r.stderr.strip()[-500:]}")
        sys.exit(1)
    return r.stdout


def setup_net():
    sh("ip", "netns", "add", NS)
    cleanup_actions.append(lambda: subprocess.run(["ip", "netns", "del", NS], capture_output=True))
    ns("ip link set lo up")
    ns(f"ip tuntap add dev {TAP} mode tap && ip addr add {HOST_IP}/24 dev {TAP} && ip link set {TAP} up")


class Guest(smoke.Guest):
    """A guest whose QEMU runs inside the test namespace (smoke.Guest with another argv)."""

    def __init__(self, kernel, extra, reboot=False, smp=2, seconds=300):
        cmd = ["ip", "netns", "exec", NS, "timeout", str(seconds), "qemu-system-x86_64", "-M", "microvm",
               "-enable-kvm", "-cpu", "host,-arch-capabilities", "-global", "virtio-mmio.force-legacy=false",
               "-m", "256M", "-smp", str(smp), "-nographic", "-nodefaults", "-serial", "stdio",
               *([] if reboot else ["-no-reboot"]), "-kernel", kernel, *extra]
        self.t0 = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        cleanup_actions.append(self.stop)
        self.lines = smoke.queue.Queue()
        smoke.threading.Thread(target=self._reader, daemon=True).start()

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()  # `timeout` passes it on to QEMU
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)

    def ready(self, timeout=10):
        """Waits for READY; returns the lines printed before it."""
        before = []
        while True:
            _, l = self.line(timeout)
            if l.startswith("TESTGUEST READY"):
                return before
            before.append(l)

    def ask_ok(self, cmd, pattern, timeout=60):
        l, dt = self.ask(cmd, timeout)
        m = re.fullmatch(pattern, l)
        check(m is not None, f"{cmd!r} -> {l!r} ({1000 * dt:.1f} ms)")
        return m


def fnv1a(data, h=FNV_OFFSET):
    for b in data:
        h = ((h ^ b) * FNV_PRIME) & MASK
    return h


def record(seq, index):
    """The guest's record format (README.md, "Disk record log")."""
    r = bytearray(b"CLVMREC1" + struct.pack("<QQ", seq, index))
    for k in range(60):
        w = (((seq + 1) * 0x9E3779B97F4A7C15) & MASK) ^ ((k * 0xBF58476D1CE4E5B9) & MASK)
        r += struct.pack("<Q", w)
    r += struct.pack("<Q", fnv1a(r))
    return bytes(r)


def parse_log(path):
    """Host-side reader of the record log: [(sector, seq)] up to the first non-record."""
    out = []
    with open(path, "rb") as f:
        f.seek(512)
        while True:
            s = f.read(512)
            if len(s) < 512 or s[:8] != b"CLVMREC1":
                return out
            seq, index = struct.unpack_from("<QQ", s, 8)
            sector = len(out) + 1
            if index != sector - 1 or s != record(seq, index):
                raise ValueError(f"bad record at sector {sector}")
            out.append((sector, seq))


def pattern_sha256(n):
    period = bytes(range(251))
    h = hashlib.sha256()
    chunk = period * (1 << 14)  # a whole number of periods
    left = n
    while left:
        take = min(left, len(chunk))
        h.update(chunk[:take])
        left -= take
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default=os.path.join(REPO, "target/guest/testguest"))
    ap.add_argument("--quick", action="store_true", help="skip the benchmarks")
    a = ap.parse_args()
    for tool in ["ping", "nc", "curl", "redis-cli", "redis-benchmark"]:
        check(shutil.which(tool) is not None, f"client tool {tool} installed")

    tmp = tempfile.mkdtemp(prefix="tgvirtio")
    cleanup_actions.append(lambda: shutil.rmtree(tmp, ignore_errors=True))
    disk0, ro = os.path.join(tmp, "disk0.img"), os.path.join(tmp, "ro.img")
    with open(disk0, "wb") as f:
        f.truncate(64 << 20)
    ro_data = bytes((i * 7 + (i >> 9)) & 0xff for i in range(1 << 20))
    with open(ro, "wb") as f:
        f.write(ro_data)
    setup_net()
    devices = ["-drive", f"id=d0,file={disk0},format=raw,if=none", "-device", "virtio-blk-device,drive=d0",
               "-drive", f"id=d1,file={ro},format=raw,if=none,readonly=on", "-device", "virtio-blk-device,drive=d1",
               "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no", "-device", "virtio-net-device,netdev=n0"]

    # ---- boot with two disks and a NIC; the guest reboots on `crash` (no -no-reboot) ----
    g = Guest(a.kernel, devices, reboot=True)
    before = g.ready()
    check(before == [], f"READY with no other boot lines ({1000 * (time.monotonic() - g.t0):.0f} ms)")
    g.ask_ok("disks", r"disks=2 0:131072 1:2048:ro")
    m = g.ask_ok("net", r"mac=([0-9a-f:]{17}) ip=192\.168\.100\.2/24 rx_packets=\d+ tx_packets=\d+")

    out = ns(f"ping -c 10 -i 0.2 {GUEST_IP}")
    rtt = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
    check(" 0% packet loss" in out, f"ping: 10/10 answered, rtt min/avg/max {rtt[1]}/{rtt[2]}/{rtt[3]} ms")

    out = ns(f"printf 'hello echo\\n' | nc -q 1 {GUEST_IP} 7")
    check(out == "hello echo\n", f"tcp echo -> {out!r}")
    out = ns(f"printf 'udp hello' | nc -u -w 1 {GUEST_IP} 7")
    check(out == "udp hello", f"udp echo -> {out!r}")
    blob = os.path.join(tmp, "blob")
    with open(blob, "wb") as f:
        f.write(os.urandom(1 << 20))
    ns(f"nc -q 2 {GUEST_IP} 7 < {blob} | cmp - {blob}")
    check(True, "tcp echo of 1 MiB random bytes matches")

    def redis(*args):
        return ns("redis-cli -h " + GUEST_IP + " " + " ".join(args)).strip()
    check(redis("PING") == "PONG", "redis PING")
    check(redis("SET", "greeting", "hello-colo") == "OK", "redis SET")
    check(redis("GET", "greeting") == "hello-colo", "redis GET")
    check([redis("INCR", "ctr") for _ in range(3)] == ["1", "2", "3"], "redis INCR x3 -> 1 2 3")
    check(redis("SET", "gone", "x") == "OK" and redis("DEL", "gone") == "1" and redis("GET", "gone") == "",
          "redis DEL, then GET -> nil")
    check(redis("FROB").startswith("ERR unknown command"), "redis unknown command -> error")
    out = ns(f"printf 'PING\\r\\nSET a 1\\r\\nINCR a\\r\\nGET a\\r\\n' | nc -q 1 {GUEST_IP} 6379 | od -An -c")
    out = " ".join(out.split())
    check(out == "+ P O N G \\r \\n + O K \\r \\n : 2 \\r \\n $ 1 \\r \\n 2 \\r \\n",
          f"pipelined inline commands in one segment -> {out!r}")

    page = ns(f"curl -sf http://{GUEST_IP}/")
    check("colovmm testguest" in page, f"GET / -> {len(page)} bytes of html")
    out = ns(f"curl -sf http://{GUEST_IP}/kv/greeting")
    check(out == "hello-colo", f"GET /kv/greeting -> {out!r}")
    code = ns(f"curl -s -o /dev/null -w '%{{http_code}}' http://{GUEST_IP}/kv/missing")
    check(code == "404", f"GET /kv/missing -> {code}")
    head = ns(f"curl -si http://{GUEST_IP}/bytes/10 | tr -d '\\r'")
    check("Content-Length: 10" in head and "Date" not in head, "GET /bytes/10 has Content-Length, no Date")
    out = ns(f"curl -sv http://{GUEST_IP}/bytes/3 http://{GUEST_IP}/bytes/3 -o /dev/null -o /dev/null 2>&1")
    check(re.search(r"Re-?using existing connection", out) is not None, "two requests on one keep-alive connection")
    out = ns(f"curl -sv -H 'Connection: close' http://{GUEST_IP}/ -o /dev/null 2>&1")
    check("Connection: close" in out and "Closing connection" in out, "Connection: close is honoured")

    n = 64 << 20
    expected = pattern_sha256(n)
    speeds = []
    for i in range(3):
        out = ns(f"curl -sf http://{GUEST_IP}/bytes/{n} -w '%{{stderr}}%{{speed_download}}' 2>{tmp}/speed"
                 f" | sha256sum")
        speeds.append(float(open(f"{tmp}/speed").read()) / 1e6)
        check(out.split()[0] == expected, f"GET /bytes/{n} #{i + 1}: sha256 matches, {speeds[-1]:.0f} MB/s")

    # The console keeps answering while the network is busy.
    bg = subprocess.Popen(["ip", "netns", "exec", NS, "bash", "-c",
                           f"for i in 1 2 3 4; do curl -sf -o /dev/null http://{GUEST_IP}/bytes/{n}; done"])
    time.sleep(0.2)
    rts = []
    while bg.poll() is None and len(rts) < 20:
        l, dt = g.ask("uptime", 5)
        if not l.startswith("uptime_ms="):
            check(False, f"uptime during transfer -> {l!r}")
        rts.append(1000 * dt)
        time.sleep(0.05)
    bg.wait(120)
    check(bg.returncode == 0 and rts, f"console during 4x64 MiB transfers: {len(rts)} answers, "
          f"max {max(rts):.1f} ms, median {sorted(rts)[len(rts) // 2]:.1f} ms")

    time.sleep(11)  # let TIME-WAIT sockets expire, then the guest should be idle
    c0, w0 = g.qemu_cpu_seconds(), time.monotonic()
    time.sleep(3)
    c1, w1 = g.qemu_cpu_seconds(), time.monotonic()
    print(f"info idle QEMU CPU with disks and NIC: {100 * (c1 - c0) / (w1 - w0):.1f}% over {w1 - w0:.1f} s")

    if not a.quick:
        out = ns(f"redis-benchmark -h {GUEST_IP} -t set,get,incr -n 20000 -q 2>&1")
        rps = dict(re.findall(r"^(SET|GET|INCR): ([\d.]+) requests per second", out.replace("\r", "\n"), re.M))
        check(len(rps) == 3, "redis-benchmark -t set,get,incr -n 20000 -q (-c 50): " +
              ", ".join(f"{k} {float(v):.0f}/s" for k, v in rps.items()))
        out = ns(f"redis-benchmark -h {GUEST_IP} -t set,get,incr -n 20000 -q -P 16 2>&1")
        rps = dict(re.findall(r"^(SET|GET|INCR): ([\d.]+) requests per second", out.replace("\r", "\n"), re.M))
        check(len(rps) == 3, "redis-benchmark ... -P 16 (pipelined): " +
              ", ".join(f"{k} {float(v):.0f}/s" for k, v in rps.items()))
        if shutil.which("wrk"):
            out = ns(f"wrk -t 2 -c 10 -d 3 http://{GUEST_IP}/")
            r = re.search(r"Requests/sec:\s+([\d.]+)", out)
            errs = re.search(r"Non-2xx|Socket errors", out)
            check(r is not None and errs is None, f"wrk -c 10 GET /: {float(r[1]):.0f} requests/s")

    # ---- disks ----
    for seq in [11, 12, 13]:
        g.ask_ok(f"disk write {seq}", rf"disk write ok seq={seq} sector={seq - 10}")
    g.ask_ok("disk check", r"disk records=3 last=13 ok")
    g.ask_ok("disk write 99 1", r"error io read-only disk 0x[0-9a-f]+")
    g.ask_ok("disk bench write 1 1", r"error io read-only disk 0x[0-9a-f]+")
    g.ask_ok("disk check 1", r"disk records=0 last=none ok")
    g.ask_ok("disk hash 1", rf"disk hash={fnv1a(ro_data):016x}")
    g.ask_ok("disk check 2", r"error no such disk")
    if not a.quick:
        for cmd in ["disk bench read 64", "disk bench write 32", "disk bench randread 5000",
                    "disk bench randwrite 5000"]:
            g.ask_ok(cmd, r"disk bench \w+ bytes=\d+ ms=[\d.]+ mb_s=[\d.]+ iops=\d+", timeout=120)
    g.ask_ok("disk check", r"disk records=3 last=13 ok")  # benches stay in the upper half
    l, _ = g.ask("virtio")
    print(f"info {l}")

    # ---- reboot: the log survives and is rescanned on first use ----
    g.send("crash")
    check(g.line()[1] == "crash", "crash answered; QEMU reboots the guest")
    g.ready(20)
    g.ask_ok("disk check", r"disk records=3 last=13 ok")
    g.ask_ok("disk write 14", r"disk write ok seq=14 sector=4")
    g.ask_ok("net", r"mac=\S+ ip=192\.168\.100\.2/24 rx_packets=\d+ tx_packets=\d+")
    out = ns(f"ping -c 2 -i 0.2 {GUEST_IP}")
    check(" 0% packet loss" in out, "ping after reboot")
    g.send("poweroff")
    check(g.line()[1] == "poweroff", "poweroff")
    g.p.wait(10)
    log = parse_log(disk0)
    check(log == [(1, 11), (2, 12), (3, 13), (4, 14)], f"host parses the image: {log}")

    # ---- a corrupted record is reported ----
    with open(disk0, "r+b") as f:
        f.seek(2 * 512 + 100)
        f.write(b"\xff")
    g = Guest(a.kernel, devices[:8], seconds=30)
    g.ready()
    g.ask_ok("disk check", r"disk records=1 bad sector=2 reason=checksum")
    g.ask_ok("disk write 15", r"disk write ok seq=15 sector=2")  # the log ended at the bad record
    g.ask_ok("disk check", r"disk records=2 last=15 ok")  # and sector 3 was zeroed with it
    g.send("poweroff")
    g.line()
    g.p.wait(10)

    # ---- command-line discovery (QEMU only appends virtio_mmio.device= words with acpi=off) ----
    g = Guest(a.kernel, ["-M", "microvm,acpi=off", "-append", "cpus=2 ip=192.168.100.3/24 services=echo,udp",
                         *devices], seconds=60)
    g.ready()
    g.ask_ok("disks", r"disks=2 0:131072 1:2048:ro")
    g.ask_ok("net", r"mac=\S+ ip=192\.168\.100\.3/24 rx_packets=\d+ tx_packets=\d+")
    out = ns("printf 'via cmdline\\n' | nc -q 1 192.168.100.3 7")
    check(out == "via cmdline\n", "acpi=off: devices found on the command line; echo on ip=192.168.100.3")
    code = ns("curl -s -o /dev/null -w '%{http_code}' http://192.168.100.3/", check_rc=False)
    check(code == "000", "services=echo,udp: no HTTP on port 80 (connection refused)")
    g.send("poweroff")
    g.line()
    g.p.wait(10)

    # ---- legacy devices are reported and left alone ----
    g = Guest(a.kernel, ["-global", "virtio-mmio.force-legacy=true", *devices[:4]], seconds=30)
    before = g.ready()
    check(len(before) == 1 and "legacy" in before[0], f"legacy device -> {before}")
    g.ask_ok("disks", r"disks=0")
    g.send("poweroff")
    g.line()
    g.p.wait(10)

    # ---- a device that stops answering: timeout, error line, the guest lives on ----
    slow = ["-drive", f"id=d0,file={disk0},format=raw,if=none,throttling.bps-total=4096",
            "-device", "virtio-blk-device,drive=d0"]
    g = Guest(a.kernel, slow, seconds=60)
    g.ready()
    g.ask("disk bench read 1")  # the throttle lets the first burst through
    t = time.monotonic()
    l, _ = g.ask("disk bench read 8", 30)
    check(l.startswith("error io timeout"), f"stalled device -> {l!r} after {time.monotonic() - t:.1f} s")
    g.ask_ok("cpus", r"cpus=2")
    g.ask_ok("disk check", r"error io device 0x[0-9a-f]+ failed earlier")
    g.send("poweroff")
    g.line()
    g.p.wait(30)
    print("all virtio checks passed")


if __name__ == "__main__":
    main()
