//! ISOs built with grub-mkrescue and xorriso, read back with [`inspect`]; no VM is booted here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;
use crate::ImageError;

const DRIVERS: [&str; 5] = ["virtio_pci", "virtio_console", "virtio_rng", "ahci", "sr_mod"];

/// The cached Debian cloud kernel and the minimal backdoor initramfs (written under `dir`), or why
/// they cannot be had on this host.
fn kernel_and_initrd(dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    if which::which("grub-mkrescue").is_err() {
        return Err("grub-mkrescue is not installed (scripts/setup installs grub-pc-bin, grub-efi-amd64-bin)".into());
    }
    let kernel = crate::kernel::locate(None, &crate::cache_dir()).map_err(|e| e.to_string())?;
    let modules = kernel.module_tree().and_then(|tree| tree.resolve(&DRIVERS)).map_err(|e| e.to_string())?.load;
    let busybox = crate::find_busybox().map_err(|e| e.to_string())?;
    let bash = crate::backdoor::find_static_bash().map_err(|e| e.to_string())?;
    let initrd = crate::backdoor::backdoor_initramfs(&busybox, &bash, &modules)
        .and_then(|image| image.write_cached(dir))
        .map_err(|e| e.to_string())?;
    Ok((kernel.path, initrd))
}

fn u32_at(bytes: &[u8], at: usize) -> usize {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize
}

/// Copies of a bootable `iso` with a broken boot catalog, and with garbage for a root directory.
fn corrupt_copies_are_refused(iso: &Path, dir: &Path) {
    let bytes = std::fs::read(iso).unwrap();
    let sector = |n: usize| n * 2048;
    let boot_record = (16..32).map(sector).find(|&at| bytes[at] == 0 && &bytes[at + 1..at + 6] == b"CD001").unwrap();
    let catalog = sector(u32_at(&bytes, boot_record + 71));
    let root = sector(u32_at(&bytes, sector(16) + 158));
    for (name, at, fill) in [("catalog", catalog, 0u8), ("root", root, 0xff)] {
        let mut broken = bytes.clone();
        broken[at..at + 2048].fill(fill);
        let path = dir.join(format!("broken-{name}.iso"));
        std::fs::write(&path, broken).unwrap();
        let e = inspect(&path).unwrap_err();
        eprintln!("broken {name}: {e}");
        assert!(matches!(e, ImageError::CorruptIso { .. }), "{e}");
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let value = f();
    (value, started.elapsed())
}

#[test]
fn a_grub_iso_boots_on_bios_and_uefi_with_its_console_and_is_cached() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = match kernel_and_initrd(dir.path()) {
        Ok(inputs) => inputs,
        Err(why) => return eprintln!("SKIP: {why}"),
    };
    let cmdline = "console=ttyS0 panic=-1 quiet rdinit=/init";
    let iso = GrubIso { kernel, initrd, cmdline: cmdline.into(), title: "attest's minimal guest".into() };
    let (built, build_time) = timed(|| iso.build_cached(dir.path()).unwrap());
    let size = std::fs::metadata(&built).unwrap().len();
    eprintln!("built {} ({size} bytes) in {build_time:?}", built.display());
    assert_eq!(built.parent().unwrap(), dir.path().join("iso"));

    let (report, inspect_time) = timed(|| inspect(&built).unwrap());
    eprintln!("inspected in {inspect_time:?}: {report:#?}");
    assert!(inspect_time < Duration::from_secs(1), "inspect took {inspect_time:?}");
    assert!(report.boots_on(Platform::Bios) && report.boots_on(Platform::Uefi), "{:?}", report.boot);
    let grub = report.configs.iter().find(|c| c.path == "/boot/grub/grub.cfg").expect("grub.cfg");
    let [entry] = grub.entries.as_slice() else { panic!("one entry expected: {grub:?}") };
    assert_eq!(entry.kernel, "/boot/vmlinuz");
    assert_eq!(entry.cmdline, cmdline);
    assert_eq!(entry.title.as_deref(), Some("attest's minimal guest"), "the quote survives GRUB's quoting");
    assert!(report.entries_without_console("ttyS0").is_empty(), "{report:?}");
    assert_eq!(report.entries_without_console("ttyS1").len(), 1);
    corrupt_copies_are_refused(&built, dir.path());

    // Same inputs: the cached file, untouched, and no grub-mkrescue run.
    let modified = std::fs::metadata(&built).unwrap().modified().unwrap();
    let (again, hit_time) = timed(|| iso.build_cached(dir.path()).unwrap());
    eprintln!("cache hit in {hit_time:?}");
    assert_eq!(again, built);
    assert_eq!(std::fs::metadata(&again).unwrap().modified().unwrap(), modified);
    assert!(hit_time < build_time, "a cache hit ({hit_time:?}) must not rebuild ({build_time:?})");
    let leftovers: Vec<_> =
        std::fs::read_dir(dir.path().join("iso")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [built.file_name().unwrap()], "the build directory is gone");
}

