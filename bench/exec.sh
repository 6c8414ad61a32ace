#!/usr/bin/env bash
# attest exec start-up against its floor: raw QEMU booting the same kernel with the same machine
# options and an initramfs (same busybox) whose init powers off at once. Runs are interleaved so
# drift on a noisy machine hits both sides alike; prints medians, the ratio and attest's phases.
#
#   bench/exec.sh [RUNS]        (default 11; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
runs=${1:-11}
cargo build --release --quiet --bin attest
attest=target/release/attest
kernel=$($attest doctor | awk '$2 == "kernel" { print $3 }')
floor_initramfs=$($attest bench-floor-initramfs)
accel=$($attest exec -- true 2>&1 >/dev/null | sed -n 's/^attest: accel: \(KVM\|TCG\).*/\1/p')
case "$accel" in KVM) accel_args=(-accel kvm -cpu host) ;; *) accel_args=(-accel tcg -cpu max) ;; esac

floor() {
  qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine q35 "${accel_args[@]}" \
    -m 512 -smp 2 -kernel "$kernel" -initrd "$floor_initramfs" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init" -serial null
}


tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
floor >/dev/null; $attest exec -q -- true  # warm caches (initramfs, page cache)
for _ in $(seq "$runs"); do
  t=$(ms_now); floor >/dev/null; echo $(( $(ms_now) - t )) >>"$tmp/floor"
  t=$(ms_now); $attest exec -q --timings -- true 2>>"$tmp/phases"; echo $(( $(ms_now) - t )) >>"$tmp/attest"
done

floor_ms=$(median <"$tmp/floor")
attest_ms=$(median <"$tmp/attest")
phase() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" "$tmp/phases" | median; }
echo "host: $(nproc) cores, accel $accel, kernel $(basename "$kernel"), $runs interleaved runs each"
echo
echo "| command | median ms |"
echo "|---|---|"
echo "| floor: qemu-system-x86_64, same kernel, init = busybox poweroff -f | $floor_ms |"
echo "| attest exec -- true | $attest_ms |"
echo "| **ratio attest / floor** | **$(awk -v a="$attest_ms" -v f="$floor_ms" 'BEGIN { printf "%.2f", a / f }')** |"
echo
echo "attest phases (median ms): host setup $(phase setup), QEMU start to agent ready $(phase vmm_to_ready)" \
  "(of which guest kernel until init $(phase kernel), module loading $(phase modules), agent port $(phase port))," \
  "mounts and spawn $(phase start),"  \
  "program run and exit report $(phase program)"
