#!/usr/bin/env bash
# Builds the test guest kernel (guest/) and copies the ELF to target/guest/testguest.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# cargo reads .cargo/config.toml from the current directory, so build from guest/.
cd "$repo/guest"
cargo build --release --target-dir "$repo/target/guest-build" "$@"
mkdir -p "$repo/target/guest"
cp "$repo/target/guest-build/release/testguest" "$repo/target/guest/testguest"
echo "built $repo/target/guest/testguest ($(stat -c %s "$repo/target/guest/testguest") bytes)"
