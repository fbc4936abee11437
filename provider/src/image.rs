//! Resource `constellation_image`: assembles a node image and exposes its expected
//! measurements, which the cluster resource checks every node's attestation against.
//!
//! - `platform = "local"`: a folder with the bootstrapper and a manifest (`LocalImage`).
//! - `platform = "qemu"`: a bootable image (`qemu::NodeImage`: the pinned Debian kernel from
//!   `$CONSTELLATION_KERNEL_DIR`, an initramfs with the bootstrapper, a command line) and the
//!   PCR values OVMF and the kernel will produce when it boots, precalculated offline from the
//!   image and the firmware file.
//!
//! Read policy: a missing image folder removes the resource from state (the next plan
//! recreates it); an image whose files disagree with its manifest is an error, because
//! silently rebuilding over a tampered image would hide the tampering.

use std::path::{Path, PathBuf};

use constellation_attestation::measurements::Measurements;
use constellation_image::qemu::{self as node_image, NodeImage, NodeImageError, NodeImageInputs};
use constellation_image::{ImageError, LocalImage, BOOTSTRAPPER_FILE, MANIFEST_FILE};

use crate::cluster::model::Platform;
use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::plan::{self, Planned};
use crate::provider_config::ProviderConfig;
use crate::resource::{ApplyRequest, BoxFuture, PlanRequest, Resource, StateOutcome};
use crate::schema::{Attribute, Block, Type};
use crate::value::Value;

/// Environment variable naming the default bootstrapper binary.
pub const BOOTSTRAPPER_ENV: &str = "CONSTELLATION_BOOTSTRAPPER";
/// Environment variable naming the unpacked Debian kernel package a QEMU image boots
/// (`make image-kernel` puts it under `tools/kernel/`).
pub const KERNEL_DIR_ENV: &str = "CONSTELLATION_KERNEL_DIR";
/// Default image folder, relative to Terraform's working directory: `<this>/<version>`.
pub const DEFAULT_IMAGE_ROOT: &str = ".constellation/images";

/// The platform a `platform` attribute names, or why it cannot be used.
pub fn check_platform(platform: &str) -> Result<Platform, String> {
    match platform {
        "local" => Ok(Platform::Local),
        "qemu" => Ok(Platform::Qemu),
        "azure" | "gcp" => Err(format!(
            "platform {platform:?} is not supported yet; supported: \"local\", \"qemu\""
        )),
        other => Err(format!(
            "unknown platform {other:?}; known platforms: \"local\", \"qemu\" (supported), \
             \"azure\", \"gcp\" (not supported yet)"
        )),
    }
}

/// The cty type of a measurements map: PCR index → {expected, warn_only}.
pub fn measurements_type() -> Type {
    Type::Map(Box::new(Type::Object(vec![
        ("expected", Type::String),
        ("warn_only", Type::Bool),
    ])))
}

pub fn measurements_to_value(m: &Measurements) -> Value {
    Value::Map(
        m.0.iter()
            .map(|(index, m)| {
                (
                    index.to_string(),
                    Value::object([
                        ("expected", Value::string(hex::encode(m.expected))),
                        ("warn_only", Value::Bool(m.warn_only)),
                    ]),
                )
            })
            .collect(),
    )
}

pub struct ImageResource {
    schema: Block,
}

