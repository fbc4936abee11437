//! Node images and their expected measurements, computed offline.
//!
//! The local platform emulates measured boot honestly: before the bootstrapper runs, the
//! launcher extends [`PCR_BOOTSTRAPPER`] with SHA-256 of the bootstrapper binary (as firmware
//! measures the boot loader and kernel) and [`PCR_MANIFEST`] with SHA-256 of the image manifest
//! (as the boot loader measures the command line/config). [`expected_measurements`] performs
//! the same computation over the same files, so a node started from any other binary fails
//! attestation. [`CLUSTER_ID_PCR`] must still be zero when a node is initialized or joins.
//!
//! The QEMU platform's bootable image (kernel, initramfs, command line) and the PCRs its real
//! measured boot produces are in [`qemu`]; see the crate's README.md.

pub mod cpio;
pub mod eventlog;
pub mod kmod;
pub mod pe;
pub mod qemu;

use std::path::{Path, PathBuf};

use constellation_attestation::measurements::{
    pcr_extend, sha256, Digest, Measurement, Measurements, CLUSTER_ID_PCR,
};
use constellation_attestation::pcr;
use serde::{Deserialize, Serialize};

/// PCR extended with the bootstrapper binary's digest (the boot application's PCR).
pub const PCR_BOOTSTRAPPER: u32 = pcr::BOOT_APP;
/// PCR extended with the image manifest's digest (the kernel configuration's PCR).
pub const PCR_MANIFEST: u32 = pcr::KERNEL_CONFIG;

/// File names inside a local image folder.
pub const BOOTSTRAPPER_FILE: &str = "constellation-bootstrapper";
/// The service daemons a control plane's bootstrapper supervises, found next to it.
pub const DAEMON_FILES: [&str; 3] = [
    "constellation-joinservice",
    "constellation-keyservice",
    "constellation-verify",
];

/// Links the daemons built next to `bootstrapper` into the local image `dir` (the bootstrapper
/// looks for them next to itself). Symbolic links, not copies: the local platform does not
/// measure them (see docs/architecture.md), and copies would cost tens of MB per image. A
/// daemon not built is left out; a control plane then reports it missing in its status.
fn link_daemons(dir: &Path, bootstrapper: &Path) -> Result<(), ImageError> {
    let Some(source_dir) = bootstrapper.parent() else {
        return Ok(());
    };
    for name in DAEMON_FILES {
        let source = source_dir.join(name);
        let Ok(source) = std::fs::canonicalize(&source) else {
            continue;
        };
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&source, &link).map_err(|source| ImageError::Io {
            path: link.clone(),
            source,
        })?;
    }
    Ok(())
}
pub const MANIFEST_FILE: &str = "image-manifest.json";

/// What an image is: written next to the binary and measured at boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageManifest {
    pub version: String,
    pub platform: String,
    /// SHA-256 of the bootstrapper binary, hex.
    pub bootstrapper_sha256: String,
}

