//! The node's state disk: a LUKS2 volume (aes-xts-plain64, 512-bit volume key) keyed by the
//! node's disk key, which the node gets from the key service under the disk's LUKS UUID.
//!
//! Where the kernel has device-mapper ([`device_mapper_available`]), [`open`] activates the volume as
//! `/dev/mapper/NAME`. Where it has none (this dev machine, CI containers), [`open`] only proves the
//! key opens a keyslot and says so in the log; everything else (format, keyslots, UUID) works on a
//! plain file either way.
//!
//! libcryptsetup-rs (without its `mutex` feature) panics when called from more than one thread, so
//! every call runs on one dedicated worker thread. The functions here block until the worker is
//! done; async callers should use `tokio::task::spawn_blocking` (argon2id takes seconds).

use std::fs;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::LazyLock;

use libcryptsetup_rs::consts::flags::{CryptActivate, CryptPbkdf, CryptVolumeKey, CryptWipe};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptWipePattern, EncryptionFormat};
use libcryptsetup_rs::{
    CryptDevice, CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptPbkdfType, Either,
    LibcryptErr,
};
use uuid::Uuid;
use zeroize::Zeroizing;

/// Cipher and mode of the state disk.
pub const CIPHER: (&str, &str) = ("aes", "xts-plain64");
/// Volume key length in bytes (512 bits: two AES-256 keys for XTS).
pub const VOLUME_KEY_BYTES: usize = 64;
/// Sector size of a volume with integrity protection: one HMAC tag per 4 KiB.
const INTEGRITY_SECTOR_BYTES: u32 = 4096;

/// Whether the volume's sectors carry authentication tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    /// Confidentiality only (aes-xts-plain64): a changed sector reads as noise, unnoticed.
    None,
    /// dm-integrity with an HMAC-SHA256 tag per 4 KiB sector, keyed by 256 more bits of the
    /// volume key (Constellation's choice, aes-xts + hmac-sha256): a sector changed, or copied
    /// from elsewhere on the disk, fails to read instead of reading as noise. A sector never
    /// written has no valid tag, so a new volume is written once ([`initialize_tags`]).
    HmacSha256,
}

impl Integrity {
    fn volume_key_bytes(self) -> usize {
        match self {
            Self::None => VOLUME_KEY_BYTES,
            Self::HmacSha256 => VOLUME_KEY_BYTES + 32,
        }
    }

    fn luks2_params(self) -> Option<CryptParamsLuks2> {
        match self {
            Self::None => None,
            Self::HmacSha256 => Some(CryptParamsLuks2 {
                pbkdf: None,
                integrity: Some("hmac(sha256)".into()),
                integrity_params: None,
                data_alignment: 0,
                data_device: None,
                sector_size: INTEGRITY_SECTOR_BYTES,
                label: None,
                subsystem: None,
            }),
        }
    }
}

/// Device-mapper control node.
pub const DEVICE_MAPPER_CONTROL: &str = "/dev/mapper/control";
/// The kernel's list of misc devices; it names "device-mapper" when dm is built in or loaded.
const PROC_MISC: &str = "/proc/misc";
/// errno EPERM on Linux: libcryptsetup's answer when no keyslot accepts the passphrase.
const EPERM: i32 = 1;

/// How keyslot passphrases (the disk key) are stretched.
///
/// Every passphrase here is a 32-byte machine-generated key (an HKDF output or a random
/// first-boot key), never something a person chose, so key stretching adds no security: the
/// KDF only has to be LUKS2's argon2id. The default therefore uses fixed argon2id costs instead
/// of libcryptsetup's benchmark, which spends ~2 s per keyslot operation and up to 1 GiB of
/// memory per node and makes boot time depend on how busy the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KdfSettings {
    /// argon2id with fixed costs, no benchmark.
    Argon2id {
        iterations: u32,
        memory_kib: u32,
        parallel_threads: u32,
    },
    /// PBKDF2-SHA256 with a fixed iteration count and no benchmark. Only for tests.
    Pbkdf2 { iterations: u32 },
}

impl Default for KdfSettings {
    /// argon2id, 4 passes over 16 MiB in 2 lanes: more work than OWASP's minimum for human
    /// passwords (19 MiB, 2 passes), for keys that are 256-bit random anyway; about 60 ms per
    /// keyslot operation on two cores (a second lane halves a single unlock's wall time).
    fn default() -> Self {
        Self::Argon2id {
            iterations: 4,
            memory_kib: 16 * 1024,
            parallel_threads: 2,
        }
    }
}

