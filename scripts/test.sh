#!/usr/bin/env bash
# Builds everything (test guest, Debian kernel images, colovmm) and runs every test:
# unit tests beside the code and the integration tests in tests/ that boot real kernels under KVM.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test testguest`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ -r /dev/kvm && -w /dev/kvm ]] || { echo "test.sh: /dev/kvm is not usable by $(id -un)" >&2; exit 1; }
bash scripts/build-guest.sh
bash scripts/fetch-linux.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
