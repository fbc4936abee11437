//! Attacks on files that hold secrets: a local user who can write to the directory plants a
//! symlink or file where the secret is about to be written, or reads it while it is written.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use constellation_common::secret_file::{
    create_exclusive, ensure_private_dir, write_atomic_via, write_private_atomic, SecretFileError,
    PRIVATE_FILE_MODE,
};

const SECRET: &[u8] = b"-----BEGIN PRIVATE KEY----- not for you";

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_already_exists(err: SecretFileError) {
    match err {
        SecretFileError::Io {
            operation, source, ..
        } => {
            assert_eq!(operation, "creating");
            assert_eq!(source.kind(), std::io::ErrorKind::AlreadyExists);
        }
        other => panic!("expected a refused exclusive create, got {other:?}"),
    }
}

#[test]
fn symlink_planted_at_the_temporary_path_gets_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let loot = elsewhere.path().join("loot");
    fs::write(&loot, b"attacker file").unwrap();
    let target = dir.path().join("kubeconfig");
    let temp = dir.path().join(".kubeconfig.tmp");
    symlink(&loot, &temp).unwrap();

    let err = write_atomic_via(&target, &temp, SECRET, PRIVATE_FILE_MODE).unwrap_err();
    assert_already_exists(err);
    assert_eq!(fs::read(&loot).unwrap(), b"attacker file");
    assert!(!target.exists(), "nothing was written to the target");
    // The attacker's link stays where it was (we do not delete what we did not create).
    assert!(fs::symlink_metadata(&temp)
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn dangling_symlink_planted_at_the_temporary_path_creates_no_file_for_the_attacker() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let would_be = elsewhere.path().join("created-by-victim");
    let target = dir.path().join("journal.json");
    let temp = dir.path().join(".journal.json.tmp");
    symlink(&would_be, &temp).unwrap();

    assert_already_exists(write_atomic_via(&target, &temp, SECRET, PRIVATE_FILE_MODE).unwrap_err());
    assert!(
        !would_be.exists(),
        "the link was not followed to create a file"
    );
    assert_already_exists(create_exclusive(&temp, PRIVATE_FILE_MODE).unwrap_err());
}

#[test]
fn file_planted_at_the_temporary_path_fails_the_write_and_keeps_its_content() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("master.key");
    let temp = dir.path().join(".master.key.tmp");
    // World-readable, opened by the attacker in advance: writing into it would leak.
    fs::write(&temp, b"").unwrap();
    fs::set_permissions(&temp, fs::Permissions::from_mode(0o666)).unwrap();

    assert_already_exists(write_atomic_via(&target, &temp, SECRET, PRIVATE_FILE_MODE).unwrap_err());
    assert_eq!(fs::read(&temp).unwrap(), b"");
    assert!(!target.exists());
}

#[test]
fn symlink_planted_at_the_target_is_replaced_not_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let loot = elsewhere.path().join("loot");
    fs::write(&loot, b"attacker file").unwrap();
    fs::set_permissions(&loot, fs::Permissions::from_mode(0o666)).unwrap();
    let target = dir.path().join("ca.key");
    symlink(&loot, &target).unwrap();

    write_private_atomic(&target, SECRET).unwrap();
    assert_eq!(fs::read(&loot).unwrap(), b"attacker file");
    assert!(fs::symlink_metadata(&target).unwrap().file_type().is_file());
    assert_eq!(fs::read(&target).unwrap(), SECRET);
    assert_eq!(mode(&target), 0o600);
}

#[test]
fn world_readable_old_file_is_replaced_by_a_0600_one_and_no_temporary_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("state.json");
    fs::write(&target, b"old").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();

    write_private_atomic(&target, SECRET).unwrap();
    assert_eq!(fs::read(&target).unwrap(), SECRET);
    assert_eq!(mode(&target), 0o600);
    assert_eq!(entries(dir.path()), vec!["state.json".to_owned()]);
}

#[test]
fn failed_write_leaves_no_copy_of_the_secret_behind() {
    let dir = tempfile::tempdir().unwrap();
    // The rename fails: the target is a non-empty directory.
    let target = dir.path().join("occupied");
    fs::create_dir(&target).unwrap();
    fs::write(target.join("x"), b"").unwrap();

    let err = write_private_atomic(&target, SECRET).unwrap_err();
    assert!(
        matches!(
            err,
            SecretFileError::Io {
                operation: "renaming into place",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(entries(dir.path()), vec!["occupied".to_owned()]);
}

#[test]
fn private_directory_is_closed_to_others_and_a_symlinked_one_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let open = root.path().join("a/b");
    fs::create_dir_all(&open).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o755)).unwrap();
    ensure_private_dir(&open).unwrap();
    assert_eq!(mode(&open), 0o700);

    let fresh = root.path().join("c/d");
    ensure_private_dir(&fresh).unwrap();
    assert_eq!(mode(&fresh), 0o700);

    let elsewhere = tempfile::tempdir().unwrap();
    let link = root.path().join("link");
    symlink(elsewhere.path(), &link).unwrap();
    let err = ensure_private_dir(&link).unwrap_err();
    assert!(
        matches!(
            err,
            SecretFileError::NotADirectory {
                found: "a symlink",
                ..
            }
        ),
        "{err:?}"
    );
}
