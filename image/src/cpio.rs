//! A deterministic `newc` cpio writer (the format the Linux kernel unpacks as an initramfs).
//!
//! Entries are written sorted by path with modification time 0, owner 0:0 and inode numbers
//! assigned in that order, so the archive depends only on the paths, modes and contents.

use std::collections::BTreeMap;

/// What one archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
}

/// One entry: its kind and permission bits (without the file-type bits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: EntryKind,
    pub perm: u32,
}

/// Why an archive could not be assembled.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("cpio path {0:?} is not a relative path without '.', '..' or empty components")]
    BadPath(String),
    #[error("cpio entry {path:?} is {size} bytes, more than newc's 32-bit size field holds")]
    TooLarge { path: String, size: usize },
    #[error("cpio path {path:?} was added twice with different contents")]
    Conflict { path: String },
}

/// An archive being assembled: path (relative, no leading '/') -> entry.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

impl Archive {
    /// Adds an entry and every missing parent directory (mode 0755). Adding the same path
    /// twice is allowed only with identical contents (two binaries sharing a library).
    pub fn add(&mut self, path: &str, kind: EntryKind, perm: u32) -> Result<(), CpioError> {
        let path = path.trim_start_matches('/');
        if path.is_empty()
            || path
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(CpioError::BadPath(path.to_owned()));
        }
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            self.insert(
                &parent,
                Entry {
                    kind: EntryKind::Dir,
                    perm: 0o755,
                },
            )?;
        }
        self.insert(
            path,
            Entry {
                kind,
                perm: perm & 0o7777,
            },
        )
    }

    fn insert(&mut self, path: &str, entry: Entry) -> Result<(), CpioError> {
        match self.entries.get(path) {
            Some(existing) if *existing == entry => Ok(()),
            Some(_) => Err(CpioError::Conflict {
                path: path.to_owned(),
            }),
            None => {
                self.entries.insert(path.to_owned(), entry);
                Ok(())
            }
        }
    }

    /// Whether `path` was added.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_start_matches('/'))
    }

    /// The paths in archive order.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The archive bytes: sorted entries, then the `TRAILER!!!` record.
    pub fn to_bytes(&self) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in (1u32..).zip(&self.entries) {
            let (mode, nlink, data): (u32, u32, &[u8]) = match &entry.kind {
                EntryKind::Dir => (S_IFDIR | entry.perm, 2, &[]),
                EntryKind::File(d) => (S_IFREG | entry.perm, 1, d),
                EntryKind::Symlink(t) => (S_IFLNK | 0o777, 1, t.as_bytes()),
            };
            let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
                path: path.clone(),
                size: data.len(),
            })?;
            write_record(&mut out, ino, mode, nlink, path, data, size);
        }
        write_record(&mut out, 0, 0, 1, "TRAILER!!!", &[], 0);
        Ok(out)
    }
}

fn write_record(
    out: &mut Vec<u8>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    size: u32,
) {
    let name_len = name.len() + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        size,
        0,
        0,
        0,
        0,
        name_len as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_newc_and_independent_of_insertion_order() {
        let mut a = Archive::default();
        a.add("bin/sh", EntryKind::Symlink("busybox".into()), 0o777)
            .unwrap();
        a.add("init", EntryKind::File(b"#!/bin/sh\n".to_vec()), 0o755)
            .unwrap();
        let mut b = Archive::default();
        b.add("init", EntryKind::File(b"#!/bin/sh\n".to_vec()), 0o755)
            .unwrap();
        b.add("/bin/sh", EntryKind::Symlink("busybox".into()), 0o777)
            .unwrap();
        let bytes = a.to_bytes().unwrap();
        assert_eq!(bytes, b.to_bytes().unwrap());
        assert_eq!(a.paths().collect::<Vec<_>>(), ["bin", "bin/sh", "init"]);
        // First record: directory "bin", inode 1, mode 040755, mtime 0, name size 4.
        let header = std::str::from_utf8(&bytes[..110]).unwrap();
        assert_eq!(&header[..6], "070701");
        assert_eq!(&header[6..14], "00000001");
        assert_eq!(&header[14..22], "000041ED");
        assert_eq!(&header[46..54], "00000000", "mtime");
        assert_eq!(&header[94..102], "00000004", "name size");
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn refuses_bad_paths_and_conflicts() {
        let mut a = Archive::default();
        for p in ["", "a//b", "../x", "a/./b"] {
            assert_eq!(
                a.add(p, EntryKind::Dir, 0o755),
                Err(CpioError::BadPath(p.trim_start_matches('/').to_owned()))
            );
        }
        a.add("lib/x.so", EntryKind::File(vec![1]), 0o755).unwrap();
        a.add("lib/x.so", EntryKind::File(vec![1]), 0o755).unwrap();
        assert!(matches!(
            a.add("lib/x.so", EntryKind::File(vec![2]), 0o755),
            Err(CpioError::Conflict { .. })
        ));
    }
}
