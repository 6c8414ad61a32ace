//! Kernel modules: which of the drivers a guest needs are modules, built in or missing, in what order
//! to load them (dependencies first, from `modules.dep` or, where depmod never ran, from each module's
//! `.modinfo`), and their bytes, decompressed when the distribution compresses them.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::ImageError;

/// The modules of one kernel release.
#[derive(Debug, Default)]
pub struct ModuleTree {
    dir: Option<PathBuf>,
    paths: HashMap<String, PathBuf>,
    builtin: HashSet<String>,
    /// Each module's dependencies: all of modules.dep when depmod ran, else filled from the
    /// modules' own `.modinfo` as they are visited (so a module is read for this at most once).
    deps: RefCell<HashMap<String, Vec<String>>>,
}

/// A module to load, with its bytes ready for the initramfs.
#[derive(Debug, Clone)]
pub struct ModuleFile {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Default)]
pub struct Resolution {
    /// Modules to load, each after its dependencies.
    pub load: Vec<ModuleFile>,
    pub builtin: Vec<String>,
    /// Neither a module nor listed as built in. Without a modules directory every name lands here.
    pub missing: Vec<String>,
}

impl ModuleTree {
    /// A kernel without a modules directory: all drivers must be built in.
    pub fn none() -> Self {
        Self::default()
    }

    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let builtin = std::fs::read_to_string(dir.join("modules.builtin"))
            .unwrap_or_default()
            .lines()
            .map(|l| module_name(Path::new(l)))
            .collect();
        let mut tree = ModuleTree { dir: Some(dir.to_path_buf()), builtin, ..Self::default() };
        match std::fs::read_to_string(dir.join("modules.dep")) {
            Ok(text) => {
                let mut deps = HashMap::new();
                for line in text.lines() {
                    let Some((module, needs)) = line.split_once(':') else { continue };
                    let name = module_name(Path::new(module));
                    tree.paths.insert(name.clone(), dir.join(module));
                    deps.insert(name, needs.split_whitespace().map(|d| module_name(Path::new(d))).collect());
                }
                tree.deps = RefCell::new(deps);
            }
            Err(_) => tree.walk(dir)?,
        }
        Ok(tree)
    }

    fn walk(&mut self, dir: &Path) -> Result<(), ImageError> {
        let entries = std::fs::read_dir(dir).map_err(ImageError::io(format!("listing {}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.walk(&path)?;
            } else if is_module_file(&path) {
                self.paths.insert(module_name(&path), path);
            }
        }
        Ok(())
    }

    /// Whether the kernel has every one of `drivers`, as a module or built in. Without a modules
    /// directory attest cannot tell, and assumes they are built in.
    pub fn provides(&self, drivers: &[&str]) -> bool {
        self.dir.is_none() || self.resolve(drivers).is_ok_and(|r| r.missing.is_empty())
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Resolves the wanted drivers to a load order.
    pub fn resolve(&self, wanted: &[&str]) -> Result<Resolution, ImageError> {
        let mut out = Resolution::default();
        let mut seen = HashSet::new();
        for name in wanted {
            let name = normalize(name);
            if self.builtin.contains(&name) {
                out.builtin.push(name);
            } else if self.paths.contains_key(&name) {
                self.visit(&name, &mut seen, &mut out.load)?;
            } else {
                out.missing.push(name);
            }
        }
        Ok(out)
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<ModuleFile>) -> Result<(), ImageError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let Some(path) = self.paths.get(name) else {
            // A dependency that is built in needs no loading.
            return Ok(());
        };
        let known = self.deps.borrow().get(name).cloned();
        let deps = match known {
            Some(deps) => deps,
            None => {
                let deps = modinfo_depends(&module_bytes(path)?);
                self.deps.borrow_mut().insert(name.to_string(), deps.clone());
                deps
            }
        };
        for dep in deps {
            self.visit(&dep, seen, order)?;
        }
        order.push(ModuleFile { name: name.to_string(), path: path.clone() });
        Ok(())
    }
}

/// The module's ELF bytes, decompressed from `.ko.xz`, `.ko.zst` or `.ko.gz` as needed.
pub fn module_bytes(path: &Path) -> Result<Vec<u8>, ImageError> {
    let io_err = ImageError::io(format!("reading module {}", path.display()));
    let raw = std::fs::read(path).map_err(&io_err)?;
    let mut out = Vec::new();
    match path.extension().and_then(|e| e.to_str()) {
        Some("xz") => xz2::read::XzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(&io_err)?,
        Some("zst") => {
            zstd::stream::read::Decoder::new(raw.as_slice()).map_err(&io_err)?.read_to_end(&mut out).map_err(&io_err)?
        }
        Some("gz") => flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out).map_err(&io_err)?,
        _ => return Ok(raw),
    };
    Ok(out)
}

