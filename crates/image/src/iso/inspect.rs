//! Reading an ISO image without mounting it, quickly enough for `attest preflight` (a few sectors
//! and directories, never the whole image): the volume, the El Torito boot entries and the boot
//! loader configurations with their kernel command lines. ISO 9660, Rock Ridge and Joliet come
//! from `hadris-iso`; the El Torito catalog (which its reader does not expose) is read here from
//! its fixed 32-byte records.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::Path;

use hadris_iso::directory::DirectoryRef;
use hadris_iso::file::EntryType;
use hadris_iso::read::{DirEntry, IsoImage};
use hadris_iso::types::Endian;
use hadris_iso::volume::{PrimaryVolumeDescriptor, VolumeDescriptor};

use super::config::{parse, BootConfig, KernelEntry, Syntax};
use crate::ImageError;

const SECTOR: u64 = 2048;

/// The firmware an El Torito entry is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// PC BIOS (platform id 0, e.g. SeaBIOS).
    Bios,
    /// UEFI (platform id 0xEF, e.g. OVMF).
    Uefi,
    /// PowerPC, Mac or anything else, by its platform id.
    Other(u8),
}

/// One El Torito boot entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    pub platform: Platform,
    /// Marked bootable (indicator 0x88); firmware skips the others.
    pub bootable: bool,
}

/// What [`inspect`] found in an ISO.
#[derive(Debug, Clone)]
pub struct IsoReport {
    /// The primary volume descriptor's volume identifier, trimmed.
    pub volume_id: String,
    /// The El Torito entries: the initial entry first, then each section's.
    pub boot: Vec<BootEntry>,
    /// The boot loader configurations found, in search order (see [`inspect`]).
    pub configs: Vec<BootConfig>,
}

impl IsoReport {
    /// Whether some bootable El Torito entry is for `platform`.
    pub fn boots_on(&self, platform: Platform) -> bool {
        self.boot.iter().any(|entry| entry.bootable && entry.platform == platform)
    }

    /// The kernel entries whose command line lacks `console=<tty>` (e.g. `ttyS0`; `console=ttyS0,115200n8`
    /// counts too): booted unattended, their output would not reach that serial port.
    pub fn entries_without_console(&self, tty: &str) -> Vec<(&BootConfig, &KernelEntry)> {
        let all = self.configs.iter().flat_map(|config| config.entries.iter().map(move |entry| (config, entry)));
        all.filter(|(_, entry)| !entry.has_console(tty)).collect()
    }
}

/// Boot loader configurations by path (matched case-insensitively) and their syntax.
const CONFIGS: [(&str, Syntax); 6] = [
    ("/boot/grub/grub.cfg", Syntax::Grub),
    ("/EFI/BOOT/grub.cfg", Syntax::Grub),
    ("/boot/grub/loopback.cfg", Syntax::Grub),
    ("/isolinux/isolinux.cfg", Syntax::Syslinux),
    ("/syslinux/syslinux.cfg", Syntax::Syslinux),
    ("/boot/syslinux/syslinux.cfg", Syntax::Syslinux),
];

/// Directories whose files with a suffix are configurations too: isolinux's included menus and
/// systemd-boot's loader entries.
const CONFIG_DIRS: [(&str, &str, Syntax); 2] =
    [("/isolinux", ".cfg", Syntax::Syslinux), ("/loader/entries", ".conf", Syntax::LoaderEntry)];

type Image = IsoImage<BufReader<File>>;

/// Reads the ISO at `path`: its volume identifier, El Torito entries, and the kernel entries of the
/// boot loader configurations in [`CONFIGS`] and [`CONFIG_DIRS`]. File names match case-insensitively
/// (ISO level 1 names are upper case); Rock Ridge names are preferred, then Joliet's.
pub fn inspect(path: &Path) -> Result<IsoReport, ImageError> {
    let meta = std::fs::metadata(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ImageError::IsoMissing { path: path.to_path_buf() },
        _ => ImageError::Io { what: format!("reading ISO image {}", path.display()), source },
    })?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a directory" } else { "a special file (device, FIFO or socket)" };
        return Err(ImageError::IsoNotAFile { path: path.to_path_buf(), what });
    }
    let file = File::open(path).map_err(ImageError::io(format!("opening ISO image {}", path.display())))?;
    let corrupt = |why: String| ImageError::CorruptIso { path: path.to_path_buf(), why };
    let checked_id = check_volume(&file, meta.len(), path)?;
    let image = IsoImage::open(BufReader::new(file)).map_err(|e| corrupt(format!("reading the volume: {e}")))?;
    let volume_id = match checked_id {
        Some(id) => id,
        None => volume_id(&image.read_pvd().map_err(|e| corrupt(format!("reading the volume descriptors: {e}")))?),
    };
    let mut catalog = None;
    for descriptor in image.read_volume_descriptors() {
        match descriptor.map_err(|e| corrupt(format!("reading the volume descriptors: {e}")))? {
            VolumeDescriptor::BootRecord(record) if record.boot_system_identifier.starts_with(b"EL TORITO") => {
                catalog = Some(record.catalog_ptr.get());
            }
            _ => {}
        }
    }
    let catalog = catalog.ok_or_else(|| ImageError::IsoNotBootable { path: path.to_path_buf() })?;
    let boot = boot_entries(&image, catalog).map_err(corrupt)?;
    let configs = Tree::new(&image).configs().map_err(corrupt)?;
    Ok(IsoReport { volume_id, boot, configs })
}

