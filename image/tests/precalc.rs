//! The offline precalculation on the real kernel (from `make image-kernel`), without booting:
//! what it depends on, and what it says about PCRs it cannot predict.

use std::path::{Path, PathBuf};

use constellation_attestation::measurements::{sha256, CLUSTER_ID_PCR};
use constellation_image::eventlog::{Event, EV_EVENT_TAG};
use constellation_image::pe::{self, QemuMemory};
use constellation_image::qemu::{first_differing_event, precalculate, DEFAULT_CMDLINE};

fn kernel() -> Vec<u8> {
    let root = std::env::var_os("CONSTELLATION_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/kernel");
            let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e} (run `make image-kernel`)", dir.display()))
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            assert_eq!(
                dirs.len(),
                1,
                "one unpacked kernel under {}: {dirs:?}",
                dir.display()
            );
            dirs.remove(0)
        });
    let boot = root.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("vmlinuz-")
        })
        .expect("boot/vmlinuz-*");
    std::fs::read(vmlinuz).unwrap()
}

const OVMF_KNOWN: &str = "b157d97b1f69729514feb7f201d2cbe4957f23ab77920e361fe9f822ba49ca4c";

fn known_fw() -> [u8; 32] {
    let mut d = [0u8; 32];
    hex::decode_to_slice(OVMF_KNOWN, &mut d).unwrap();
    d
}

#[test]
fn qemu_patch_writes_the_initrd_size_and_address_into_the_header() {
    let k = kernel();
    let p = pe::qemu_patched_bzimage(&k, 12345, QemuMemory { ram_mib: 1024 }).unwrap();
    assert_eq!(p.len(), k.len());
    assert_eq!(
        u32::from_le_bytes(p[0x21c..0x220].try_into().unwrap()),
        12345
    );
    // (1 GiB - 0x28000 - 1 - 12345) & !4095
    let addr = ((1u64 << 30) - 0x28000 - 1 - 12345) & !4095;
    assert_eq!(
        u32::from_le_bytes(p[0x218..0x21c].try_into().unwrap()) as u64,
        addr
    );
    assert_eq!(p[0x210], 0xb0);
    // Nothing outside the setup header changed.
    let changed: Vec<usize> = (0..k.len()).filter(|&i| k[i] != p[i]).collect();
    assert!(
        changed.iter().all(|&i| (0x210..0x230).contains(&i)),
        "{changed:x?}"
    );
    assert!(pe::qemu_patched_bzimage(&k, 2 << 30, QemuMemory { ram_mib: 1024 }).is_err());
}

#[test]
fn pcr_4_follows_initrd_size_and_ram_and_pcr_9_follows_initrd_bytes_and_cmdline() {
    let k = kernel();
    let fw = known_fw();
    let base = precalculate(&k, b"initrd-a", DEFAULT_CMDLINE, 1024, &fw).unwrap();
    let same_size = precalculate(&k, b"initrd-b", DEFAULT_CMDLINE, 1024, &fw).unwrap();
    let other_size = precalculate(&k, b"initrd-ab", DEFAULT_CMDLINE, 1024, &fw).unwrap();
    let other_ram = precalculate(&k, b"initrd-a", DEFAULT_CMDLINE, 2048, &fw).unwrap();
    let other_cmdline = precalculate(&k, b"initrd-a", "console=ttyS0", 1024, &fw).unwrap();
    let m = |p: &constellation_image::qemu::Precalculated, i: u32| p.measurements.0[&i].expected;
    assert_eq!(m(&base, 4), m(&same_size, 4));
    assert_ne!(m(&base, 4), m(&other_size, 4));
    assert_ne!(m(&base, 9), m(&same_size, 9));
    assert_ne!(m(&base, 9), m(&other_cmdline, 9));
    // 2048 MiB has no recorded firmware events; PCR 4 still moves with the initrd address.
    assert_ne!(other_ram.measurements.0[&4].expected, m(&base, 4));
    // The initrd event is exactly SHA-256 of the initrd.
    let initrd_event = base
        .events
        .iter()
        .find(|e| e.what.contains("Linux initrd"))
        .unwrap();
    assert_eq!(initrd_event.sha256, sha256(b"initrd-a"));
}

#[test]
fn image_pcrs_are_enforced_and_unknown_firmware_pcrs_are_left_out_with_a_reason() {
    let k = kernel();
    let known = precalculate(&k, b"x", DEFAULT_CMDLINE, 1024, &known_fw()).unwrap();
    let unknown = precalculate(&k, b"x", DEFAULT_CMDLINE, 1024, &[7; 32]).unwrap();
    for p in [&known, &unknown] {
        p.measurements.validate().unwrap();
        for pcr in [4, 8, 9, CLUSTER_ID_PCR] {
            assert!(!p.measurements.0[&pcr].warn_only, "PCR {pcr}");
            assert!(p.sources[&pcr].enforced);
        }
        for pcr in [2, 3, 5, 6] {
            assert!(p.measurements.0[&pcr].warn_only, "PCR {pcr}");
        }
        assert_eq!(known.measurements.0[&4], p.measurements.0[&4]);
    }
    for pcr in [0, 1, 7] {
        assert!(known.measurements.0[&pcr].warn_only);
        assert!(!unknown.measurements.0.contains_key(&pcr));
        let reason = &unknown.sources[&pcr].reason;
        assert!(
            reason.contains("not predicted") && reason.contains("0707"),
            "{reason}"
        );
    }
}

#[test]
fn the_first_differing_event_is_named() {
    let k = kernel();
    let pre = precalculate(&k, b"x", DEFAULT_CMDLINE, 1024, &known_fw()).unwrap();
    let logged: Vec<Event> = pre
        .events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.pcr == 9)
        .map(|(i, e)| Event {
            index: i,
            pcr: e.pcr,
            event_type: e.event_type,
            sha256: e.sha256,
            data: Vec::new(),
        })
        .collect();
    assert!(first_differing_event(9, &pre.events, &logged).contains("every logged event matches"));
    let mut tampered = logged.clone();
    tampered[1].sha256 = sha256(b"y");
    tampered[1].data = b"\xec\x22\x3b\x8f\x0d\0\0\0Linux initrd\0".to_vec();
    let named = first_differing_event(9, &pre.events, &tampered);
    assert!(
        named.contains("Linux initrd") && named.contains(&hex::encode(sha256(b"y"))),
        "{named}"
    );
    assert_eq!(tampered[1].event_type, EV_EVENT_TAG);
    let named = first_differing_event(9, &pre.events, &logged[..1]);
    assert!(named.contains("missing"), "{named}");
}
