#!/usr/bin/env bash
# Fetches Debian's cloud kernel and leaves two boot images in target/linux/:
#   bzImage  - the packaged vmlinuz (64-bit Linux boot protocol)
#   vmlinux  - the same kernel decompressed to an ELF with a PVH note
# Idempotent: does nothing when both are present.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/target/linux"
[[ -s "$out/vmlinux" && -s "$out/bzImage" ]] && exit 0
mkdir -p "$out"
need=()
command -v lz4 >/dev/null || need+=(lz4)
if ((${#need[@]})); then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
# The metapackage names the current kernel package.
pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
if [[ -z "$pkg" ]]; then
    apt-get update -qq
    pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')"
fi
apt-get download "$pkg" >/dev/null 2>&1
dpkg-deb --fsys-tarfile ./*.deb | tar -x ./boot/
vmlinuz="$(ls boot/vmlinuz-*)"
# Debian compresses the payload with LZ4 (legacy frame, magic 02 21 4c 18): find it and inflate.
off="$(python3 -c 'import sys; d=open(sys.argv[1],"rb").read(); print(d.find(b"\x02\x21\x4c\x18"))' "$vmlinuz")"
if [[ "$off" -lt 0 ]]; then
    echo "fetch-linux: no LZ4 payload in $vmlinuz" >&2
    exit 1
fi
tail -c +"$((off + 1))" "$vmlinuz" | lz4 -dc > vmlinux 2>/dev/null || true
if [[ "$(head -c 4 vmlinux | od -An -c | tr -d ' ')" != '177ELF' ]]; then
    echo "fetch-linux: decompressed payload is not an ELF" >&2
    exit 1
fi
cp "$vmlinuz" "$out/bzImage"
cp vmlinux "$out/vmlinux"
echo "fetch-linux: $pkg -> $out/{bzImage,vmlinux}"
