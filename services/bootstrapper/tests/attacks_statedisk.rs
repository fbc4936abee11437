//! Attacks on a node's state disk: copying the first-boot key and LUKS header before the node
//! gets its real disk key, and a second node on the same host whose device-mapper name collides
//! with this one's.

use std::path::Path;
use std::process::Command;

use constellation_bootstrapper::statedisk::{self, KdfSettings, StateDiskError};

const SIZE: u64 = 32 * 1024 * 1024;
const FIRST_BOOT_KEY: [u8; 32] = [0x5a; 32];
const DISK_KEY: [u8; 32] = [0xa5; 32];

fn kdf() -> KdfSettings {
    KdfSettings::fast_insecure_for_tests()
}

/// The volume key `key` unlocks in the LUKS2 header of `disk`, read by cryptsetup (an
/// independent implementation), as hex.
fn volume_key(dir: &Path, disk: &Path, key: &[u8]) -> String {
    let key_file = dir.join("key");
    std::fs::write(&key_file, key).unwrap();
    let out = Command::new("cryptsetup")
        .args([
            "luksDump",
            "--dump-volume-key",
            "--batch-mode",
            "--key-file",
        ])
        .arg(&key_file)
        .arg(disk)
        .output()
        .expect("cryptsetup is required (apt-get install cryptsetup-bin)");
    std::fs::remove_file(&key_file).unwrap();
    assert!(
        out.status.success(),
        "dump volume key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "MK dump:\t<hex bytes>\n\t\t<hex bytes>..." (the label differs between versions).
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("dump:")
        .unwrap_or_else(|| panic!("no key dump in {text}"));
    let hex: String = text[start + 5..]
        .split_whitespace()
        .take_while(|w| w.len() == 2 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .collect();
    assert_eq!(hex.len(), 2 * statedisk::VOLUME_KEY_BYTES, "{text}");
    hex
}

/// Whether the volume key in `vk_file` is the volume key of `disk`: LUKS2 checks a candidate
/// against the header's digest before it adds a keyslot with it.
fn header_accepts_volume_key(dir: &Path, disk: &Path, vk_hex: &str) -> bool {
    let vk_file = dir.join("vk");
    let bytes: Vec<u8> = (0..vk_hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&vk_hex[i..i + 2], 16).unwrap())
        .collect();
    std::fs::write(&vk_file, bytes).unwrap();
    let new_pass = dir.join("pass");
    std::fs::write(&new_pass, b"attacker passphrase").unwrap();
    let status = Command::new("cryptsetup")
        .args([
            "luksAddKey",
            "--batch-mode",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--volume-key-file",
        ])
        .arg(&vk_file)
        .arg(disk)
        .arg(&new_pass)
        .output()
        .expect("cryptsetup")
        .status;
    status.success()
}

#[test]
fn header_and_first_boot_key_copied_before_the_rekey_cannot_open_the_rekeyed_volume() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let uuid = statedisk::format(&disk, SIZE, &FIRST_BOOT_KEY, kdf()).unwrap();

    // The attacker copies the whole first-boot disk (header included) and somehow the key.
    let stolen = dir.path().join("stolen.img");
    std::fs::copy(&disk, &stolen).unwrap();
    let stolen_vk = volume_key(dir.path(), &stolen, &FIRST_BOOT_KEY);

    statedisk::rekey(&disk, &FIRST_BOOT_KEY, &DISK_KEY, kdf()).unwrap();
    assert_eq!(
        statedisk::uuid(&disk).unwrap(),
        uuid,
        "the disk key's ID stays"
    );
    statedisk::verify_key(&disk, &DISK_KEY).unwrap();

    // The first-boot key opens nothing on the live disk ...
    let err = statedisk::verify_key(&disk, &FIRST_BOOT_KEY).unwrap_err();
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    // ... and what it opens in the stolen header is not the live volume key: data written
    // after the re-key is encrypted under a key the attacker never saw.
    let live_vk = volume_key(dir.path(), &disk, &DISK_KEY);
    assert_ne!(live_vk, stolen_vk, "re-key must replace the volume key");
    assert!(
        !header_accepts_volume_key(dir.path(), &disk, &stolen_vk),
        "the live header must reject the stolen volume key"
    );
    // (The check itself works: the live volume key is accepted.)
    assert!(header_accepts_volume_key(dir.path(), &disk, &live_vk));
}

#[test]
fn rekey_with_a_wrong_first_boot_key_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    statedisk::format(&disk, SIZE, &FIRST_BOOT_KEY, kdf()).unwrap();
    let before = volume_key(dir.path(), &disk, &FIRST_BOOT_KEY);
    let err = statedisk::rekey(&disk, &[0x33; 32], &DISK_KEY, kdf()).unwrap_err();
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    assert_eq!(volume_key(dir.path(), &disk, &FIRST_BOOT_KEY), before);
    let err = statedisk::verify_key(&disk, &DISK_KEY).unwrap_err();
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
}

#[test]
fn nodes_with_equal_length_names_get_distinct_device_mapper_names() {
    // Two nodes on one host, "worker-1" and "worker-2": one kernel device-mapper namespace.
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = ["worker-1", "worker-2"]
        .iter()
        .map(|node| {
            let disk = dir.path().join(format!("{node}.img"));
            statedisk::format(&disk, SIZE, &FIRST_BOOT_KEY, kdf()).unwrap();
            statedisk::mapper_name_of(&disk).unwrap()
        })
        .collect();
    assert_ne!(names[0], names[1]);
    for name in &names {
        // A valid dm name, and open() accepts it.
        assert!(
            name.len() <= 127 && name.starts_with("constellation-state-"),
            "{name}"
        );
    }
    let disk = dir.path().join("worker-1.img");
    let opened = statedisk::open(&disk, &FIRST_BOOT_KEY, &names[0]).unwrap();
    assert_eq!(opened.keyslot(), 0);
    // Stable per disk: a reboot finds the same name.
    assert_eq!(statedisk::mapper_name_of(&disk).unwrap(), names[0]);
    let uuid = statedisk::uuid(&disk).unwrap();
    assert_eq!(statedisk::mapper_name(&uuid), names[0]);
}