impl KdfSettings {
    /// PBKDF2 with 1000 iterations: formatting takes milliseconds. Only for tests that call
    /// this module directly; the node always uses [`KdfSettings::default`] (no switch selects
    /// this, not even in test clusters: the default costs ~0.1 s per keyslot operation).
    pub fn fast_insecure_for_tests() -> Self {
        Self::Pbkdf2 { iterations: 1000 }
    }

    fn pbkdf_type(self) -> CryptPbkdfType {
        match self {
            Self::Argon2id {
                iterations,
                memory_kib,
                parallel_threads,
            } => CryptPbkdfType {
                type_: CryptKdf::Argon2Id,
                hash: Some("sha256".into()),
                time_ms: 0,
                iterations,
                max_memory_kb: memory_kib,
                parallel_threads,
                flags: CryptPbkdf::NO_BENCHMARK,
            },
            Self::Pbkdf2 { iterations } => CryptPbkdfType {
                type_: CryptKdf::Pbkdf2,
                hash: Some("sha256".into()),
                time_ms: 0,
                iterations,
                max_memory_kb: 0,
                parallel_threads: 0,
                flags: CryptPbkdf::NO_BENCHMARK,
            },
        }
    }
}

/// Why a state-disk operation failed. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum StateDiskError {
    #[error("wrong disk key for {path}: no keyslot opens with it")]
    WrongKey { path: PathBuf },
    #[error("the disk key is empty")]
    EmptyKey,
    #[error("re-keying {path}: the new key is the old key")]
    SameKey { path: PathBuf },
    #[error("{path} is not a LUKS2 volume: {source}")]
    NotLuks2 {
        path: PathBuf,
        #[source]
        source: LibcryptErr,
    },
    #[error("{path} is already a LUKS2 volume; refusing to format it again")]
    AlreadyFormatted { path: PathBuf },
    #[error("device-mapper name {name:?} is invalid: {reason}")]
    BadMapperName { name: String, reason: &'static str },
    #[error("{operation} on {path} failed: {source}")]
    Cryptsetup {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: LibcryptErr,
    },
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("libcryptsetup worker: {0}")]
    Worker(&'static str),
}

/// What [`open`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenedVolume {
    /// Activated through device-mapper; the plaintext volume is at `mapper_path`.
    Activated { keyslot: u32, mapper_path: PathBuf },
    /// No device-mapper here: the key was verified against `keyslot`, nothing was activated.
    VerifiedOnly { keyslot: u32 },
}

impl OpenedVolume {
    pub fn keyslot(&self) -> u32 {
        match self {
            Self::Activated { keyslot, .. } | Self::VerifiedOnly { keyslot } => *keyslot,
        }
    }
}

/// Formats `path` as LUKS2 (aes-xts-plain64, 512-bit random volume key) with `key` in keyslot 0
/// and returns the new volume's UUID. A missing or empty regular file is created/grown to
/// `size_bytes`. Refuses a device that is already LUKS2.
pub fn format(
    path: &Path,
    size_bytes: u64,
    key: &[u8],
    kdf: KdfSettings,
) -> Result<Uuid, StateDiskError> {
    format_with(path, size_bytes, key, kdf, Integrity::None)
}

/// [`format`] with the given sector [`Integrity`] (with integrity: on a device-mapper host).
pub fn format_with(
    path: &Path,
    size_bytes: u64,
    key: &[u8],
    kdf: KdfSettings,
    integrity: Integrity,
) -> Result<Uuid, StateDiskError> {
    let key = owned_key(key)?;
    prepare_backing_file(path, size_bytes)?;
    let path = path.to_path_buf();
    on_worker(move || {
        if load_luks2(&path).is_ok() {
            return Err(StateDiskError::AlreadyFormatted { path });
        }
        let mut device = write_header(&path, None, kdf, integrity)?;
        device
            .keyslot_handle()
            .add_by_key(None, None, &key, CryptVolumeKey::empty())
            .map_err(cryptsetup_error("adding keyslot", &path))?;
        // The header itself says the volume still has its first-boot key (a VM has no other
        // place that survives a reboot); [`rekey`]'s fresh header carries no label.
        device
            .context_handle()
            .set_label(Some(FIRST_BOOT_LABEL), None)
            .map_err(cryptsetup_error("setting the first-boot label", &path))?;
        let uuid = device
            .status_handle()
            .get_uuid()
            .map_err(cryptsetup_error("reading UUID", &path))?;
        tracing::info!(path = %path.display(), %uuid, ?kdf, "formatted LUKS2 state disk");
        Ok(uuid)
    })?
}

