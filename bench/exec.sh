#!/usr/bin/env bash
# attest exec start-up against two floors, both raw QEMU booting the same kernel with an initramfs
# (same busybox) whose init powers off at once:
#   bare floor:    what a user would type: `qemu-system-x86_64 -kernel K -initrd I -append … -nographic`
#                  (QEMU's default machine, memory and vCPU, firmware, default devices);
#   matched floor: attest's own machine options (machine type, accelerator, CPU model, memory, vCPUs,
#                  boot image, kernel command line), read from the QEMU command line attest logs, so it shows what attest
#                  adds on top of booting.
# Runs are interleaved so drift on a noisy machine hits all sides alike; prints medians, the ratios
# and attest's phases.
#
#   bench/exec.sh [RUNS]        (default 11; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
runs=${1:-11}
exec_floor_setup
accel=$(opt -accel)

bare_floor() {
  qemu-system-x86_64 -kernel "$kernel" -initrd "$floor_initramfs" -append "console=ttyS0 panic=-1 quiet" -nographic
}
matched_floor() {
  qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot -machine "$(opt -machine)" \
    -accel "$accel" -cpu "$(opt -cpu)" -m "$(opt -m)" -smp "$(opt -smp)" -kernel "$(opt -kernel)" \
    -initrd "$floor_initramfs" -append "$(opt -append)" -serial null
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bare_floor </dev/null >/dev/null; matched_floor >/dev/null  # warm caches (page cache)
for _ in $(seq "$runs"); do
  t=$(ms_now); bare_floor </dev/null >/dev/null; echo $(( $(ms_now) - t )) >>"$tmp/bare"
  t=$(ms_now); matched_floor >/dev/null; echo $(( $(ms_now) - t )) >>"$tmp/matched"
  t=$(ms_now); $attest exec -q --timings -- true 2>>"$tmp/phases"; echo $(( $(ms_now) - t )) >>"$tmp/attest"
done

bare_ms=$(median <"$tmp/bare")
matched_ms=$(median <"$tmp/matched")
attest_ms=$(median <"$tmp/attest")
ratio() { awk -v a="$attest_ms" -v f="$1" 'BEGIN { printf "%.2f", a / f }'; }
phase() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" "$tmp/phases" | median; }
echo "host: $(nproc) cores, accel $accel, kernel $(basename "$kernel"), $runs interleaved runs each"
echo "attest's machine: -machine $(opt -machine) -cpu $(opt -cpu) -m $(opt -m) -smp $(opt -smp) -kernel $(basename "$(opt -kernel)")"
echo
echo "| command | median ms |"
echo "|---|---|"
echo "| bare floor: qemu-system-x86_64 -kernel K -initrd I -append … -nographic (QEMU defaults) | $bare_ms |"
echo "| matched floor: qemu-system-x86_64 with attest's machine options, init = busybox poweroff -f | $matched_ms |"
echo "| attest exec -- true | $attest_ms |"
echo "| **ratio attest / bare floor** | **$(ratio "$bare_ms")** |"
echo "| ratio attest / matched floor | $(ratio "$matched_ms") |"
echo
echo "attest phases (median ms): host setup $(phase setup), QEMU start to agent ready $(phase vmm_to_ready)" \
  "(of which guest kernel until init $(phase kernel), module loading $(phase modules), agent port $(phase port))," \
  "mounts and spawn $(phase start),"  \
  "program run and exit report $(phase program)"
