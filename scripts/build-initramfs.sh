#!/usr/bin/env bash
# Builds a busybox initramfs whose init prints a marker and powers off.
# Usage: build-initramfs.sh OUT.cpio.gz
set -euo pipefail
out="${1:?usage: build-initramfs.sh OUT.cpio.gz}"
[[ -s "$out" ]] && exit 0
if ! command -v cpio >/dev/null || [[ ! -x /bin/busybox ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static cpio >/dev/null
fi
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,dev,proc,sys}
cp /bin/busybox "$root/bin/busybox"
for app in sh mount echo poweroff sleep; do ln -s busybox "$root/bin/$app"; done
cat > "$root/init" <<'INIT'
#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
echo "COLOVMM-INITRAMFS-USERSPACE-OK cpus=$(grep -c ^processor /proc/cpuinfo)"
poweroff -f
INIT
chmod +x "$root/init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -9) > "$out"
