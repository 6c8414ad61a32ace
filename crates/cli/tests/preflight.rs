//! `attest preflight`, and `attest run` doing it first: a test whose ISO lacks the serial console
//! on its kernel command line (or is no ISO at all, or is missing) fails in about a second, naming
//! the file inside the ISO and the line, and nothing boots; the test installer's variant without
//! the serial console too, its good variant passing. And every value or file of a definition that
//! cannot work (memory beyond the host's, a missing or bogus kernel, vCPUs, VLAN 0, blank disks
//! that cannot fit, a zero timeout) fails preflight with its fix, and `attest run` refuses it at
//! once.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{attest_bin, run_command, Run};

/// A hybrid ISO of the Debian kernel and the minimal guest, with `cmdline`; `None` when this host
/// cannot build one.
fn iso(cmdline: &str) -> Option<PathBuf> {
    let cache = attest_image::cache_dir();
    let (Ok(kernel), Ok(busybox), Ok(bash), Ok(_)) = (
        attest_image::kernel::locate(None, &cache),
        attest_image::find_busybox(),
        attest_image::backdoor::find_static_bash(),
        which::which("grub-mkrescue"),
    ) else {
        eprintln!("SKIP: the kernel, busybox, bash-static or grub-mkrescue is missing (scripts/setup)");
        return None;
    };
    let initrd = attest_image::backdoor::backdoor_initramfs(&busybox, &bash, &[])
        .unwrap()
        .write_cached(&cache.join("initramfs"))
        .unwrap();
    let iso =
        attest_image::iso::GrubIso { kernel: kernel.path, initrd, cmdline: cmdline.into(), title: "rescue".into() };
    Some(iso.build_cached(&cache).unwrap())
}

fn test_with(dir: &Path, iso: &Path) -> PathBuf {
    let test = dir.join("test.toml");
    let toml = format!(
        "[machines.installer]\niso = \"{}\"\nblank_disks = [{{ size = \"8G\" }}]\n\
         login = {{ user = \"root\" }}\n[[machines.installer.conditions]]\nname = \"up\"\nconsole = \"login:\"\n",
        iso.display()
    );
    std::fs::write(&test, toml).unwrap();
    test
}

fn attest(args: &[&str], test: &Path) -> Run {
    run_command(Command::new(attest_bin()).args(args).arg(test).stdin(Stdio::null()))
}

