//! `attest verify measurements` on the real signed sample: exit 0 and an accept verdict; a
//! changed file exits 1 naming the failed check.

use std::process::Command;

// The signed sample is the attestation crate's test data.
const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../attestation/test_data/measurements/"
);

fn run(file: &str) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_attest"))
        .args(["verify", "measurements", "--file", file])
        .args(["--signature", &format!("{DIR}measurements.json.sig")])
        .args(["--public-key", &format!("{DIR}cosign.pub")])
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        serde_json::from_slice(&out.stdout).unwrap(),
    )
}

#[test]
fn genuine_file_accepted_tampered_file_rejected() {
    let (code, v) = run(&format!("{DIR}measurements.json"));
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["verdict"], "accept");
    assert!(v["extra"]["file_sha256"]
        .as_str()
        .unwrap()
        .starts_with("7269a1e8"));

    let dir = tempfile::tempdir().unwrap();
    let tampered = dir.path().join("m.json");
    let mut bytes = std::fs::read(format!("{DIR}measurements.json")).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&tampered, bytes).unwrap();
    let (code, v) = run(tampered.to_str().unwrap());
    assert_eq!(code, 1);
    assert_eq!(v["verdict"], "reject");
    assert_eq!(v["failed_check"]["name"], "signature");
}
