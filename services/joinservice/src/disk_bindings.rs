//! Disk bindings: which node a state disk belongs to.
//!
//! The join service derives a disk key from the disk UUID a joiner names, so without a binding
//! any attested node could fetch the key of any disk. Each disk UUID is bound to the first node
//! that claims it (its attested name and attestation-key fingerprint, never a request field);
//! the join service refuses everyone else. The first control plane binds its own disk at Init.
//!
//! [`DiskBindings`] is compare-and-set (claim if absent, else report the owner), so two control
//! planes racing to bind one disk agree on one owner. A node binds at most
//! [`MAX_DISKS_PER_NODE`] disks (it has one state disk, formatted anew with a new UUID only if it
//! restarts before its disk key arrives), so a compromised node cannot grow the store by claiming
//! made-up UUIDs.
//! Two implementations: [`EtcdDiskBindings`] (the control planes' etcd cluster: the same
//! compare-and-set as one etcd transaction, whatever host each control plane runs on), and
//! [`FileDiskBindings`], one file per disk and one per node in a directory every
//! control plane of one host shares (the cluster folder next to the platform's metadata), kept
//! for nodes that run as host processes without etcd.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Disks one node may bind: its state disk, plus a few for restarts between a claim and the
/// re-key (the node then formats its never-opened disk anew, with a new UUID).
pub const MAX_DISKS_PER_NODE: usize = 4;

/// Largest binding file read back; a real one is ~200 bytes.
const MAX_RECORD_BYTES: u64 = 4096;

/// A disk UUID in its canonical form: 8-4-4-4-12 lowercase hex (safe as a file name).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskUuid(String);

/// A disk UUID that is not of the 8-4-4-4-12 hex form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("disk UUID {found:?} is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (hex)")]
pub struct BadDiskUuid {
    pub found: String,
}

impl DiskUuid {
    /// Checks the 8-4-4-4-12 hex form and lowercases it, so neither the disk key nor the binding
    /// depends on how the node spelled its UUID.
    pub fn parse(uuid: &str) -> Result<Self, BadDiskUuid> {
        let groups: Vec<&str> = uuid.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        let well_formed = lengths == [8, 4, 4, 4, 12]
            && groups
                .iter()
                .all(|g| g.bytes().all(|b| b.is_ascii_hexdigit()));
        if !well_formed {
            return Err(BadDiskUuid {
                found: uuid.to_owned(),
            });
        }
        Ok(Self(uuid.to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DiskUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The attested identity a disk is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOwner {
    /// The node's name in the platform's metadata (looked up from its attested key).
    pub node_name: String,
    /// SHA-256 of the node's attestation key.
    pub ak_fingerprint: [u8; 32],
}

impl fmt::Display for DiskOwner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {:?} (AK {})",
            self.node_name,
            hex::encode(self.ak_fingerprint)
        )
    }
}

/// Why the binding store could not answer. Fails closed: no binding answer, no key.
#[derive(Debug, thiserror::Error)]
pub enum DiskBindingError {
    #[error("disk binding store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk binding {path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("disk binding store task failed: {0}")]
    Task(String),
    /// The replicated store (etcd) did not answer or refused.
    #[error("disk binding store: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The disk is bound to this node after the call: the claimant (now or from before) or
    /// another node.
    BoundTo(DiskOwner),
    /// The claimed disk is unbound but the claimant holds [`MAX_DISKS_PER_NODE`] other disks.
    ClaimantAtLimit { held: Vec<DiskUuid> },
}

/// Where disk bindings live. Shared by every control plane of a cluster.
#[tonic::async_trait]
pub trait DiskBindings: Send + Sync {
    /// Compare-and-set: binds `disk` to `claimant` unless some node holds it already or the
    /// claimant holds [`MAX_DISKS_PER_NODE`] disks. Of concurrent claims of one disk, from any
    /// control plane, exactly one wins and all see the same owner; a node's concurrent claims of
    /// different disks bind at most [`MAX_DISKS_PER_NODE`].
    async fn claim(&self, disk: &DiskUuid, claimant: &DiskOwner)
        -> Result<Claim, DiskBindingError>;
}

/// One file per disk, `<dir>/<uuid>.yaml`, and one per disk a node holds,
/// `<dir>/node-<AK SHA-256>-<slot>.yaml` (0600, in a 0700 directory). A claim takes a free slot of
/// the node (or the one naming this disk, on a retry), then publishes the disk's record.
///
/// Each record is written to a temporary file created with `O_EXCL` (a file or symlink planted at
/// its path makes the write fail) and published with `link(2)`, which, unlike `rename(2)`, fails
/// when the target exists: the publish is the compare-and-set, atomic across processes on the
/// host, and a reader never sees a partial record.
#[derive(Debug, Clone)]
pub struct FileDiskBindings {
    dir: PathBuf,
}

/// The on-disk record (the same shape for a disk's and a node's file).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    disk_uuid: String,
    node_name: String,
    /// Hex SHA-256 of the node's attestation key.
    ak_sha256: String,
}

