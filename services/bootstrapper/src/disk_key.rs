//! The state disk's keys: formatted at first boot with a key held only in memory, then keyed
//! with the node's disk key when Init, a join ticket or Recover delivers it.

use std::path::PathBuf;

use crate::context::NodeContext;
use crate::statedisk::{self, KdfSettings, OpenedVolume, StateDiskError};

/// Size of the state disk's backing file on the local platform.
const STATE_DISK_BYTES: u64 = 32 << 20;

/// Why the node could not key or unlock its state disk. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum DiskKeyError {
    #[error(transparent)]
    StateDisk(#[from] StateDiskError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state disk worker: {0}")]
    Worker(String),
    #[error("state volume: {0}")]
    Volume(#[from] crate::vm::VmError),
    #[error(transparent)]
    StateDir(#[from] constellation_common::secret_file::SecretFileError),
}

/// Name of the marker file present while the state disk is keyed with its first-boot key.
const FIRST_BOOT_MARKER: &str = "disk.first-boot";

type FirstBootKey = zeroize::Zeroizing<[u8; 32]>;

/// First-boot keys of the state disks this process formatted, by disk path. They live in memory
/// only (never in a file, where they would outlive their purpose): a node restarted before its
/// disk key arrived formats its still empty disk anew.
static FIRST_BOOT_KEYS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<PathBuf, FirstBootKey>>,
> = std::sync::LazyLock::new(Default::default);

fn first_boot_keys(
) -> std::sync::MutexGuard<'static, std::collections::HashMap<PathBuf, FirstBootKey>> {
    FIRST_BOOT_KEYS.lock().unwrap_or_else(|p| p.into_inner())
}

impl NodeContext {
    /// Present while the state disk still has its first-boot key (no secret in it).
    fn first_boot_marker(&self) -> PathBuf {
        self.state_dir.join(FIRST_BOOT_MARKER)
    }
}

/// Keys the state disk with the node's disk key: on first use replaces the first-boot key and
/// the volume key ([`statedisk::rekey`]: the first-boot key, and anything derived from the old
/// header, then opens nothing); always proves the key by opening the volume. A wrong key is
/// [`StateDiskError::WrongKey`].
pub(crate) async fn adopt_disk_key(
    node: &NodeContext,
    key: &[u8],
) -> Result<OpenedVolume, DiskKeyError> {
    let disk = node.disk_path();
    let marker = node.first_boot_marker();
    let key = zeroize::Zeroizing::new(key.to_vec());
    let (vm, state_dir) = (node.vm.is_some(), node.state_dir.clone());
    tokio::task::spawn_blocking(move || {
        let initial = first_boot_keys().get(&disk).cloned();
        let fresh = initial.is_some();
        if let Some(initial) = initial {
            statedisk::rekey_with(
                &disk,
                initial.as_slice(),
                &key,
                KdfSettings::default(),
                integrity(vm),
            )?;
            first_boot_keys().remove(&disk);
            match std::fs::remove_file(&marker) {
                Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                    return Err(DiskKeyError::Io {
                        path: marker.clone(),
                        source,
                    })
                }
                _ => {}
            }
            tracing::info!("state disk re-keyed with the node's disk key and a new volume key");
        }
        let name = statedisk::mapper_name_of(&disk)?;
        let opened = statedisk::open(&disk, &key, &name)?;
        if vm {
            crate::vm::mount_state_volume(&disk, &opened, fresh, &state_dir)?;
        }
        Ok(opened)
    })
    .await
    .map_err(|e| DiskKeyError::Worker(e.to_string()))?
}

/// Formats the state disk with a first-boot key held only in memory, unless the disk already
/// carries the node's disk key. A disk whose first-boot key died with an earlier process (the
/// marker is still there) was never opened, so it holds nothing: it is formatted anew.
pub(crate) fn ensure_state_disk(node: &NodeContext) -> Result<(), DiskKeyError> {
    constellation_common::secret_file::ensure_private_dir(&node.state_dir)?;
    let path = node.disk_path();
    let marker = node.first_boot_marker();
    if node.vm.is_some() {
        // The marker would not survive a reboot of the guest: the header says it instead.
        if !crate::vm::state_device_needs_format(&path)? {
            return Ok(());
        }
    } else if path.exists() && !marker.exists() {
        return Ok(());
    }
    if first_boot_keys().contains_key(&path) {
        return Ok(());
    }
    // The marker goes first: a crash before the format completes leaves a disk we redo.
    constellation_common::secret_file::write_private_atomic(&marker, b"")?;
    if node.vm.is_some() {
        // A block device is not removed; a stale header and keyslots are erased.
        crate::vm::clear_state_device(&path)?;
    } else {
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                return Err(DiskKeyError::Io { path, source })
            }
            _ => {}
        }
    }
    let first_boot = FirstBootKey::new(rand::random());
    let uuid = statedisk::format_with(
        &path,
        STATE_DISK_BYTES,
        first_boot.as_slice(),
        KdfSettings::default(),
        integrity(node.vm.is_some()),
    )?;
    first_boot_keys().insert(path, first_boot);
    tracing::info!(%uuid, "formatted the state disk with a first-boot key (memory only)");
    Ok(())
}

/// A VM's state volume carries integrity tags (dm-integrity, HMAC-SHA256); the local platform's
/// file-backed volume cannot (the host has no device-mapper to format or open one) and is never
/// opened for data anyway.
fn integrity(vm: bool) -> statedisk::Integrity {
    if vm {
        statedisk::Integrity::HmacSha256
    } else {
        statedisk::Integrity::None
    }
}
