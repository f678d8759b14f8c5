#!/usr/bin/env bash
# Live migration of the test guest over loopback TCP, colovmm vs QEMU microvm, in one run:
# 512 MiB / 2 GiB x idle / `dirty 200 256` x 1 / 4 channels, plus the loopback bandwidth;
# writes docs/benchmarks.md. Waits for a running bench_io.py / bench_boot.py to finish first.
# Usage: bench-migration.sh [RUNS] [RUNS_2G]   (runs per 512 MiB / 2 GiB case, default 5 and 5; medians;
# about 3 minutes on 2 cores)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
command -v qemu-system-x86_64 >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
}
bash scripts/build-guest.sh
cargo build --release --bins
# The Python side stops every VMM it started (also on SIGTERM); forward INT/TERM to it by pid.
python3 scripts/bench_migration.py --runs "${1:-5}" --runs-2g "${2:-5}" --out docs/benchmarks.md &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"' INT TERM
wait "$pid"