/// Why an image could not be assembled or measured.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: image manifest is malformed: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "image at {dir} is inconsistent: manifest says bootstrapper {expected}, binary is {found}"
    )]
    Inconsistent {
        dir: PathBuf,
        expected: String,
        found: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, ImageError> {
    std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The boot events the launcher extends, in order: (PCR index, event digest).
pub fn boot_events(bootstrapper: &[u8], manifest: &[u8]) -> [(u32, Digest); 2] {
    [
        (PCR_BOOTSTRAPPER, sha256(bootstrapper)),
        (PCR_MANIFEST, sha256(manifest)),
    ]
}

/// Expected measurements of a node booted from these files (all enforced).
pub fn expected_measurements(bootstrapper: &[u8], manifest: &[u8]) -> Measurements {
    let [(_, binary), (_, manifest)] = boot_events(bootstrapper, manifest);
    measurements_from_digests(&binary, &manifest)
}

/// [`expected_measurements`] from the two files' SHA-256 digests.
pub fn measurements_from_digests(bootstrapper: &Digest, manifest: &Digest) -> Measurements {
    let mut m = Measurements::default();
    for (index, event) in [(PCR_BOOTSTRAPPER, bootstrapper), (PCR_MANIFEST, manifest)] {
        m.0.insert(index, Measurement::enforce(pcr_extend(&[0u8; 32], event)));
    }
    m.0.insert(CLUSTER_ID_PCR, Measurement::enforce([0u8; 32]));
    m
}

/// A file changed more recently than this is hashed but not cached (see [`file_sha256_cached`]).
pub const RACY_WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Name of the digest cache inside an image folder.
pub const DIGEST_CACHE_FILE: &str = ".digest-cache.json";

/// What identifies one content of a file without reading it: any write changes the size or
/// the change time (ctime, which user space cannot set back), and a replaced file has
/// another inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DigestCache {
    /// Absolute path -> (stamp when hashed, SHA-256 hex).
    entries: std::collections::BTreeMap<PathBuf, (FileStamp, String)>,
}

/// SHA-256 of the file at `path`. Node binaries are tens of MB and every `terraform plan`
/// asks for their digest, so the digest is kept in `cache_dir`'s [`DIGEST_CACHE_FILE`] and
/// reused while the file's [`FileStamp`] is unchanged. Only drift detection uses this: the
/// launcher measures the bytes it actually starts, and attestation checks those.
pub fn file_sha256_cached(path: &Path, cache_dir: &Path) -> Result<Digest, ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_owned(),
        source,
    };
    let key = std::path::absolute(path).map_err(io)?;
    let stamp = FileStamp::of(path).map_err(io)?;
    let cache_path = cache_dir.join(DIGEST_CACHE_FILE);
    let mut cache: DigestCache = std::fs::read(&cache_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Some((cached_stamp, hex_digest)) = cache.entries.get(&key) {
        let mut digest = [0u8; 32];
        if *cached_stamp == stamp && hex::decode_to_slice(hex_digest, &mut digest).is_ok() {
            return Ok(digest);
        }
    }
    let digest = sha256(&read(path)?);
    // File times have a coarse granularity, so a file changed within that granule of its
    // last change could keep its stamp. Like git's "racily clean" rule, only a file whose
    // last change is older than RACY_WINDOW is cached. The stamp was taken before reading,
    // so a write during the read leaves a stale stamp that the next call sees as changed.
    let changed = std::time::UNIX_EPOCH
        + std::time::Duration::new(
            u64::try_from(stamp.ctime.0).unwrap_or(0),
            u32::try_from(stamp.ctime.1).unwrap_or(0),
        );
    let settled = std::time::SystemTime::now()
        .duration_since(changed)
        .is_ok_and(|age| age > RACY_WINDOW);
    if !settled {
        return Ok(digest);
    }
    cache.entries.insert(key, (stamp, hex::encode(digest)));
    if let Ok(bytes) = serde_json::to_vec(&cache) {
        // Best effort: without a cache the next call hashes again.
        let tmp = cache_dir.join(format!("{DIGEST_CACHE_FILE}.{}.tmp", std::process::id()));
        if std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, &cache_path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(digest)
}

/// A local node image: a folder holding the bootstrapper binary and its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalImage {
    pub dir: PathBuf,
    pub manifest: ImageManifest,
    pub measurements: Measurements,
}

impl LocalImage {
    /// Copies `bootstrapper` into `dir` with a manifest naming `version`, and measures both.
    pub fn assemble(dir: &Path, bootstrapper: &Path, version: &str) -> Result<Self, ImageError> {
        let binary = read(bootstrapper)?;
        let binary_digest = sha256(&binary);
        let manifest = ImageManifest {
            version: version.to_owned(),
            platform: "local".to_owned(),
            bootstrapper_sha256: hex::encode(binary_digest),
        };
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ImageError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let bin_path = dir.join(BOOTSTRAPPER_FILE);
        let tmp = dir.join(format!(".{BOOTSTRAPPER_FILE}.tmp"));
        std::fs::write(&tmp, &binary).map_err(io(&tmp))?;
        set_executable(&tmp)?;
        std::fs::rename(&tmp, &bin_path).map_err(io(&bin_path))?;
        link_daemons(dir, bootstrapper)?;
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let manifest_path = dir.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, &manifest_bytes).map_err(io(&manifest_path))?;
        // Measured from the bytes just written: reading the ~80 MB binary back to hash it again
        // would prove nothing more.
        Ok(Self {
            dir: dir.to_owned(),
            measurements: measurements_from_digests(&binary_digest, &sha256(&manifest_bytes)),
            manifest,
        })
    }

    /// Reads an assembled image and recomputes its measurements from the files on disk (the
    /// binary's digest through [`file_sha256_cached`]).
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let binary_digest = file_sha256_cached(&dir.join(BOOTSTRAPPER_FILE), dir)?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = read(&manifest_path)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::Manifest {
                path: manifest_path,
                source,
            })?;
        let found = hex::encode(binary_digest);
        if found != manifest.bootstrapper_sha256 {
            return Err(ImageError::Inconsistent {
                dir: dir.to_owned(),
                expected: manifest.bootstrapper_sha256,
                found,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            measurements: measurements_from_digests(&binary_digest, &sha256(&manifest_bytes)),
            manifest,
        })
    }

    pub fn bootstrapper_path(&self) -> PathBuf {
        self.dir.join(BOOTSTRAPPER_FILE)
    }

    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }
}

