#!/usr/bin/env bash
# The per-call overhead of a Python test script: 1000 calls of machine.is_up() (no VM work) from a
# script run by `attest run`, against the same call from Rust (the floor). Goal: ≤ 1 ms a call.
# Then a wait-heavy script (bench/script/waits.py) on the Debian guest: attest's waits against the
# NixOS driver's algorithm for them (check, sleep 1 s), in the same VM. Goal: at least 2x faster.
#
#   bench/script.sh        (needs scripts/setup to have run)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin attest
cargo build --release --quiet -p attest-driver --example bench
target/release/examples/bench overhead
target/release/attest run bench/script/overhead.toml 2>/dev/null
# The same wait-heavy script, attest's waits against the NixOS driver's algorithm for them.
target/release/attest run bench/script/waits.toml 2>/dev/null
