//! The node image for the QEMU platform: the Debian cloud kernel booted by OVMF directly
//! (`qemu -kernel -initrd -append`), an initramfs assembled here, and the PCR values that
//! boot produces, computed offline.
//!
//! Why direct boot and not a unified kernel image: Debian bookworm ships no `ukify`, and
//! with direct boot the measurement is already simple and complete. OVMF measures the kernel
//! (PE image hash, PCR 4) and the kernel's EFI stub measures the command line OVMF passes as
//! load options and the initrd it loads (PCR 9). A UKI would move the same bytes into PE
//! sections without covering more.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use constellation_attestation::measurements::{
    pcr_extend, sha256, Digest, Measurement, Measurements, CLUSTER_ID_PCR,
};
// Which PCR carries what is the attestation crate's PCR layout, named here for this chain.
use constellation_attestation::pcr::{
    BOOT_APP as PCR_BOOT_APP, BOOT_LOADER_CMDLINE as PCR_UNUSED, FIRMWARE as FIRMWARE_PCRS,
    KERNEL_CONFIG as PCR_KERNEL_CONFIG,
};
use serde::{Deserialize, Serialize};

use crate::cpio::{Archive, CpioError, EntryKind};
use crate::eventlog::{
    Event, EV_EFI_ACTION, EV_EFI_BOOT_SERVICES_APPLICATION, EV_EVENT_TAG, EV_SEPARATOR,
};
use crate::kmod::{self, KmodError};
use crate::pe::{self, PeError, QemuMemory};

/// File names inside a QEMU node image folder.
pub const KERNEL_FILE: &str = "vmlinuz";
pub const INITRD_FILE: &str = "initrd.cpio.gz";
pub const NODE_MANIFEST_FILE: &str = "node-image.json";
/// Where the bootstrapper lives inside the initramfs.
pub const GUEST_BOOTSTRAPPER: &str = "usr/bin/constellation-bootstrapper";
/// Serial-console markers around the boot report the init prints.
pub const PCRS_BEGIN: &str = "===CONSTELLATION-PCRS-BEGIN===";
pub const PCRS_END: &str = "===CONSTELLATION-PCRS-END===";
pub const EVENTLOG_BEGIN: &str = "===CONSTELLATION-EVENTLOG-BEGIN===";
pub const EVENTLOG_END: &str = "===CONSTELLATION-EVENTLOG-END===";

/// Modules the node needs (dependencies are added): virtio devices, firmware config, and
/// device-mapper crypt/integrity with the ciphers dm-crypt's aes-xts-plain64 and its HMAC-SHA256
/// integrity (authenc) need. The TPM
/// CRB/TIS drivers are built into Debian's cloud kernel.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "qemu_fw_cfg",
    "dm_mod",
    "dm_crypt",
    "dm_integrity",
    "ecb",
    "xts",
    "authenc",
];

/// Kernel command line of the node image. OVMF appends ` initrd=initrd` when it passes it.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Guest RAM the image is measured for: QEMU writes the initrd's load address, which depends
/// on it, into the kernel header that OVMF measures. The platform must boot with this `-m`.
pub const DEFAULT_RAM_MIB: u32 = 1024;

const INIT_SCRIPT: &str = include_str!("init.sh");
const UDHCPC_SCRIPT: &str = include_str!("udhcpc.sh");