#[test]
fn an_iso_without_the_serial_console_fails_preflight_in_a_second_without_booting() {
    let Some(quiet) = iso("quiet panic=-1 rdinit=/init") else { return };
    let dir = tempfile::tempdir().unwrap();
    let test = test_with(dir.path(), &quiet);

    let preflight = attest(&["preflight"], &test);
    let stdout = String::from_utf8_lossy(&preflight.stdout);
    assert_eq!(preflight.code, 1, "{stdout}");
    assert!(
        stdout.contains(
            "FAIL  iso console  installer: no console=ttyS0 on the kernel command line in /boot/grub/grub.cfg line"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("add console=ttyS0,115200 to those lines"), "{stdout}");
    assert!(preflight.elapsed < Duration::from_secs(2), "{:?}", preflight.elapsed);

    let run = attest(&["run"], &test);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("preflight FAIL: iso console"), "{}", run.stderr);
    assert!(!run.stderr.contains("starting vm"), "nothing boots: {}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(2), "{:?}", run.elapsed);

    let Some(good) = iso("console=ttyS0 panic=-1 rdinit=/init") else { return };
    let preflight = attest(&["preflight"], &test_with(dir.path(), &good));
    let stdout = String::from_utf8_lossy(&preflight.stdout);
    assert!(stdout.contains("ok    iso console  installer: every boot entry has console=ttyS0"), "{stdout}");
}

#[test]
fn a_missing_or_corrupt_iso_fails_preflight_with_its_reason() {
    if attest_machine::Qemu::find_binary().is_none() {
        return eprintln!("SKIP: QEMU is missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let missing = attest(&["preflight"], &test_with(dir.path(), &dir.path().join("nowhere.iso")));
    assert_eq!(missing.code, 1);
    assert!(String::from_utf8_lossy(&missing.stdout).contains("FAIL  iso"), "{missing:?}");
    let corrupt = dir.path().join("corrupt.iso");
    std::fs::write(&corrupt, vec![0x5a; 1 << 20]).unwrap();
    let run = attest(&["preflight"], &test_with(dir.path(), &corrupt));
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("not an ISO 9660 image"), "{stdout}");
}

/// The test installer ISO of `variant` (a Debian root in its initrd; cached after its first build).
fn installer_iso(variant: attest_image::installer::Variant) -> Option<PathBuf> {
    let cache = attest_image::cache_dir();
    let (Ok(kernel), Ok(_), Ok(_), Ok(_)) = (
        attest_image::kernel::locate(None, &cache),
        which::which("debootstrap"),
        which::which("cpio"),
        which::which("grub-mkrescue"),
    ) else {
        eprintln!("SKIP: the kernel, debootstrap, cpio or grub-mkrescue is missing (scripts/setup)");
        return None;
    };
    let mut progress = |line: &str| eprintln!("{line}");
    Some(attest_image::installer::ensure(&cache, &kernel, variant, &mut progress).unwrap())
}

#[test]
fn the_installer_without_the_serial_console_fails_preflight_naming_its_grub_line() {
    use attest_image::installer::Variant;
    let Some(quiet) = installer_iso(Variant::NoSerialConsole) else { return };
    let dir = tempfile::tempdir().unwrap();
    let preflight = attest(&["preflight"], &test_with(dir.path(), &quiet));
    let stdout = String::from_utf8_lossy(&preflight.stdout);
    println!("attest preflight took {:.2?}:\n{stdout}", preflight.elapsed);
    assert_eq!(preflight.code, 1, "{stdout}");
    let line =
        "FAIL  iso console  installer: no console=ttyS0 on the kernel command line in /boot/grub/grub.cfg line 7";
    assert!(stdout.contains(line), "{stdout}");
    assert!(preflight.elapsed < Duration::from_secs(2), "{:?}", preflight.elapsed);

    let Some(good) = installer_iso(Variant::Good) else { return };
    let preflight = attest(&["preflight"], &test_with(dir.path(), &good));
    let stdout = String::from_utf8_lossy(&preflight.stdout);
    assert!(stdout.contains("ok    iso console  installer: every boot entry has console=ttyS0"), "{stdout}");
}

/// `body` as a test (with a script, so `attest run` would run it), failing preflight with a FAIL
/// line containing `problem` and the fix containing `fix`; `attest run` refuses it in seconds.
fn refused(body: &str, problem: &str, fix: &str) {
    let dir = tempfile::tempdir().unwrap();
    let test = dir.path().join("test.toml");
    std::fs::write(&test, format!("script = \"test.py\"\n{body}\n")).unwrap();
    std::fs::write(dir.path().join("test.py"), "a.succeed(\"true\")\n").unwrap();

    let preflight = attest(&["preflight"], &test);
    let stdout = String::from_utf8_lossy(&preflight.stdout);
    assert_eq!(preflight.code, 1, "{body}: {stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines.iter().position(|l| l.starts_with("FAIL") && l.contains(problem));
    let at = at.unwrap_or_else(|| panic!("{body}: no FAIL line with {problem:?}:\n{stdout}"));
    assert!(lines[at + 1].contains("fix: ") && lines[at + 1].contains(fix), "{body}: fix {fix:?}:\n{stdout}");

    let run = attest(&["run"], &test);
    assert_eq!(run.code, 2, "{body}: {run:?}");
    assert!(run.stderr.contains("preflight FAIL") && run.stderr.contains(problem), "{body}: {}", run.stderr);
    assert!(!run.stderr.contains("starting vm"), "nothing boots: {}", run.stderr);
    assert!(run.elapsed < Duration::from_secs(5), "{body}: {:?}", run.elapsed);
}

const MINIMAL: &str = "[machines.a]\nimage = \"minimal\"";

#[test]
fn memory_beyond_the_hosts_fails_preflight() {
    refused(&format!("{MINIMAL}\nmemory = 99999999"), "need about 100000099 MiB, but this host has", "less memory");
}

#[test]
fn a_missing_kernel_initrd_or_disk_fails_preflight() {
    let fix = "give the path of an existing file";
    refused("[machines.a]\nkernel = \"/nope/vmlinuz\"", "kernel /nope/vmlinuz cannot be read: No such file", fix);
    let kernel = attest_image::kernel::locate(None, &attest_image::cache_dir()).ok().map(|k| k.path);
    let Some(kernel) = kernel else { return eprintln!("SKIP: no kernel (scripts/setup fetches one)") };
    let machine = format!("[machines.a]\nkernel = \"{}\"", kernel.display());
    refused(&format!("{machine}\ninitrd = \"/nope/initrd\""), "initrd /nope/initrd cannot be read", fix);
    refused(
        &format!("{machine}\ndisk = \"/nonexistent/disk.qcow2\""),
        "disk /nonexistent/disk.qcow2 cannot be read",
        fix,
    );
    refused("[machines.a]\ndisk = \"/nonexistent/disk.qcow2\"", "disk /nonexistent/disk.qcow2 cannot be read", fix);
}

#[test]
fn a_kernel_that_is_no_kernel_fails_preflight() {
    refused(
        "[machines.a]\nkernel = \"/etc/passwd\"",
        "kernel /etc/passwd is unusable: no x86 boot header",
        "give a bzImage (such as /boot/vmlinuz-*) or an ELF vmlinux with the PVH entry note",
    );
}

#[test]
fn vcpus_out_of_range_fail_preflight() {
    for cpus in [0, 1000] {
        let problem = format!("machine a: cpus = {cpus}, but a q35 machine takes 1 to 255 vCPUs");
        refused(&format!("{MINIMAL}\ncpus = {cpus}"), &problem, "set cpus between 1 and 255");
    }
}

#[test]
fn vlan_zero_fails_preflight_by_the_drivers_rule() {
    refused(&format!("vlans = [0]\n{MINIMAL}"), "VLAN 0 is out of range", "number the VLANs from 1 to 255");
}

#[test]
fn blank_disks_of_no_size_or_beyond_the_free_space_fail_preflight() {
    refused(
        &format!("{MINIMAL}\nblank_disks = [{{ size = \"900T\" }}]"),
        "the test's blank disks take up to 943718400 MiB, but",
        "give the blank disks smaller sizes",
    );
    refused(&format!("{MINIMAL}\nblank_disks = [{{ size = 0 }}]"), "blank disk 1 has size 0", "give it a size");
}

#[test]
fn a_zero_global_timeout_fails_preflight() {
    refused(&format!("global_timeout = 0\n{MINIMAL}"), "global_timeout = 0", "global_timeout = 600");
}