/// A LUKS2 header with a new random volume key (and, with integrity, a dm-integrity
/// superblock), no keyslot yet.
fn write_header(
    path: &Path,
    uuid: Option<Uuid>,
    kdf: KdfSettings,
    integrity: Integrity,
) -> Result<CryptDevice, StateDiskError> {
    let mut device = init(path)?;
    device
        .settings_handle()
        .set_pbkdf_type(&kdf.pbkdf_type())
        .map_err(cryptsetup_error("setting PBKDF", path))?;
    let key = Either::Right(integrity.volume_key_bytes());
    let formatted = match integrity.luks2_params() {
        None => {
            device
                .context_handle()
                .format::<()>(EncryptionFormat::Luks2, CIPHER, uuid, key, None)
        }
        Some(params) => {
            let mut params: CryptParamsLuks2Ref<'_> = (&params)
                .try_into()
                .map_err(cryptsetup_error("integrity parameters", path))?;
            device.context_handle().format(
                EncryptionFormat::Luks2,
                CIPHER,
                uuid,
                key,
                Some(&mut params),
            )
        }
    };
    formatted.map_err(cryptsetup_error("writing a LUKS2 header", path))?;
    Ok(device)
}

/// Writes zeros over the whole opened volume `mapper_path` of `path`, so that every sector of
/// a volume with [`Integrity::HmacSha256`] carries a valid tag (a sector never written fails
/// to read, which the file system would meet). Done once per volume key, before `mkfs`.
pub fn initialize_tags(path: &Path, mapper_path: &Path) -> Result<(), StateDiskError> {
    let path = path.to_path_buf();
    let mapper_path = mapper_path.to_path_buf();
    on_worker(move || {
        let length = fs::metadata(&mapper_path)
            .and_then(|_| {
                let mut file = fs::File::open(&mapper_path)?;
                io::Seek::seek(&mut file, io::SeekFrom::End(0))
            })
            .map_err(|source| StateDiskError::Io {
                operation: "measuring",
                path: mapper_path.clone(),
                source,
            })?;
        let mut device = load_luks2(&path)?;
        device
            .wipe_handle()
            .wipe::<()>(
                &mapper_path,
                CryptWipePattern::Zero,
                0,
                length,
                1 << 20,
                CryptWipe::empty(),
                None,
                None,
            )
            .map_err(cryptsetup_error("writing the integrity tags", &mapper_path))?;
        tracing::info!(volume = %mapper_path.display(), bytes = length, "integrity tags initialized");
        Ok(())
    })?
}

/// The volume's integrity algorithm, e.g. `hmac(sha256)`; `None` without integrity.
pub fn integrity_of(path: &Path) -> Result<Option<String>, StateDiskError> {
    let path = path.to_path_buf();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        Ok(device
            .status_handle()
            .get_integrity_info()
            .ok()
            .map(|i| i.integrity)
            .filter(|i| !i.is_empty()))
    })?
}

/// LUKS2 label of a volume keyed with a first-boot key (not a secret: it says only that the
/// volume holds no data yet and nobody will ever open it with that key).
pub const FIRST_BOOT_LABEL: &str = "constellation-first-boot";
/// LUKS2 binary header: magic, and where the 48-byte label starts.
const LUKS2_MAGIC: &[u8] = b"LUKS\xba\xbe";
const LUKS2_LABEL: std::ops::Range<usize> = 24..72;
/// Bytes [`wipe_header`] zeroes: LUKS2's default metadata and keyslots area (16 MiB).
pub const HEADER_AREA_BYTES: usize = 16 << 20;

/// What the start of a device says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeKind {
    /// No LUKS2 header: a blank (or foreign) disk.
    NotLuks2,
    /// A LUKS2 volume still keyed with its first-boot key ([`FIRST_BOOT_LABEL`]).
    FirstBoot,
    /// A LUKS2 volume keyed with a node's disk key.
    Keyed,
}

