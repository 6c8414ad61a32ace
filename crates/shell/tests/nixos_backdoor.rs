//! A guest that runs exactly the NixOS test driver's backdoor script (`test-instrumentation.nix`:
//! bash on /dev/hvc0, stderr to ttyS0, the marker line; `attest_image::backdoor`), driven by
//! attest's shell over a virtconsole. A real VM under TCG, booted from the cached kernel.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attest_image::backdoor::{backdoor_initramfs, find_static_bash};
use attest_machine::console::Echo;
use attest_machine::{Backend, Boot, GuestChannel, MachineSpec, Qemu, StateDir, Vm};
use attest_shell::BackdoorShell;

fn spec(kernel: PathBuf, initrd: Option<PathBuf>) -> MachineSpec {
    let boot = Boot::kernel(kernel, initrd, "console=ttyS0 panic=-1 quiet rdinit=/init");
    MachineSpec {
        memory_mib: 256,
        guest_channel: Some(GuestChannel::VirtConsole),
        ..MachineSpec::new("nixos-like", boot)
    }
}

fn initramfs(qemu: &Qemu, spec: &MachineSpec, kernel: &attest_image::Kernel, cache: &std::path::Path) -> PathBuf {
    let modules = kernel.module_tree().unwrap().resolve(&qemu.guest_drivers(spec)).unwrap().load;
    let (busybox, bash) = (attest_image::find_busybox().unwrap(), find_static_bash().unwrap());
    backdoor_initramfs(&busybox, &bash, &modules).unwrap().write_cached(cache).unwrap()
}

#[test]
fn a_guest_running_the_nixos_backdoor_script_is_driven_over_its_virtconsole() {
    let Some(binary) = Qemu::find_binary() else { return eprintln!("SKIP: qemu-system-x86_64 not found") };
    if let Err(err) = find_static_bash() {
        return eprintln!("SKIP: {err}");
    }
    let cache = attest_image::cache_dir();
    let Ok(kernel) = attest_image::kernel::locate(None, &cache) else {
        return eprintln!("SKIP: no guest kernel (scripts/setup fetches one)");
    };
    let qemu = Qemu { binary, virtiofsd: None, vhost_vsock: None };
    let spec = spec(
        kernel.path.clone(),
        Some(initramfs(&qemu, &spec(kernel.path.clone(), None), &kernel, &cache.join("initramfs"))),
    );

    let state = StateDir::create(false).unwrap();
    let dir = state.machine_dir(0, &spec.name).unwrap();
    let mut vm = Vm::start(&qemu, &spec, &dir, Echo::Off, Arc::new(|_| {})).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let console_tail = |vm: &Vm| vm.console().tail(30).join("\n");
    let stream = vm.take_agent().expect("the virtconsole's socket").connect(deadline, None).unwrap();
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