impl Default for ImageResource {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageResource {
    pub fn new() -> Self {
        let schema = Block {
            version: 0,
            description: "A Constellation node image and its expected measurements.",
            attributes: vec![
                Attribute::required(
                    "platform",
                    Type::String,
                    "Platform the image is for: `local` (the bootstrapper and a manifest) or `qemu` \
                     (a bootable image: the kernel in `$CONSTELLATION_KERNEL_DIR` and an initramfs \
                     with the bootstrapper; its measurements are the PCRs OVMF and the kernel \
                     produce, precalculated).",
                )
                .forces_replacement(),
                Attribute::required("version", Type::String, "Image version, e.g. `v0.1.0`.")
                    .forces_replacement(),
                Attribute::optional_computed(
                    "bootstrapper_path",
                    Type::String,
                    "Bootstrapper binary to put into the image. Default: `$CONSTELLATION_BOOTSTRAPPER`, \
                     else `constellation-bootstrapper` next to the provider binary. A change of the \
                     binary's content forces replacement; a new path to identical content does not.",
                ),
                Attribute::optional_computed(
                    "image_dir",
                    Type::String,
                    "Folder the image is assembled in. Default: `.constellation/images/<version>` \
                     under the Terraform working directory.",
                )
                .forces_replacement(),
                Attribute::computed("id", Type::String, "Same as `reference`."),
                Attribute::computed(
                    "reference",
                    Type::String,
                    "Absolute path of the image folder; pass it to `constellation_cluster.image.reference`.",
                ),
                Attribute::computed(
                    "bootstrapper_sha256",
                    Type::String,
                    "SHA-256 (hex) of the bootstrapper inside the image.",
                ),
                Attribute::computed(
                    "measurements",
                    measurements_type(),
                    "Expected measurements: PCR index → `{expected = hex, warn_only = bool}`.",
                ),
            ],
        };
        Self { schema }
    }
}

fn path(name: &str) -> AttrPath {
    AttrPath::attr(&[name])
}

/// The default bootstrapper: `$CONSTELLATION_BOOTSTRAPPER`, else the sibling binary.
fn default_bootstrapper() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(BOOTSTRAPPER_ENV).filter(|p| !p.is_empty()) {
        return Some(absolute(Path::new(&p)));
    }
    let exe = std::env::current_exe().ok()?;
    let sibling = exe.parent()?.join("constellation-bootstrapper");
    sibling.is_file().then_some(sibling)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

fn default_image_dir(version: &str) -> PathBuf {
    absolute(&Path::new(DEFAULT_IMAGE_ROOT).join(version))
}

fn check_version(v: &str) -> Result<(), String> {
    let ok = !v.is_empty()
        && v != "."
        && v != ".."
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '+'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "version {v:?} must be non-empty and use only letters, digits, '.', '-', '_', '+' \
             (it names the image folder)"
        ))
    }
}

/// SHA-256 (hex) of the bootstrapper at `p`, through the digest cache of the image folder
/// `cache_dir` (it exists once the image was created).
fn hash_file(p: &str, cache_dir: &Path) -> Result<String, String> {
    constellation_image::file_sha256_cached(Path::new(p), cache_dir)
        .map(hex::encode)
        .map_err(|e| format!("cannot read bootstrapper {p:?}: {e}"))
}

fn check_readable_file(p: &str) -> Result<(), String> {
    let file =
        std::fs::File::open(p).map_err(|e| format!("cannot read bootstrapper {p:?}: {e}"))?;
    match file.metadata() {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(format!("bootstrapper {p:?} is not a regular file")),
        Err(e) => Err(format!("cannot read bootstrapper {p:?}: {e}")),
    }
}

/// The inputs of an image, all known.
struct ImageInputs {
    platform: Platform,
    version: String,
    bootstrapper_path: String,
    image_dir: String,
}

impl ImageResource {
    /// Decodes and checks the inputs; `None` with no error when some are unknown.
    fn decode(&self, v: &Value, d: &mut Decoder) -> Option<ImageInputs> {
        let platform = d
            .req_string(v.get("platform"), &path("platform"))
            .and_then(|p| {
                d.check(
                    check_platform(&p),
                    &path("platform"),
                    "Unsupported platform",
                )
            });
        let version = d.req_string(v.get("version"), &path("version"));
        if let Some(ver) = &version {
            d.check(
                check_version(ver),
                &path("version"),
                "Invalid image version",
            );
        }
        let bootstrapper_path =
            d.opt_string(v.get("bootstrapper_path"), &path("bootstrapper_path"));
        let image_dir = d.opt_string(v.get("image_dir"), &path("image_dir"));
        for (name, p) in [
            ("bootstrapper_path", &bootstrapper_path),
            ("image_dir", &image_dir),
        ] {
            if let Some(Some(p)) = p {
                if p.is_empty() {
                    d.error(
                        &path(name),
                        "Empty path",
                        format!("{name} must not be empty"),
                    );
                }
            }
        }
        let (version, bootstrapper_path, image_dir) = (version?, bootstrapper_path?, image_dir?);
        Some(ImageInputs {
            platform: platform?,
            bootstrapper_path: bootstrapper_path?,
            image_dir: image_dir
                .unwrap_or_else(|| default_image_dir(&version).display().to_string()),
            version,
        })
    }

