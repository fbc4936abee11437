//! Writing files that hold secrets or trust roots (keys, kubeconfigs, pinned keys, journals).
//!
//! A write goes to a fresh temporary in the target's own directory, opened with
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and the final mode, is synced, renamed over the target, and the
//! directory is synced. The temporary's name is random *and* created exclusively: whoever
//! pre-plants a file or symlink at a temporary path makes the write fail instead of receiving
//! the secret, and the rename replaces a symlink at the target itself rather than writing
//! through it. Readers never see half a file, and a crash leaves the old file or the new one.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files holding secrets: owner read/write only.
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of directories holding secrets: only the owner may enter.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Why a secret file could not be written. Carries paths, never contents.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{operation} {path}: {source}")]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} has no file name to write to")]
    NoFileName { path: PathBuf },
    #[error("{path} is not a directory (found {found}); refusing to keep secrets in it")]
    NotADirectory { path: PathBuf, found: &'static str },
}

impl SecretFileError {
    fn io<'a>(operation: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            operation,
            path: path.to_owned(),
            source,
        }
    }
}

impl From<SecretFileError> for io::Error {
    /// For callers whose own error type carries an `io::Error`: keeps the kind of the
    /// underlying failure (e.g. `AlreadyExists` for a pre-planted temporary).
    fn from(e: SecretFileError) -> Self {
        let kind = match &e {
            SecretFileError::Io { source, .. } => source.kind(),
            SecretFileError::NoFileName { .. } => io::ErrorKind::InvalidInput,
            SecretFileError::NotADirectory { .. } => io::ErrorKind::NotADirectory,
        };
        io::Error::new(kind, e)
    }
}

/// Writes `bytes` to `path` atomically with mode 0600 (see the module docs).
pub fn write_private_atomic(path: &Path, bytes: &[u8]) -> Result<(), SecretFileError> {
    write_atomic(path, bytes, PRIVATE_FILE_MODE)
}

/// Writes `bytes` to `path` atomically with `mode` (e.g. 0644 for a public CA certificate that
/// must not be swapped under a reader). The parent directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), SecretFileError> {
    let temp = temporary_path(path)?;
    write_atomic_via(path, &temp, bytes, mode)
}

/// [`write_atomic`] through the temporary `temp`, which must be in `path`'s directory. The
/// random name [`write_atomic`] picks is the normal case; a fixed one lets tests plant a file
/// or symlink where the temporary will be created.
pub fn write_atomic_via(
    path: &Path,
    temp: &Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), SecretFileError> {
    let mut file = create_exclusive(temp, mode)?;
    let result = (|| {
        file.write_all(bytes)
            .map_err(SecretFileError::io("writing", temp))?;
        file.sync_all()
            .map_err(SecretFileError::io("syncing", temp))?;
        drop(file);
        fs::rename(temp, path).map_err(SecretFileError::io("renaming into place", path))?;
        let dir = parent_dir(path);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(SecretFileError::io("syncing directory", dir))
    })();
    if result.is_err() {
        // The temporary is ours (created exclusively): never leave a copy of the secret behind.
        let _ = fs::remove_file(temp);
    }
    result
}

/// Creates a new file with exactly `mode` (the umask can only remove bits, so they are set
/// again). Fails if anything, a symlink included, already exists at `path`.
pub fn create_exclusive(path: &Path, mode: u32) -> Result<File, SecretFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(SecretFileError::io("creating", path))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(SecretFileError::io("setting the mode of", path))?;
    Ok(file)
}

/// Creates `dir` (and missing parents) and makes `dir` itself mode 0700. A symlink or a
/// non-directory at `dir` is refused rather than followed.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecretFileError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(SecretFileError::io("creating directory", dir))?;
    let meta =
        fs::symlink_metadata(dir).map_err(SecretFileError::io("inspecting directory", dir))?;
    let found = if meta.file_type().is_symlink() {
        "a symlink"
    } else if !meta.is_dir() {
        "a file"
    } else {
        ""
    };
    if !found.is_empty() {
        return Err(SecretFileError::NotADirectory {
            path: dir.to_owned(),
            found,
        });
    }
    if meta.permissions().mode() & 0o7777 != PRIVATE_DIR_MODE {
        fs::set_permissions(dir, fs::Permissions::from_mode(PRIVATE_DIR_MODE))
            .map_err(SecretFileError::io("setting the mode of", dir))?;
    }
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `.<name>.<16 random hex digits>.tmp` next to `path`.
fn temporary_path(path: &Path) -> Result<PathBuf, SecretFileError> {
    let name = path
        .file_name()
        .ok_or_else(|| SecretFileError::NoFileName {
            path: path.to_owned(),
        })?;
    let mut temp = OsString::from(".");
    temp.push(name);
    temp.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    Ok(parent_dir(path).join(temp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporaries_are_random_and_next_to_the_target() {
        let a = temporary_path(Path::new("/x/y/key.pem")).unwrap();
        let b = temporary_path(Path::new("/x/y/key.pem")).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x/y")));
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".key.pem."));
        assert_eq!(
            temporary_path(Path::new("k")).unwrap().parent(),
            Some(Path::new("."))
        );
        assert!(matches!(
            temporary_path(Path::new("/")),
            Err(SecretFileError::NoFileName { .. })
        ));
    }
}
