//! Bootable ISO images: reading one without mounting it ([`inspect`]: volume, El Torito boot entries,
//! the boot loaders' configurations and the kernel command lines in them), so `attest preflight` can
//! check an ISO in about a second before a long boot, and building a small hybrid BIOS/UEFI GRUB ISO
//! ([`GrubIso`]) for boot-image tests.

mod config;
mod grub;
mod inspect;
#[cfg(test)]
mod tests;

pub use config::{BootConfig, KernelEntry};
pub use grub::GrubIso;
pub use inspect::{inspect, BootEntry, IsoReport, Platform};
