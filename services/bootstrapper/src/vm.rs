//! The bootstrapper as a QEMU guest's node daemon (`--platform qemu`): the TPM is the guest's
//! vTPM (`device:/dev/tpmrm0`), the metadata comes from the platform's endpoint on the guest's
//! user-mode network ([`TcpMetadata`](constellation_common::metadata::TcpMetadata)), and the
//! state disk is a virtio block device that, once the node has its disk key, is opened with
//! dm-crypt, gets an ext4 file system on first use and is mounted at the node's state folder,
//! so every secret and every state file the node writes afterwards lives on the encrypted
//! volume. Before that the state folder is on the guest's tmpfs and holds nothing secret.
//!
//! The node reports its status ([`NodeStatus`]) on the serial console, one JSON line per change
//! after [`CONSOLE_STATUS_PREFIX`]: the host cannot read the guest's files.
//!
//! Choices and limits (tested in `provider/platform/tests/qemu_cluster.rs` and
//! `attacks_qemu_disk.rs`):
//! - Whether the disk still has its first-boot key is read from the LUKS2 header's label
//!   ([`statedisk::FIRST_BOOT_LABEL`]): the guest has no other storage that survives a reboot.
//! - dm-crypt (aes-xts-plain64) with dm-integrity (HMAC-SHA256 per 4 KiB sector,
//!   [`statedisk::Integrity::HmacSha256`]): by design a changed sector fails to read. The tags are
//!   written once per volume key, after the re-key (the first-boot volume is never opened, so
//!   it is not written), before `mkfs`.
//! - A control plane's etcd member (the control planes' shared join state: disk bindings,
//!   policy) keeps its data directory on the state volume, so it starts only once the volume is
//!   mounted (Init, a join, Recover).
//! - The node's phase file is on the volume, closed at boot: a control-plane VM whose volume
//!   is keyed with a disk key was initialized or joined, so it serves Recover, which opens and
//!   mounts the volume with the derived disk key and only then reads the phase and record; a
//!   rebooted worker rejoins and mounts its existing volume.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use constellation_common::metadata::CONSOLE_STATUS_PREFIX;
use constellation_common::node_status::{NodeStatus, STATUS_FILE};

use crate::statedisk::{self, OpenedVolume, StateDiskError, VolumeKind};

/// Defaults of a node in a QEMU guest.
pub const GUEST_TCTI: &str = "device:/dev/tpmrm0";
pub const GUEST_STATE_DEVICE: &str = "/dev/vda";
pub const GUEST_NODE_DIR: &str = "/run/constellation";

/// The file system tool the node image ships.
const MKFS: &str = "mkfs.ext4";
/// How often the console reporter looks for a new status.
const STATUS_POLL: Duration = Duration::from_millis(200);

/// What differs for a node running in a QEMU guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSettings {
    /// The platform's metadata endpoint on the guest network.
    pub metadata_endpoint: SocketAddr,
    /// The state disk's block device.
    pub state_device: PathBuf,
}

/// Why the state volume could not be made or mounted. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("state disk: {0}")]
    StateDisk(#[from] StateDiskError),
    #[error("the state volume {device} was not activated through device-mapper (this kernel has none), so it cannot be mounted")]
    NotActivated { device: PathBuf },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Whether the state device must be (re)formatted: it is blank, or still has a first-boot key
/// that died with an earlier boot (the volume never held data). A keyed volume is kept: only
/// the cluster's disk key opens it.
pub fn state_device_needs_format(device: &Path) -> Result<bool, StateDiskError> {
    Ok(statedisk::volume_kind(device)? != VolumeKind::Keyed)
}

/// Erases a stale first-boot header so the device can be formatted; a blank device is left
/// as it is.
pub fn clear_state_device(device: &Path) -> Result<(), StateDiskError> {
    if statedisk::volume_kind(device)? == VolumeKind::FirstBoot {
        statedisk::wipe_header(device)?;
        tracing::info!(device = %device.display(), "erased a first-boot header whose key died with an earlier boot");
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<(), VmError> {
    let what = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| VmError::Io {
        path: PathBuf::from(cmd.get_program()),
        source,
    })?;
    if out.status.success() {
        return Ok(());
    }
    Err(VmError::Command {
        command: what,
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    })
}

/// Whether `dir` is a mount point (listed in the kernel's mount table).
fn mounted(dir: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let dir = dir.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(dir.as_ref()))
}

/// Mounts the opened state volume at `state_dir`; `fresh` (the volume was just re-keyed with a
/// new volume key, so it reads as noise) makes the file system first. A volume that is not
/// fresh is never formatted: a mount failure then is an error, not a reason to erase it.
pub fn mount_state_volume(
    device: &Path,
    opened: &OpenedVolume,
    fresh: bool,
    state_dir: &Path,
) -> Result<(), VmError> {
    let OpenedVolume::Activated { mapper_path, .. } = opened else {
        return Err(VmError::NotActivated {
            device: state_dir.to_owned(),
        });
    };
    if mounted(state_dir) {
        return Ok(());
    }
    if fresh {
        // A new volume key: no sector has a valid integrity tag yet.
        statedisk::initialize_tags(device, mapper_path)?;
        // Lazy inode-table and journal init: the volume's blocks are written when used, not
        // now (under TCG every written block costs).
        run(Command::new(MKFS)
            .args(["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"])
            .arg(mapper_path))?;
        tracing::info!(volume = %mapper_path.display(), "made an ext4 file system on the state volume");
    }
    std::fs::create_dir_all(state_dir).map_err(|source| VmError::Io {
        path: state_dir.to_owned(),
        source,
    })?;
    run(Command::new("mount")
        .args(["-t", "ext4", "-o", "nosuid,nodev,noexec"])
        .arg(mapper_path)
        .arg(state_dir))?;
    constellation_common::secret_file::ensure_private_dir(state_dir).map_err(|e| VmError::Io {
        path: state_dir.to_owned(),
        source: e.into(),
    })?;
    // The status on the volume is an earlier boot's (the pid cannot tell: a guest's boot is
    // deterministic); this boot reports its own next.
    let stale = state_dir.join(STATUS_FILE);
    match std::fs::remove_file(&stale) {
        Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
            return Err(VmError::Io {
                path: stale,
                source,
            })
        }
        _ => {}
    }
    tracing::info!(volume = %mapper_path.display(), dir = %state_dir.display(), "state volume mounted");
    Ok(())
}

/// Prints every new status the node writes to `state_dir` on the console (stdout, which the
/// image's init connects to the serial port), as one line: [`CONSOLE_STATUS_PREFIX`] + JSON.
pub fn report_status_on_console(state_dir: PathBuf) {
    std::thread::spawn(move || {
        let mut last: Option<NodeStatus> = None;
        loop {
            if let Ok(Some(status)) = NodeStatus::read(&state_dir) {
                if last.as_ref() != Some(&status) {
                    if let Ok(json) = serde_json::to_string(&status) {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        let _ = writeln!(out, "{CONSOLE_STATUS_PREFIX}{json}");
                        let _ = out.flush();
                    }
                    last = Some(status);
                }
            }
            std::thread::sleep(STATUS_POLL);
        }
    });
}
