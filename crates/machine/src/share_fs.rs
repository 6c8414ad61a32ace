//! Choosing how host directories reach the guest: virtio-fs (through virtiofsd) when the daemon
//! and the guest kernel allow it, since it is faster on metadata-heavy work (BENCHMARKS.md), else 9p.

use crate::error::MachineError;
use crate::spec::ShareFs;

const INSTALL_VIRTIOFSD: &str = "`cargo install virtiofsd` (scripts/setup does this) or set ATTEST_VIRTIOFSD";

/// `request` is the user's choice (`None`: pick); `kernel_has` says whether the guest kernel can
/// mount a filesystem, `have_virtiofsd` whether the daemon was found.
pub fn choose(
    request: Option<ShareFs>,
    kernel_has: impl Fn(ShareFs) -> bool,
    have_virtiofsd: bool,
) -> Result<ShareFs, MachineError> {
    let (virtiofs, ninep) = (kernel_has(ShareFs::Virtiofs), kernel_has(ShareFs::NineP));
    let no_virtiofsd = |purpose: &str| MachineError::MissingHelper {
        program: "virtiofsd",
        purpose: purpose.into(),
        fix: INSTALL_VIRTIOFSD,
    };
    match request {
        Some(ShareFs::Virtiofs) if !have_virtiofsd => Err(no_virtiofsd("for virtio-fs shares")),
        Some(ShareFs::Virtiofs) if !virtiofs => Err(MachineError::KernelLacks {
            what: "a virtiofs driver".into(),
            fix: "use a kernel with virtiofs, or 9p",
        }),
        Some(ShareFs::NineP) if !ninep => Err(MachineError::KernelLacks {
            what: "a 9p driver (Debian's cloud kernel lacks it)".into(),
            fix: "use virtio-fs, or a kernel with 9p",
        }),
        Some(fs) => Ok(fs),
        None if have_virtiofsd && virtiofs => Ok(ShareFs::Virtiofs),
        None if ninep => Ok(ShareFs::NineP),
        None if virtiofs => Err(no_virtiofsd("because the kernel can only share files over virtio-fs")),
        None => Err(MachineError::KernelLacks {
            what: "a virtiofs or a 9p driver".into(),
            fix: "pass a kernel that has one with --kernel",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_fs_first_then_9p_and_every_refusal_says_why() {
        let both = |_: ShareFs| true;
        let only = |wanted: ShareFs| move |fs: ShareFs| fs == wanted;
        assert_eq!(choose(None, both, true).unwrap(), ShareFs::Virtiofs);
        assert_eq!(choose(None, both, false).unwrap(), ShareFs::NineP);
        assert_eq!(choose(Some(ShareFs::NineP), both, true).unwrap(), ShareFs::NineP);
        let err = choose(None, only(ShareFs::Virtiofs), false).unwrap_err().to_string();
        assert!(err.contains("virtiofsd") && err.contains("cargo install virtiofsd"), "{err}");
        let err = choose(Some(ShareFs::NineP), only(ShareFs::Virtiofs), true).unwrap_err().to_string();
        assert!(err.contains("9p driver"), "{err}");
        assert!(matches!(choose(None, |_| false, true), Err(MachineError::KernelLacks { .. })));
        assert!(matches!(choose(Some(ShareFs::Virtiofs), both, false), Err(MachineError::MissingHelper { .. })));
    }
}
