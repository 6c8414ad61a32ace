#!/usr/bin/env bash
# VM-to-VM networking on real VMs (TCG here): TCP throughput (100 MB over HTTP) and ping latency
# between two minimal guests on VLAN 1, in switch mode (vde_switch) and TAP mode (a bridge in a
# user+net namespace), each against the same measurement over the guest's own loopback, taken in
# the same run. See crates/driver/examples/network_bench.rs.
#
#   bench/network.sh [RUNS]        (default 3; needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p attest-driver --example network_bench
"${CARGO_TARGET_DIR:-target}/release/examples/network_bench" "${1:-3}"
