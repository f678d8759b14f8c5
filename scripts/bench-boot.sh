#!/usr/bin/env bash
# Boot time of the test guest, colovmm vs QEMU microvm, in one run; writes docs/benchmarks.md.
# Usage: bench-boot.sh [RUNS]   (default 9; the median is reported)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
command -v qemu-system-x86_64 >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 >/dev/null
}
bash scripts/build-guest.sh
cargo build --release --bin colovmm
python3 scripts/bench_boot.py --runs "${1:-9}" --out docs/benchmarks.md
