//! What a VM's bootstrapper reads from its state disk's header before any key is known: blank,
//! still on its first-boot key (the guest lost that key in a reboot, so the disk is formatted
//! anew), or keyed with a disk key (kept; only the cluster can open it).

use constellation_bootstrapper::statedisk::{self, KdfSettings, VolumeKind};
use constellation_bootstrapper::vm;

#[test]
fn the_header_tells_blank_first_boot_and_keyed_volumes_apart() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(32 << 20))
        .unwrap();
    assert_eq!(statedisk::volume_kind(&disk).unwrap(), VolumeKind::NotLuks2);
    assert!(vm::state_device_needs_format(&disk).unwrap());

    let kdf = KdfSettings::fast_insecure_for_tests();
    statedisk::format(&disk, 32 << 20, &[1; 32], kdf).unwrap();
    assert_eq!(
        statedisk::volume_kind(&disk).unwrap(),
        VolumeKind::FirstBoot
    );
    assert!(vm::state_device_needs_format(&disk).unwrap());

    // A lost first-boot key: the header is wiped and a new volume can be formatted.
    vm::clear_state_device(&disk).unwrap();
    assert_eq!(statedisk::volume_kind(&disk).unwrap(), VolumeKind::NotLuks2);
    let uuid = statedisk::format(&disk, 32 << 20, &[2; 32], kdf).unwrap();

    statedisk::rekey(&disk, &[2; 32], &[3; 32], kdf).unwrap();
    assert_eq!(statedisk::volume_kind(&disk).unwrap(), VolumeKind::Keyed);
    assert!(!vm::state_device_needs_format(&disk).unwrap());
    // A keyed volume is never cleared: its data belongs to the cluster.
    vm::clear_state_device(&disk).unwrap();
    assert_eq!(statedisk::uuid(&disk).unwrap(), uuid);
    assert_eq!(statedisk::verify_key(&disk, &[3; 32]).unwrap(), 0);
}

#[test]
fn a_short_or_foreign_device_is_not_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, b"LUKS").unwrap();
    assert_eq!(
        statedisk::volume_kind(&short).unwrap(),
        VolumeKind::NotLuks2
    );
    let luks1 = dir.path().join("luks1");
    let mut h = vec![0u8; 4096];
    h[..6].copy_from_slice(b"LUKS\xba\xbe");
    h[6..8].copy_from_slice(&[0, 1]);
    std::fs::write(&luks1, &h).unwrap();
    assert_eq!(
        statedisk::volume_kind(&luks1).unwrap(),
        VolumeKind::NotLuks2
    );
}