fn set_executable(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
        ImageError::Io {
            path: path.to_owned(),
            source,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measurements_follow_the_files() {
        let a = expected_measurements(b"binary-a", b"manifest");
        let b = expected_measurements(b"binary-b", b"manifest");
        assert_ne!(a.0[&PCR_BOOTSTRAPPER], b.0[&PCR_BOOTSTRAPPER]);
        assert_eq!(a.0[&PCR_MANIFEST], b.0[&PCR_MANIFEST]);
        assert_eq!(a.0[&CLUSTER_ID_PCR].expected, [0u8; 32]);
        // Independent recomputation of one extend from zero.
        let mut h = sha2_concat(&[0u8; 32], &sha256(b"binary-a"));
        assert_eq!(a.0[&PCR_BOOTSTRAPPER].expected, h);
        h[0] ^= 1;
        assert_ne!(a.0[&PCR_BOOTSTRAPPER].expected, h);
    }

    fn sha2_concat(a: &[u8], b: &[u8]) -> Digest {
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        sha256(&v)
    }

    #[test]
    fn assemble_then_open_detects_tampering() {
        let dir = std::env::temp_dir().join(format!("image-test-{}", std::process::id()));
        let src = dir.join("src-bin");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&src, b"#!/bin/sh\necho node\n").unwrap();
        let img = LocalImage::assemble(&dir.join("img"), &src, "v0.1.0").unwrap();
        assert_eq!(img.manifest.version, "v0.1.0");
        assert_eq!(LocalImage::open(&img.dir).unwrap(), img);
        std::fs::write(img.bootstrapper_path(), b"tampered").unwrap();
        assert!(matches!(
            LocalImage::open(&img.dir),
            Err(ImageError::Inconsistent { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The cache is really consulted (a poisoned entry is believed while the stamp holds),
    /// a changed file is hashed again, and a file changed just now is not cached at all.
    #[test]
    fn digest_cache_follows_the_file_stamp() {
        let dir = std::env::temp_dir().join(format!("digest-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bin");
        std::fs::write(&file, b"first").unwrap();
        assert_eq!(file_sha256_cached(&file, &dir).unwrap(), sha256(b"first"));
        assert!(
            !dir.join(DIGEST_CACHE_FILE).exists(),
            "a file changed within the racy window is not cached"
        );
        std::thread::sleep(RACY_WINDOW + std::time::Duration::from_millis(100));
        assert_eq!(file_sha256_cached(&file, &dir).unwrap(), sha256(b"first"));
        let cache_path = dir.join(DIGEST_CACHE_FILE);
        let cached = std::fs::read_to_string(&cache_path).unwrap();
        assert!(cached.contains(&hex::encode(sha256(b"first"))), "{cached}");
        std::fs::write(
            &cache_path,
            cached.replace(&hex::encode(sha256(b"first")), &hex::encode([7u8; 32])),
        )
        .unwrap();
        assert_eq!(file_sha256_cached(&file, &dir).unwrap(), [7u8; 32]);
        // Same length, new content: the change time moved on, so the file is hashed again.
        std::fs::write(&file, b"other").unwrap();
        assert_eq!(file_sha256_cached(&file, &dir).unwrap(), sha256(b"other"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
