#!/usr/bin/env bash
# Boot-image tests on the test installer ISO (a Debian systemd root in a GRUB hybrid ISO's initrd,
# see crates/image/src/installer): the time to a verdict on a broken ISO (`attest preflight` on the
# variant without console=ttyS0; goal under 2 s), and one boot of the good ISO by BIOS and by UEFI
# with the time of each phase, firmware to the last condition. Prints Markdown tables. See
# crates/driver/examples/boot_image_bench.rs.
#
#   bench/boot_image.sh [RUNS]        (default 5 preflight runs; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release --quiet --bin attest -p attest
cargo build --release --quiet -p attest-driver --example boot_image_bench
target="${CARGO_TARGET_DIR:-target}"
"$target/release/examples/boot_image_bench" "$target/release/attest" "$runs"
