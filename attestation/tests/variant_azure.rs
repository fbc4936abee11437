//! azure-sev-snp against the real Azure evidence in test_data/snp-azure (SNP report, HCL runtime
//! data, VCEK and AMD chain) and a real swtpm for the TPM half.
//!
//! No TPM quote signed by the real HCL AK exists, so the accept path of the TPM half is shown
//! with a swtpm AK, and the full validator is shown to refuse that quote because it is not
//! signed by the key the report vouches for.

mod snp_common;
mod tpm_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_lc_rs::rsa::PublicEncryptingKey;
use base64::Engine as _;
use constellation_attestation::measurements::sha256;
use constellation_attestation::snp::{SnpError, REPORT_LEN};
use constellation_attestation::tpm::{AkKind, QuoteError, Tpm};
use constellation_attestation::variant::azure_sev_snp::{
    hcl_ak_from_runtime_data, AzureSevSnpEvidence, AzureSevSnpIssuer, AzureSevSnpValidator,
    HclReport,
};
use constellation_attestation::variant::snp_vtpm::validate_vouched_quote;
use constellation_attestation::{
    Issuer, Measurement, Measurements, ValidationError, Validator, Variant,
};
use snp_common::{read, AZURE_REPORT, AZURE_RUNTIME_DATA};

const QUOTED: [u32; 2] = [0, 4];
const BINDING: [u8; 32] = [0x5a; 32];

/// The report only: attestation.bin has 20 bytes of HCL request header after it.
fn report() -> Vec<u8> {
    read(AZURE_REPORT)
        .get(..REPORT_LEN)
        .expect("attestation.bin holds a full report")
        .to_vec()
}

fn runtime_data() -> Vec<u8> {
    read(AZURE_RUNTIME_DATA)
}

/// Fresh swtpm PCRs are zero.
fn measurements() -> Measurements {
    Measurements(
        QUOTED
            .iter()
            .map(|&i| (i, Measurement::enforce([0; 32])))
            .collect(),
    )
}

/// The real report's TCB and launch measurement as the policy minimum / expectation.
fn validator() -> AzureSevSnpValidator {
    AzureSevSnpValidator::new(
        snp_common::azure_vek(),
        snp_common::azure_tcb_and_measurement_policy(),
        measurements(),
        Arc::new(snp_common::clock(snp_common::AZURE_VALID_AT)),
    )
}

#[test]
fn a_validator_outliving_its_vcek_rejects_the_report_it_once_accepted() {
    // The VCEK is valid until 2030-08-30; a validator still running after that refuses.
    let mut later = validator();
    later.clock = Arc::new(snp_common::clock("2030-09-01T00:00:00Z"));
    let err = later
        .verify_report_and_runtime_data(&report(), &runtime_data())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Snp(SnpError::CertificateExpired { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn real_report_vouches_for_the_runtime_data_and_its_rsa_2048_hcl_ak() {
    let runtime = runtime_data();
    let ak = validator()
        .verify_report_and_runtime_data(&report(), &runtime)
        .unwrap();
    assert_eq!(ak.kind(), AkKind::Rsa2048);
    let rsa = PublicEncryptingKey::from_der(ak.spki_der()).unwrap();
    assert_eq!(rsa.key_size_bits(), 2048);
    // The key is the JWK's modulus, not some other key: n appears verbatim in the SPKI.
    let json: runtime_json::Doc = serde_json::from_slice(&runtime).unwrap();
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&json.keys[0].n)
        .unwrap();
    assert_eq!(n.len(), 256);
    assert!(ak.spki_der().windows(n.len()).any(|w| w == n.as_slice()));
    assert_eq!(
        hcl_ak_from_runtime_data(&runtime).unwrap().fingerprint(),
        ak.fingerprint()
    );
}

/// A minimal typed view of the runtime data, independent of the code under test.
mod runtime_json {
    #[derive(serde::Deserialize)]
    pub struct Doc {
        pub keys: Vec<Key>,
    }
    #[derive(serde::Deserialize)]
    pub struct Key {
        pub n: String,
    }
}

#[test]
fn changed_runtime_data_byte_breaks_the_binding() {
    let mut runtime = runtime_data();
    // Inside vmUniqueId: still valid JSON with the same key, only the hash changes.
    let at = runtime
        .windows(8)
        .position(|w| w == b"B6C98C3B")
        .expect("vmUniqueId in runtime data");
    runtime[at] = b'C';
    let err = validator()
        .verify_report_and_runtime_data(&report(), &runtime)
        .unwrap_err();
    let ValidationError::Snp(SnpError::ReportDataMismatch { expected, found }) = err else {
        panic!("expected report-data mismatch, got {err:?}");
    };
    assert_eq!(expected[..32], sha256(&runtime));
    assert_eq!(found[..32], sha256(&runtime_data()));
    assert_eq!(found[32..], [0u8; 32]);
}

#[test]
fn tampered_report_or_policy_violation_is_refused_by_the_snp_half() {
    let mut tampered = report();
    tampered[0x90] ^= 1; // inside MEASUREMENT, covered by the signature
    let err = validator()
        .verify_report_and_runtime_data(&tampered, &runtime_data())
        .unwrap_err();
    assert!(
        matches!(err, ValidationError::Snp(SnpError::SignatureInvalid)),
        "{err:?}"
    );

    let mut strict = validator();
    strict.policy.minimum_tcb.snp = 7;
    let err = strict
        .verify_report_and_runtime_data(&report(), &runtime_data())
        .unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Snp(SnpError::TcbBelowMinimum {
                component: "snp",
                ..
            })
        ),
        "{err:?}"
    );
}

