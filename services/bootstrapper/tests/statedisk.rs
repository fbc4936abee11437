//! State disk on a real LUKS2 volume (libcryptsetup on a 32 MiB file; cryptsetup CLI as witness).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use constellation_bootstrapper::statedisk::{self, KdfSettings, OpenedVolume, StateDiskError};

const SIZE: u64 = 32 * 1024 * 1024;
const KEY: [u8; 32] = [0x11; 32];
const OTHER_KEY: [u8; 32] = [0x22; 32];

/// A scratch directory removed on drop (no tempfile dev-dependency in this crate).
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "statedisk-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self(dir)
    }

    fn disk(&self) -> PathBuf {
        self.0.join("state.img")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn formatted(scratch: &Scratch) -> (PathBuf, uuid::Uuid) {
    let disk = scratch.disk();
    let started = Instant::now();
    let uuid = statedisk::format(&disk, SIZE, &KEY, KdfSettings::fast_insecure_for_tests())
        .expect("format");
    eprintln!(
        "format (PBKDF2 1000 iterations, 32 MiB): {:?}",
        started.elapsed()
    );
    (disk, uuid)
}

/// The "Keyslots:" section of `cryptsetup luksDump` (digests always use pbkdf2, so PBKDF checks
/// must look at the keyslots only).
fn keyslots_section(dump: &str) -> &str {
    let start = dump.find("Keyslots:").expect("Keyslots section");
    let end = dump[start..]
        .find("Tokens:")
        .map_or(dump.len(), |i| start + i);
    &dump[start..end]
}

/// `cryptsetup luksDump` output: an independent view of the header.
fn luks_dump(disk: &Path) -> String {
    let output = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(disk)
        .output()
        .expect("cryptsetup is required (apt-get install cryptsetup-bin)");
    assert!(output.status.success(), "luksDump failed: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn right_key_unlocks_and_uuid_is_stable() {
    let scratch = Scratch::new();
    let (disk, uuid) = formatted(&scratch);
    assert_eq!(std::fs::metadata(&disk).expect("metadata").len(), SIZE);

    let started = Instant::now();
    assert_eq!(statedisk::verify_key(&disk, &KEY).expect("verify"), 0);
    eprintln!("verify_key (PBKDF2): {:?}", started.elapsed());

    assert_eq!(statedisk::uuid(&disk).expect("uuid"), uuid);
    assert_eq!(statedisk::uuid(&disk).expect("uuid again"), uuid);
    let dump = luks_dump(&disk);
    assert!(dump.contains(&uuid.to_string()), "{dump}");
    assert!(dump.contains("Version:       \t2"), "{dump}");
    assert!(dump.contains("aes-xts-plain64"), "{dump}");
    assert!(dump.contains("512 bits"), "{dump}");
    let keyslots = keyslots_section(&dump);
    assert!(
        keyslots.contains("pbkdf2") && !keyslots.contains("argon2"),
        "{dump}"
    );
    assert!(keyslots.contains("Iterations: 1000"), "{dump}");

    let opened = statedisk::open(&disk, &KEY, "state").expect("open");
    let dm = statedisk::device_mapper_available();
    if dm {
        assert_eq!(
            opened,
            OpenedVolume::Activated {
                keyslot: 0,
                mapper_path: "/dev/mapper/state".into()
            }
        );
    } else {
        assert_eq!(opened, OpenedVolume::VerifiedOnly { keyslot: 0 });
    }
    // The dm check itself must not have been fooled into an activation attempt.
    assert_eq!(statedisk::device_mapper_available(), dm);
}

#[test]
fn wrong_key_is_a_typed_error() {
    let scratch = Scratch::new();
    let (disk, _) = formatted(&scratch);
    let err = statedisk::verify_key(&disk, &OTHER_KEY).expect_err("wrong key");
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    let err = statedisk::open(&disk, &OTHER_KEY, "state").expect_err("wrong key");
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    assert!(
        !format!("{err:?}").contains("34343434"),
        "no key material: {err:?}"
    );
    let err = statedisk::verify_key(&disk, &[]).expect_err("empty key");
    assert!(matches!(err, StateDiskError::EmptyKey), "{err:?}");
}

#[test]
fn rekeying_adds_a_keyslot_while_the_old_key_still_works() {
    let scratch = Scratch::new();
    let (disk, uuid) = formatted(&scratch);
    let new_slot = statedisk::add_key(
        &disk,
        &KEY,
        &OTHER_KEY,
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect("add key");
    assert_eq!(new_slot, 1);
    assert_eq!(statedisk::verify_key(&disk, &KEY).expect("old key"), 0);
    assert_eq!(
        statedisk::verify_key(&disk, &OTHER_KEY).expect("new key"),
        1
    );
    assert_eq!(statedisk::uuid(&disk).expect("uuid"), uuid);

    let err = statedisk::add_key(
        &disk,
        &[0x33; 32],
        &[0x44; 32],
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect_err("unauthorized re-key");
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
}

#[test]
fn rekey_replaces_the_first_boot_key_which_then_opens_nothing() {
    let scratch = Scratch::new();
    let (disk, uuid) = formatted(&scratch);
    let slot = statedisk::rekey(
        &disk,
        &KEY,
        &OTHER_KEY,
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect("rekey");
    // A new header (new volume key) with the new key's keyslot only.
    assert_eq!(slot, 0);
    assert_eq!(
        statedisk::verify_key(&disk, &OTHER_KEY).expect("new key"),
        0
    );
    let err = statedisk::verify_key(&disk, &KEY).expect_err("old key must be gone");
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    assert_eq!(statedisk::uuid(&disk).expect("uuid"), uuid);
    // The independent view agrees: exactly one keyslot.
    let dump = luks_dump(&disk);
    let keyslots = keyslots_section(&dump);
    assert!(keyslots.contains("  0: luks2"), "{dump}");
    assert!(!keyslots.contains("  1: luks2"), "{dump}");

    let err = statedisk::rekey(
        &disk,
        &OTHER_KEY,
        &OTHER_KEY,
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect_err("same key");
    assert!(matches!(err, StateDiskError::SameKey { .. }), "{err:?}");
    let err = statedisk::rekey(
        &disk,
        &KEY,
        &[0x44; 32],
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect_err("a destroyed key authorizes nothing");
    assert!(matches!(err, StateDiskError::WrongKey { .. }), "{err:?}");
    assert_eq!(statedisk::verify_key(&disk, &OTHER_KEY).expect("still"), 0);
}

#[test]
fn refuses_to_reformat_and_rejects_non_luks_inputs() {
    let scratch = Scratch::new();
    let (disk, uuid) = formatted(&scratch);
    let err = statedisk::format(
        &disk,
        SIZE,
        &OTHER_KEY,
        KdfSettings::fast_insecure_for_tests(),
    )
    .expect_err("already formatted");
    assert!(
        matches!(err, StateDiskError::AlreadyFormatted { .. }),
        "{err:?}"
    );
    assert_eq!(statedisk::uuid(&disk).expect("uuid"), uuid);
    assert_eq!(
        statedisk::verify_key(&disk, &KEY).expect("key still works"),
        0
    );

    let plain = scratch.0.join("plain.img");
    std::fs::write(&plain, vec![0u8; 4 * 1024 * 1024]).expect("write plain file");
    let err = statedisk::verify_key(&plain, &KEY).expect_err("not LUKS");
    assert!(matches!(err, StateDiskError::NotLuks2 { .. }), "{err:?}");
    let err = statedisk::uuid(&scratch.0.join("missing.img")).expect_err("missing");
    assert!(
        matches!(
            err,
            StateDiskError::Cryptsetup { .. } | StateDiskError::NotLuks2 { .. }
        ),
        "{err:?}"
    );
    let err = statedisk::open(&disk, &KEY, "../etc").expect_err("bad name");
    assert!(
        matches!(err, StateDiskError::BadMapperName { .. }),
        "{err:?}"
    );
}

#[test]
fn calls_from_many_threads_are_safe() {
    let scratch = Scratch::new();
    let (disk, _) = formatted(&scratch);
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let disk = disk.clone();
            std::thread::spawn(move || {
                let key = if i % 2 == 0 { KEY } else { OTHER_KEY };
                statedisk::verify_key(&disk, &key)
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let result = thread.join().expect("thread must not panic");
        if i % 2 == 0 {
            assert_eq!(result.expect("right key"), 0);
        } else {
            assert!(matches!(result, Err(StateDiskError::WrongKey { .. })));
        }
    }
}

#[test]
fn default_kdf_is_argon2id() {
    let scratch = Scratch::new();
    let disk = scratch.disk();
    let started = Instant::now();
    let uuid = statedisk::format(&disk, SIZE, &KEY, KdfSettings::default()).expect("format");
    eprintln!(
        "format (argon2id, fixed costs, 32 MiB volume): {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    assert_eq!(statedisk::verify_key(&disk, &KEY).expect("verify"), 0);
    eprintln!("verify_key (argon2id): {:?}", started.elapsed());
    let dump = luks_dump(&disk);
    let keyslots = keyslots_section(&dump);
    assert!(
        keyslots.contains("argon2id") && !keyslots.contains("pbkdf2"),
        "{dump}"
    );
    // The fixed costs, not a benchmark's: 4 passes, 16 MiB, two lanes.
    let KdfSettings::Argon2id {
        iterations,
        memory_kib,
        parallel_threads,
    } = KdfSettings::default()
    else {
        panic!("the default KDF must be argon2id");
    };
    for (field, value) in [
        ("Time cost:", iterations),
        ("Memory:", memory_kib),
        ("Threads:", parallel_threads),
    ] {
        let line = keyslots
            .lines()
            .find(|l| l.trim_start().starts_with(field))
            .unwrap_or_else(|| panic!("{field} missing in {dump}"));
        assert_eq!(
            line.trim_start()[field.len()..].trim(),
            value.to_string(),
            "{dump}"
        );
    }
    assert_eq!((iterations, memory_kib, parallel_threads), (4, 16384, 2));
    assert!(dump.contains(&uuid.to_string()), "{dump}");
}
