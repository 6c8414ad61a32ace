#!/usr/bin/env bash
# Snapshots on the Debian guest (TCG here): cold boot against a cached restore to the first
# command (interleaved), an in-test restore to the next command and its save, the PSS of 4 machines
# restored from one snapshot against 4 booted cold, and ten one-machine tests cold and cached.
# See crates/driver/examples/snapshot_bench.rs.
#
#   bench/snapshots.sh [ROUNDS]        (default 3; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p attest-driver --example snapshot_bench
target/release/examples/snapshot_bench "${1:-3}"
