//! The real SEV-SNP evidence and AMD certificates vendored in `attestation/test_data/` (each
//! folder's README names origin, license and what a correct verifier concludes), for the tests
//! and benchmarks of every crate: paths, loaders, and the instants at which each certificate is
//! valid. Paths are relative to that folder.

use base64::Engine as _;

use crate::snp::{SnpPolicy, Tcb, VerifiedVek};
use crate::FixedClock;

/// The attestation crate's test data folder (resolved from this crate, so every crate's tests
/// read the same copy).
pub const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/test_data");

pub const AZURE_REPORT: &str = "snp-azure/attestation.bin";
pub const AZURE_VCEK_PEM: &str = "snp-azure/vcek.pem";
pub const AZURE_VCEK_DER: &str = "snp-azure/vcek.der";
pub const AZURE_RUNTIME_DATA: &str = "snp-azure/runtimedata.bin";
pub const ASK_ARK: &str = "amd-certs/milan-ask-ark.pem";
pub const ASVK_ARK: &str = "amd-certs/milan-asvk-ark.pem";
pub const AWS_REPORT_B64: &str = "snp-aws/report.b64";
pub const AWS_VLEK: &str = "snp-aws/vlek.pem";
pub const BADSIG_REPORT: &str = "snp-aws/report-vlek-2023-badsig.bin";
pub const VLEK_2023: &str = "snp-aws/vlek-2023.pem";
/// AMD's Genoa ASK and ARK, in the crate's embedded-roots folder (src/snp/roots/README.md).
pub const GENOA_ASK: &str = "../src/snp/roots/genoa-ask.pem";
pub const GENOA_ARK: &str = "../src/snp/roots/genoa-ark.pem";

/// Inside every Azure certificate's validity period (VCEK 2023-08-30..2030-08-30).
pub const AZURE_VALID_AT: &str = "2026-11-23T00:00:00Z";
/// After the Azure VCEK expired.
pub const AZURE_VCEK_EXPIRED_AT: &str = "2030-09-01T00:00:00Z";
/// Inside the AWS VLEK's validity period (2024-12-10..2025-12-10).
pub const AWS_VALID_AT: &str = "2025-06-01T00:00:00Z";
/// After the AWS VLEK expired.
pub const AWS_EXPIRED_AT: &str = "2026-11-23T00:00:00Z";
/// Inside the 2023 VLEK's validity period (2023-07-19..2024-07-19).
pub const VLEK_2023_VALID_AT: &str = "2024-01-01T00:00:00Z";

/// The Azure report's launch MEASUREMENT.
pub const AZURE_MEASUREMENT: &str = "5677f1de87289e7ad2c7e99c805d0468b1a9ccd83f0d245afa5242d405da4d5725852f8c6550564870e5f3206dfb1841";
/// The AWS report's REPORT_DATA: SHA-512 of the AK's PKIX DER (test_data/snp-aws/README.md).
pub const AWS_REPORT_DATA: &str = "87ab7caf510e1b3520dc3cceb64ee44128e10976fb0d3fc5e274699d8aaf506154af4c1de0a026b49fdf861e9ac75551551b3534d1c61369a3b08f5baed0db2f";

pub fn path(rel: &str) -> String {
    format!("{TESTDATA}/{rel}")
}

/// A testdata file's bytes; panics (naming the path) when it is missing.
pub fn read(rel: &str) -> Vec<u8> {
    let p = path(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("test data {p} missing: {e}"))
}

/// Every CERTIFICATE block of a PEM file, as the exact DER inside it.
pub fn pem_ders(rel: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8(read(rel)).expect("PEM is text");
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| {
            let (label, der) = der::pem::decode_vec(block.trim().as_bytes()).expect("PEM block");
            assert_eq!(label, "CERTIFICATE");
            der
        })
        .collect()
}

pub fn first_der(rel: &str) -> Vec<u8> {
    pem_ders(rel).remove(0)
}

pub fn clock(at: &str) -> FixedClock {
    FixedClock::at_rfc3339(at).expect("valid RFC 3339")
}

/// Azure's `attestation.bin` as stored: the report followed by the HCL header.
pub fn azure_report() -> Vec<u8> {
    read(AZURE_REPORT)
}

/// The AWS report (stored base64).
pub fn aws_report() -> Vec<u8> {
    let text: Vec<u8> = read(AWS_REPORT_B64)
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("report.b64 is base64")
}

pub fn azure_vek() -> VerifiedVek {
    VerifiedVek::new(
        &read(AZURE_VCEK_PEM),
        &read(ASK_ARK),
        &clock(AZURE_VALID_AT),
    )
    .expect("Azure VCEK chain verifies")
}

pub fn aws_vek() -> VerifiedVek {
    VerifiedVek::new(&read(AWS_VLEK), &read(ASVK_ARK), &clock(AWS_VALID_AT))
        .expect("AWS VLEK chain verifies before expiry")
}

/// The Azure report's reported TCB (bl 2, tee 0, snp 6, ucode 93) as the minimum and its launch
/// measurement as the expected one.
pub fn azure_tcb_and_measurement_policy() -> SnpPolicy {
    let mut measurement = [0u8; 48];
    hex::decode_to_slice(AZURE_MEASUREMENT, &mut measurement).expect("measurement hex");
    SnpPolicy {
        minimum_tcb: Tcb {
            bootloader: 2,
            tee: 0,
            snp: 6,
            microcode: 93,
        },
        allowed_measurements: Some(vec![measurement]),
        ..SnpPolicy::default()
    }
}

/// The AWS report's reported TCB (bl 4, tee 0, snp 24, ucode 217) as the minimum.
pub fn aws_tcb_policy() -> SnpPolicy {
    SnpPolicy {
        minimum_tcb: Tcb {
            bootloader: 4,
            tee: 0,
            snp: 24,
            microcode: 217,
        },
        ..SnpPolicy::default()
    }
}
