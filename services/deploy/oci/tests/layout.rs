//! The image layout: deterministic digests, blobs named by their SHA-256, and a layer GNU tar
//! reads back with the expected names, modes and mtime 0.

use std::path::Path;
use std::process::Command;

use sha2::{Digest, Sha256};

fn build(out: &Path) -> String {
    let rootfs =
        constellation_oci::daemon_rootfs(Path::new("/bin/true"), "true-daemon", &[]).unwrap();
    let image = constellation_oci::ImageConfig {
        name: "true-daemon".into(),
        tag: "test".into(),
        entrypoint: vec!["/usr/local/bin/true-daemon".into()],
        exposed_ports: vec![1234],
    };
    constellation_oci::write_layout(out, &rootfs, &image).unwrap()
}

#[test]
fn same_inputs_same_digest_and_blobs_match_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let a = build(&dir.path().join("a"));
    let b = build(&dir.path().join("b"));
    assert_eq!(a, b, "two builds of the same inputs differ");
    let blobs = dir.path().join("a/blobs/sha256");
    let mut count = 0;
    for entry in std::fs::read_dir(&blobs).unwrap() {
        let entry = entry.unwrap();
        let bytes = std::fs::read(entry.path()).unwrap();
        assert_eq!(
            hex::encode(Sha256::digest(&bytes)),
            entry.file_name().to_string_lossy()
        );
        count += 1;
    }
    assert_eq!(count, 3, "layer, config, manifest");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a/index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], a.as_str());
}

#[test]
fn the_layer_holds_binary_libraries_and_user_with_mtime_zero() {
    let dir = tempfile::tempdir().unwrap();
    let digest = build(&dir.path().join("img"));
    let blobs = dir.path().join("img/blobs/sha256");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(blobs.join(digest.trim_start_matches("sha256:"))).unwrap(),
    )
    .unwrap();
    let layer = blobs.join(
        manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    let listing = Command::new("tar")
        .args([
            "--list",
            "--verbose",
            "--numeric-owner",
            "--full-time",
            "-f",
        ])
        .arg(&layer)
        .output()
        .unwrap();
    assert!(
        listing.status.success(),
        "{}",
        String::from_utf8_lossy(&listing.stderr)
    );
    let text = String::from_utf8_lossy(&listing.stdout);
    assert!(text.contains("-rwxr-xr-x 0/0"), "{text}");
    assert!(text.contains("usr/local/bin/true-daemon"), "{text}");
    assert!(text.contains("lib64/ld-linux-x86-64.so.2"), "{text}");
    assert!(text.contains("libc.so.6"), "{text}");
    assert!(text.contains("etc/passwd"), "{text}");
    for line in text.lines() {
        assert!(line.contains("1970-01-01 00:00:00"), "mtime not 0: {line}");
    }
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            blobs.join(
                manifest["config"]["digest"]
                    .as_str()
                    .unwrap()
                    .trim_start_matches("sha256:"),
            ),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["config"]["User"], "65532:65532");
    assert_eq!(
        config["config"]["Entrypoint"][0],
        "/usr/local/bin/true-daemon"
    );
}
