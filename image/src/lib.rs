//! Node images and their expected measurements, computed offline.
//!
//! The local platform emulates measured boot honestly: before the bootstrapper runs, the
//! launcher extends [`PCR_BOOTSTRAPPER`] with SHA-256 of the bootstrapper binary (as firmware
//! measures the boot loader and kernel) and [`PCR_MANIFEST`] with SHA-256 of the image manifest
//! (as the boot loader measures the command line/config). [`expected_measurements`] performs
//! the same computation over the same files, so a node started from any other binary fails
//! attestation. [`CLUSTER_ID_PCR`] must still be zero when a node is initialized or joins.

use std::path::{Path, PathBuf};

use constellation_attestation::measurements::{
    pcr_extend, sha256, Digest, Measurement, Measurements, CLUSTER_ID_PCR,
};
use serde::{Deserialize, Serialize};

/// PCR extended with the bootstrapper binary's digest.
pub const PCR_BOOTSTRAPPER: u32 = 4;
/// PCR extended with the image manifest's digest.
pub const PCR_MANIFEST: u32 = 9;

/// File names inside a local image folder.
pub const BOOTSTRAPPER_FILE: &str = "constellation-bootstrapper";
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
    let mut m = Measurements::default();
    for (index, event) in boot_events(bootstrapper, manifest) {
        m.0.insert(index, Measurement::enforce(pcr_extend(&[0u8; 32], &event)));
    }
    m.0.insert(CLUSTER_ID_PCR, Measurement::enforce([0u8; 32]));
    m
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
        let manifest = ImageManifest {
            version: version.to_owned(),
            platform: "local".to_owned(),
            bootstrapper_sha256: hex::encode(sha256(&binary)),
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
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        let manifest_path = dir.join(MANIFEST_FILE);
        std::fs::write(&manifest_path, &manifest_bytes).map_err(io(&manifest_path))?;
        Self::open(dir)
    }

    /// Reads an assembled image and recomputes its measurements from the files on disk.
    pub fn open(dir: &Path) -> Result<Self, ImageError> {
        let binary = read(&dir.join(BOOTSTRAPPER_FILE))?;
        let manifest_path = dir.join(MANIFEST_FILE);
        let manifest_bytes = read(&manifest_path)?;
        let manifest: ImageManifest =
            serde_json::from_slice(&manifest_bytes).map_err(|source| ImageError::Manifest {
                path: manifest_path,
                source,
            })?;
        let found = hex::encode(sha256(&binary));
        if found != manifest.bootstrapper_sha256 {
            return Err(ImageError::Inconsistent {
                dir: dir.to_owned(),
                expected: manifest.bootstrapper_sha256,
                found,
            });
        }
        Ok(Self {
            dir: dir.to_owned(),
            measurements: expected_measurements(&binary, &manifest_bytes),
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
}
