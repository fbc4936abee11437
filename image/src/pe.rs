//! The PE/COFF image hash ("Authenticode" digest) that UEFI firmware measures into PCR 4 when it
//! loads an EFI application, and the patch QEMU applies to a bzImage's setup header before
//! OVMF loads it (`-kernel`).
//!
//! Hash order, as EDK2's `Tcg2MeasurePeImage` (and the Authenticode spec) do: the headers
//! without the `CheckSum` field and without the certificate-table data directory entry, then
//! each section's raw data in ascending `PointerToRawData` order, then any data after the last
//! section except the certificate table (its size is taken from the directory entry).

use sha2::{Digest as _, Sha256};

use constellation_attestation::measurements::Digest;

/// Why a file is not a PE image we can hash, or not a bzImage QEMU can load.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeError {
    #[error("not a PE image: {0}")]
    NotPe(&'static str),
    #[error("PE field {field} points outside the {len}-byte file")]
    OutOfBounds { field: &'static str, len: usize },
    #[error("not a Linux bzImage with boot protocol >= 2.12: {0}")]
    NotBzImage(&'static str),
    #[error("initrd of {initrd_len} bytes does not fit below {initrd_max:#x}")]
    InitrdTooLarge { initrd_len: u64, initrd_max: u64 },
}

fn read<const N: usize>(b: &[u8], off: usize, field: &'static str) -> Result<[u8; N], PeError> {
    off.checked_add(N)
        .and_then(|end| b.get(off..end))
        .and_then(|s| s.try_into().ok())
        .ok_or(PeError::OutOfBounds {
            field,
            len: b.len(),
        })
}
fn u16_at(b: &[u8], off: usize, field: &'static str) -> Result<u16, PeError> {
    read::<2>(b, off, field).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize, field: &'static str) -> Result<u32, PeError> {
    read::<4>(b, off, field).map(u32::from_le_bytes)
}
fn range<'a>(
    b: &'a [u8],
    start: usize,
    end: usize,
    field: &'static str,
) -> Result<&'a [u8], PeError> {
    b.get(start..end).ok_or(PeError::OutOfBounds {
        field,
        len: b.len(),
    })
}

/// SHA-256 PE image hash of `image`.
pub fn authenticode_sha256(image: &[u8]) -> Result<Digest, PeError> {
    if image.get(..2) != Some(b"MZ") {
        return Err(PeError::NotPe("no MZ signature"));
    }
    let pe = u32_at(image, 0x3c, "e_lfanew")? as usize;
    if read::<4>(image, pe, "PE signature")? != *b"PE\0\0" {
        return Err(PeError::NotPe("no PE signature"));
    }
    let coff = pe + 4;
    let num_sections = usize::from(u16_at(image, coff + 2, "NumberOfSections")?);
    let opt_size = usize::from(u16_at(image, coff + 16, "SizeOfOptionalHeader")?);
    let opt = coff + 20;
    let (num_rva_off, dirs_off) = match u16_at(image, opt, "Magic")? {
        0x10b => (92, 96),
        0x20b => (108, 112),
        _ => return Err(PeError::NotPe("unknown optional header magic")),
    };
    let size_of_headers = u32_at(image, opt + 60, "SizeOfHeaders")? as usize;
    let checksum = opt + 64;
    let num_rva = u32_at(image, opt + num_rva_off, "NumberOfRvaAndSizes")? as usize;
    let mut h = Sha256::new();
    h.update(range(image, 0, checksum, "CheckSum")?);
    let cert_size = if num_rva > 4 {
        let cert_dir = opt + dirs_off + 4 * 8;
        h.update(range(
            image,
            checksum + 4,
            cert_dir,
            "certificate table entry",
        )?);
        h.update(range(
            image,
            cert_dir + 8,
            size_of_headers,
            "SizeOfHeaders",
        )?);
        u32_at(image, cert_dir + 4, "certificate table size")? as usize
    } else {
        h.update(range(
            image,
            checksum + 4,
            size_of_headers,
            "SizeOfHeaders",
        )?);
        0
    };
    let table = opt + opt_size;
    let mut sections = Vec::with_capacity(num_sections.min(96));
    for i in 0..num_sections {
        let s = table + i * 40;
        let raw_size = u32_at(image, s + 16, "SizeOfRawData")? as usize;
        let raw_ptr = u32_at(image, s + 20, "PointerToRawData")? as usize;
        if raw_size != 0 {
            sections.push((raw_ptr, raw_size));
        }
    }
    sections.sort_unstable();
    let mut hashed = size_of_headers;
    for (ptr, size) in sections {
        let end = ptr.checked_add(size).ok_or(PeError::OutOfBounds {
            field: "section",
            len: image.len(),
        })?;
        h.update(range(image, ptr, end, "section raw data")?);
        hashed += size;
    }
    let trailing_end = image.len().saturating_sub(cert_size);
    if trailing_end > hashed {
        h.update(range(image, hashed, trailing_end, "trailing data")?);
    }
    Ok(h.finalize().into())
}

