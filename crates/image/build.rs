//! Builds the guest init (crates/guest) as a static executable and hands it to this crate to embed.
//!
//! The guest init runs as PID 1 before any host file is reachable, so it must not need the host's
//! shared libraries: it is linked with crt-static for the host triple (no extra rustup target needed).
//! A nested cargo with its own target directory avoids contending for the outer build's lock.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const TRIPLE: &str = "x86_64-unknown-linux-gnu";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest_dir.join("../..").canonicalize().unwrap();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("guest-target");

    for dir in ["crates/guest", "crates/netlink", "crates/protocol", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--package", "attest-guest", "--target", TRIPLE])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static -C strip=symbols")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .expect("running cargo to build the static guest init");
    assert!(status.success(), "building the static guest init (crates/guest) failed");

    let built = target_dir.join(TRIPLE).join("release").join("attest-guest-init");
    let embedded = out_dir.join("attest-guest-init");
    std::fs::copy(&built, &embedded).expect("copying the guest init");
}