    /// State of an assembled image; `image_dir` is kept as the user wrote it.
    fn state_of(&self, image: &BuiltImage, bootstrapper_path: Value, image_dir: Value) -> Value {
        let reference = Value::string(absolute(&image.dir).display().to_string());
        Value::object([
            ("platform", Value::string(image.platform.as_str())),
            ("version", Value::string(image.version.clone())),
            ("bootstrapper_path", bootstrapper_path),
            ("image_dir", image_dir),
            ("id", reference.clone()),
            ("reference", reference),
            (
                "bootstrapper_sha256",
                Value::string(image.bootstrapper_sha256.clone()),
            ),
            ("measurements", measurements_to_value(&image.measurements)),
        ])
    }
}

/// An image of either platform, as the resource's state shows it.
struct BuiltImage {
    dir: PathBuf,
    platform: Platform,
    version: String,
    bootstrapper_sha256: String,
    measurements: Measurements,
}

impl From<LocalImage> for BuiltImage {
    fn from(image: LocalImage) -> Self {
        Self {
            dir: image.dir,
            platform: Platform::Local,
            version: image.manifest.version,
            bootstrapper_sha256: image.manifest.bootstrapper_sha256,
            measurements: image.measurements,
        }
    }
}

/// Why an image could not be built or opened.
#[derive(Debug, thiserror::Error)]
enum BuildError {
    #[error("{0}")]
    Local(#[from] ImageError),
    #[error("{0}")]
    Qemu(#[from] NodeImageError),
    #[error(
        "${KERNEL_DIR_ENV} is not set: a qemu image boots the unpacked Debian kernel package it \
         names (`make image-kernel` unpacks it into tools/kernel/)"
    )]
    NoKernel,
}

impl BuildError {
    /// The image folder (or a file in it) does not exist.
    fn is_not_found(&self) -> bool {
        let kind = match self {
            BuildError::Local(ImageError::Io { source, .. })
            | BuildError::Qemu(NodeImageError::Io { source, .. }) => source.kind(),
            _ => return false,
        };
        kind == std::io::ErrorKind::NotFound
    }
}

/// A QEMU image with its measurements, precalculated for the firmware the platform boots.
fn measured_node_image(image: NodeImage) -> Result<BuiltImage, BuildError> {
    let measurements = image
        .precalculate(Path::new(node_image::OVMF_CODE))?
        .measurements;
    Ok(BuiltImage {
        dir: image.dir,
        platform: Platform::Qemu,
        version: image.manifest.version,
        bootstrapper_sha256: image.manifest.bootstrapper_sha256,
        measurements,
    })
}

/// Builds the image of `platform` into `dir`.
fn build_image(
    platform: Platform,
    dir: &Path,
    bootstrapper: &Path,
    version: &str,
) -> Result<BuiltImage, BuildError> {
    match platform {
        Platform::Local => Ok(LocalImage::assemble(dir, bootstrapper, version)?.into()),
        Platform::Qemu => {
            let kernel = std::env::var_os(KERNEL_DIR_ENV)
                .filter(|k| !k.is_empty())
                .ok_or(BuildError::NoKernel)?;
            let inputs = NodeImageInputs::new(Path::new(&kernel), bootstrapper);
            measured_node_image(NodeImage::build(dir, &inputs, version)?)
        }
    }
}

/// Opens the image of `platform` in `dir`, its files checked against its manifest, and
/// computes its measurements again.
fn open_image(platform: Platform, dir: &Path) -> Result<BuiltImage, BuildError> {
    match platform {
        Platform::Local => Ok(LocalImage::open(dir)?.into()),
        Platform::Qemu => measured_node_image(NodeImage::open(dir)?),
    }
}

/// The platform of the image folder `dir`: a QEMU image has a node image manifest.
fn platform_of(dir: &Path) -> Platform {
    if dir.join(node_image::NODE_MANIFEST_FILE).exists() {
        Platform::Qemu
    } else {
        Platform::Local
    }
}

fn image_error(summary: &str, e: &BuildError) -> Diagnostic {
    Diagnostic::error(summary, e.to_string())
}

