#!/usr/bin/env bash
# COLO checkpoints of the test guest over loopback TCP, colovmm vs QEMU COLO (stock, and with an
# LD_PRELOAD TCP_NODELAY shim), in one run: 512 MiB / 2 GiB x idle / `dirty 200 128` x 1 / 4
# channels, checkpoint interval 600 ms; pause and memory-transfer time per checkpoint (mean, p99).
# Writes the bench-colo section of docs/benchmarks.md and docs/bench-colo-pause.png.
# Waits for a running bench_io.py / bench_boot.py / bench_migration.py to finish first.
# Usage: bench-colo.sh [--no-build] [--quick] [--checkpoints N] [--cells 512M,dirty]
#                      [--vmms colovmm,qemu,qemu-nodelay] [--retries N] [--out FILE] [--plot FILE.png]
#   --no-build  use target/release/colovmm and target/guest/testguest as they are
#   --quick     512 MiB cells only, 12 checkpoints per cell and VMM (about 2.5 minutes)
#   default     30 checkpoints per cell and VMM (about 11 minutes on 2 cores)
#   --logs DIR  keep every VMM's log, console and event file; --raw FILE saves the measurements,
#   --from-raw FILE rebuilds the section and the plot from them without measuring
# Then the network part (scripts/bench_colo_net.py: colovmm / QEMU COLO with a NIC and their
# network proxies vs unprotected, in network namespaces; latency, redis-benchmark, HTTP download,
# failover gap; about 8 minutes), which writes its own section, bench-colo-net:
#   --net-only  run only the network part       --no-net  skip it
#   --net-X V   passed to bench_colo_net.py as --X V, e.g. --net-rounds 3, --net-intervals 1000,
#               --net-lock /tmp/some.lock (flock around each boot), --net-logs DIR, --net-raw FILE
# Then the disk part (scripts/bench_colo_disk.py: guest disk write latency, randwrite IOPS and
# sequential MB/s, colovmm / QEMU COLO with quorum + replication + NBD vs unprotected; about
# 12 minutes), which writes its own section, bench-colo-disk:
#   --disk-only  run only the disk part         --no-disk  skip it
#   --disk-X V   passed to bench_colo_disk.py as --X V, e.g. --disk-rounds 3, --disk-intervals 1000
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build=1
net=1
disk=1
checkpoints=1
args=()
net_args=()
disk_args=()
while (($#)); do
    case "$1" in
        --no-build) build=0 ;;
        --no-net) net=0 ;;
        --net-only) checkpoints=0; disk=0 ;;
        --no-disk) disk=0 ;;
        --disk-only) checkpoints=0; net=0 ;;
        --disk-*)
            disk_args+=("--${1#--disk-}")
            if [[ "$1" != *=* && $# -gt 1 ]]; then disk_args+=("$2"); shift; fi ;;
        --net-*)
            net_args+=("--${1#--net-}")
            if [[ "$1" != *=* && $# -gt 1 ]]; then net_args+=("$2"); shift; fi ;;
        *) args+=("$1") ;;
    esac
    shift
done
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v ss >/dev/null || need+=(iproute2)
if ((disk)); then command -v qemu-img >/dev/null || need+=(qemu-utils); fi
if ((net)); then
    command -v redis-benchmark >/dev/null || need+=(redis-tools)
    command -v ping >/dev/null || need+=(iputils-ping)
fi
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The plot needs matplotlib in the python3 that runs the benchmark (pip first: python3 may not be
# Debian's; Debian's package otherwise).
py=python3
if ! $py -c 'import matplotlib' 2>/dev/null; then
    $py -m pip install -q matplotlib >/dev/null 2>&1 || {
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-matplotlib >/dev/null
        $py -c 'import matplotlib' 2>/dev/null || py=/usr/bin/python3
    }
fi
if ((build)); then
    bash scripts/build-guest.sh
    cargo build --release --bins
elif [[ ! -x target/guest/testguest ]]; then
    bash scripts/build-guest.sh
fi
# The Python side stops every VMM it started (also on SIGTERM); forward INT/TERM to it by pid.
pid=
trap '[[ -z "$pid" ]] || kill -TERM "$pid" 2>/dev/null; wait; exit 143' INT TERM
if ((checkpoints)); then
    "$py" scripts/bench_colo.py ${args[@]+"${args[@]}"} &
    pid=$!
    wait "$pid"
fi
# The network part also removes every namespace it made.
if ((net)); then
    "$py" scripts/bench_colo_net.py ${net_args[@]+"${net_args[@]}"} &
    pid=$!
    wait "$pid"
fi
if ((disk)); then
    "$py" scripts/bench_colo_disk.py ${disk_args[@]+"${disk_args[@]}"} &
    pid=$!
    wait "$pid"
fi
