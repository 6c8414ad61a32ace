#!/usr/bin/env bash
# The system-test driver's speed on real VMs (TCG here), for each built-in guest: the round trip of
# succeed("true") against the guest running the same backdoor command line locally (the floor, same
# run, interleaved in blocks), wait latencies (file, port, console line), and for Debian the boot to
# the first command against systemd-analyze. See crates/driver/examples/bench.rs.
#
#   bench/driver.sh [CALLS]        (default 200; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
calls=${1:-200}
cargo build --release --quiet -p attest-driver --example bench
for guest in minimal debian; do
  target/release/examples/bench "$guest" "$calls"
  echo
done
