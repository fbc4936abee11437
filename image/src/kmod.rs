//! Kernel modules for the initramfs: each module's dependencies come from the `depends=`
//! entry of its ELF `.modinfo` section (Debian's package ships no `modules.dep`), and the
//! load order is a dependency-first walk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Why a module set could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a 64-bit little-endian ELF module with a .modinfo section ({what})")]
    BadElf { path: PathBuf, what: &'static str },
    #[error("kernel module {name:?} (needed by {needed_by}) is not under {dir}")]
    Missing {
        name: String,
        needed_by: String,
        dir: PathBuf,
    },
}

/// One resolved module: its name, file, and the modules it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
    pub depends: Vec<String>,
}

/// Module names are compared with '-' and '_' equal, as the kernel does.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

fn bytes<const N: usize>(b: &[u8], off: usize) -> Option<[u8; N]> {
    b.get(off..off.checked_add(N)?)?.try_into().ok()
}
fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    bytes(b, off).map(u16::from_le_bytes)
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    bytes(b, off).map(u32::from_le_bytes)
}
fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(bytes(b, off).map(u64::from_le_bytes)?).ok()
}

/// The `key=value` strings of an ELF64 module's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, &'static str> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err("bad ELF identification");
    }
    let shoff = u64_at(elf, 0x28).ok_or("truncated header")?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or("truncated header")?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or("truncated header")?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or("truncated header")?);
    if shentsize < 0x40 {
        return Err("section header entries too small");
    }
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(elf, base)?,
            u64_at(elf, base + 0x18)?,
            u64_at(elf, base + 0x20)?,
        ))
    };
    let slice = |off: usize, size: usize| elf.get(off..off.checked_add(size)?);
    let (_, str_off, str_size) = section(shstrndx).ok_or("section table out of bounds")?;
    let names = slice(str_off, str_size).ok_or("section names out of bounds")?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or("section table out of bounds")?;
        let name = names
            .get(name_off as usize..)
            .and_then(|n| n.split(|&c| c == 0).next())
            .ok_or("section name out of bounds")?;
        if name == b".modinfo" {
            let data = slice(off, size).ok_or(".modinfo out of bounds")?;
            return Ok(data
                .split(|&c| c == 0)
                .filter_map(|kv| {
                    let kv = std::str::from_utf8(kv).ok()?;
                    let (k, v) = kv.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect());
        }
    }
    Err("no .modinfo section")
}

/// Resolves `wanted` (module names) and their dependencies under `modules_dir`
/// (`lib/modules/<version>`), skipping modules built into the kernel (`modules.builtin`).
/// Returns the modules in load order: every module after all it depends on.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, KmodError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| KmodError::Io { path, source }
    };
    let mut files = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let p = e.map_err(io(&dir))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                files.insert(canonical(stem), p);
            }
        }
    }
    let builtin_path = modules_dir.join("modules.builtin");
    let builtin: BTreeSet<String> = std::fs::read_to_string(&builtin_path)
        .map_err(io(&builtin_path))?
        .lines()
        .filter_map(|l| l.rsplit('/').next()?.strip_suffix(".ko").map(canonical))
        .collect();

    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    // Iterative depth-first walk; (name, needed_by, deps_pushed).
    let mut work: Vec<(String, String, bool)> = wanted
        .iter()
        .rev()
        .map(|w| (canonical(w), "the image".to_owned(), false))
        .collect();
    let mut info: BTreeMap<String, Module> = BTreeMap::new();
    while let Some((name, needed_by, expanded)) = work.pop() {
        if done.contains(&name) || builtin.contains(&name) {
            continue;
        }
        if expanded {
            done.insert(name.clone());
            order.push(info[&name].clone());
            continue;
        }
        let path = files.get(&name).ok_or_else(|| KmodError::Missing {
            name: name.clone(),
            needed_by: needed_by.clone(),
            dir: modules_dir.to_owned(),
        })?;
        let bytes = std::fs::read(path).map_err(io(path))?;
        let depends: Vec<String> = modinfo(&bytes)
            .map_err(|what| KmodError::BadElf {
                path: path.clone(),
                what,
            })?
            .into_iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| {
                v.split(',')
                    .filter(|d| !d.is_empty())
                    .map(canonical)
                    .collect::<Vec<_>>()
            })
            .collect();
        work.push((name.clone(), needed_by, true));
        for d in depends.iter().rev() {
            // A cycle would re-push forever; the kernel refuses cyclic modules, and `done`
            // only grows, so bound the walk by refusing a module already being expanded.
            if !done.contains(d) && !info.contains_key(d) {
                work.push((d.clone(), name.clone(), false));
            }
        }
        info.insert(
            name.clone(),
            Module {
                name,
                path: path.clone(),
                depends,
            },
        );
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modinfo_rejects_garbage_without_panicking() {
        assert!(modinfo(b"").is_err());
        assert!(modinfo(b"\x7fELF\x02\x01").is_err());
        let mut fake = vec![0u8; 64];
        fake[..6].copy_from_slice(b"\x7fELF\x02\x01");
        fake[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        fake[0x3a] = 0x40;
        fake[0x3c] = 3;
        assert!(modinfo(&fake).is_err());
    }
}