/// What `sign-file` appends to a signed module, after the signature and its descriptor.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, 3 bytes padding, sig_len (big endian).
const SIGNATURE_DESCRIPTOR_LEN: usize = 12;

/// The module without its appended signature (unchanged when it has none). A kernel that does not
/// enforce signatures loads it all the same, tainting itself, and skips hashing the module and
/// checking its RSA signature, which is slow under TCG.
pub fn strip_signature(mut module: Vec<u8>) -> Vec<u8> {
    let Some(marker) = module.len().checked_sub(SIGNATURE_MARKER.len()) else { return module };
    let Some(descriptor) = marker.checked_sub(SIGNATURE_DESCRIPTOR_LEN) else { return module };
    if &module[marker..] != SIGNATURE_MARKER {
        return module;
    }
    let sig_len = u32::from_be_bytes([
        module[descriptor + 8],
        module[descriptor + 9],
        module[descriptor + 10],
        module[descriptor + 11],
    ]);
    if let Some(end) = descriptor.checked_sub(sig_len as usize) {
        module.truncate(end);
    }
    module
}

/// The `depends=` entry of a module's `.modinfo` section (NUL-separated `key=value` strings).
pub fn modinfo_depends(elf: &[u8]) -> Vec<String> {
    let Ok(file) = object::File::parse(elf) else { return Vec::new() };
    let Some(data) = file.section_by_name(".modinfo").and_then(|s| s.data().ok()) else { return Vec::new() };
    data.split(|&b| b == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| String::from_utf8_lossy(list).split(',').map(normalize).collect::<Vec<_>>())
        .filter(|d| !d.is_empty())
        .collect()
}

fn is_module_file(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|ext| name.ends_with(ext))
}

/// `kernel/fs/fuse/virtiofs.ko.xz` → `virtiofs`; dashes and underscores are the same to the kernel.
fn module_name(path: &Path) -> String {
    let file = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    normalize(file.split(".ko").next().unwrap_or(file))
}

fn normalize(name: &str) -> String {
    name.trim().replace('-', "_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree_with_dep_file(dep: &str, builtin: &str) -> (tempfile::TempDir, ModuleTree) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("modules.dep"), dep).unwrap();
        std::fs::write(dir.path().join("modules.builtin"), builtin).unwrap();
        let tree = ModuleTree::open(dir.path()).unwrap();
        (dir, tree)
    }

    #[test]
    fn load_order_puts_dependencies_first_once() {
        let (_dir, tree) = tree_with_dep_file(
            "kernel/fs/fuse/virtiofs.ko.xz: kernel/fs/fuse/fuse.ko.xz kernel/drivers/virtio/virtio.ko\n\
             kernel/fs/fuse/fuse.ko.xz:\n\
             kernel/drivers/virtio/virtio.ko:\n\
             kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko\n",
            "kernel/drivers/virtio/virtio_pci.ko\n",
        );
        let r = tree.resolve(&["virtio-pci", "virtiofs", "virtio_console", "9p"]).unwrap();
        let names: Vec<_> = r.load.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["fuse", "virtio", "virtiofs", "virtio_console"]);
        assert_eq!(r.builtin, ["virtio_pci"]);
        assert_eq!(r.missing, ["9p"]);
    }

    #[test]
    fn without_a_modules_dir_everything_is_missing() {
        let r = ModuleTree::none().resolve(&["virtio_console"]).unwrap();
        assert!(r.load.is_empty());
        assert_eq!(r.missing, ["virtio_console"]);
    }

    #[test]
    fn strips_an_appended_signature_only() {
        let module = b"\x7fELF module body".to_vec();
        let mut signed = module.clone();
        signed.extend_from_slice(b"SIGNATURE");
        signed.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 9]);
        signed.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_signature(signed), module);
        assert_eq!(strip_signature(module.clone()), module);
        assert_eq!(strip_signature(b"short".to_vec()), b"short");
    }

    #[test]
    fn decompresses_every_supported_format() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let payload = b"\x7fELF pretend module".to_vec();
        let xz = dir.path().join("a.ko.xz");
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(&payload).unwrap();
        std::fs::write(&xz, enc.finish().unwrap()).unwrap();
        let zst = dir.path().join("b.ko.zst");
        std::fs::write(&zst, zstd::encode_all(payload.as_slice(), 1).unwrap()).unwrap();
        let gz = dir.path().join("c.ko.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&payload).unwrap();
        std::fs::write(&gz, enc.finish().unwrap()).unwrap();
        for path in [xz, zst, gz] {
            assert_eq!(module_bytes(&path).unwrap(), payload, "{}", path.display());
        }
    }
}
