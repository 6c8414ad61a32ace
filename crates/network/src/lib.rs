//! attest's virtual networks between machines. A test declares VLANs and each machine the VLANs it
//! joins; [`plan`] turns that into NixOS's node numbers, MACs and addresses, and a [`Networks`]
//! runs them, in one of two modes:
//! - switch: one userspace switch per VLAN (`vde_switch`, as the NixOS driver runs), which QEMU and
//!   NixOS start scripts (`QEMU_VDE_SOCKET_N`) join;
//! - tap: a bridge per VLAN and a TAP per card in a user+net namespace ([`tap`]), for VMMs that
//!   only take TAP devices.
//!
//! [`guest`] configures the addresses inside attest's own guests. Blocking a link and forwarding a
//! port are the VMM's business (QMP `set_link`, `hostfwd_add`), the same in both modes.

mod error;
pub mod guest;
pub mod plan;
pub mod switch;
pub mod tap;

pub use error::{NetworkError, Result};
pub use plan::{MachinePlan, Plan, VlanNic};
mod networks;

pub use networks::{Mode, Networks};