/// Removes exactly the files an image (of either platform) consists of, then the folder if it
/// is empty: a user-chosen `image_dir` may hold other files, which are never deleted.
fn remove_image(dir: &Path) -> Result<Diagnostics, Diagnostic> {
    let mut warnings = Diagnostics::default();
    let files = [
        BOOTSTRAPPER_FILE,
        MANIFEST_FILE,
        constellation_image::DIGEST_CACHE_FILE,
        node_image::KERNEL_FILE,
        node_image::INITRD_FILE,
        node_image::NODE_MANIFEST_FILE,
    ]
    .into_iter()
    // A local image links the daemons next to its bootstrapper.
    .chain(constellation_image::DAEMON_FILES);
    let temporary = [
        BOOTSTRAPPER_FILE,
        node_image::KERNEL_FILE,
        node_image::INITRD_FILE,
        node_image::NODE_MANIFEST_FILE,
    ]
    .map(|f| format!(".{f}.tmp"));
    for name in files.map(str::to_owned).chain(temporary) {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Diagnostic::error(
                    "Cannot delete image",
                    format!("{}: {e}", p.display()),
                ))
            }
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warnings.push(Diagnostic::warning(
            "Image folder left in place",
            format!(
                "{}: the image files were removed, but the folder is not empty or cannot be \
                 removed ({e})",
                dir.display()
            ),
        )),
    }
    Ok(warnings)
}

