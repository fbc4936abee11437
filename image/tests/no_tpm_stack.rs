//! Hashing an image and precalculating its PCRs must not link a TPM stack or gRPC: the image
//! crate uses the attestation crate without its `tpm-device` and `atls` features.

#[test]
fn the_image_crate_links_no_tpm_stack_and_no_grpc() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--offline",
            "-p",
            "constellation-image",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(
        tree.lines()
            .any(|l| l.starts_with("constellation-attestation ")),
        "the attestation crate should be a dependency:\n{tree}"
    );
    for forbidden in ["tss-esapi", "tonic", "tokio ", "rustls", "h2 "] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "{forbidden} is linked into constellation-image:\n{tree}"
        );
    }
}
