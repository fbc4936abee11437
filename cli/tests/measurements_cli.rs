//! `attest verify measurements` on the real signed sample: exit 0 and an accept verdict; a
//! changed file exits 1 naming the failed check; with `--last-accepted`, a file older than the
//! recorded version is refused as a rollback and an accepted one advances the record.

use std::process::Command;

// The signed sample is the attestation crate's test data.
const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../attestation/test_data/measurements/"
);

fn run(file: &str) -> (i32, serde_json::Value) {
    run_with(file, &[])
}

fn run_with(file: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(env!("CARGO_BIN_EXE_attest"))
        .args(["verify", "measurements", "--file", file])
        .args(["--signature", &format!("{DIR}measurements.json.sig")])
        .args(["--public-key", &format!("{DIR}cosign.pub")])
        .args(extra)
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

#[test]
fn an_older_release_than_the_last_accepted_is_refused_as_rollback() {
    // The sample is signed version v1.0.0-test.
    let genuine = format!("{DIR}measurements.json");
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("last-accepted");
    let flag = ["--last-accepted", record.to_str().unwrap()];

    // Nothing accepted yet: accepted, and recorded.
    let (code, v) = run_with(&genuine, &flag);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["extra"]["version"], "v1.0.0-test");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "v1.0.0-test\n");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&record).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A newer release was accepted since: the genuine but older file is a rollback.
    std::fs::write(&record, "v1.0.0\n").unwrap();
    let (code, v) = run_with(&genuine, &flag);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["failed_check"]["name"], "version", "{v}");
    assert_eq!(v["failed_check"]["expected"], ">= v1.0.0", "{v}");
    assert_eq!(v["failed_check"]["found"], "v1.0.0-test", "{v}");
    assert_eq!(
        std::fs::read_to_string(&record).unwrap(),
        "v1.0.0\n",
        "unchanged"
    );

    // An older record: accepted and advanced.
    std::fs::write(&record, "v0.9.3\n").unwrap();
    let (code, v) = run_with(&genuine, &flag);
    assert_eq!(code, 0, "{v}");
    assert_eq!(std::fs::read_to_string(&record).unwrap(), "v1.0.0-test\n");

    // A record that is no version: refused, naming the file.
    std::fs::write(&record, "latest\n").unwrap();
    let (code, v) = run_with(&genuine, &flag);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["failed_check"]["name"], "last-accepted", "{v}");
    assert!(v["failed_check"]["detail"]
        .as_str()
        .unwrap()
        .contains("last-accepted"));
}
