//! `VekSource` and `verify_report_from` against the real evidence in attestation/test_data: the
//! VEK is chosen per report (signer, CHIP_ID, reported TCB), and collateral given as separate
//! DER certificates (as a KDS serves it) verifies like the PEM chain.

mod snp_common;

use std::collections::HashMap;
use std::sync::Arc;

use constellation_attestation::snp::{
    self, CollateralError, SigningKey, SnpPolicy, SourcedReportError, VekRef, VekRequest,
    VekSource, VerifiedVek, REPORT_LEN,
};
use snp_common::*;

fn ders(rel: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8(read(rel)).unwrap();
    text.split_inclusive("-----END CERTIFICATE-----")
        .filter(|b| b.contains("-----BEGIN CERTIFICATE-----"))
        .map(|b| der::pem::decode_vec(b.trim().as_bytes()).unwrap().1)
        .collect()
}

fn azure() -> Vec<u8> {
    azure_report()[..REPORT_LEN].to_vec()
}

#[test]
fn der_collateral_verifies_like_the_pem_chain() {
    let chain = ders(ASK_ARK);
    let clock = clock(AZURE_VALID_AT);
    let from_der =
        VerifiedVek::from_der(&read(AZURE_VCEK_DER), &chain[0], &chain[1], &clock).unwrap();
    assert_eq!(from_der.extensions(), azure_vek().extensions());
    snp::verify_report(&azure(), &from_der, &SnpPolicy::default()).unwrap();
    // Roles are fixed in this form: the ARK in the intermediate's place is not accepted.
    assert!(VerifiedVek::from_der(&read(AZURE_VCEK_DER), &chain[1], &chain[0], &clock).is_err());
}

/// A source holding several keys, chosen by what the report says.
#[derive(Debug, Default)]
struct ByKey(HashMap<(SigningKey, [u8; 64], u64), Arc<VerifiedVek>>);

impl VekSource for ByKey {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        self.0
            .get(&request.key())
            .map(|vek| VekRef::Shared(vek.clone()))
            .ok_or_else(|| CollateralError::unavailable(request, "not in this test's map"))
    }
}

#[test]
fn one_source_serves_reports_from_different_chips_and_signers() {
    let azure_report = snp::AttestationReport::parse(&azure()).unwrap();
    let aws = aws_report();
    let aws_report = snp::AttestationReport::parse(&aws).unwrap();
    let mut source = ByKey::default();
    for (report, vek) in [(&azure_report, azure_vek()), (&aws_report, aws_vek())] {
        let key = VekRequest::for_report(report).unwrap().key();
        source.0.insert(key, Arc::new(vek));
    }
    let policy = SnpPolicy::default();
    let r = snp::verify_report_from(&azure(), &source, &policy, &clock(AZURE_VALID_AT)).unwrap();
    assert_eq!(r.signing_key, SigningKey::Vcek);
    let r = snp::verify_report_from(&aws, &source, &policy, &clock(AWS_VALID_AT)).unwrap();
    assert_eq!(r.signing_key, SigningKey::Vlek);
    // The VLEK's expiry is re-checked at the caller's clock, whatever the source holds.
    assert!(matches!(
        snp::verify_report_from(&aws, &source, &policy, &clock(AWS_EXPIRED_AT)),
        Err(SourcedReportError::Snp(
            snp::SnpError::CertificateExpired { .. }
        ))
    ));
    // A chip the source does not know is a typed collateral error naming it.
    let mut other = azure();
    other[0x1A0] ^= 1;
    match snp::verify_report_from(&other, &source, &policy, &clock(AZURE_VALID_AT)) {
        Err(SourcedReportError::Collateral(CollateralError::Unavailable {
            chip_id, tcb, ..
        })) => {
            assert_eq!(chip_id, other[0x1A0..0x1E0].to_vec());
            assert_eq!(tcb, azure_report.reported_tcb.raw);
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// The fixed-key path (one pre-verified VEK) still works through the same function.
#[test]
fn a_fixed_verified_vek_is_a_source() {
    let vek = azure_vek();
    snp::verify_report_from(
        &azure(),
        &vek,
        &SnpPolicy::default(),
        &clock(AZURE_VALID_AT),
    )
    .unwrap();
}
