//! aws-sev-snp against the real AWS evidence in test_data/snp-aws (VLEK-signed report v3,
//! VLEK, ASVK/ARK chain, verified at a pinned time before the VLEK expired) and a real swtpm.
//!
//! The real report's REPORT_DATA is SHA-512 of an AK's SPKI DER, but that AK (and any quote by
//! it) is not in the testdata. So the accept path is shown half by half: the SNP half accepts
//! the real report when the policy expects its documented REPORT_DATA, the TPM half accepts a
//! swtpm quote; and the full validator refuses the real report for the swtpm AK at exactly the
//! report-data check, which is what ties the two halves together.

mod snp_common;
mod tpm_support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use constellation_attestation::snp::{verify_report, SnpError, SnpPolicy};
use constellation_attestation::tpm::{AkKind, QuoteError, Tpm};
use constellation_attestation::variant::aws_sev_snp::{
    report_data_for_ak, AwsSevSnpEvidence, AwsSevSnpIssuer, AwsSevSnpValidator,
};
use constellation_attestation::variant::snp_vtpm::{validate_vouched_quote, SnpReportError};
use constellation_attestation::{
    IssueError, Issuer, Measurement, Measurements, ValidationError, Validator, Variant,
};
use snp_common::{aws_report, AWS_REPORT_DATA};

const QUOTED: [u32; 2] = [0, 4];
const BINDING: [u8; 32] = [0xa5; 32];

/// Fresh swtpm PCRs are zero.
fn measurements() -> Measurements {
    Measurements(
        QUOTED
            .iter()
            .map(|&i| (i, Measurement::enforce([0; 32])))
            .collect(),
    )
}

/// The real report's reported TCB as the minimum (bl 4, tee 0, snp 24, ucode 217).
fn validator() -> AwsSevSnpValidator {
    let policy = snp_common::aws_tcb_policy();
    AwsSevSnpValidator::new(
        snp_common::aws_vek(),
        policy,
        measurements(),
        Arc::new(snp_common::clock(snp_common::AWS_VALID_AT)),
    )
}

fn documented_report_data() -> [u8; 64] {
    let mut rd = [0u8; 64];
    hex::decode_to_slice(AWS_REPORT_DATA, &mut rd).unwrap();
    rd
}

#[test]
fn snp_half_accepts_the_real_report_with_its_documented_report_data() {
    let v = validator();
    let policy = SnpPolicy {
        report_data: Some(documented_report_data()),
        ..v.policy.clone()
    };
    let report = verify_report(&aws_report(), &v.vek, &policy).unwrap();
    assert_eq!(report.report_data, documented_report_data());
}

#[test]
fn real_report_for_another_ak_fails_the_report_data_check() {
    // A real TPM AK that is not the one the report was made for.
    let (_dir, swtpm) = tpm_support::swtpm();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let ak = tpm.attestation_key(AkKind::EcdsaP256).unwrap();
    let err = validator()
        .verify_report_for_ak(&aws_report(), ak.spki_der())
        .unwrap_err();
    let ValidationError::Snp(SnpError::ReportDataMismatch { expected, found }) = err else {
        panic!("expected report-data mismatch, got {err:?}");
    };
    assert_eq!(expected, report_data_for_ak(ak.spki_der()).to_vec());
    assert_eq!(hex::encode(found), AWS_REPORT_DATA);
}

#[test]
fn a_validator_outliving_its_vlek_rejects_reports_once_it_expired() {
    // Built while the VLEK was valid; later (the VLEK expired 2025-12-10) the same cached
    // chain must no longer vouch for anything, even the report it once accepted.
    let mut later = validator();
    later.clock = Arc::new(snp_common::clock(snp_common::AWS_EXPIRED_AT));
    let err = later
        .verify_report_for_ak(&aws_report(), b"any AK: expiry is checked first")
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
fn policy_is_applied_before_the_ak_binding() {
    let mut strict = validator();
    strict.policy.minimum_tcb.microcode = 218;
    let err = strict
        .verify_report_for_ak(&aws_report(), b"any key")
        .unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Snp(SnpError::TcbBelowMinimum {
                component: "microcode",
                ..
            })
        ),
        "{err:?}"
    );

    let mut tampered = aws_report();
    tampered[0x50] ^= 1; // inside REPORT_DATA, covered by the signature
    let err = validator()
        .verify_report_for_ak(&tampered, b"any key")
        .unwrap_err();
    assert!(
        matches!(err, ValidationError::Snp(SnpError::SignatureInvalid)),
        "{err:?}"
    );
}

#[test]
fn issuer_round_trip_tpm_half_verifies_and_full_validation_needs_the_vouched_ak() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let asked: Arc<Mutex<Vec<[u8; 64]>>> = Arc::default();
    let asked_by_issuer = Arc::clone(&asked);
    let issuer = AwsSevSnpIssuer::new(
        tpm,
        AkKind::EcdsaP256,
        QUOTED.to_vec(),
        Box::new(move |report_data: &[u8; 64]| {
            asked_by_issuer.lock().unwrap().push(*report_data);
            Ok(aws_report())
        }),
    )
    .unwrap();
    assert_eq!(issuer.variant(), Variant::AwsSevSnp);
    let bytes = issuer.issue(&BINDING).unwrap();
    let evidence = AwsSevSnpEvidence::from_bytes(&bytes).unwrap();

    // The issuer asked the firmware for SHA-512 of its AK, and carried the report unchanged.
    let swtpm_ak = issuer.tpm_issuer().ak_public().unwrap();
    assert_eq!(evidence.tpm.ak, swtpm_ak.to_spki_der());
    assert_eq!(
        *asked.lock().unwrap(),
        vec![report_data_for_ak(&evidence.tpm.ak)]
    );
    assert_eq!(evidence.report, aws_report());

    // TPM half: a valid quote by the AK with the binding and the measured PCRs.
    // Checked by the same function the validator runs once the SNP half vouched for the AK.
    let tpm_half = |binding: &[u8; 32], measurements: &Measurements| {
        validate_vouched_quote(
            Variant::AwsSevSnp,
            evidence.tpm.clone(),
            swtpm_ak.clone(),
            measurements,
            binding,
        )
    };
    let verdict = tpm_half(&BINDING, &measurements()).unwrap();
    assert_eq!(verdict.variant, Variant::AwsSevSnp);
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

    // Full validation: the real report vouches for another AK.
    let err = validator().validate(&bytes, &BINDING).unwrap_err();
    assert!(
        matches!(
            &err,
            ValidationError::Snp(SnpError::ReportDataMismatch { expected, .. })
                if *expected == report_data_for_ak(swtpm_ak.spki_der()).to_vec()
        ),
        "{err:?}"
    );
}

#[test]
fn provider_failure_is_an_issue_error() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let issuer = AwsSevSnpIssuer::new(
        tpm,
        AkKind::EcdsaP256,
        QUOTED.to_vec(),
        Box::new(|_: &[u8; 64]| Err(SnpReportError("no /dev/sev-guest".into()))),
    )
    .unwrap();
    assert!(matches!(
        issuer.issue(&BINDING),
        Err(IssueError::Unsupported(Variant::AwsSevSnp, _))
    ));
}
