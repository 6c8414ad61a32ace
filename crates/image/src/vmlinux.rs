//! The kernel as an uncompressed ELF `vmlinux` for direct PVH boot. QEMU then loads the kernel's
//! segments itself and enters it at its PVH entry point, so the guest skips the bzImage's firmware
//! hand-off and self-decompression (about 0.4 s of a 1.6 s boot under TCG). The ELF is extracted
//! once from the bzImage's payload and cached. Kernels without the PVH entry note, or whose payload
//! compression is not one of gzip, xz, zstd and LZ4, keep booting as bzImages.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ImageError;

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit entry point that QEMU needs to boot an ELF kernel (PVH).
const PVH_ENTRY_NOTE: u32 = 18;
/// The legacy LZ4 stream format the kernel build uses: this magic, then blocks of at most 8 MiB.
const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
/// Bumped when what is extracted changes, so older cache entries are ignored.
const CACHE_FORMAT: u32 = 1;

/// The PVH-bootable ELF of `bzimage`, from `cache_dir` or extracted into it; `None` when this
/// kernel cannot boot that way (the verdict is cached too, so the payload is read once).
pub fn pvh_vmlinux(bzimage: &Path, cache_dir: &Path) -> Result<Option<PathBuf>, ImageError> {
    let io_err = ImageError::io;
    let meta = std::fs::metadata(bzimage).map_err(io_err(format!("reading kernel {}", bzimage.display())))?;
    let key = cache_key(bzimage, &meta);
    let elf_path = cache_dir.join(format!("{key}.vmlinux"));
    let refused = cache_dir.join(format!("{key}.no-pvh"));
    if elf_path.exists() {
        return Ok(Some(elf_path));
    }
    if refused.exists() {
        return Ok(None);
    }

    let image = std::fs::read(bzimage).map_err(io_err(format!("reading kernel {}", bzimage.display())))?;
    let elf = payload(&image).and_then(decompress).filter(|elf| has_pvh_entry(elf));
    std::fs::create_dir_all(cache_dir).map_err(io_err(format!("creating {}", cache_dir.display())))?;
    let (target, bytes) = match &elf {
        Some(elf) => (&elf_path, elf.as_slice()),
        None => {
            tracing::info!(kernel = %bzimage.display(), "no PVH-bootable vmlinux in this kernel; booting the bzImage");
            (&refused, &[][..])
        }
    };
    let store_err = io_err(format!("storing {}", target.display()));
    let tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(&store_err)?;
    std::fs::write(tmp.path(), bytes).map_err(&store_err)?;
    tmp.persist(target).map_err(|e| e.error).map_err(&store_err)?;
    Ok(elf.map(|_| elf_path))
}

