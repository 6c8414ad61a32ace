# Shared by the bench scripts: sourced, not run.
ms_now() { echo $(( $(date +%s%N) / 1000000 )); }
median() { sort -n | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# exec_floor_setup: builds attest and sets what the exec floors boot: $attest, $kernel (the one
# attest exec picks), $floor_initramfs (init = busybox poweroff -f), and $qemu_line, attest's own
# QEMU command line, whose options `opt -machine` (etc.) reads.
exec_floor_setup() {
  cargo build --release --quiet --bin attest
  attest=target/release/attest
  kernel=$($attest doctor --json | python3 -c 'import json, sys; print(next(c["path"] for c in json.load(sys.stdin) if c["name"] == "kernel"))')
  floor_initramfs=$($attest bench-floor-initramfs)
  qemu_line=$(ATTEST_LOG=attest_machine=debug $attest exec -q -- true 2>&1 | grep 'starting qemu')
  [[ -n "$(opt -accel)" ]] || { echo "could not read attest's QEMU command line" >&2; exit 1; }
}
# The value after `"OPTION"` in attest's logged QEMU command.
opt() { sed -n "s/.* \"$1\" \"\([^\"]*\)\".*/\1/p" <<<"$qemu_line"; }
