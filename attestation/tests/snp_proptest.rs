//! Arbitrary bytes into the SNP report parser, the verifier and the certificate/extension
//! parser never panic. The bounded tests run by default; `make fuzz` runs the `proptest_long`
//! variants with PROPTEST_CASES=200000.

mod snp_common;

use constellation_attestation::snp::{
    self, parse_vek_certificate, AttestationReport, SnpPolicy, VerifiedVek,
};
use proptest::prelude::*;
use snp_common::*;

const BOUNDED_CASES: u32 = 256;

/// Arbitrary bytes, or a real report/certificate with a few bytes overwritten (which reaches
/// far deeper into the parsers than uniform noise).
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        proptest::collection::vec((0..len, any::<u8>()), 1..8).prop_map(move |edits| {
            let mut b = base.clone();
            for (i, v) in edits {
                b[i] = v;
            }
            b
        }),
    ]
}

fn truncated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    (0..=len).prop_map(move |n| base[..n].to_vec())
}

fn report_input_never_panics(bytes: &[u8], vek: &VerifiedVek) {
    let _ = AttestationReport::parse(bytes).map(|r| serde_json::to_string(&r));
    let _ = snp::verify_report(bytes, vek, &SnpPolicy::default());
}

fn cert_input_never_panics(bytes: &[u8], chain: &[u8]) {
    let _ = parse_vek_certificate(bytes);
    let _ = VerifiedVek::new(bytes, chain, &clock(AZURE_VALID_AT));
    let _ = VerifiedVek::new(&read(AZURE_VCEK_DER), bytes, &clock(AZURE_VALID_AT));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(BOUNDED_CASES))]

    #[test]
    fn report_parser_never_panics(bytes in mutated(azure_report())) {
        report_input_never_panics(&bytes, &azure_vek());
    }

    #[test]
    fn truncated_reports_never_panic(bytes in truncated(aws_report())) {
        report_input_never_panics(&bytes, &aws_vek());
    }

    #[test]
    fn cert_parser_never_panics(bytes in mutated(read(AZURE_VCEK_DER))) {
        cert_input_never_panics(&bytes, &read(ASK_ARK));
    }

    #[test]
    fn pem_chain_parser_never_panics(bytes in mutated(read(ASK_ARK))) {
        cert_input_never_panics(&bytes, &bytes);
    }
}

proptest! {
    // Case count from PROPTEST_CASES.
    #![proptest_config(ProptestConfig::default())]

    #[test]
    #[ignore = "long fuzzing run: make fuzz"]
    fn proptest_long_report_parser(bytes in mutated(azure_report())) {
        report_input_never_panics(&bytes, &azure_vek());
    }

    #[test]
    #[ignore = "long fuzzing run: make fuzz"]
    fn proptest_long_cert_parser(bytes in mutated(read(AZURE_VCEK_DER))) {
        cert_input_never_panics(&bytes, &read(ASK_ARK));
    }

    #[test]
    #[ignore = "long fuzzing run: make fuzz"]
    fn proptest_long_pem_chain_parser(bytes in mutated(read(ASK_ARK))) {
        cert_input_never_panics(&bytes, &bytes);
    }
}