/// Checks sector 16 holds a volume descriptor (`CD001`). When it is the primary one (it always is
/// in practice), checks the file is as long as the volume it declares and returns its identifier.
fn check_volume(file: &File, len: u64, path: &Path) -> Result<Option<String>, ImageError> {
    let mut sector = [0u8; SECTOR as usize];
    let not_iso = |why: String| ImageError::NotIso9660 { path: path.to_path_buf(), why };
    if len < 17 * SECTOR {
        return Err(not_iso(format!("the file is only {len} bytes")));
    }
    file.read_exact_at(&mut sector, 16 * SECTOR)
        .map_err(ImageError::io(format!("reading the volume descriptor of {}", path.display())))?;
    if sector[1..6] != *b"CD001" {
        return Err(not_iso(format!("sector 16 starts with {:02x?}", &sector[..6])));
    }
    let VolumeDescriptor::Primary(pvd) = VolumeDescriptor::new(sector) else { return Ok(None) };
    let declared = u64::from(pvd.volume_space_size.read()) * SECTOR;
    if len < declared {
        return Err(ImageError::CorruptIso {
            path: path.to_path_buf(),
            why: format!("the file is {len} bytes, but its volume descriptor declares {declared}: it was cut short"),
        });
    }
    Ok(Some(volume_id(&pvd)))
}

fn volume_id(pvd: &PrimaryVolumeDescriptor) -> String {
    String::from_utf8_lossy(pvd.volume_identifier.as_bytes()).trim().to_string()
}

/// The entries of the El Torito catalog at `sector`: the validation entry's platform applies to the
/// initial entry; each section header (0x90, the last 0x91) gives its entries' platform. Only the
/// catalog's first sector is read (62 entries).
fn boot_entries(image: &Image, sector: u32) -> Result<Vec<BootEntry>, String> {
    let mut catalog = [0u8; SECTOR as usize];
    image
        .read_bytes_at(u64::from(sector) * SECTOR, &mut catalog)
        .map_err(|e| format!("reading the El Torito boot catalog at sector {sector}: {e}"))?;
    let validation = &catalog[..32];
    let sum = validation.chunks_exact(2).fold(0u16, |sum, w| sum.wrapping_add(u16::from_le_bytes([w[0], w[1]])));
    if validation[0] != 1 || validation[30..] != [0x55, 0xAA] || sum != 0 {
        return Err(format!("the El Torito boot catalog at sector {sector} has no valid validation entry"));
    }
    let entry = |platform: u8, record: &[u8]| BootEntry {
        platform: match platform {
            0 => Platform::Bios,
            0xEF => Platform::Uefi,
            other => Platform::Other(other),
        },
        bootable: record[0] == 0x88,
    };
    let mut entries = vec![entry(validation[1], &catalog[32..64])];
    let mut records = catalog[64..].chunks_exact(32);
    while let Some(header @ [0x90 | 0x91, ..]) = records.next() {
        let count = u16::from_le_bytes([header[2], header[3]]);
        // Extension records (0x44) continue the entry before them.
        for record in records.by_ref().filter(|record| record[0] != 0x44).take(count.into()) {
            entries.push(entry(header[1], record));
        }
        if header[0] == 0x91 {
            break;
        }
    }
    Ok(entries)
}

/// Directory lookups by path in the image's best-named tree, each directory read once.
struct Tree<'a> {
    image: &'a Image,
    root: DirectoryRef,
    joliet: bool,
    /// Listings by the directory's path as the image names it.
    listed: HashMap<String, Vec<(String, DirEntry)>>,
}

