#!/usr/bin/env bash
# The QEMU that scripts/setup installs (bookworm-backports, 10.0) against Debian 12's own 7.2, on
# the floors of bench/exec.sh (raw QEMU booting the cloud kernel to an init that powers off), and
# where a difference comes from: each of 10.0's variants changes one thing towards 7.2 (the machine
# type's compat version, 7.2's firmware, the CPU model). 7.2 is run from its unpacked .debs (with
# its own modules, data files and SeaBIOS), downloaded once into attest's cache; nothing is
# installed. Runs are interleaved, so drift on a noisy machine hits every variant alike.
#
#   bench/qemu_versions.sh [RUNS]        (default 7; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
runs=${1:-7}

# Debian 12's QEMU 7.2, unpacked: the newest version of each package from bookworm itself.
old="${ATTEST_CACHE_DIR:-$HOME/.cache/attest}/bench/qemu-bookworm"
bookworm_version() { apt-cache madison "$1" | awk -F' *[|] *' '$3 ~ /bookworm\/main/ && $3 !~ /backports/ { print $2; exit }'; }
if [ ! -x "$old/root/usr/bin/qemu-system-x86_64" ]; then
  rm -rf "$old" && mkdir -p "$old/debs" && chmod 755 "$old/debs"
  for package in qemu-system-x86 qemu-system-common qemu-system-data seabios; do
    version=$(bookworm_version "$package")
    [ -n "$version" ] || { echo "no bookworm version of $package (apt-get update?)" >&2; exit 1; }
    (cd "$old/debs" && apt-get download -qq "$package=$version" 2>/dev/null)
  done
  for deb in "$old"/debs/*.deb; do dpkg-deb -x "$deb" "$old/root"; done
fi
export QEMU_MODULE_DIR_OLD="$old/root/usr/lib/x86_64-linux-gnu/qemu"
old_firmware=(-L "$old/root/usr/share/qemu" -L "$old/root/usr/share/seabios" -L /usr/lib/ipxe/qemu)
new=qemu-system-x86_64
old_qemu() { QEMU_MODULE_DIR=$QEMU_MODULE_DIR_OLD "$old/root/usr/bin/qemu-system-x86_64" "${old_firmware[@]}" "$@"; }
new_version=$($new --version | head -1)
old_version=$(old_qemu --version | head -1)

exec_floor_setup
vmlinux=$(opt -kernel)
bare=(-kernel "$kernel" -initrd "$floor_initramfs" -append "console=ttyS0 panic=-1 quiet" -nographic)
matched=(-nodefaults -no-user-config -display none -no-reboot -accel "$(opt -accel)" -m "$(opt -m)"
  -smp "$(opt -smp)" -kernel "$vmlinux" -initrd "$floor_initramfs" -append "$(opt -append)" -serial null)
cpu=$(opt -cpu)

# name and command of each variant, in the order they run in each round.
variants=(
  "bare 10.0"                       "$new ${bare[*]@Q}"
  "bare 7.2"                        "old_qemu ${bare[*]@Q}"
  "bare 10.0, -machine pc-i440fx-7.2" "$new -machine pc-i440fx-7.2 ${bare[*]@Q}"
  "bare 10.0, 7.2's firmware"       "$new ${old_firmware[*]@Q} ${bare[*]@Q}"
  "matched 10.0"                    "$new -machine q35 -cpu $cpu ${matched[*]@Q}"
  "matched 7.2"                     "old_qemu -machine q35 -cpu $cpu ${matched[*]@Q}"
  "matched 10.0, -machine pc-q35-7.2" "$new -machine pc-q35-7.2 -cpu $cpu ${matched[*]@Q}"
  "matched 10.0, 7.2's firmware"    "$new ${old_firmware[*]@Q} -machine q35 -cpu $cpu ${matched[*]@Q}"
  "matched 10.0, -cpu qemu64"       "$new -machine q35 -cpu qemu64 ${matched[*]@Q}"
)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for ((v = 0; v < ${#variants[@]}; v += 2)); do  # each must boot and power off, and warms caches
  eval "${variants[v + 1]}" </dev/null >"$tmp/check" 2>&1 || { echo "${variants[v]} failed:" >&2; cat "$tmp/check" >&2; exit 1; }
done
for _ in $(seq "$runs"); do
  for ((v = 0; v < ${#variants[@]}; v += 2)); do
    t=$(ms_now); eval "${variants[v + 1]}" </dev/null >/dev/null 2>&1; echo $(( $(ms_now) - t )) >>"$tmp/$v"
  done
done

echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, accel $(opt -accel), kernel $(basename "$kernel"), $runs interleaved runs each"
echo "new: $new_version"
echo "old: $old_version (unpacked from bookworm's .debs)"
echo
echo "| floor | median ms | against 10.0 |"
echo "|---|---|---|"
for ((v = 0; v < ${#variants[@]}; v += 2)); do
  m=$(median <"$tmp/$v")
  base=$([[ ${variants[v]} == bare* ]] && median <"$tmp/0" || median <"$tmp/8")
  echo "| ${variants[v]} | $m | $(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.2f", a / b }') |"
done
