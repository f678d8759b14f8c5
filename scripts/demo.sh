#!/usr/bin/env bash
# Builds colovmm and the test guest, boots the guest, shows its console until it is READY,
# asks it a few questions, and powers it off. colovmm's exit status is this script's.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/build-guest.sh
cargo build --release --bin colovmm
dir="$(mktemp -d)"
trap 'exec 3>&-; rm -rf "$dir"' EXIT
mkfifo "$dir/console-in"
exec 3<>"$dir/console-in"   # held open so the guest's console never sees EOF
set +e
./target/release/colovmm --kernel target/guest/testguest --cpus boot=2 --memory size=512M \
    --cmdline "demo=1" <"$dir/console-in" |
while IFS= read -r line; do
    printf '%s\n' "$line"
    case "$line" in
        "TESTGUEST READY"*) printf 'cpus\nuptime\nhash 0 64\n' >&3 ;;
        hash=*) printf 'poweroff\n' >&3 ;;
    esac
done
status=${PIPESTATUS[0]}
echo "colovmm exited with status $status"
exit "$status"
