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
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
build=1
args=()
for a in "$@"; do
    if [[ "$a" == --no-build ]]; then build=0; else args+=("$a"); fi
done
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v gcc >/dev/null || need+=(gcc libc6-dev)
command -v ss >/dev/null || need+=(iproute2)
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
"$py" scripts/bench_colo.py ${args[@]+"${args[@]}"} &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"' INT TERM
wait "$pid"