impl Record {
    fn new(disk: &DiskUuid, owner: &DiskOwner) -> Self {
        Self {
            disk_uuid: disk.to_string(),
            node_name: owner.node_name.clone(),
            ak_sha256: hex::encode(owner.ak_fingerprint),
        }
    }
}

impl FileDiskBindings {
    /// Opens (creating it 0700 if missing) the binding directory `dir`; a directory others may
    /// enter is tightened to 0700.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, DiskBindingError> {
        let dir = dir.into();
        let io = |source| DiskBindingError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io)?;
        let mode = std::fs::metadata(&dir).map_err(io)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The owner recorded for `disk`, if any.
    pub fn owner(&self, disk: &DiskUuid) -> Result<Option<DiskOwner>, DiskBindingError> {
        let path = self.disk_path(disk);
        match read_record(&path)? {
            None => Ok(None),
            Some((recorded, owner)) if recorded == *disk => Ok(Some(owner)),
            Some((recorded, _)) => Err(DiskBindingError::Malformed {
                path,
                reason: format!("records disk {recorded}, expected {disk}"),
            }),
        }
    }

    fn disk_path(&self, disk: &DiskUuid) -> PathBuf {
        self.dir.join(format!("{disk}.yaml"))
    }

    fn slot_path(&self, node: &DiskOwner, slot: usize) -> PathBuf {
        self.dir.join(format!(
            "node-{}-{slot}.yaml",
            hex::encode(node.ak_fingerprint)
        ))
    }

    /// Takes a slot of `claimant` for `disk`: `Ok(Ok(published))`, or the disks of its full
    /// slots.
    fn take_slot(
        &self,
        disk: &DiskUuid,
        claimant: &DiskOwner,
        record: &Record,
    ) -> Result<Result<bool, Vec<DiskUuid>>, DiskBindingError> {
        let mut held = Vec::new();
        for slot in 0..MAX_DISKS_PER_NODE {
            let path = self.slot_path(claimant, slot);
            if self.publish(&path, record)? {
                return Ok(Ok(true));
            }
            let (slot_disk, _) = read_record(&path)?.ok_or_else(|| vanished(&path))?;
            if slot_disk == *disk {
                return Ok(Ok(false));
            }
            held.push(slot_disk);
        }
        Ok(Err(held))
    }

    fn claim_blocking(
        &self,
        disk: &DiskUuid,
        claimant: &DiskOwner,
    ) -> Result<Claim, DiskBindingError> {
        if let Some(owner) = self.owner(disk)? {
            return Ok(Claim::BoundTo(owner));
        }
        let record = Record::new(disk, claimant);
        // The node's slot first: a node holding its limit of disks binds no more.
        let node_published = match self.take_slot(disk, claimant, &record)? {
            Ok(published) => published,
            Err(held) => return Ok(Claim::ClaimantAtLimit { held }),
        };
        let disk_path = self.disk_path(disk);
        let disk_published = self.publish(&disk_path, &record)?;
        if node_published || disk_published {
            // One directory sync makes both new names durable.
            sync_dir(&self.dir)?;
        }
        if disk_published {
            tracing::info!(disk = %disk, owner = %claimant, "disk bound to node");
            return Ok(Claim::BoundTo(claimant.clone()));
        }
        // Another claim won the race: its record is complete (linked after it was written).
        self.owner(disk)?
            .map(Claim::BoundTo)
            .ok_or_else(|| vanished(&disk_path))
    }

    /// Publishes `record` at `path` unless a file is there; true if this call published it (the
    /// caller syncs the directory).
    fn publish(&self, path: &Path, record: &Record) -> Result<bool, DiskBindingError> {
        let bytes = serde_yaml::to_string(record).map_err(|e| DiskBindingError::Malformed {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let tmp = self
            .dir
            .join(format!(".claim.{:016x}.tmp", rand::random::<u64>()));
        write_exclusive(&tmp, bytes.as_bytes())?;
        let published = std::fs::hard_link(&tmp, path);
        if let Err(e) = std::fs::remove_file(&tmp) {
            tracing::warn!(path = %tmp.display(), error = %e, "leftover disk-binding temporary");
        }
        match published {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(DiskBindingError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }
}

fn vanished(path: &Path) -> DiskBindingError {
    DiskBindingError::Malformed {
        path: path.to_owned(),
        reason: "vanished right after a concurrent claim".into(),
    }
}

#[tonic::async_trait]
impl DiskBindings for FileDiskBindings {
    async fn claim(
        &self,
        disk: &DiskUuid,
        claimant: &DiskOwner,
    ) -> Result<Claim, DiskBindingError> {
        let (store, disk, claimant) = (self.clone(), disk.clone(), claimant.clone());
        tokio::task::spawn_blocking(move || store.claim_blocking(&disk, &claimant))
            .await
            .map_err(|e| DiskBindingError::Task(e.to_string()))?
    }
}

/// [`DiskBindings`] in the control planes' etcd cluster ([`constellation_store::Store::claim_disk`]:
/// the disk's key and a free slot of the node created in one transaction, each only if absent).
/// Fails closed: a store without quorum answers [`DiskBindingError::Store`] (the join service
/// refuses with `Unavailable`, the joiner retries), never a guess.
#[derive(Debug, Clone)]
pub struct EtcdDiskBindings {
    store: constellation_store::Store,
}

impl EtcdDiskBindings {
    pub fn new(store: constellation_store::Store) -> Self {
        Self { store }
    }

    /// The owner recorded for `disk`, if any.
    pub async fn owner(&self, disk: &DiskUuid) -> Result<Option<DiskOwner>, DiskBindingError> {
        self.store
            .disk_binding(disk.as_str())
            .await
            .map_err(store_error)?
            .map(|record| owner_of(disk, &record))
            .transpose()
    }
}

fn store_error(e: constellation_store::StoreError) -> DiskBindingError {
    DiskBindingError::Store(Box::new(e))
}

/// The typed owner in a stored record (the store checked that it names `disk`).
fn owner_of(
    disk: &DiskUuid,
    record: &constellation_store::keys::DiskBindingRecord,
) -> Result<DiskOwner, DiskBindingError> {
    let ak_fingerprint = hex::decode(&record.ak_sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| DiskBindingError::Malformed {
            path: PathBuf::from(format!("etcd:{disk}")),
            reason: format!("ak_sha256 {:?} is not 32 hex bytes", record.ak_sha256),
        })?;
    Ok(DiskOwner {
        node_name: record.node_name.clone(),
        ak_fingerprint,
    })
}

#[tonic::async_trait]
impl DiskBindings for EtcdDiskBindings {
    async fn claim(
        &self,
        disk: &DiskUuid,
        claimant: &DiskOwner,
    ) -> Result<Claim, DiskBindingError> {
        let record = constellation_store::keys::DiskBindingRecord {
            disk_uuid: disk.to_string(),
            node_name: claimant.node_name.clone(),
            ak_sha256: hex::encode(claimant.ak_fingerprint),
        };
        let claim = self
            .store
            .claim_disk(&record, &claimant.ak_fingerprint, MAX_DISKS_PER_NODE)
            .await
            .map_err(store_error)?;
        match claim {
            constellation_store::DiskClaim::BoundTo(bound) => {
                owner_of(disk, &bound).map(Claim::BoundTo)
            }
            constellation_store::DiskClaim::ClaimantAtLimit { held } => {
                let held = held
                    .iter()
                    .map(|uuid| {
                        DiskUuid::parse(uuid).map_err(|e| DiskBindingError::Malformed {
                            path: PathBuf::from(format!("etcd:{disk}")),
                            reason: e.to_string(),
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Ok(Claim::ClaimantAtLimit { held })
            }
        }
    }
}

/// Creates `path` (`O_CREAT|O_EXCL`, 0600), writes `bytes` and syncs it.
fn write_exclusive(path: &Path, bytes: &[u8]) -> Result<(), DiskBindingError> {
    let io = |source| DiskBindingError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), DiskBindingError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| DiskBindingError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// A record's disk and owner; `None` if there is no file at `path`.
fn read_record(path: &Path) -> Result<Option<(DiskUuid, DiskOwner)>, DiskBindingError> {
    let malformed = |reason: String| DiskBindingError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DiskBindingError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut text = String::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|source| DiskBindingError::Io {
            path: path.to_owned(),
            source,
        })?;
    if text.len() as u64 > MAX_RECORD_BYTES {
        return Err(malformed(format!("larger than {MAX_RECORD_BYTES} bytes")));
    }
    let record: Record = serde_yaml::from_str(&text).map_err(|e| malformed(e.to_string()))?;
    let disk = DiskUuid::parse(&record.disk_uuid).map_err(|e| malformed(e.to_string()))?;
    let ak_fingerprint = hex::decode(&record.ak_sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            malformed(format!(
                "ak_sha256 {:?} is not 32 hex bytes",
                record.ak_sha256
            ))
        })?;
    Ok(Some((
        disk,
        DiskOwner {
            node_name: record.node_name,
            ak_fingerprint,
        },
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK: &str = "4f7c3b2a-1d9e-4c8b-a6f5-0e1d2c3b4a59";

    fn owner(name: &str, ak: u8) -> DiskOwner {
        DiskOwner {
            node_name: name.into(),
            ak_fingerprint: [ak; 32],
        }
    }

    #[test]
    fn uuid_form() {
        assert_eq!(
            DiskUuid::parse("0F1E2D3C-4b5a-6978-8796-a5b4c3d2e1f0")
                .unwrap()
                .as_str(),
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
        );
        for bad in [
            "",
            "0f1e2d3c4b5a69788796a5b4c3d2e1f0",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f",
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
            "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}",
            "../../etc/passwd",
        ] {
            assert_eq!(DiskUuid::parse(bad), Err(BadDiskUuid { found: bad.into() }));
        }
    }

    #[tokio::test]
    async fn first_claim_wins_and_the_record_is_private() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bindings");
        let store = FileDiskBindings::open(&dir).unwrap();
        let disk = DiskUuid::parse(DISK).unwrap();
        assert_eq!(store.owner(&disk).unwrap(), None);
        for claimant in [owner("a", 1), owner("b", 2), owner("a", 1)] {
            assert_eq!(
                store.claim(&disk, &claimant).await.unwrap(),
                Claim::BoundTo(owner("a", 1))
            );
        }
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let node_record = dir.join(format!("node-{}-0.yaml", hex::encode([1u8; 32])));
        for record in [dir.join(format!("{DISK}.yaml")), node_record] {
            assert_eq!(mode(&record), 0o600, "{}", record.display());
        }
        // The disk's and the node's record, no temporary left behind, nothing for the loser.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_node_binds_at_most_its_limit_of_disks() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileDiskBindings::open(tmp.path()).unwrap();
        let disk = |i: usize| DiskUuid::parse(&format!("00000000-0000-0000-0000-{i:012}")).unwrap();
        for i in 0..MAX_DISKS_PER_NODE {
            assert_eq!(
                store.claim(&disk(i), &owner("a", 1)).await.unwrap(),
                Claim::BoundTo(owner("a", 1))
            );
        }
        let held: Vec<DiskUuid> = (0..MAX_DISKS_PER_NODE).map(disk).collect();
        for i in MAX_DISKS_PER_NODE..MAX_DISKS_PER_NODE + 10 {
            assert_eq!(
                store.claim(&disk(i), &owner("a", 1)).await.unwrap(),
                Claim::ClaimantAtLimit { held: held.clone() }
            );
            assert_eq!(store.owner(&disk(i)).unwrap(), None);
        }
        // Its bound disks still answer, and other nodes still bind.
        assert_eq!(
            store.claim(&disk(0), &owner("a", 1)).await.unwrap(),
            Claim::BoundTo(owner("a", 1))
        );
        store.claim(&disk(99), &owner("b", 2)).await.unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            2 * MAX_DISKS_PER_NODE + 2
        );
    }

    #[tokio::test]
    async fn a_corrupt_record_fails_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileDiskBindings::open(tmp.path()).unwrap();
        let disk = DiskUuid::parse(DISK).unwrap();
        std::fs::write(tmp.path().join(format!("{DISK}.yaml")), "node_name: [").unwrap();
        assert!(matches!(
            store.claim(&disk, &owner("a", 1)).await,
            Err(DiskBindingError::Malformed { .. })
        ));
        // A record for another disk copied over this one's name is refused too.
        let other = DiskUuid::parse("00000000-0000-0000-0000-000000000000").unwrap();
        store.claim(&other, &owner("c", 3)).await.unwrap();
        std::fs::copy(
            tmp.path().join(format!("{other}.yaml")),
            tmp.path().join(format!("{DISK}.yaml")),
        )
        .unwrap();
        assert!(matches!(
            store.claim(&disk, &owner("b", 2)).await,
            Err(DiskBindingError::Malformed { .. })
        ));
    }

    #[test]
    fn a_loose_directory_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        FileDiskBindings::open(tmp.path()).unwrap();
        let mode = std::fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