#[test]
fn an_entry_without_the_serial_console_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = match kernel_and_initrd(dir.path()) {
        Ok(inputs) => inputs,
        Err(why) => return eprintln!("SKIP: {why}"),
    };
    let iso = GrubIso { kernel, initrd, cmdline: "panic=-1 quiet rdinit=/init".into(), title: "quiet".into() };
    let built = iso.build_cached(dir.path()).unwrap();
    let report = inspect(&built).unwrap();
    let missing = report.entries_without_console("ttyS0");
    let [(config, entry)] = missing.as_slice() else { panic!("one entry expected: {missing:?}") };
    assert_eq!(config.path, "/boot/grub/grub.cfg");
    // serial, terminal_input, terminal_output, set timeout, blank, menuentry, then linux.
    assert_eq!((entry.line, entry.title.as_deref()), (7, Some("quiet")));
    assert!(iso.grub_cfg().lines().nth(6).unwrap().trim_start().starts_with("linux /boot/vmlinuz "));
}

#[test]
fn the_cache_name_follows_every_input() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let base =
        GrubIso { kernel: write("k", "kernel"), initrd: write("i", "initrd"), cmdline: "a".into(), title: "t".into() };
    let digest = |iso: &GrubIso, version: &str| iso.digest(version).unwrap();
    let mut changed = vec![digest(&base, "2.07")];
    changed.push(digest(&GrubIso { cmdline: "b".into(), ..base.clone() }, "2.06"));
    changed.push(digest(&GrubIso { title: "u".into(), ..base.clone() }, "2.06"));
    changed.push(digest(&GrubIso { kernel: write("k2", "kernel2"), ..base.clone() }, "2.06"));
    changed.push(digest(&GrubIso { initrd: write("i2", "initrd2"), ..base.clone() }, "2.06"));
    let original = digest(&base, "2.06");
    assert_eq!(original, digest(&base, "2.06"));
    assert!(changed.iter().all(|d| *d != original), "{changed:?}");
}

/// `xorriso -as mkisofs -o iso dir` on a directory with a 200 KB file: ISO 9660, no El Torito.
fn plain_iso(dir: &Path) -> Option<PathBuf> {
    if which::which("xorriso").is_err() {
        return None;
    }
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("data.bin"), vec![7u8; 200 * 1024]).unwrap();
    let iso = dir.join("plain.iso");
    let out = Command::new("xorriso").args(["-as", "mkisofs", "-o"]).arg(&iso).arg(&content).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Some(iso)
}

