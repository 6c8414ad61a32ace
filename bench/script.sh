#!/usr/bin/env bash
# The per-call overhead of a Python test script: 1000 calls of machine.is_up() (no VM work) from a
# script run by `attest run`, against the same call from Rust (the floor). Goal: ≤ 1 ms a call.
#
#   bench/script.sh        (needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin attest
cargo build --release --quiet -p attest-driver --example bench
target/release/examples/bench overhead
target/release/attest run bench/script/overhead.toml 2>/dev/null