/// Reads the primary LUKS2 binary header of `path` (no libcryptsetup, no key).
pub fn volume_kind(path: &Path) -> Result<VolumeKind, StateDiskError> {
    use std::io::Read;
    let mut header = [0u8; 72];
    let read = fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|source| StateDiskError::Io {
            operation: "reading the header of",
            path: path.to_path_buf(),
            source,
        });
    if let Err(StateDiskError::Io { source, .. }) = &read {
        if source.kind() == io::ErrorKind::UnexpectedEof {
            return Ok(VolumeKind::NotLuks2);
        }
    }
    read?;
    if &header[..6] != LUKS2_MAGIC || header[6..8] != [0, 2] {
        return Ok(VolumeKind::NotLuks2);
    }
    let label = &header[LUKS2_LABEL];
    let label = &label[..label.iter().position(|b| *b == 0).unwrap_or(label.len())];
    Ok(if label == FIRST_BOOT_LABEL.as_bytes() {
        VolumeKind::FirstBoot
    } else {
        VolumeKind::Keyed
    })
}

/// Zeroes the first [`HEADER_AREA_BYTES`] of a block device (or file): both LUKS2 headers and
/// the keyslots go, so [`format`] may write a new volume. Only for a volume whose first-boot
/// key is lost (it never held data).
pub fn wipe_header(path: &Path) -> Result<(), StateDiskError> {
    use std::io::Write;
    let io_error = |source| StateDiskError::Io {
        operation: "wiping the header of",
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_error)?;
    f.write_all(&vec![0u8; HEADER_AREA_BYTES])
        .and_then(|()| f.sync_all())
        .map_err(io_error)
}

/// Checks that `key` opens a keyslot of the volume, without activating anything (works without
/// device-mapper). Returns the keyslot; a wrong key is [`StateDiskError::WrongKey`].
pub fn verify_key(path: &Path, key: &[u8]) -> Result<u32, StateDiskError> {
    let key = owned_key(key)?;
    let path = path.to_path_buf();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        activate(&mut device, &path, None, &key)
    })?
}

/// Opens the volume: activates it as `/dev/mapper/<name>` where device-mapper exists, otherwise
/// only verifies the key (and logs that the volume is not mounted).
pub fn open(path: &Path, key: &[u8], name: &str) -> Result<OpenedVolume, StateDiskError> {
    validate_mapper_name(name)?;
    if !device_mapper_available() {
        let keyslot = verify_key(path, key)?;
        tracing::info!(
            path = %path.display(), keyslot,
            "verified key without device-mapper (no dm here): volume not mounted"
        );
        return Ok(OpenedVolume::VerifiedOnly { keyslot });
    }
    let key = owned_key(key)?;
    let path = path.to_path_buf();
    let name = name.to_string();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        let keyslot = activate(&mut device, &path, Some(&name), &key)?;
        let mapper_path = Path::new("/dev/mapper").join(&name);
        tracing::info!(path = %path.display(), keyslot, "activated {}", mapper_path.display());
        Ok(OpenedVolume::Activated {
            keyslot,
            mapper_path,
        })
    })?
}

/// LUKS2 has 32 token slots.
const TOKEN_SLOTS: u32 = 32;

/// The LUKS2 token of type `kind` in the volume header: its `data` string. Tokens are plain
/// header metadata, readable without a key: only what is safe in the clear belongs there.
pub fn read_token(path: &Path, kind: &str) -> Result<Option<String>, StateDiskError> {
    let path = path.to_path_buf();
    let kind = kind.to_owned();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        Ok(find_token(&mut device, &kind).map(|(_, data)| data))
    })?
}

/// Writes (or replaces) the LUKS2 token of type `kind` carrying `data`; assigned to no keyslot.
pub fn write_token(path: &Path, kind: &str, data: &str) -> Result<(), StateDiskError> {
    let path = path.to_path_buf();
    let token = serde_json::json!({ "type": kind, "keyslots": [], "data": data });
    let kind = kind.to_owned();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        let input = match find_token(&mut device, &kind) {
            Some((slot, _)) => libcryptsetup_rs::TokenInput::ReplaceToken(slot, &token),
            None => libcryptsetup_rs::TokenInput::AddToken(&token),
        };
        device
            .token_handle()
            .json_set(input)
            .map_err(cryptsetup_error("writing a LUKS2 token", &path))?;
        Ok(())
    })?
}