#[test]
fn bad_input_gets_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = |path: &Path| inspect(path).unwrap_err();

    let missing = dir.path().join("nope.iso");
    assert!(matches!(err(&missing), ImageError::IsoMissing { .. }), "{}", err(&missing));
    let e = err(dir.path());
    assert!(matches!(e, ImageError::IsoNotAFile { what: "a directory", .. }), "{e}");

    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let random: Vec<u8> = (0..1 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let noise = dir.path().join("noise.iso");
    std::fs::write(&noise, random).unwrap();
    let e = err(&noise);
    assert!(matches!(e, ImageError::NotIso9660 { .. }), "{e}");
    assert!(e.to_string().contains("no CD001 volume descriptor at sector 16"), "{e}");
    let tiny = dir.path().join("tiny.iso");
    std::fs::write(&tiny, b"short").unwrap();
    assert!(matches!(err(&tiny), ImageError::NotIso9660 { .. }), "{}", err(&tiny));

    let Some(plain) = plain_iso(dir.path()) else { return eprintln!("SKIP: xorriso is not installed") };
    let e = err(&plain);
    assert!(matches!(e, ImageError::IsoNotBootable { .. }), "{e}");
    assert!(e.to_string().contains("not bootable from a CD: no El Torito boot catalog"), "{e}");

    let truncated = dir.path().join("truncated.iso");
    std::fs::write(&truncated, &std::fs::read(&plain).unwrap()[..40 * 1024]).unwrap();
    let e = err(&truncated);
    assert!(matches!(e, ImageError::CorruptIso { .. }), "{e}");
    assert!(e.to_string().contains("it was cut short"), "{e}");
}

/// A tree with isolinux, systemd-boot and EFI GRUB configurations, El Torito for BIOS and UEFI.
fn stage_loaders(root: &Path) {
    let files = [
        ("isolinux/isolinux.bin", "not really"),
        ("isolinux/isolinux.cfg", "UI menu.c32\nINCLUDE menu.cfg\n"),
        (
            "isolinux/menu.cfg",
            "LABEL live\n  MENU LABEL Live\n  KERNEL /live/vmlinuz\n  APPEND console=ttyS0,115200n8\n",
        ),
        ("loader/entries/arch.conf", "title Arch\nlinux /vmlinuz\noptions quiet\n"),
        ("EFI/BOOT/grub.cfg", "menuentry \"x\" {\n linux /live/vmlinuz quiet\n}\n"),
        ("efi.img", "fat"),
    ];
    for (path, text) in files {
        std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
        std::fs::write(root.join(path), text).unwrap();
    }
}

#[test]
fn configs_are_found_by_rock_ridge_joliet_or_plain_iso_9660_names() {
    if which::which("xorriso").is_err() {
        return eprintln!("SKIP: xorriso is not installed");
    }
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    stage_loaders(&stage);
    for (names, rockridge, joliet) in [("Rock Ridge", "on", "on"), ("Joliet", "off", "on"), ("ISO 9660", "off", "off")]
    {
        let iso = dir.path().join(format!("{rockridge}-{joliet}.iso"));
        let out = Command::new("xorriso")
            .args(["-rockridge", rockridge, "-joliet", joliet, "-outdev"])
            .arg(&iso)
            .args(["-map"])
            .arg(&stage)
            .args(["/", "-boot_image", "any", "bin_path=/isolinux/isolinux.bin", "-boot_image", "any", "next"])
            .args(["-boot_image", "any", "efi_path=/efi.img"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report = inspect(&iso).unwrap();
        assert!(report.boots_on(Platform::Bios) && report.boots_on(Platform::Uefi), "{names}: {:?}", report.boot);
        let paths: Vec<&str> = report.configs.iter().map(|c| c.path.as_str()).collect();
        let expected =
            ["/EFI/BOOT/grub.cfg", "/isolinux/isolinux.cfg", "/isolinux/menu.cfg", "/loader/entries/arch.conf"];
        match names {
            "ISO 9660" => assert_eq!(paths, expected.map(str::to_uppercase), "{names}"),
            _ => assert_eq!(paths, expected, "{names}"),
        }
        let entries = |index: usize| report.configs[index].entries.len();
        assert_eq!((entries(0), entries(1), entries(2), entries(3)), (1, 0, 1, 1), "{names}: {report:#?}");
        let missing: Vec<_> =
            report.entries_without_console("ttyS0").iter().map(|(c, e)| (c.path.to_lowercase(), e.line)).collect();
        assert_eq!(
            missing,
            [("/efi/boot/grub.cfg".into(), 2), ("/loader/entries/arch.conf".to_string(), 3)],
            "{names}"
        );
    }
}