#[test]
fn issuer_round_trip_and_a_quote_not_by_the_vouched_ak_is_refused() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let issuer = AzureSevSnpIssuer::new(
        tpm,
        QUOTED.to_vec(),
        Box::new(|| {
            Ok(HclReport {
                report: report(),
                runtime_data: runtime_data(),
            })
        }),
    )
    .unwrap();
    assert_eq!(issuer.variant(), Variant::AzureSevSnp);
    let bytes = issuer.issue(&BINDING).unwrap();

    // The SNP half is the file's report and runtime data, byte for byte.
    let evidence = AzureSevSnpEvidence::from_bytes(&bytes).unwrap();
    assert_eq!(evidence.report, report());
    assert_eq!(evidence.runtime_data, runtime_data());

    // The TPM half is a valid quote by the swtpm AK with the binding and measured PCRs.
    let swtpm_ak = issuer.tpm_issuer().ak_public().unwrap();
    assert_eq!(swtpm_ak.kind(), AkKind::Rsa2048);
    // Checked by the same function the validator runs once the SNP half vouched for the AK.
    let tpm_half = |binding: &[u8; 32], measurements: &Measurements| {
        validate_vouched_quote(
            Variant::AzureSevSnp,
            evidence.tpm.clone(),
            swtpm_ak.clone(),
            measurements,
            binding,
        )
    };
    let verdict = tpm_half(&BINDING, &measurements()).unwrap();
    assert_eq!(verdict.variant, Variant::AzureSevSnp);
    assert_eq!(verdict.pcrs, BTreeMap::from([(0, [0; 32]), (4, [0; 32])]));
    assert_eq!(verdict.ak_fingerprint, swtpm_ak.fingerprint());
    assert!(verdict.warnings.is_empty());
    // ... and it refuses another binding or other measurements.
    let err = tpm_half(&[0; 32], &measurements()).unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Quote(QuoteError::NonceMismatch { .. })
        ),
        "{err:?}"
    );
    let mut other = measurements();
    other.0.insert(4, Measurement::enforce([1; 32]));
    let err = tpm_half(&BINDING, &other).unwrap_err();
    assert!(matches!(err, ValidationError::Measurements(_)), "{err:?}");

    // The full validator checks the quote against the HCL AK the report vouches for, which
    // did not sign it: a signature failure, not a pinning or binding failure.
    let hcl_ak = hcl_ak_from_runtime_data(&runtime_data()).unwrap();
    assert_ne!(hcl_ak.fingerprint(), swtpm_ak.fingerprint());
    let err = validator().validate(&bytes, &BINDING).unwrap_err();
    match err {
        ValidationError::Quote(QuoteError::BadSignature { ak_fingerprint }) => {
            assert_eq!(ak_fingerprint, hex::encode(hcl_ak.fingerprint()));
        }
        other => panic!("expected a bad quote signature, got {other:?}"),
    }

    // Evidence of another variant is refused before any check.
    let mut other = evidence;
    other.variant = Variant::AwsSevSnp;
    assert!(matches!(
        validator().validate(&other.to_bytes(), &BINDING),
        Err(ValidationError::VariantMismatch {
            expected: Variant::AzureSevSnp,
            found: Variant::AwsSevSnp
        })
    ));
}