/// The guest's memory layout as far as QEMU's bzImage loader needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuMemory {
    /// Guest RAM in MiB (`-m`), which on q35 below 2816 MiB is all below 4 GiB.
    pub ram_mib: u32,
}

/// q35/pc machines reserve this much at the top of low RAM for ACPI tables (QEMU
/// `pcmc->acpi_data_size`).
const QEMU_ACPI_DATA_SIZE: u64 = 0x20000 + 0x8000;
/// q35 keeps all RAM below 4 GiB while it is smaller than this (`pc_q35_init`).
const Q35_LOWMEM_LIMIT: u64 = 0xb000_0000;

/// The bzImage as OVMF sees it after `qemu -kernel -initrd -m`: QEMU's `x86_load_linux`
/// writes the loader type, heap end, command-line address and the initrd's address and size
/// into the setup header, and OVMF measures that patched file.
pub fn qemu_patched_bzimage(
    kernel: &[u8],
    initrd_len: u64,
    mem: QemuMemory,
) -> Result<Vec<u8>, PeError> {
    if u32_at(kernel, 0x202, "header magic").ok() != Some(0x5372_6448) {
        return Err(PeError::NotBzImage("no HdrS magic"));
    }
    let protocol = u16_at(kernel, 0x206, "protocol")?;
    if protocol < 0x20c {
        return Err(PeError::NotBzImage("boot protocol too old"));
    }
    let ram = u64::from(mem.ram_mib) << 20;
    let below_4g = if ram >= Q35_LOWMEM_LIMIT {
        0x8000_0000
    } else {
        ram
    };
    let xloadflags = u16_at(kernel, 0x236, "xloadflags")?;
    let mut initrd_max: u64 = if xloadflags & 0x2 != 0 {
        u64::from(u32::MAX) // XLF_CAN_BE_LOADED_ABOVE_4G
    } else {
        u64::from(u32_at(kernel, 0x22c, "initrd_addr_max")?)
    };
    if initrd_max >= below_4g.saturating_sub(QEMU_ACPI_DATA_SIZE) {
        initrd_max = below_4g.saturating_sub(QEMU_ACPI_DATA_SIZE + 1);
    }
    if initrd_len >= initrd_max {
        return Err(PeError::InitrdTooLarge {
            initrd_len,
            initrd_max,
        });
    }
    let (real_addr, cmdline_addr): (u32, u32) = (0x10000, 0x20000);
    let initrd_addr = ((initrd_max - initrd_len) & !4095) as u32;
    let mut out = kernel.to_vec();
    let setup_sects = usize::from(*kernel.get(0x1f1).ok_or(PeError::NotBzImage("truncated"))?);
    let setup_size = (if setup_sects == 0 { 4 } else { setup_sects } + 1) * 512;
    if setup_size > kernel.len() || out.len() < 0x240 {
        return Err(PeError::NotBzImage("setup larger than the file"));
    }
    out[0x228..0x22c].copy_from_slice(&cmdline_addr.to_le_bytes());
    out[0x210] = 0xb0; // loader type: QEMU
    out[0x211] |= 0x80; // CAN_USE_HEAP
    out[0x224..0x226].copy_from_slice(&((cmdline_addr - real_addr - 0x200) as u16).to_le_bytes());
    out[0x218..0x21c].copy_from_slice(&initrd_addr.to_le_bytes());
    out[0x21c..0x220].copy_from_slice(&(initrd_len as u32).to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncated_or_garbage_images_are_errors_not_panics() {
        assert_eq!(
            authenticode_sha256(b""),
            Err(PeError::NotPe("no MZ signature"))
        );
        let mut img = vec![0u8; 0x200];
        img[..2].copy_from_slice(b"MZ");
        img[0x3c..0x40].copy_from_slice(&0xfff0u32.to_le_bytes());
        assert!(matches!(
            authenticode_sha256(&img),
            Err(PeError::OutOfBounds { .. })
        ));
        for cut in 0..img.len() {
            let _ = authenticode_sha256(&img[..cut]);
        }
        assert!(qemu_patched_bzimage(&img, 1, QemuMemory { ram_mib: 512 }).is_err());
    }
}