impl<'a> Tree<'a> {
    /// Rock Ridge names (on the primary tree) first, then Joliet's, then plain ISO 9660 names.
    fn new(image: &'a Image) -> Self {
        let roots = image.root_dirs();
        // The primary volume's tree comes first; Rock Ridge names live in it.
        let primary = roots.iter().next().map_or_else(|| image.root_dir().dir_ref(), |root| root.dir_ref());
        let joliet = roots.iter().find(|root| matches!(root.entry_type(), EntryType::Joliet { .. }));
        let (root, joliet) = match joliet {
            Some(root) if !image.supports_rrip() => (root.dir_ref(), true),
            _ => (primary, false),
        };
        Tree { image, root, joliet, listed: HashMap::new() }
    }

    /// The configurations that exist, each read and parsed once.
    fn configs(&mut self) -> Result<Vec<BootConfig>, String> {
        let mut found = Vec::new();
        for (path, syntax) in CONFIGS {
            found.extend(self.lookup(path)?.map(|(path, entry)| (path, entry, syntax)));
        }
        for (dir, suffix, syntax) in CONFIG_DIRS {
            let Some((dir, entry)) = self.lookup(dir)? else { continue };
            if !entry.is_directory() {
                continue;
            }
            let dir_ref = entry.as_dir_ref(self.image).map_err(|e| format!("opening {dir}: {e}"))?;
            let has_suffix = |name: &str| {
                name.len() > suffix.len()
                    && name.get(name.len() - suffix.len()..).is_some_and(|end| end.eq_ignore_ascii_case(suffix))
            };
            let mut files: Vec<_> =
                self.list(&dir, dir_ref)?.into_iter().filter(|(name, _)| has_suffix(name)).collect();
            files.sort_by(|a, b| a.0.cmp(&b.0));
            found.extend(files.into_iter().map(|(name, entry)| (format!("{dir}/{name}"), entry, syntax)));
        }
        let mut seen = HashSet::new();
        let mut configs = Vec::new();
        for (path, entry, syntax) in found {
            if entry.is_directory() || !seen.insert(path.clone()) {
                continue;
            }
            let bytes = self.image.read_file(&entry).map_err(|e| format!("reading {path}: {e}"))?;
            let entries = parse(syntax, &String::from_utf8_lossy(&bytes));
            configs.push(BootConfig { path, entries });
        }
        Ok(configs)
    }

    /// The entry at `path` and its path as the image names it; an exact name wins over one that
    /// differs in case.
    fn lookup(&mut self, path: &str) -> Result<Option<(String, DirEntry)>, String> {
        let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let (mut dir, mut dir_ref) = (String::new(), self.root);
        for (index, wanted) in components.iter().enumerate() {
            let listing = self.list(&dir, dir_ref)?;
            let exact = listing.iter().find(|(name, _)| name == wanted);
            let found = exact.or_else(|| listing.iter().find(|(name, _)| name.eq_ignore_ascii_case(wanted)));
            let Some((name, entry)) = found.cloned() else { return Ok(None) };
            dir = format!("{dir}/{name}");
            if index + 1 == components.len() {
                return Ok(Some((dir, entry)));
            }
            if !entry.is_directory() {
                return Ok(None);
            }
            dir_ref = entry.as_dir_ref(self.image).map_err(|e| format!("opening {dir}: {e}"))?;
        }
        Ok(None)
    }

    fn list(&mut self, dir: &str, dir_ref: DirectoryRef) -> Result<Vec<(String, DirEntry)>, String> {
        if let Some(listing) = self.listed.get(dir) {
            return Ok(listing.clone());
        }
        let entries = self.image.open_dir(dir_ref).read_entries().map_err(|e| {
            format!("reading directory {} (sector {}): {e}", if dir.is_empty() { "/" } else { dir }, dir_ref.extent.0)
        })?;
        let listing: Vec<_> = entries.into_iter().filter(|e| !e.is_special()).map(|e| (self.name(&e), e)).collect();
        self.listed.insert(dir.to_string(), listing.clone());
        Ok(listing)
    }

    /// The entry's name without ISO 9660's version (`;1`) and the dot of a name without extension.
    fn name(&self, entry: &DirEntry) -> String {
        if let Some(name) = entry.rrip.as_ref().and_then(|rrip| rrip.alternate_name.clone()) {
            return name;
        }
        let raw = entry.name();
        let name = if self.joliet {
            let units: Vec<u16> = raw.chunks_exact(2).map(|b| u16::from_be_bytes([b[0], b[1]])).collect();
            String::from_utf16_lossy(&units)
        } else {
            String::from_utf8_lossy(raw).into_owned()
        };
        let name = match name.rsplit_once(';') {
            Some((base, version)) if version.bytes().all(|b| b.is_ascii_digit()) => base,
            _ => &name,
        };
        name.strip_suffix('.').unwrap_or(name).to_string()
    }
}
