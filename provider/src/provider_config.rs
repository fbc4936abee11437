//! The `provider "constellation" { ... }` block: what the configuration allows the provider to
//! touch beyond the resources it names.
//!
//! Imports read secrets (a cluster's journal) and trust roots (an image's measurements) from
//! folders on disk. An import ID comes from the command line, not from the configuration, so a
//! folder outside the working directory's `.constellation` folder is only read when the
//! configuration lists it (or a parent of it) in `import_dirs`.

use std::path::{Path, PathBuf};

use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::schema::{Attribute, Block, Type};
use crate::value::Value;

/// The folder, relative to Terraform's working directory, under which the provider keeps
/// clusters and images; imports from it need no configuration.
pub const DEFAULT_IMPORT_ROOT: &str = ".constellation";

pub fn schema() -> Block {
    Block {
        version: 0,
        description: "Settings of the Constellation provider.",
        attributes: vec![Attribute::optional(
            "import_dirs",
            Type::List(Box::new(Type::String)),
            "Absolute folders (besides the working directory's `.constellation`) from which \
             `terraform import` may read a cluster folder (`cluster_dir=`) or an image folder. \
             An import ID naming any other folder is refused.",
        )],
    }
}

/// The decoded provider block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderConfig {
    /// Canonical absolute folders imports may read from (the default root first).
    pub import_dirs: Vec<PathBuf>,
}

/// Why an import may not read a folder.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{} is outside the folders imports may read ({}); add it (or a parent) to the provider's \
     import_dirs",
    folder.display(),
    allowed.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
)]
pub struct ImportFolderRefused {
    pub folder: PathBuf,
    pub allowed: Vec<PathBuf>,
}

impl ProviderConfig {
    /// Only the working directory's `.constellation` folder.
    pub fn default_for(working_dir: &Path) -> Self {
        Self {
            import_dirs: vec![canonical(&working_dir.join(DEFAULT_IMPORT_ROOT))],
        }
    }

    /// Decodes the provider block; `working_dir` is where Terraform runs (the provider's cwd).
    pub fn decode(config: &Value, working_dir: &Path) -> Result<Self, Diagnostics> {
        let mut d = Decoder::new();
        let mut out = Self::default_for(working_dir);
        let path = AttrPath::attr(&["import_dirs"]);
        match config.get("import_dirs") {
            Value::Null => {}
            Value::Unknown => d.incomplete = true,
            Value::List(items) => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = path.key(&i.to_string());
                    match d.opt_string(item, &item_path) {
                        Some(Some(dir)) if Path::new(&dir).is_absolute() => {
                            out.import_dirs.push(canonical(Path::new(&dir)));
                        }
                        Some(Some(dir)) => d.error(
                            &item_path,
                            "Import folder is not absolute",
                            format!("{dir:?} must be an absolute path"),
                        ),
                        Some(None) => d.error(
                            &item_path,
                            "Import folder is null",
                            "each entry of import_dirs must be a folder",
                        ),
                        None => {}
                    }
                }
            }
            other => d.error(
                &path,
                "Wrong type",
                format!(
                    "import_dirs must be a list of strings, found {}",
                    other.kind()
                ),
            ),
        }
        if d.diagnostics.has_errors() {
            return Err(d.diagnostics);
        }
        Ok(out)
    }

    /// Checks that an import may read `folder` (absolute): it must be one of the allowed
    /// folders or lie inside one, after resolving symbolic links and `..`.
    pub fn check_import_folder(&self, folder: &Path) -> Result<(), ImportFolderRefused> {
        let resolved = canonical(folder);
        if self
            .import_dirs
            .iter()
            .any(|allowed| resolved.starts_with(allowed))
        {
            Ok(())
        } else {
            Err(ImportFolderRefused {
                folder: folder.to_owned(),
                allowed: self.import_dirs.clone(),
            })
        }
    }
}

/// The path with symbolic links and `..` resolved where it exists; a folder that does not exist
/// yet is normalised lexically (it cannot be a link).
fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The diagnostic for an RPC that arrived before ConfigureProvider.
pub fn not_configured() -> Diagnostics {
    Diagnostic::error(
        "Provider not configured",
        "Terraform has not sent the provider configuration (ConfigureProvider) yet; the \
         provider touches no cluster before it has",
    )
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(list: &[&str]) -> Value {
        Value::object([(
            "import_dirs",
            Value::List(list.iter().map(|s| Value::string(*s)).collect()),
        )])
    }

    #[test]
    fn imports_read_only_the_default_root_and_listed_folders() {
        let work = tempfile::tempdir().unwrap();
        let extra = tempfile::tempdir().unwrap();
        let config =
            ProviderConfig::decode(&dirs(&[extra.path().to_str().unwrap()]), work.path()).unwrap();
        let root = work.path().join(DEFAULT_IMPORT_ROOT);
        assert!(config.check_import_folder(&root.join("clusters/a")).is_ok());
        assert!(config.check_import_folder(&extra.path().join("c")).is_ok());
        for outside in [
            work.path().to_owned(),
            PathBuf::from("/etc"),
            root.join("../../x"),
            extra.path().join("../elsewhere"),
        ] {
            let err = config.check_import_folder(&outside).unwrap_err();
            assert_eq!(err.folder, outside);
            assert_eq!(err.allowed.len(), 2);
        }
    }

    #[test]
    fn a_symlink_inside_an_allowed_folder_cannot_lead_outside() {
        let work = tempfile::tempdir().unwrap();
        let secret = tempfile::tempdir().unwrap();
        let root = work.path().join(DEFAULT_IMPORT_ROOT);
        std::fs::create_dir_all(&root).unwrap();
        std::os::unix::fs::symlink(secret.path(), root.join("link")).unwrap();
        let config = ProviderConfig::default_for(work.path());
        assert!(config.check_import_folder(&root.join("link")).is_err());
    }

    #[test]
    fn relative_or_mistyped_entries_are_errors() {
        let work = tempfile::tempdir().unwrap();
        assert!(ProviderConfig::decode(&dirs(&["relative/dir"]), work.path()).is_err());
        let wrong = Value::object([("import_dirs", Value::string("/x"))]);
        assert!(ProviderConfig::decode(&wrong, work.path()).is_err());
        assert_eq!(
            ProviderConfig::decode(&Value::Null, work.path()).unwrap(),
            ProviderConfig::default_for(work.path())
        );
    }
}
