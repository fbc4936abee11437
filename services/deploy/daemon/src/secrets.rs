//! Secret files from the daemon's state folder (on the node's encrypted state disk, or a
//! Kubernetes Secret mounted as files). Secrets never come from flags or the environment, and
//! errors name the file but never its content.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use constellation_common::secret::SecretBytes;

/// Why a secret file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("secret file {path} is missing")]
    Missing { path: PathBuf },
    #[error("secret file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("secret file {path} is readable by every user (mode {mode:o}); allow at most owner and group")]
    WorldReadable { path: PathBuf, mode: u32 },
    #[error("secret file {path} is empty")]
    Empty { path: PathBuf },
}

/// Refuses a secret file that exists and others may read (a missing file is for the reader).
pub fn check_private(path: &Path) -> Result<(), SecretFileError> {
    let mode = match std::fs::metadata(path) {
        Ok(m) => m.permissions().mode() & 0o777,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SecretFileError::Missing {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(SecretFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    if mode & 0o007 != 0 {
        return Err(SecretFileError::WorldReadable {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Reads `state_dir/relative`, refusing files others may read.
pub fn read(state_dir: &Path, relative: &str) -> Result<SecretBytes, SecretFileError> {
    let path = state_dir.join(relative);
    let io = |source: std::io::Error| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SecretFileError::Missing { path: path.clone() }
        } else {
            SecretFileError::Io {
                path: path.clone(),
                source,
            }
        }
    };
    check_private(&path)?;
    let bytes = SecretBytes::new(std::fs::read(&path).map_err(io)?);
    if bytes.is_empty() {
        return Err(SecretFileError::Empty { path });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_or_missing_secrets_are_refused_without_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"topsecret").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read(dir.path(), "key").unwrap_err();
        assert!(
            matches!(e, SecretFileError::WorldReadable { mode: 0o644, .. }),
            "{e}"
        );
        assert!(!e.to_string().contains("topsecret"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert_eq!(read(dir.path(), "key").unwrap().expose(), b"topsecret");
        assert!(matches!(
            read(dir.path(), "nope"),
            Err(SecretFileError::Missing { .. })
        ));
    }
}
