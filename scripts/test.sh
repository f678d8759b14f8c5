#!/usr/bin/env bash
# Builds everything (test guest, Debian kernel images, colovmm) and runs every test:
# unit tests beside the code and the integration tests in tests/ that boot real kernels under KVM.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test testguest`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ -r /dev/kvm && -w /dev/kvm ]] || { echo "test.sh: /dev/kvm is not usable by $(id -un)" >&2; exit 1; }
# Client tools the network tests run inside their namespaces.
need=()
for tool in ping:iputils-ping nc:netcat-openbsd curl:curl redis-cli:redis-tools redis-benchmark:redis-tools \
    ip:iproute2 python3:python3; do
    command -v "${tool%%:*}" >/dev/null || need+=("${tool#*:}")
done
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
bash scripts/build-guest.sh
bash scripts/fetch-linux.sh
cargo build --release --workspace --bins
cargo test --release --workspace "$@"
