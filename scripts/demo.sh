#!/usr/bin/env bash
# The main job: a COLO-protected VM pair with its network and its disk. Builds colovmm and the
# test guest, makes three network namespaces standing for two hosts and a client on one switch,
# starts a secondary and a primary (each VM's NIC on its host's tap, its disk on its host's
# image: the secondary's copy is created and synced), runs a client that increments a redis
# counter in the guest over one TCP connection, and has the guest append records to its disk.
# Then it kills the primary with -9: the secondary's copy of the guest takes over the network
# and the same connection goes on, every reply still the previous one plus one, and the
# survivor's disk holds the records in order. Everything it made is removed on exit. Needs root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/build-guest.sh
cargo build --release --bin colovmm --bin colovmm-remote
bin="$root/target/release"
dir="$(mktemp -d)"
tag="cvd$$"
hostp="$tag-p" hosts="$tag-s" client="$tag-c" switch="$tag-w"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for ns in "$hostp" "$hosts" "$client" "$switch"; do ip netns del "$ns" 2>/dev/null || true; done
    rm -rf "$dir"
}
trap cleanup EXIT
remote() { "$bin/colovmm-remote" --api-socket "$dir/$1.sock" "${@:2}"; }
wait_event() { # file event count
    for _ in $(seq 1200); do
        [ "$(grep -c "\"event\":\"$2\"" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
        sleep 0.05
    done
    echo "demo: no $3 '$2' events in $1" >&2
    return 1
}

echo "== network: hosts $hostp (10.77.0.10) and $hosts (10.77.0.11), client $client (10.77.0.1)"
for ns in "$hostp" "$hosts" "$client" "$switch"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
ip -n "$switch" link add br0 type bridge
ip -n "$switch" link set br0 up
plug() { # namespace port address
    ip link add "$2" netns "$switch" type veth peer name up0 netns "$1"
    ip -n "$switch" link set "$2" master br0
    ip -n "$switch" link set "$2" up
}
for host in "$hostp:pp:10.77.0.10" "$hosts:ps:10.77.0.11"; do
    IFS=: read -r ns port addr <<<"$host"
    plug "$ns" "$port"
    ip -n "$ns" link add br0 type bridge
    ip -n "$ns" link set up0 master br0
    ip netns exec "$ns" ip tuntap add dev tap0 mode tap vnet_hdr
    ip -n "$ns" link set tap0 master br0
    ip -n "$ns" addr add "$addr/24" dev br0
    for d in br0 up0 tap0; do ip -n "$ns" link set "$d" up; done
done
plug "$client" pc
ip -n "$client" addr add 10.77.0.1/24 dev up0
ip -n "$client" link set up0 up

echo "== secondary: waits on 10.77.0.11:9400; its VM comes from the primary, on its own tap and disk copy"
ip netns exec "$hosts" "$bin/colovmm" --net tap=tap0 --disk "path=$dir/vm-copy.img" \
    --colo "role=secondary,listen=10.77.0.11:9400" --serial "socket=$dir/svm.console" \
    --api-socket "path=$dir/s.sock" --event-monitor "path=$dir/s.ev" 2>"$dir/s.err" &
pids+=($!)
echo "== primary: boots the test guest (10.77.0.2) with a 64 MiB disk and protects it (a checkpoint every 500 ms)"
truncate -s 64M "$dir/vm.img"
ip netns exec "$hostp" "$bin/colovmm" --kernel target/guest/testguest --memory size=256M \
    --cmdline "ip=10.77.0.2/24" --net tap=tap0 --disk "path=$dir/vm.img" \
    --serial "socket=$dir/pvm.console" \
    --api-socket "path=$dir/p.sock" --event-monitor "path=$dir/p.ev" \
    --colo "role=primary,peer=10.77.0.11:9400,checkpoint-interval=500" \
    >"$dir/pvm.log" 2>"$dir/p.err" </dev/null &
pids+=($!)
primary=$!
wait_event "$dir/p.ev" protected 1
wait_event "$dir/s.ev" protected 1

echo "== client: INCR on one TCP connection to the guest's redis, checking each reply"
cat >"$dir/incr.py" <<'EOF'
import socket, sys, time
s = socket.create_connection(("10.77.0.2", 6379), timeout=30)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
f = s.makefile("rb")
prev, n, gap, last = 0, 0, 0.0, time.time()
while True:
    s.sendall(b"*2\r\n$4\r\nINCR\r\n$4\r\ndemo\r\n")
    line = f.readline()
    now = time.time()
    gap, last = max(gap, now - last), now
    if not line.startswith(b":") or int(line[1:]) != prev + 1:
        print(f"client: bad reply {line!r} after {prev}", flush=True)
        sys.exit(1)
    prev, n = prev + 1, n + 1
    if n % 500 == 0:
        print(f"client: {n} increments, each reply previous+1, longest wait {gap*1000:.0f} ms", flush=True)
    if n >= int(sys.argv[1]):
        break
    time.sleep(0.002)
print(f"client: done, {n} increments on one connection, longest wait {gap*1000:.0f} ms")
EOF
ip netns exec "$client" python3 "$dir/incr.py" 3000 &
pids+=($!)
clientpid=$!
cat >"$dir/console.py" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
def ask(cmd, prefix):
    s.sendall(cmd.encode() + b"\n")
    for line in f:
        if line.startswith(prefix.encode()) or line.startswith(b"error"):
            return line.decode().strip()
    return None
if sys.argv[2] == "write":
    n = 0
    while True:
        line = ask(f"disk write {n + 1}", "disk write")
        if line is None:
            print(f"disk writer: the primary is gone; it had confirmed {n} records", flush=True)
            break
        if not line.startswith("disk write ok"):
            sys.exit(f"disk writer: {line}")
        n += 1
        if n % 500 == 0:
            print(f"disk writer: {n} records written and flushed", flush=True)
else:
    print("survivor's guest:", ask("disk check", "disk "))
EOF
echo "== the guest appends records to its disk (each confirmed after its write and a flush)"
python3 "$dir/console.py" "$dir/pvm.console" write &
pids+=($!)
writer=$!
wait_event "$dir/p.ev" checkpoint 6
echo "== the primary's view"
remote p colo-status
echo "== kill -9 the primary"
kill -9 "$primary"
wait_event "$dir/s.ev" colo_exit 1
grep '"colo_exit"' "$dir/s.ev"
echo "== the secondary's view"
remote s colo-status
wait "$writer" || true
python3 "$dir/console.py" "$dir/svm.console" check
if wait "$clientpid"; then
    echo "demo: the client's connection survived the primary's death"
else
    echo "demo: the client's connection broke" >&2
    exit 1
fi
remote s shutdown >/dev/null