/// Why a node image could not be built or measured.
#[derive(Debug, thiserror::Error)]
pub enum NodeImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error("{0}")]
    Kmod(#[from] KmodError),
    #[error("{0}")]
    Cpio(#[from] CpioError),
    #[error("kernel {path}: {source}")]
    Pe { path: PathBuf, source: PeError },
    #[error("{path}: node image manifest is malformed: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("node image at {dir} is inconsistent: manifest says {file} has SHA-256 {expected}, found {found}")]
    Inconsistent {
        dir: PathBuf,
        file: &'static str,
        expected: String,
        found: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NodeImageError + '_ {
    move |source| NodeImageError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, NodeImageError> {
    std::fs::read(path).map_err(io_err(path))
}

/// What a node image is built from.
#[derive(Debug, Clone)]
pub struct NodeImageInputs {
    /// Root of the unpacked Debian kernel package (holds `boot/vmlinuz-*` and `lib/modules/*`).
    pub kernel_package: PathBuf,
    pub bootstrapper: PathBuf,
    /// The service daemons a control plane's bootstrapper supervises, put next to it in
    /// `usr/bin`, where it looks for them (stripped like the bootstrapper).
    pub daemons: Vec<PathBuf>,
    /// A static busybox: the init's shell and tools.
    pub busybox: PathBuf,
    /// More host binaries the node runs (e.g. `mkfs.ext4`), copied with their libraries.
    pub extra_binaries: Vec<PathBuf>,
    /// Libraries loaded with `dlopen`, which `ldd` cannot see (the TSS's TCTI for
    /// `/dev/tpmrm0`), copied with their own libraries.
    pub dlopen_libraries: Vec<PathBuf>,
    /// Drop the bootstrapper's debug sections (`objcopy --strip-debug`): a debug build is
    /// ~80 MB, most of it debug info, and under TCG every initrd byte costs boot time
    /// (QEMU loads it through fw_cfg, the EFI stub hashes it).
    pub strip_debug: bool,
    pub cmdline: String,
    pub ram_mib: u32,
}

impl NodeImageInputs {
    /// Inputs with the defaults: `/bin/busybox`, `mkfs.ext4`, [`DEFAULT_CMDLINE`], [`DEFAULT_RAM_MIB`].
    pub fn new(kernel_package: &Path, bootstrapper: &Path) -> Self {
        Self {
            kernel_package: kernel_package.to_owned(),
            bootstrapper: bootstrapper.to_owned(),
            // The daemons built next to the bootstrapper; one not built is left out (a control
            // plane then reports it missing), as in a local image.
            daemons: crate::DAEMON_FILES
                .iter()
                .map(|name| bootstrapper.with_file_name(name))
                .filter(|p| p.is_file())
                .collect(),
            busybox: PathBuf::from("/bin/busybox"),
            // etcd (Debian's etcd-server): a control plane's member of the cluster store.
            extra_binaries: vec![PathBuf::from("/sbin/mkfs.ext4"), PathBuf::from(ETCD_BINARY)],
            dlopen_libraries: vec![PathBuf::from(
                "/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0",
            )],
            strip_debug: true,
            cmdline: DEFAULT_CMDLINE.to_owned(),
            ram_mib: DEFAULT_RAM_MIB,
        }
    }
}

/// The single entry of `dir` matching `pred`, or an error naming what was expected.
fn single_entry(
    dir: &Path,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> Result<PathBuf, NodeImageError> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path())
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => Err(NodeImageError::Input {
            path: dir.to_owned(),
            reason: format!("expected exactly one {what}, found {n}"),
        }),
    }
}

/// The shared libraries and dynamic loader `binary` needs, as absolute paths (via `ldd`); none
/// for a static binary. Also used to build the daemons' OCI images.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, NodeImageError> {
    let out = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(io_err(Path::new("ldd")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: ldd says so and fails.
        if text.contains("not a dynamic executable")
            || String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(NodeImageError::Input {
            path: binary.to_owned(),
            reason: format!(
                "ldd failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("statically linked") || line.starts_with("linux-vdso") {
            continue;
        }
        if line.contains("not found") {
            return Err(NodeImageError::Input {
                path: binary.to_owned(),
                reason: format!("missing shared library: {line}"),
            });
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn add_host_file(
    archive: &mut Archive,
    host: &Path,
    guest: &str,
    perm: u32,
) -> Result<(), NodeImageError> {
    // Reading follows symlinks: the archive holds the library under the name the loader asks for.
    archive.add(guest, EntryKind::File(read(host)?), perm)?;
    Ok(())
}

fn add_binary(archive: &mut Archive, host: &Path, guest: &str) -> Result<(), NodeImageError> {
    add_host_file(archive, host, guest, 0o755)?;
    add_libraries(archive, host)
}

/// One of our programs with its libraries, without its debug sections if `strip`.
fn add_program(
    archive: &mut Archive,
    host: &Path,
    guest: &str,
    strip: bool,
) -> Result<(), NodeImageError> {
    if !strip {
        return add_binary(archive, host, guest);
    }
    archive.add(guest, EntryKind::File(strip_debug(host)?), 0o755)?;
    add_libraries(archive, host)
}

fn file_name(binary: &Path) -> Result<&str, NodeImageError> {
    binary
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| NodeImageError::Input {
            path: binary.to_owned(),
            reason: "binary path has no file name".into(),
        })
}

fn add_libraries(archive: &mut Archive, host: &Path) -> Result<(), NodeImageError> {
    for lib in shared_libraries(host)? {
        add_host_file(archive, &lib, &lib.to_string_lossy(), 0o755)?;
    }
    Ok(())
}

/// `binary` without its debug sections (binutils' objcopy; its output depends only on the input).
fn strip_debug(binary: &Path) -> Result<Vec<u8>, NodeImageError> {
    // A private scratch directory: objcopy writes by name, which in a shared /tmp would follow
    // whatever another user placed there.
    let scratch = tempfile::tempdir().map_err(io_err(&std::env::temp_dir()))?;
    let tmp = scratch.path().join("stripped");
    let out = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(binary)
        .arg(&tmp)
        .output()
        .map_err(io_err(Path::new("objcopy")))?;
    if !out.status.success() {
        return Err(NodeImageError::Input {
            path: binary.to_owned(),
            reason: format!(
                "objcopy --strip-debug failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    read(&tmp)
}

/// Assembles the initramfs (newc, uncompressed: deterministic by construction; see
/// [`compress_initrd`]).
pub fn build_initramfs(inputs: &NodeImageInputs) -> Result<Vec<u8>, NodeImageError> {
    let mut a = Archive::default();
    for dir in [
        "dev",
        "proc",
        "sys",
        "run",
        "tmp",
        "etc",
        "var/lib",
        "mnt/state",
    ] {
        a.add(dir, EntryKind::Dir, 0o755)?;
    }
    add_binary(&mut a, &inputs.busybox, "bin/busybox")?;
    let list = std::process::Command::new(&inputs.busybox)
        .arg("--list-full")
        .output()
        .map_err(io_err(&inputs.busybox))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || a.contains(applet) || applet == "bin/busybox" {
            continue;
        }
        a.add(applet, EntryKind::Symlink("/bin/busybox".into()), 0o777)?;
    }
    a.add(
        "init",
        EntryKind::File(INIT_SCRIPT.as_bytes().to_vec()),
        0o755,
    )?;
    a.add(
        "etc/udhcpc.script",
        EntryKind::File(UDHCPC_SCRIPT.as_bytes().to_vec()),
        0o755,
    )?;

    let modules_root = inputs.kernel_package.join("lib/modules");
    let modules_dir = single_entry(&modules_root, "kernel version directory", |_| true)?;
    let modules = kmod::resolve(&modules_dir, MODULES)?;
    let mut order = String::new();
    for m in &modules {
        let file = format!("{}.ko", m.name);
        add_host_file(&mut a, &m.path, &format!("lib/modules/{file}"), 0o644)?;
        order.push_str(&file);
        order.push('\n');
    }
    a.add(
        "etc/modules.order",
        EntryKind::File(order.into_bytes()),
        0o644,
    )?;

    add_program(
        &mut a,
        &inputs.bootstrapper,
        GUEST_BOOTSTRAPPER,
        inputs.strip_debug,
    )?;
    for daemon in &inputs.daemons {
        let guest = format!("usr/bin/{}", file_name(daemon)?);
        add_program(&mut a, daemon, &guest, inputs.strip_debug)?;
    }
    for lib in &inputs.dlopen_libraries {
        add_binary(&mut a, lib, &lib.to_string_lossy())?;
    }
    for extra in &inputs.extra_binaries {
        add_binary(&mut a, extra, &format!("usr/sbin/{}", file_name(extra)?))?;
    }
    Ok(a.to_bytes()?)
}

/// The initramfs as the image ships it: gzip (no name, modification time 0, so the same cpio
/// gives the same bytes). Under TCG, OVMF and the kernel's EFI stub hash every initrd byte at
/// a few MB/s, and a third of the bytes cut QEMU start → init from 19.1 s to 10.6 s; the
/// kernel decompresses it in about 0.5 s. The fastest level: a few MB more than level 6, but
/// built in a third of the time (see image/README.md).
pub fn compress_initrd(cpio: &[u8]) -> Result<Vec<u8>, NodeImageError> {
    use std::io::Write;
    let mut gz = flate2::GzBuilder::new().mtime(0).write(
        Vec::with_capacity(cpio.len() / 2),
        flate2::Compression::fast(),
    );
    gz.write_all(cpio)
        .and_then(|()| gz.finish())
        .map_err(|source| NodeImageError::Io {
            path: PathBuf::from(INITRD_FILE),
            source,
        })
}

/// Where a PCR's expected value comes from, and whether it is enforced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrSource {
    pub enforced: bool,
    /// What the value covers, and for a warn-only PCR why it is not enforced.
    pub reason: String,
}

/// One event the boot is expected to log, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedEvent {
    pub pcr: u32,
    pub event_type: u32,
    pub sha256: Digest,
    pub what: String,
}

/// The precalculated boot: every expected event, the resulting policy, and per PCR why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Precalculated {
    pub events: Vec<ExpectedEvent>,
    pub measurements: Measurements,
    pub sources: BTreeMap<u32, PcrSource>,
}

/// A firmware build whose measured events were recorded from a boot's event log (its PCR 0, 1
/// and 7 events hash the decompressed firmware volumes in memory and the boot variables OVMF
/// creates, which cannot be derived from the file without running it).
struct KnownFirmware {
    name: &'static str,
    sha256: &'static str,
    /// Guest RAM of the recorded boot: PCR 0's firmware-volume events change with it.
    ram_mib: u32,
    /// (PCR, event type, SHA-256 of the event) in log order.
    events: &'static [(u32, u32, &'static str)],
}

const KNOWN_FIRMWARE: &[KnownFirmware] = &[KnownFirmware {
    name: "OVMF_CODE_4M.fd of Debian ovmf 2022.11-6+deb12u2",
    sha256: "b157d97b1f69729514feb7f201d2cbe4957f23ab77920e361fe9f822ba49ca4c",
    ram_mib: 1024,
    events: include!("ovmf_2022_11_6_deb12u2_1024mib.events"),
}];

fn separator() -> Digest {
    sha256(&[0u8; 4])
}

/// Computes the PCR values OVMF and the kernel's EFI stub produce when QEMU boots `kernel`
/// with `initrd` and `cmdline` in `ram_mib` of RAM on `firmware` (the OVMF code file).
pub fn precalculate(
    kernel: &[u8],
    initrd: &[u8],
    cmdline: &str,
    ram_mib: u32,
    firmware_sha256: &Digest,
) -> Result<Precalculated, PeError> {
    let patched = pe::qemu_patched_bzimage(kernel, initrd.len() as u64, QemuMemory { ram_mib })?;
    let kernel_hash = pe::authenticode_sha256(&patched)?;
    let ev = |pcr, event_type, sha256, what: &str| ExpectedEvent {
        pcr,
        event_type,
        sha256,
        what: what.to_owned(),
    };
    let mut events = Vec::new();
    let firmware = KNOWN_FIRMWARE
        .iter()
        .find(|f| f.sha256 == hex::encode(firmware_sha256) && f.ram_mib == ram_mib);
    if let Some(fw) = firmware {
        for &(pcr, t, d) in fw.events {
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(d, &mut digest).is_ok() {
                events.push(ev(pcr, t, digest, crate::eventlog::event_type_name(t)));
            }
        }
    }
    // Boot order of OVMF with -kernel: the kernel image is loaded (measured), then the
    // boot-option action, then separators, then the stub's PCR 9 events, then ExitBootServices.
    events.push(ev(
        PCR_BOOT_APP,
        EV_EFI_BOOT_SERVICES_APPLICATION,
        kernel_hash,
        "kernel PE image (as QEMU patched it)",
    ));
    events.push(ev(
        PCR_BOOT_APP,
        EV_EFI_ACTION,
        sha256(b"Calling EFI Application from Boot Option"),
        "EV_EFI_ACTION \"Calling EFI Application from Boot Option\"",
    ));
    for pcr in 0..=6 {
        if firmware.is_some() || !matches!(pcr, 0 | 1) {
            events.push(ev(pcr, EV_SEPARATOR, separator(), "EV_SEPARATOR"));
        }
    }
    // OVMF passes the command line as UCS-2 load options, with " initrd=initrd" appended and
    // a NUL terminator; the stub measures those bytes, then the initrd it loads.
    let mut options: Vec<u8> = format!("{cmdline} initrd=initrd")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    options.extend_from_slice(&[0, 0]);
    events.push(ev(
        PCR_KERNEL_CONFIG,
        EV_EVENT_TAG,
        sha256(&options),
        "EV_EVENT_TAG \"LOADED_IMAGE::LoadOptions\" (command line)",
    ));
    events.push(ev(
        PCR_KERNEL_CONFIG,
        EV_EVENT_TAG,
        sha256(initrd),
        "EV_EVENT_TAG \"Linux initrd\"",
    ));
    events.push(ev(
        5,
        EV_EFI_ACTION,
        sha256(b"Exit Boot Services Invocation"),
        "EV_EFI_ACTION \"Exit Boot Services Invocation\"",
    ));
    events.push(ev(
        5,
        EV_EFI_ACTION,
        sha256(b"Exit Boot Services Returned with Success"),
        "EV_EFI_ACTION \"Exit Boot Services Returned with Success\"",
    ));

    let values = replay_expected(&events);
    let mut measurements = Measurements::default();
    let mut sources = BTreeMap::new();
    let mut enforce = |pcr: u32, value: Digest, reason: &str| {
        measurements.0.insert(pcr, Measurement::enforce(value));
        sources.insert(
            pcr,
            PcrSource {
                enforced: true,
                reason: reason.to_owned(),
            },
        );
    };
    enforce(
        PCR_BOOT_APP,
        values[&PCR_BOOT_APP],
        "kernel PE image hash, boot-option action, separator",
    );
    enforce(
        PCR_UNUSED,
        [0; 32],
        "nothing measures into PCR 8 in this boot chain",
    );
    enforce(
        PCR_KERNEL_CONFIG,
        values[&PCR_KERNEL_CONFIG],
        "kernel command line and initrd, measured by the kernel's EFI stub",
    );
    enforce(
        CLUSTER_ID_PCR,
        [0; 32],
        "cluster ID: zero until the node is initialized or joins",
    );
    for pcr in FIRMWARE_PCRS {
        let reason = match (pcr, firmware) {
            (0 | 1 | 7, Some(fw)) => format!("firmware build ({}): recorded from its event log; depends on the firmware, not on the image", fw.name),
            (0 | 1 | 7, None) => {
                sources.insert(pcr, PcrSource {
                    enforced: false,
                    reason: format!(
                        "not predicted: firmware {} with {ram_mib} MiB RAM has no recorded events",
                        hex::encode(firmware_sha256)
                    ),
                });
                continue;
            }
            _ => "firmware structure (separator, ExitBootServices actions): holds for OVMF without option ROMs; depends on the firmware, not on the image".to_owned(),
        };
        measurements
            .0
            .insert(pcr, Measurement::warn_only(values[&pcr]));
        sources.insert(
            pcr,
            PcrSource {
                enforced: false,
                reason,
            },
        );
    }
    Ok(Precalculated {
        events,
        measurements,
        sources,
    })
}

/// PCR values the expected events produce.
pub fn replay_expected(events: &[ExpectedEvent]) -> BTreeMap<u32, Digest> {
    let mut pcrs = BTreeMap::new();
    for e in events {
        let v = pcrs.entry(e.pcr).or_insert([0u8; 32]);
        *v = pcr_extend(v, &e.sha256);
    }
    pcrs
}

/// For a PCR whose live value differs from the expected one: the first logged event of that
/// PCR that differs from the expected sequence (or the first missing/extra one), described.
pub fn first_differing_event(pcr: u32, expected: &[ExpectedEvent], logged: &[Event]) -> String {
    let exp: Vec<&ExpectedEvent> = expected.iter().filter(|e| e.pcr == pcr).collect();
    let got: Vec<&Event> = logged.iter().filter(|e| e.pcr == pcr).collect();
    for i in 0..exp.len().max(got.len()) {
        match (exp.get(i), got.get(i)) {
            (Some(e), Some(g)) if e.sha256 == g.sha256 && e.event_type == g.event_type => continue,
            (Some(e), Some(g)) => {
                return format!(
                    "PCR {pcr}: first differing event is {g}; expected {} with sha256 {}",
                    e.what,
                    hex::encode(e.sha256)
                )
            }
            (Some(e), None) => {
                return format!(
                    "PCR {pcr}: expected event {} (sha256 {}) is missing from the log",
                    e.what,
                    hex::encode(e.sha256)
                )
            }
            (None, Some(g)) => return format!("PCR {pcr}: unexpected extra {g}"),
            (None, None) => unreachable!("loop bound is the longer list"),
        }
    }
    format!("PCR {pcr}: every logged event matches the expected ones (the live PCR disagrees with the log)")
}

/// What a node image is: written next to its files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeImageManifest {
    pub version: String,
    pub platform: String,
    pub cmdline: String,
    pub ram_mib: u32,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub bootstrapper_sha256: String,
}

/// A built QEMU node image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeImage {
    pub dir: PathBuf,
    pub manifest: NodeImageManifest,
}

impl NodeImage {
    /// Builds the image into `dir`: the kernel, the initramfs, and the manifest.
    pub fn build(
        dir: &Path,
        inputs: &NodeImageInputs,
        version: &str,
    ) -> Result<Self, NodeImageError> {
        let boot = inputs.kernel_package.join("boot");
        let kernel_path = single_entry(&boot, "boot/vmlinuz-*", |n| n.starts_with("vmlinuz-"))?;
        let kernel = read(&kernel_path)?;
        let initrd = compress_initrd(&build_initramfs(inputs)?)?;
        let manifest = NodeImageManifest {
            version: version.to_owned(),
            platform: "qemu".to_owned(),
            cmdline: inputs.cmdline.clone(),
            ram_mib: inputs.ram_mib,
            kernel_sha256: hex::encode(sha256(&kernel)),
            initrd_sha256: hex::encode(sha256(&initrd)),
            bootstrapper_sha256: hex::encode(sha256(&read(&inputs.bootstrapper)?)),
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let manifest_bytes =
            serde_json::to_vec_pretty(&manifest).map_err(|source| NodeImageError::Manifest {
                path: dir.join(NODE_MANIFEST_FILE),
                source,
            })?;
        for (name, bytes) in [
            (KERNEL_FILE, &kernel),
            (INITRD_FILE, &initrd),
            (NODE_MANIFEST_FILE, &manifest_bytes),
        ] {
            let path = dir.join(name);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, bytes).map_err(io_err(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    /// Opens a built image and checks its files against the manifest.
    pub fn open(dir: &Path) -> Result<Self, NodeImageError> {
        let path = dir.join(NODE_MANIFEST_FILE);
        let manifest: NodeImageManifest = serde_json::from_slice(&read(&path)?)
            .map_err(|source| NodeImageError::Manifest { path, source })?;
        for (file, expected) in [
            (KERNEL_FILE, &manifest.kernel_sha256),
            (INITRD_FILE, &manifest.initrd_sha256),
        ] {
            let found = hex::encode(sha256(&read(&dir.join(file))?));
            if &found != expected {
                return Err(NodeImageError::Inconsistent {
                    dir: dir.to_owned(),
                    file,
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(Self {
            dir: dir.to_owned(),
            manifest,
        })
    }

    pub fn kernel_path(&self) -> PathBuf {
        self.dir.join(KERNEL_FILE)
    }
    pub fn initrd_path(&self) -> PathBuf {
        self.dir.join(INITRD_FILE)
    }

    /// The image's expected measurements when booted on the OVMF code file `firmware`.
    pub fn precalculate(&self, firmware: &Path) -> Result<Precalculated, NodeImageError> {
        let kernel_path = self.kernel_path();
        let kernel = read(&kernel_path)?;
        let initrd = read(&self.initrd_path())?;
        let fw = sha256(&read(firmware)?);
        precalculate(
            &kernel,
            &initrd,
            &self.manifest.cmdline,
            self.manifest.ram_mib,
            &fw,
        )
        .map_err(|source| NodeImageError::Pe {
            path: kernel_path,
            source,
        })
    }
}

/// Standard locations of Debian's OVMF (package `ovmf`): the code (read-only pflash) and the
/// variable-store template every VM gets its own copy of.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS_TEMPLATE: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How QEMU runs guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// One VM booting a node image: the `qemu-system-x86_64` arguments. Only the devices that
/// this list names exist (`-nodefaults`): no option ROMs are loaded (`romfile=`), so the
/// firmware measures none into PCR 2, as the precalculation assumes.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub accel: Accel,
    pub ram_mib: u32,
    pub firmware_code: PathBuf,
    /// This VM's own copy of the OVMF variable store.
    pub firmware_vars: PathBuf,
    /// swtpm's control socket.
    pub tpm_socket: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    /// Extra `-netdev user` options, e.g. `hostfwd=tcp:127.0.0.1:9000-:9000`.
    pub user_net: Option<String>,
    /// A raw virtio disk (the state disk).
    pub state_disk: Option<PathBuf>,
    /// The bootstrapper's arguments, one per line: a file QEMU exposes as the firmware config
    /// entry [`FW_CFG_BOOTSTRAPPER_ARGS`], which the image's init passes on.
    pub bootstrapper_args: Option<PathBuf>,
    /// A second NIC on the cluster's own network segment, shared by the cluster's VMs.
    pub cluster_nic: Option<ClusterNic>,
}

/// A VM's NIC on its cluster's network: an Ethernet segment that QEMU carries as UDP multicast
/// on the host's loopback interface (`-netdev socket,mcast=...,localaddr=127.0.0.1`), so every
/// VM of the cluster reaches every other, including VMs started later, with no switch process
/// and nothing leaving the machine. The guest's init gives the NIC with `mac` the address
/// `address/prefix` (firmware config entry [`FW_CFG_CLUSTER_NET`]; unmeasured, like cloud
/// metadata).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNic {
    /// The cluster's multicast group and port (239.0.0.0/8, organization-local scope).
    pub group: std::net::SocketAddrV4,
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
}

impl ClusterNic {
    fn mac_string(&self) -> String {
        self.mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    fn args(&self) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("socket,id=cluster,mcast={},localaddr=127.0.0.1", self.group),
            "-device".into(),
            format!(
                "virtio-net-pci,netdev=cluster,mac={},romfile=",
                self.mac_string()
            ),
            "-fw_cfg".into(),
            format!(
                "name={FW_CFG_CLUSTER_NET},string={} {}/{}",
                self.mac_string(),
                self.address,
                self.prefix
            ),
        ]
    }
}

/// Firmware config entry naming the cluster NIC and its address: `<mac> <address>/<prefix>`.
pub const FW_CFG_CLUSTER_NET: &str = "opt/org.constellation/cluster-net";

/// Debian's etcd server, put into the image as `usr/sbin/etcd`.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

/// Firmware config entry holding the bootstrapper's arguments (not measured: the node treats
/// it as it would cloud metadata).
pub const FW_CFG_BOOTSTRAPPER_ARGS: &str = "opt/org.constellation/bootstrapper-args";

impl VmConfig {
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-accel",
            self.accel.as_str(),
            "-machine",
            "q35",
            "-smp",
            "1",
            "-nodefaults",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.ram_mib.to_string());
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            self.firmware_code.display()
        ));
        a.push("-drive".into());
        a.push(format!(
            "if=pflash,format=raw,unit=1,file={}",
            self.firmware_vars.display()
        ));
        a.push("-chardev".into());
        a.push(format!(
            "socket,id=chrtpm,path={}",
            self.tpm_socket.display()
        ));
        a.extend(
            [
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-crb,tpmdev=tpm0",
            ]
            .map(String::from),
        );
        if let Some(opts) = &self.user_net {
            a.push("-netdev".into());
            a.push(if opts.is_empty() {
                "user,id=net0".into()
            } else {
                format!("user,id=net0,{opts}")
            });
            a.extend(["-device", "virtio-net-pci,netdev=net0,romfile="].map(String::from));
        }
        if let Some(disk) = &self.state_disk {
            a.push("-drive".into());
            a.push(format!(
                "if=none,id=state,format=raw,file={}",
                disk.display()
            ));
            a.extend(["-device", "virtio-blk-pci,drive=state"].map(String::from));
        }
        if let Some(args) = &self.bootstrapper_args {
            a.push("-fw_cfg".into());
            a.push(format!(
                "name={FW_CFG_BOOTSTRAPPER_ARGS},file={}",
                args.display()
            ));
        }
        if let Some(nic) = &self.cluster_nic {
            a.extend(nic.args());
        }
        a.extend(["-kernel".into(), self.kernel.display().to_string()]);
        a.extend(["-initrd".into(), self.initrd.display().to_string()]);
        a.extend(["-append".into(), self.cmdline.clone()]);
        a
    }
}

/// Whether KVM can boot a guest here: `/dev/kvm` must open read-write, and OVMF must run
/// under it for `probe_time` without QEMU reporting a KVM error or exiting. (On hosts whose
/// KVM is a paravirtualized shim, OVMF stops at once with "KVM internal error".) Anything
/// else means TCG; callers use the same code path with either.
pub fn probe_kvm(
    firmware_code: &Path,
    vars_template: &Path,
    scratch: &Path,
    probe_time: std::time::Duration,
) -> Accel {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Accel::Tcg;
    }
    let vars = scratch.join("kvm-probe-vars.fd");
    if std::fs::copy(vars_template, &vars).is_err() {
        return Accel::Tcg;
    }
    let child = std::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "256",
            "-drive",
        ])
        .arg(format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            firmware_code.display()
        ))
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,unit=1,file={}",
            vars.display()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    // QEMU reports a KVM failure on stderr and then waits, paused: read stderr as it comes, so
    // a failed probe ends at the first error line instead of at the deadline.
    let (lines, stderr_lines) = std::sync::mpsc::channel::<String>();
    if let Some(e) = child.stderr.take() {
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(e).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let deadline = std::time::Instant::now() + probe_time;
    let mut err = String::new();
    let exited = loop {
        while let Ok(line) = stderr_lines.try_recv() {
            err.push_str(&line);
            err.push('\n');
        }
        if err.contains("error") {
            break false;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break true;
        }
        if std::time::Instant::now() >= deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    err.extend(stderr_lines.try_iter().map(|l| l + "\n"));
    let _ = std::fs::remove_file(&vars);
    if exited || err.contains("KVM internal error") || err.contains("error") {
        tracing::info!(stderr = %err.trim(), "KVM cannot run OVMF here; using TCG");
        Accel::Tcg
    } else {
        Accel::Kvm
    }
}