fn find_token(device: &mut CryptDevice, kind: &str) -> Option<(u32, String)> {
    for slot in 0..TOKEN_SLOTS {
        let Ok(json) = device.token_handle().json_get(slot) else {
            continue;
        };
        if json.get("type").and_then(|t| t.as_str()) == Some(kind) {
            let data = json
                .get("data")
                .and_then(|d| d.as_str())
                .unwrap_or_default();
            return Some((slot, data.to_owned()));
        }
    }
    None
}

/// The volume's LUKS UUID (the node's disk key ID).
pub fn uuid(path: &Path) -> Result<Uuid, StateDiskError> {
    let path = path.to_path_buf();
    on_worker(move || {
        load_luks2(&path)?
            .status_handle()
            .get_uuid()
            .map_err(cryptsetup_error("reading UUID", &path))
    })?
}

/// Re-keying: adds a keyslot for `new_key`, authorized by `existing_key`; both keys work
/// afterwards. Returns the new keyslot.
pub fn add_key(
    path: &Path,
    existing_key: &[u8],
    new_key: &[u8],
    kdf: KdfSettings,
) -> Result<u32, StateDiskError> {
    let existing_key = owned_key(existing_key)?;
    let new_key = owned_key(new_key)?;
    let path = path.to_path_buf();
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        // Check the old key first so a wrong one is reported as such.
        activate(&mut device, &path, None, &existing_key)?;
        let pbkdf = kdf.pbkdf_type();
        device
            .settings_handle()
            .set_pbkdf_type(&pbkdf)
            .map_err(cryptsetup_error("setting PBKDF", &path))?;
        let keyslot = device
            .keyslot_handle()
            .add_by_passphrase(None, &existing_key, &new_key)
            .map_err(cryptsetup_error("adding keyslot", &path))?;
        tracing::info!(path = %path.display(), keyslot, "added state disk keyslot");
        Ok(keyslot)
    })?
}

/// Replaces the first-boot `old_key` with `new_key` *and* the volume key: checks that `old_key`
/// opens the volume, then writes a fresh LUKS2 header with the same UUID (the disk key's ID), a
/// new random volume key and one keyslot, for `new_key`. Anyone who copied the old header and
/// the old key, or the old volume key itself, learns nothing about data written afterwards.
///
/// Only for a volume that holds no data yet (a node's state disk before it was ever opened):
/// the data area is not re-encrypted. Returns the new keyslot.
pub fn rekey(
    path: &Path,
    old_key: &[u8],
    new_key: &[u8],
    kdf: KdfSettings,
) -> Result<u32, StateDiskError> {
    rekey_with(path, old_key, new_key, kdf, Integrity::None)
}

/// [`rekey`] to a new header with the given sector [`Integrity`].
pub fn rekey_with(
    path: &Path,
    old_key: &[u8],
    new_key: &[u8],
    kdf: KdfSettings,
    integrity: Integrity,
) -> Result<u32, StateDiskError> {
    let old_key = owned_key(old_key)?;
    let new_key = owned_key(new_key)?;
    let path = path.to_path_buf();
    if old_key == new_key {
        return Err(StateDiskError::SameKey { path });
    }
    on_worker(move || {
        let mut device = load_luks2(&path)?;
        let old_slot = activate(&mut device, &path, None, &old_key)?;
        let uuid = device
            .status_handle()
            .get_uuid()
            .map_err(cryptsetup_error("reading UUID", &path))?;
        drop(device);
        // A new header over the old one (libcryptsetup wipes the old keyslots area with it).
        let mut device = write_header(&path, Some(uuid), kdf, integrity)?;
        let new_slot = device
            .keyslot_handle()
            .add_by_key(None, None, &new_key, CryptVolumeKey::empty())
            .map_err(cryptsetup_error("adding keyslot", &path))?;
        tracing::info!(
            path = %path.display(), old_slot, new_slot,
            "state disk re-keyed: new volume key, the first-boot keyslot is gone"
        );
        Ok(new_slot)
    })?
}

/// The device-mapper name of the state disk with LUKS UUID `uuid`. Each disk has its own UUID,
/// so nodes sharing a host (and their kernel's device-mapper namespace) never collide, whatever
/// their names.
pub fn mapper_name(uuid: &Uuid) -> String {
    format!("constellation-state-{}", uuid.simple())
}

/// [`mapper_name`] of the LUKS2 volume at `path`.
pub fn mapper_name_of(path: &Path) -> Result<String, StateDiskError> {
    Ok(mapper_name(&uuid(path)?))
}

