//! OCI image layouts (image-spec 1.0) written directly, without a container daemon or builder:
//! one uncompressed layer holding the daemon binary, the shared libraries `ldd` names (plus
//! libraries it loads with dlopen, e.g. TPM TCTI modules) and an `/etc/passwd` with the
//! non-root user. The tar is deterministic (sorted entries, mtime 0, uid/gid 0), the JSON has
//! sorted keys and no timestamps, so the same inputs give the same digests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};

/// The non-root user images run as (uid = gid).
pub const USER_ID: u32 = 65532;

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ldd {path} failed: {message}")]
    Ldd { path: PathBuf, message: String },
    #[error("path {path:?} does not fit a ustar header (at most 100 bytes, or 155 + 100 split at a '/')")]
    PathTooLong { path: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |source| OciError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One entry of the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { mode: u32, data: Vec<u8> },
}

/// A root filesystem: paths relative to `/`, without a leading slash.
pub type RootFs = BTreeMap<String, Entry>;

/// Adds a file and its parent directories.
pub fn add_file(rootfs: &mut RootFs, path: &str, mode: u32, data: Vec<u8>) {
    let path = path.trim_start_matches('/');
    let mut parent = String::new();
    for part in path.split('/').take(path.split('/').count() - 1) {
        if !parent.is_empty() {
            parent.push('/');
        }
        parent.push_str(part);
        rootfs.entry(parent.clone()).or_insert(Entry::Dir);
    }
    rootfs.insert(path.to_owned(), Entry::File { mode, data });
}

/// The absolute library paths `ldd` reports for `binary` (including the dynamic loader): the
/// node image's own resolver, so the VM image and the OCI images agree on what a binary needs.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, OciError> {
    constellation_image::qemu::shared_libraries(binary).map_err(|e| OciError::Ldd {
        path: binary.to_owned(),
        message: e.to_string(),
    })
}

/// The root filesystem of a daemon image: `binary` at `/usr/local/bin/<name>`, its libraries
/// and those of each `dlopen` library (placed where ldd found them), `/etc/passwd` and
/// `/etc/group` naming the non-root user.
pub fn daemon_rootfs(binary: &Path, name: &str, dlopen: &[PathBuf]) -> Result<RootFs, OciError> {
    let mut rootfs = RootFs::new();
    add_file(
        &mut rootfs,
        &format!("usr/local/bin/{name}"),
        0o755,
        std::fs::read(binary).map_err(io(binary))?,
    );
    let mut libs = shared_libraries(binary)?;
    for extra in dlopen {
        libs.push(extra.clone());
        libs.extend(shared_libraries(extra)?);
    }
    for lib in libs {
        let data = std::fs::read(&lib).map_err(io(&lib))?;
        add_file(&mut rootfs, &lib.to_string_lossy(), 0o755, data);
    }
    add_file(
        &mut rootfs,
        "etc/passwd",
        0o644,
        format!("root:x:0:0:root:/:/sbin/nologin\nnonroot:x:{USER_ID}:{USER_ID}:nonroot:/:/sbin/nologin\n").into_bytes(),
    );
    add_file(
        &mut rootfs,
        "etc/group",
        0o644,
        format!("root:x:0:\nnonroot:x:{USER_ID}:\n").into_bytes(),
    );
    Ok(rootfs)
}

fn octal(field: &mut [u8], value: u64) {
    let text = format!("{:0width$o}\0", value, width = field.len() - 1);
    field.copy_from_slice(text.as_bytes());
}

fn header(path: &str, entry: &Entry) -> Result<[u8; 512], OciError> {
    let mut h = [0u8; 512];
    let name = match entry {
        Entry::Dir => format!("{path}/"),
        Entry::File { .. } => path.to_owned(),
    };
    let (prefix, name) = if name.len() <= 100 {
        ("", name.as_str())
    } else {
        // ustar: a prefix of up to 155 bytes, split at a '/'.
        let split = name[..name.len().min(156)]
            .rfind('/')
            .filter(|&i| name.len() - i - 1 <= 100 && i <= 155)
            .ok_or_else(|| OciError::PathTooLong {
                path: path.to_owned(),
            })?;
        (&name[..split], &name[split + 1..])
    };
    h[..name.len()].copy_from_slice(name.as_bytes());
    let (mode, size, kind) = match entry {
        Entry::Dir => (0o755, 0, b'5'),
        Entry::File { mode, data } => (*mode, data.len() as u64, b'0'),
    };
    octal(&mut h[100..108], u64::from(mode));
    octal(&mut h[108..116], 0); // uid
    octal(&mut h[116..124], 0); // gid
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 0); // mtime: the epoch, for reproducible layers
    h[148..156].copy_from_slice(b"        ");
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[345..345 + prefix.len()].copy_from_slice(prefix.as_bytes());
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    Ok(h)
}

/// The layer: a ustar archive of `rootfs` in path order.
pub fn tar(rootfs: &RootFs) -> Result<Vec<u8>, OciError> {
    let mut out = Vec::new();
    for (path, entry) in rootfs {
        out.extend_from_slice(&header(path, entry)?);
        if let Entry::File { data, .. } = entry {
            out.extend_from_slice(data);
            out.resize(out.len().next_multiple_of(512), 0);
        }
    }
    out.resize(out.len() + 1024, 0);
    Ok(out)
}

/// What the image runs.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub name: String,
    pub tag: String,
    pub entrypoint: Vec<String>,
    pub exposed_ports: Vec<u16>,
}

fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Writes the OCI image layout for `rootfs` into `out` (replacing it); returns the manifest's
/// descriptor digest.
pub fn write_layout(out: &Path, rootfs: &RootFs, image: &ImageConfig) -> Result<String, OciError> {
    let layer = tar(rootfs)?;
    let layer_digest = digest(&layer);
    let ports: serde_json::Map<String, Value> = image
        .exposed_ports
        .iter()
        .map(|p| (format!("{p}/tcp"), json!({})))
        .collect();
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": format!("{USER_ID}:{USER_ID}"),
            "Entrypoint": image.entrypoint,
            "Env": ["PATH=/usr/local/bin"],
            "WorkingDir": "/",
            "ExposedPorts": ports,
            "Labels": {"org.opencontainers.image.title": image.name},
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "constellation-oci: binary and its shared libraries"}],
    }))
    .map_err(|e| OciError::Io {
        path: out.to_owned(),
        source: e.into(),
    })?;
    let config_digest = digest(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))
    .map_err(|e| OciError::Io {
        path: out.to_owned(),
        source: e.into(),
    })?;
    let manifest_digest = digest(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": image.tag},
        }],
    }))
    .map_err(|e| OciError::Io {
        path: out.to_owned(),
        source: e.into(),
    })?;

    if out.exists() {
        std::fs::remove_dir_all(out).map_err(io(out))?;
    }
    let blobs = out.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(io(&blobs))?;
    for (d, bytes) in [
        (&layer_digest, &layer),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        let path = blobs.join(d.trim_start_matches("sha256:"));
        std::fs::write(&path, bytes).map_err(io(&path))?;
    }
    let path = out.join("oci-layout");
    std::fs::write(&path, br#"{"imageLayoutVersion":"1.0.0"}"#).map_err(io(&path))?;
    let path = out.join("index.json");
    std::fs::write(&path, index).map_err(io(&path))?;
    Ok(manifest_digest)
}