impl Resource for ImageResource {
    fn type_name(&self) -> &'static str {
        "constellation_image"
    }

    fn schema(&self) -> &Block {
        &self.schema
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut d = Decoder::new();
        let _ = self.decode(config, &mut d);
        d.diagnostics
    }

    fn plan(&self, req: PlanRequest<'_>) -> Result<Planned, Diagnostics> {
        let mut planned = plan::plan(&self.schema, req.prior, req.proposed);
        if req.proposed.is_null() {
            return Ok(planned);
        }
        let mut diags = self.validate(req.config);
        let state = &mut planned.state;
        if req.prior.is_null() {
            // Resolve defaults now so the plan shows them.
            if state.get("bootstrapper_path").is_unknown()
                && req.config.get("bootstrapper_path").is_null()
            {
                match default_bootstrapper() {
                    Some(p) => {
                        state.set("bootstrapper_path", Value::string(p.display().to_string()))
                    }
                    None => diags.push(
                        Diagnostic::error(
                            "No bootstrapper binary",
                            format!(
                                "bootstrapper_path is not set, ${BOOTSTRAPPER_ENV} is not set, and \
                                 there is no constellation-bootstrapper next to the provider binary"
                            ),
                        )
                        .at(path("bootstrapper_path")),
                    ),
                }
            }
            if state.get("image_dir").is_unknown() && req.config.get("image_dir").is_null() {
                if let Some(v) = state.get("version").as_str() {
                    let dir = default_image_dir(v).display().to_string();
                    state.set("image_dir", Value::string(dir));
                }
            }
            if state.get("platform").as_str() == Some(Platform::Qemu.as_str())
                && std::env::var_os(KERNEL_DIR_ENV).is_none_or(|k| k.is_empty())
            {
                diags.push(
                    image_error("No kernel for the QEMU image", &BuildError::NoKernel)
                        .at(path("platform")),
                );
            }
            if let Some(p) = state.get("bootstrapper_path").as_str() {
                // Only readability here; apply hashes the binary once, when it copies it.
                if let Err(e) = check_readable_file(p) {
                    diags.push(
                        Diagnostic::error("Bootstrapper not readable", e)
                            .at(path("bootstrapper_path")),
                    );
                }
            }
        } else if let (Some(p), Some(prior_sha)) = (
            state.get("bootstrapper_path").as_str(),
            req.prior.get("bootstrapper_sha256").as_str(),
        ) {
            let cache_dir = req
                .prior
                .get("image_dir")
                .as_str()
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir);
            // Replacement follows the binary's content, not its path.
            match hash_file(p, &cache_dir) {
                Ok(sha) if sha == prior_sha => {}
                Ok(_) => {
                    planned.requires_replace.push(path("bootstrapper_path"));
                    for computed in ["id", "reference", "bootstrapper_sha256", "measurements"] {
                        planned.state.set(computed, Value::Unknown);
                    }
                }
                Err(e) => diags.push(
                    Diagnostic::error("Bootstrapper not readable", e).at(path("bootstrapper_path")),
                ),
            }
        }
        if diags.has_errors() {
            return Err(diags);
        }
        Ok(planned)
    }

    fn apply<'a>(
        &'a self,
        req: ApplyRequest<'a>,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            if req.planned.is_null() {
                let Some(dir) = req.prior.get("reference").as_str() else {
                    return Ok(StateOutcome::default());
                };
                let warnings = remove_image(Path::new(dir))?;
                return Ok(StateOutcome {
                    state: Value::Null,
                    private: Vec::new(),
                    warnings,
                });
            }
            if !req.prior.is_null() {
                // In place: only the bootstrapper path changed, to identical content.
                return Ok(StateOutcome {
                    state: req.planned.clone(),
                    ..Default::default()
                });
            }
            let mut d = Decoder::new();
            let decoded = self.decode(req.planned, &mut d);
            let inputs = d.finish(decoded)?;
            let (bootstrapper, dir) = (inputs.bootstrapper_path.clone(), inputs.image_dir.clone());
            let (platform, version) = (inputs.platform, inputs.version.clone());
            let image = tokio::task::spawn_blocking(move || {
                build_image(
                    platform,
                    &absolute(Path::new(&dir)),
                    Path::new(&bootstrapper),
                    &version,
                )
            })
            .await
            .map_err(|e| Diagnostic::error("Image assembly task failed", e.to_string()))?
            .map_err(|e| image_error("Cannot assemble image", &e))?;
            tracing::info!(dir = %image.dir.display(), platform = image.platform.as_str(), version = %image.version, "assembled image");
            Ok(StateOutcome {
                state: self.state_of(
                    &image,
                    Value::string(inputs.bootstrapper_path),
                    Value::string(inputs.image_dir),
                ),
                ..Default::default()
            })
        })
    }

    fn read<'a>(
        &'a self,
        current: &'a Value,
        _private: &'a [u8],
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let Some(dir) = current.get("reference").as_str() else {
                return Ok(StateOutcome::default());
            };
            let platform = current
                .get("platform")
                .as_str()
                .and_then(|p| check_platform(p).ok())
                .unwrap_or(Platform::Local);
            let dir = PathBuf::from(dir);
            let opened = tokio::task::spawn_blocking(move || open_image(platform, &dir))
                .await
                .map_err(|e| Diagnostic::error("Image read task failed", e.to_string()))?;
            match opened {
                Ok(image) => Ok(StateOutcome {
                    state: self.state_of(
                        &image,
                        current.get("bootstrapper_path").clone(),
                        current.get("image_dir").clone(),
                    ),
                    ..Default::default()
                }),
                Err(e) if e.is_not_found() => {
                    tracing::warn!(error = %e, "image folder is gone; removing it from state");
                    Ok(StateOutcome::default())
                }
                Err(e) => Err(image_error("Image is damaged or was modified", &e).into()),
            }
        })
    }

    fn import<'a>(
        &'a self,
        id: &'a str,
        provider: &'a ProviderConfig,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let dir = absolute(Path::new(id));
            provider.check_import_folder(&dir).map_err(|e| {
                Diagnostics::from(Diagnostic::error(
                    "Import folder not allowed",
                    e.to_string(),
                ))
            })?;
            let image = open_image(platform_of(&dir), &dir).map_err(|e| {
                Diagnostics::from(Diagnostic::error(
                    "Cannot import image",
                    format!("import ID must be the image folder (the `reference` attribute): {e}"),
                ))
            })?;
            let bootstrapper = default_bootstrapper()
                .map(|p| Value::string(p.display().to_string()))
                .unwrap_or(Value::Null);
            Ok(StateOutcome {
                state: self.state_of(
                    &image,
                    bootstrapper,
                    Value::string(dir.display().to_string()),
                ),
                ..Default::default()
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(platform: &str, version: Value) -> Value {
        Value::object([
            ("platform", Value::string(platform)),
            ("version", version),
            ("bootstrapper_path", Value::string("/bin/true")),
            ("image_dir", Value::Null),
            ("id", Value::Null),
            ("reference", Value::Null),
            ("bootstrapper_sha256", Value::Null),
            ("measurements", Value::Null),
        ])
    }

    #[test]
    fn platforms_other_than_local_and_qemu_are_refused_with_the_attribute() {
        let r = ImageResource::new();
        assert!(r
            .validate(&config("qemu", Value::string("v1")))
            .0
            .is_empty());
        for p in ["azure", "gcp"] {
            let d = r.validate(&config(p, Value::string("v1")));
            assert_eq!(d.0.len(), 1, "{p}");
            assert!(d.0[0].detail.contains("not supported yet"));
            assert_eq!(d.0[0].attribute, Some(AttrPath::attr(&["platform"])));
        }
        let d = r.validate(&config("aws", Value::string("v1")));
        assert!(d.0[0].detail.contains("unknown platform"));
        assert!(r
            .validate(&config("local", Value::string("v1")))
            .0
            .is_empty());
        // Unknown version (a variable during validate) is skipped.
        assert!(r.validate(&config("local", Value::Unknown)).0.is_empty());
        let d = r.validate(&config("local", Value::string("../x")));
        assert_eq!(d.0[0].attribute, Some(AttrPath::attr(&["version"])));
    }

    #[tokio::test]
    async fn create_read_import_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("boot");
        std::fs::write(&bin, b"#!/bin/sh\n").unwrap();
        let dir = tmp.path().join("img");
        let r = ImageResource::new();
        let mut cfg = config("local", Value::string("v1"));
        cfg.set(
            "bootstrapper_path",
            Value::string(bin.display().to_string()),
        );
        cfg.set("image_dir", Value::string(dir.display().to_string()));
        let planned = r
            .plan(PlanRequest {
                prior: &Value::Null,
                proposed: &cfg,
                config: &cfg,
            })
            .unwrap();
        assert!(planned.state.get("measurements").is_unknown());
        let created = r
            .apply(ApplyRequest {
                prior: &Value::Null,
                planned: &planned.state,
                config: &cfg,
                private: &[],
            })
            .await
            .unwrap();
        let m = created.state.get("measurements");
        assert_eq!(m.get("4").get("warn_only"), &Value::Bool(false));
        assert_eq!(
            created.state.get("reference").as_str(),
            Some(dir.to_str().unwrap())
        );

        let read = r.read(&created.state, &[]).await.unwrap();
        assert_eq!(read.state, created.state);
        let parent = dir.parent().unwrap();
        let allowed = ProviderConfig {
            import_dirs: vec![parent.canonicalize().unwrap()],
        };
        let imported = r.import(dir.to_str().unwrap(), &allowed).await.unwrap();
        assert_eq!(imported.state.get("measurements"), m);
        // The same folder is not read when the configuration does not allow its parent.
        let elsewhere = tempfile::tempdir().unwrap();
        let refused = r
            .import(
                dir.to_str().unwrap(),
                &ProviderConfig::default_for(elsewhere.path()),
            )
            .await
            .unwrap_err();
        assert!(
            format!("{refused:?}").contains("Import folder not allowed"),
            "{refused:?}"
        );

        // Same path, new content: replacement.
        std::fs::write(&bin, b"#!/bin/sh\nexit 1\n").unwrap();
        let p = r
            .plan(PlanRequest {
                prior: &created.state,
                proposed: &created.state,
                config: &cfg,
            })
            .unwrap();
        assert_eq!(
            p.requires_replace,
            vec![AttrPath::attr(&["bootstrapper_path"])]
        );

        // Tampering is an error, a missing folder removes the resource.
        std::fs::write(dir.join(BOOTSTRAPPER_FILE), b"evil").unwrap();
        assert!(r.read(&created.state, &[]).await.is_err());
        std::fs::write(dir.join("keep.txt"), b"user file").unwrap();
        let deleted = r
            .apply(ApplyRequest {
                prior: &created.state,
                planned: &Value::Null,
                config: &Value::Null,
                private: &[],
            })
            .await
            .unwrap();
        assert_eq!(deleted.warnings.0.len(), 1);
        assert!(dir.join("keep.txt").exists());
        assert!(!dir.join(MANIFEST_FILE).exists());
        std::fs::remove_file(dir.join("keep.txt")).unwrap();
        std::fs::remove_dir(&dir).unwrap();
        assert!(r.read(&created.state, &[]).await.unwrap().state.is_null());
    }
}