/// Whether this kernel offers device-mapper. The `/dev/mapper/control` node alone proves
/// nothing: libdevmapper creates it with mknod on a failed activation attempt even when the kernel
/// has no dm, so the kernel's own misc-device list must name "device-mapper" as well.
pub fn device_mapper_available() -> bool {
    let kernel_has_dm = fs::read_to_string(PROC_MISC)
        .map(|misc| {
            misc.lines()
                .any(|line| line.split_whitespace().nth(1) == Some("device-mapper"))
        })
        .unwrap_or(false);
    kernel_has_dm && Path::new(DEVICE_MAPPER_CONTROL).exists()
}

fn owned_key(key: &[u8]) -> Result<Zeroizing<Vec<u8>>, StateDiskError> {
    if key.is_empty() {
        return Err(StateDiskError::EmptyKey);
    }
    Ok(Zeroizing::new(key.to_vec()))
}

fn validate_mapper_name(name: &str) -> Result<(), StateDiskError> {
    let reason = if name.is_empty() {
        Some("empty")
    } else if name.len() > 127 {
        Some("longer than 127 bytes")
    } else if name == "." || name == ".." || name == "control" {
        Some("reserved")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        Some("only ASCII letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(StateDiskError::BadMapperName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn prepare_backing_file(path: &Path, size_bytes: u64) -> Result<(), StateDiskError> {
    let io_error = |operation: &'static str| {
        move |source| StateDiskError::Io {
            operation,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_error("opening"))?;
    let metadata = file.metadata().map_err(io_error("inspecting"))?;
    // Only grow regular files; block devices have their own size.
    if metadata.is_file() && metadata.len() < size_bytes {
        file.set_len(size_bytes).map_err(io_error("resizing"))?;
    }
    Ok(())
}

fn init(path: &Path) -> Result<CryptDevice, StateDiskError> {
    CryptInit::init(path).map_err(cryptsetup_error("opening device", path))
}

fn load_luks2(path: &Path) -> Result<CryptDevice, StateDiskError> {
    let mut device = init(path)?;
    device
        .context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(|source| StateDiskError::NotLuks2 {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(device)
}

fn activate(
    device: &mut CryptDevice,
    path: &Path,
    name: Option<&str>,
    key: &[u8],
) -> Result<u32, StateDiskError> {
    device
        .activate_handle()
        .activate_by_passphrase(name, None, key, CryptActivate::empty())
        .map_err(|source| {
            let operation = if name.is_some() {
                "activating"
            } else {
                "verifying key"
            };
            wrong_key_or(source, path, operation)
        })
}

/// libcryptsetup answers EPERM when no keyslot accepts the passphrase: that is a wrong key;
/// anything else failed `operation`.
fn wrong_key_or(source: LibcryptErr, path: &Path, operation: &'static str) -> StateDiskError {
    match &source {
        LibcryptErr::IOError(e) if e.raw_os_error() == Some(EPERM) => StateDiskError::WrongKey {
            path: path.to_path_buf(),
        },
        _ => StateDiskError::Cryptsetup {
            operation,
            path: path.to_path_buf(),
            source,
        },
    }
}

fn cryptsetup_error(
    operation: &'static str,
    path: &Path,
) -> impl FnOnce(LibcryptErr) -> StateDiskError {
    let path = path.to_path_buf();
    move |source| StateDiskError::Cryptsetup {
        operation,
        path,
        source,
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The one thread that calls libcryptsetup.
static WORKER: LazyLock<Option<mpsc::Sender<Job>>> = LazyLock::new(|| {
    let (sender, jobs) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("cryptsetup".into())
        .spawn(move || {
            for job in jobs {
                // A panic inside the bindings must not take the worker (or the node) down; the
                // caller sees it as a dropped result.
                let _ = catch_unwind(AssertUnwindSafe(job));
            }
        })
        .ok()
        .map(|_| sender)
});

fn on_worker<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StateDiskError> {
    let sender = WORKER.as_ref().ok_or(StateDiskError::Worker(
        "the worker thread could not be started",
    ))?;
    let (result_sender, result) = mpsc::sync_channel(1);
    sender
        .send(Box::new(move || {
            let _ = result_sender.send(job());
        }))
        .map_err(|_| StateDiskError::Worker("the worker thread has stopped"))?;
    result
        .recv()
        .map_err(|_| StateDiskError::Worker("a libcryptsetup call panicked"))
}
