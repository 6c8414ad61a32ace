#!/usr/bin/env bash
# 9p against virtio-fs for attest exec's host shares, on Debian's generic kernel (the cloud kernel
# has no 9p). Each workload is timed inside the guest, so boot time does not blur the comparison;
# boot-to-exit is reported separately. Prints the median of RUNS runs per cell.
#
#   bench/fs.sh [RUNS]    (default 5; scripts/setup fetches the generic kernel)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
runs=${1:-5}
cargo build --release --quiet --bin attest
attest=$PWD/target/release/attest

cache="${ATTEST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/attest}"
kernel=$(ls "$cache"/test-kernels/*/boot/vmlinuz-* 2>/dev/null | tail -n 1)
[ -n "$kernel" ] || { echo "bench/fs.sh: no generic kernel in $cache/test-kernels; run scripts/setup" >&2; exit 1; }

work=$(mktemp -d -p "$PWD/target")
trap 'rm -rf "$work"' EXIT
head -c 200000000 /dev/urandom >"$work/big"
cd "$work"

# name|script; each prints nothing, the harness prints elapsed ms measured in the guest.
workloads=(
  "metadata: find /usr/share -type f (44k files)|find /usr/share -type f >/dev/null"
  "bulk read: cat 200 MB from the shared cwd|cat big >/dev/null"
  "small writes: 500 files into the shared cwd|mkdir -p w && for i in \$(seq 500); do echo \$i > w/f\$i; done; rm -r w"
)

echo "kernel $(basename "$kernel"), $runs runs per cell, medians in ms (lower is better)"
echo
echo "| workload | 9p | virtio-fs | 9p / virtio-fs |"
echo "|---|---|---|---|"
for fs in 9p virtiofs; do
  for _ in $(seq "$runs"); do
    t=$(ms_now); $attest exec -q --kernel "$kernel" --fs $fs -- true; echo $(( $(ms_now) - t )) >>"$work/boot-$fs"
  done
done
row() { printf '| %s | %s | %s | %.2f |\n' "$1" "$2" "$3" "$(awk -v a="$2" -v b="$3" 'BEGIN { print a / b }')"; }
row "attest exec -- true, boot to exit" "$(median <"$work/boot-9p")" "$(median <"$work/boot-virtiofs")"
for entry in "${workloads[@]}"; do
  name=${entry%%|*}; script=${entry#*|}
  for fs in 9p virtiofs; do
    : >"$work/t-$fs"
    for _ in $(seq "$runs"); do
      $attest exec -q --kernel "$kernel" --fs $fs -- sh -c \
        "s=\$(date +%s%N); $script; echo \$(( (\$(date +%s%N) - s) / 1000000 ))" >>"$work/t-$fs"
    done
  done
  row "$name" "$(median <"$work/t-9p")" "$(median <"$work/t-virtiofs")"
done
