#!/usr/bin/env bash
# The main job: a COLO-protected VM pair. Builds colovmm and the test guest, starts a secondary
# and a primary (on loopback: two colovmm processes standing for two hosts), lets the guest
# count while checkpoints run, shows the status, then kills the primary with -9 and shows the
# secondary taking over: its copy of the guest keeps counting. Everything started is stopped
# on exit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/build-guest.sh
cargo build --release --bin colovmm --bin colovmm-remote
bin=target/release
dir="$(mktemp -d)"
pids=()
cleanup() {
    exec 3>&- 2>/dev/null || true
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
port=$((20000 + RANDOM % 20000))
remote() { "$bin/colovmm-remote" --api-socket "$dir/$1.sock" "${@:2}"; }
wait_event() { # file event count
    for _ in $(seq 600); do
        [ "$(grep -c "\"event\":\"$2\"" "$1" 2>/dev/null || true)" -ge "$3" ] && return 0
        sleep 0.05
    done
    echo "demo: no $3 '$2' events in $1" >&2
    return 1
}

echo "== secondary: waits on 127.0.0.1:$port; its VM will come from the primary"
"$bin/colovmm" --colo "role=secondary,listen=127.0.0.1:$port" --serial "file=$dir/svm.log" \
    --api-socket "path=$dir/s.sock" --event-monitor "path=$dir/s.ev" 2>"$dir/s.err" &
pids+=($!)
mkfifo "$dir/console-in"
exec 3<>"$dir/console-in"
echo "== primary: boots the test guest and protects it (a checkpoint every 300 ms)"
"$bin/colovmm" --kernel target/guest/testguest --memory size=256M --cmdline demo=1 \
    --api-socket "path=$dir/p.sock" --event-monitor "path=$dir/p.ev" \
    --colo "role=primary,peer=127.0.0.1:$port,checkpoint-interval=300" \
    <"$dir/console-in" >"$dir/pvm.log" 2>"$dir/p.err" &
pids+=($!)
primary=$!
wait_event "$dir/p.ev" protected 1
printf 'count 100\n' >&3
wait_event "$dir/p.ev" checkpoint 8
echo "== the primary's view"
remote p colo-status
echo "== the secondary's view"
remote s colo-status
echo "== primary console (last lines):"; tail -n 3 "$dir/pvm.log"
echo "== kill -9 the primary"
kill -9 "$primary"
wait_event "$dir/s.ev" colo_exit 1
grep '"colo_exit"' "$dir/s.ev"
before=$(grep -c count= "$dir/svm.log" || true)
sleep 1
echo "== the secondary's VM runs on (its console, last lines):"
tail -n 3 "$dir/svm.log"
after=$(grep -c count= "$dir/svm.log" || true)
remote s info | head -n 1
remote s shutdown >/dev/null
if [ "$after" -gt "$before" ]; then
    echo "demo: the guest survived the primary's death ($before -> $after count lines)"
else
    echo "demo: the secondary's guest stopped counting" >&2
    exit 1
fi
