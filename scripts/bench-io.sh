#!/usr/bin/env bash
# Disk and network I/O of the test guest, colovmm vs QEMU microvm, same guest, image and tap
# set-up, in one run; writes docs/benchmarks.md. Needs root (network namespaces).
# Usage: bench-io.sh [ROUNDS]   (default 3; the median is reported)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
need=()
for tool in qemu-system-x86_64:qemu-system-x86 curl:curl redis-benchmark:redis-tools ping:iputils-ping; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/build-guest.sh
cargo build --release --bin colovmm
python3 scripts/bench_io.py --rounds "${1:-3}" --out docs/benchmarks.md
