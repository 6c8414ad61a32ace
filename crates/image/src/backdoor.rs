//! A minimal guest that speaks the NixOS test driver's backdoor protocol: busybox, a static bash,
//! the virtio drivers, and NixOS's own `backdoor.service` script (store paths replaced by /bin).
//! It boots in seconds, so the shell and the driver can be tested against the real protocol
//! without a NixOS or systemd image.

use std::path::{Path, PathBuf};

use attest_protocol::MODULE_LIST;

use crate::initramfs::{base_layout, with_modules};
use crate::{is_static_elf, ImageError, Initramfs, ModuleFile};

/// NixOS's `backdoor.service` script (`test-instrumentation.nix`).
pub const BACKDOOR_SCRIPT: &str = r#"
export USER=root HOME=/root DISPLAY=:0.0
export PAGER=
cd /tmp
exec < /dev/hvc0 > /dev/hvc0
while ! exec 2> /dev/ttyS0; do sleep 0.1; done
echo "connecting to host..." >&2
stty -F /dev/hvc0 raw -echo # prevent nl -> cr/nl conversion
echo "Spawning backdoor root shell..."
PS1="" exec /bin/bash --norc /dev/hvc0
"#;

/// Mounts the kernel filesystems, loads the drivers, brings up loopback, adds /dev/fd (bash's
/// process substitution needs it; udev makes it on systemd guests), waits for hvc0 as systemd would
/// (the unit `requires dev-hvc0.device`), then runs the backdoor script.
fn init() -> String {
    format!(
        "#!/bin/sh\nmount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev\n\
         for module in $(cat {MODULE_LIST}); do insmod \"$module\"; done\n\
         ip link set lo up; ln -s /proc/self/fd /dev/fd\n\
         while [ ! -e /dev/hvc0 ]; do sleep 0.1; done\n\
         exec /bin/bash /backdoor\n"
    )
}

/// The busybox applets the init, the backdoor and the driver's commands use, and the everyday tools
/// tests run in a guest without an init system.
const APPLETS: &[&str] = &[
    "mount",
    "insmod",
    "sleep",
    "stty",
    "base64",
    "timeout",
    "cat",
    "uname",
    "ls",
    "rm",
    "mktemp",
    "test",
    "[",
    "awk",
    "basename",
    "chmod",
    "cp",
    "date",
    "dirname",
    "echo",
    "env",
    "false",
    "fold",
    "grep",
    "head",
    "hostname",
    "httpd",
    "id",
    "ip",
    "kill",
    "ln",
    "mkdir",
    "mv",
    "nc",
    "ping",
    "printf",
    "ps",
    "sed",
    "seq",
    "sha256sum",
    "sort",
    "sync",
    "tail",
    "tar",
    "touch",
    "tr",
    "true",
    "wc",
    "wget",
    "xargs",
];

/// `poweroff` and `reboot` for a guest whose PID 1 is a shell, which ignores the signals busybox's
/// versions send to an init: they sync and act at once, as systemd does at the end.
const POWER: [(&str, &str); 2] = [("poweroff", "poweroff -f"), ("reboot", "reboot -f")];

/// `$ATTEST_BASH`, else Debian's bash-static: a bash the guest can run without the host's libraries.
pub fn find_static_bash() -> Result<PathBuf, ImageError> {
    let path = std::env::var_os("ATTEST_BASH").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/bin/bash-static"));
    if !is_static_elf(&path) {
        return Err(ImageError::NoStaticBash { path });
    }
    Ok(path)
}

pub fn backdoor_initramfs(busybox: &Path, bash: &Path, modules: &[ModuleFile]) -> Result<Initramfs, ImageError> {
    let bash_bytes = std::fs::read(bash).map_err(ImageError::io(format!("reading {}", bash.display())))?;
    let mut image = base_layout(busybox)?
        .file("bin/bash", bash_bytes, 0o755)
        .file("init", init().into_bytes(), 0o755)
        .file("backdoor", BACKDOOR_SCRIPT.as_bytes().to_vec(), 0o644);
    for applet in APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    for (name, action) in POWER {
        image =
            image.file(&format!("bin/{name}"), format!("#!/bin/sh\nsync\nexec busybox {action}\n").into_bytes(), 0o755);
    }
    with_modules(image, modules, false)
}