/// Identifies the bzImage file without reading it: hashing 14 MB on every run would cost more than
/// it saves.
fn cache_key(path: &Path, meta: &std::fs::Metadata) -> String {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let mut h = Sha256::new();
    let (len, ino, secs, nanos) = (meta.len(), meta.ino(), meta.mtime(), meta.mtime_nsec());
    h.update(format!("{CACHE_FORMAT}\0{}\0{len}\0{ino}\0{secs}.{nanos:09}", path.display()));
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The compressed kernel inside a bzImage (boot protocol ≥ 2.08: `payload_offset` at 0x248 and
/// `payload_length` at 0x24C, counted from the end of the real-mode setup sectors).
fn payload(image: &[u8]) -> Option<&[u8]> {
    let u16_at = |at: usize| Some(u16::from_le_bytes(image.get(at..at + 2)?.try_into().ok()?));
    let u32_at = |at: usize| Some(u32::from_le_bytes(image.get(at..at + 4)?.try_into().ok()?) as usize);
    if image.get(0x202..0x206)? != b"HdrS" || u16_at(0x206)? < 0x208 {
        return None;
    }
    let setup_sectors = match *image.get(0x1F1)? {
        0 => 4,
        n => n as usize,
    };
    let start = (setup_sectors + 1) * 512 + u32_at(0x248)?;
    image.get(start..start.checked_add(u32_at(0x24C)?)?)
}

/// Decompresses a kernel payload by its magic. The kernel build appends the uncompressed size after
/// the compressed stream; every decoder here stops at the stream's end and ignores it.
fn decompress(payload: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let read = match payload {
        [0x1F, 0x8B, ..] => flate2::read::GzDecoder::new(payload).read_to_end(&mut out),
        [0xFD, b'7', b'z', b'X', b'Z', 0, ..] => xz2::read::XzDecoder::new(payload).read_to_end(&mut out),
        [0x28, 0xB5, 0x2F, 0xFD, ..] => {
            zstd::stream::read::Decoder::new(payload).and_then(|d| d.single_frame().read_to_end(&mut out))
        }
        [a, b, c, d, rest @ ..] if [*a, *b, *c, *d] == LZ4_LEGACY_MAGIC => return lz4_legacy(rest),
        _ => return None,
    };
    read.ok().map(|_| out)
}

/// Blocks of `u32` compressed size + LZ4 block, each independent; the magic may recur between
/// concatenated streams. A size running past the end is the kernel's appended length: the end.
fn lz4_legacy(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    while let Some((size, after)) = rest.split_first_chunk::<4>() {
        rest = after;
        if *size == LZ4_LEGACY_MAGIC {
            continue;
        }
        let size = u32::from_le_bytes(*size) as usize;
        let Some(block) = rest.get(..size) else { break };
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let written = lz4_flex::block::decompress_into(block, &mut out[start..]).ok()?;
        out.truncate(start + written);
        rest = &rest[size..];
    }
    (!out.is_empty()).then_some(out)
}

/// Whether `elf` is a 64-bit ELF with the PVH entry note, without which QEMU refuses to boot it.
pub(crate) fn has_pvh_entry(elf: &[u8]) -> bool {
    use object::read::elf::{FileHeader, ProgramHeader};
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(elf) else { return false };
    let Ok(endian) = header.endian() else { return false };
    let Ok(segments) = header.program_headers(endian, elf) else { return false };
    segments.iter().filter_map(|segment| segment.notes(endian, elf).ok().flatten()).any(|mut notes| {
        while let Ok(Some(note)) = notes.next() {
            if note.name() == b"Xen" && note.n_type(endian) == PVH_ENTRY_NOTE {
                return true;
            }
        }
        false
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage header (protocol 2.15, one setup sector) around `payload`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut image = vec![0u8; 2 * 512];
        image[0x1F1] = 1;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x206..0x208].copy_from_slice(&0x20Fu16.to_le_bytes());
        image[0x248..0x24C].copy_from_slice(&16u32.to_le_bytes());
        image[0x24C..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image.extend_from_slice(&[0xAA; 16]);
        image.extend_from_slice(payload);
        image.extend_from_slice(&[0xBB; 8]);
        image
    }

    #[test]
    fn finds_the_payload_after_the_setup_sectors() {
        let image = fake_bzimage(b"compressed kernel");
        assert_eq!(payload(&image), Some(&b"compressed kernel"[..]));
        assert_eq!(payload(&image[..0x300]), None);
        assert_eq!(payload(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn decompresses_lz4_legacy_blocks_and_stops_at_the_appended_size() {
        let kernel: Vec<u8> = (0..3 * LZ4_LEGACY_BLOCK / 2).map(|i| (i / 7 % 251) as u8).collect();
        let mut stream = LZ4_LEGACY_MAGIC.to_vec();
        for chunk in kernel.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            stream.extend_from_slice(&(block.len() as u32).to_le_bytes());
            stream.extend_from_slice(&block);
        }
        stream.extend_from_slice(&(kernel.len() as u32).to_le_bytes());
        assert!(decompress(&stream) == Some(kernel));
    }

    #[test]
    fn decompresses_gzip_and_zstd_with_the_appended_size() {
        use std::io::Write;
        let kernel = b"\x7fELF pretend kernel".to_vec();
        let size = (kernel.len() as u32).to_le_bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&kernel).unwrap();
        let mut gz = gz.finish().unwrap();
        gz.extend_from_slice(&size);
        assert_eq!(decompress(&gz), Some(kernel.clone()));
        let mut zst = zstd::encode_all(kernel.as_slice(), 1).unwrap();
        zst.extend_from_slice(&size);
        assert_eq!(decompress(&zst), Some(kernel));
        assert_eq!(decompress(b"BZh91AY&SY"), None);
    }

    #[test]
    fn a_kernel_without_a_payload_is_refused_once_and_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, fake_bzimage(b"not compressed")).unwrap();
        let cache = dir.path().join("cache");
        assert_eq!(pvh_vmlinux(&kernel, &cache).unwrap(), None);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
        assert_eq!(pvh_vmlinux(&kernel, &cache).unwrap(), None);
    }

    #[test]
    fn extracts_a_pvh_vmlinux_from_the_cached_debian_kernel() {
        let Some(kernel) = crate::kernel::locate(None, &crate::cache_dir()).ok().map(|k| k.path) else {
            eprintln!("SKIP: no kernel (scripts/setup fetches one)");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let Some(elf) = pvh_vmlinux(&kernel, dir.path()).unwrap() else {
            eprintln!("SKIP: {} has no PVH entry or an unsupported compression", kernel.display());
            return;
        };
        assert!(has_pvh_entry(&std::fs::read(&elf).unwrap()));
        assert_eq!(crate::kernel::bootable(&elf).unwrap(), crate::kernel::KernelFormat::PvhElf, "QEMU boots it");
        assert_eq!(pvh_vmlinux(&kernel, dir.path()).unwrap(), Some(elf));
    }
}
