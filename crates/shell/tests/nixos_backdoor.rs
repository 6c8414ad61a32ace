//! A guest that runs exactly the NixOS test driver's backdoor script (`test-instrumentation.nix`:
//! bash on /dev/hvc0, stderr to ttyS0, the marker line), driven by attest's shell over a
//! virtconsole. A real VM under TCG, booted from the cached kernel with busybox and bash-static.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attest_image::modules::module_bytes;
use attest_image::Initramfs;
use attest_machine::{Accel, Backend, GuestChannel, MachineSpec, Qemu, StateDir, Vm};
use attest_shell::BackdoorShell;

/// NixOS's `backdoor.service` script, with the store paths replaced by /bin.
const BACKDOOR: &str = r#"
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

/// Mounts the kernel filesystems, loads the virtio drivers, waits for hvc0 as systemd would
/// (`requires dev-hvc0.device`), then hands over to the backdoor script.
const INIT: &str = r#"#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
for module in $(cat /etc/modules); do insmod "$module"; done
while [ ! -e /dev/hvc0 ]; do sleep 0.1; done
exec /bin/bash /backdoor
"#;

const APPLETS: [&str; 9] = ["sh", "mount", "insmod", "sleep", "stty", "base64", "timeout", "cat", "uname"];

fn spec(kernel: PathBuf) -> MachineSpec {
    MachineSpec {
        name: "nixos-like".into(),
        kernel,
        initrd: None,
        cmdline: "console=ttyS0 panic=-1 quiet rdinit=/init".into(),
        memory_mib: 256,
        cpus: 1,
        accel: Accel::Tcg,
        shares: Vec::new(),
        nics: Vec::new(),
        guest_channel: Some(GuestChannel::VirtConsole),
    }
}

fn initramfs(qemu: &Qemu, spec: &MachineSpec, kernel: &attest_image::Kernel, cache: &std::path::Path) -> PathBuf {
    let busybox = attest_image::find_busybox().unwrap();
    let mut image = Initramfs::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "root", "etc", "lib"] {
        image = image.dir(dir);
    }
    image = image
        .char_device("dev/console", 5, 1)
        .file("bin/busybox", std::fs::read(busybox).unwrap(), 0o755)
        .file("bin/bash", std::fs::read("/bin/bash-static").unwrap(), 0o755)
        .file("init", INIT.as_bytes().to_vec(), 0o755)
        .file("backdoor", BACKDOOR.as_bytes().to_vec(), 0o644);
    for applet in APPLETS {
        image = image.symlink(&format!("bin/{applet}"), "busybox");
    }
    let modules = kernel.module_tree().unwrap().resolve(&qemu.guest_drivers(spec)).unwrap().load;
    let mut list = String::new();
    for (index, module) in modules.iter().enumerate() {
        let path = format!("lib/{index:02}-{}.ko", module.name);
        list.push_str(&format!("/{path}\n"));
        image = image.file(&path, module_bytes(&module.path).unwrap(), 0o644);
    }
    image.file("etc/modules", list.into_bytes(), 0o644).write_cached(cache).unwrap()
}

#[test]
fn a_guest_running_the_nixos_backdoor_script_is_driven_over_its_virtconsole() {
    let Some(binary) = Qemu::find_binary() else { return eprintln!("SKIP: qemu-system-x86_64 not found") };
    if !std::path::Path::new("/bin/bash-static").is_file() {
        return eprintln!("SKIP: /bin/bash-static not found (scripts/setup installs Debian's bash-static)");
    }
    let cache = attest_image::cache_dir();
    let Ok(kernel) = attest_image::kernel::locate(None, &cache) else {
        return eprintln!("SKIP: no guest kernel (scripts/setup fetches one)");
    };
    let qemu = Qemu { binary, virtiofsd: None, vhost_vsock: None };
    let mut spec = spec(kernel.path.clone());
    spec.initrd = Some(initramfs(&qemu, &spec, &kernel, &cache.join("initramfs")));

    let state = StateDir::create(false).unwrap();
    let dir = state.machine_dir(0, &spec.name).unwrap();
    let mut vm = Vm::start(&qemu, &spec, &dir, false, Arc::new(|_| {})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let console_tail = |vm: &Vm| vm.console().tail(30).join("\n");
    let stream = vm.take_agent().expect("the virtconsole's socket").connect(deadline).unwrap();
    let (mut shell, _before) =
        BackdoorShell::connect(stream, deadline).unwrap_or_else(|e| panic!("{e}; console:\n{}", console_tail(&vm)));

    let soon = || Instant::now() + Duration::from_secs(30);
    let (status, out) = shell.execute("uname -r; echo $((6 * 7))", None, soon()).unwrap();
    assert_eq!((status, String::from_utf8_lossy(&out).into_owned()), (0, format!("{}\n42\n", kernel.release)));
    assert_eq!(shell.execute("exit 7", None, soon()).unwrap().0, 7);
    // The guest's own `timeout` cuts the command off: GNU's (NixOS) exits 124, this busybox's 143.
    let asked = Instant::now();
    let (status, _) = shell.execute("sleep 20", Some(Duration::from_secs(1)), soon()).unwrap();
    assert!(
        matches!(status, 124 | 143) && asked.elapsed() < Duration::from_secs(10),
        "{status} after {:?}",
        asked.elapsed()
    );
    // The backdoor's stderr is the serial port, which the console reads.
    shell.execute("echo 'to the serial port' >&2", None, soon()).unwrap();
    let marker = regex::bytes::Regex::new("to the serial port").unwrap();
    vm.console().wait_for(&marker, soon()).unwrap_or_else(|e| panic!("{e}; console:\n{}", console_tail(&vm)));
}
