//! Every single-bit flip in what the signature covers, and anywhere in R and S (the 48 used
//! bytes and the 24 bytes of zero padding above them), must be rejected, for both real reports.

mod snp_common;

use constellation_attestation::snp::{self, SnpError, SnpPolicy, VerifiedVek, SIGNED_LEN};
use snp_common::*;

/// Byte ranges a flip must break: the signed body and all 72 bytes of R and of S.
const MUTATED_RANGES: [std::ops::Range<usize>; 2] = [0..SIGNED_LEN, SIGNED_LEN..SIGNED_LEN + 144];

fn assert_every_bit_flip_rejected(original: &[u8], vek: &VerifiedVek) {
    let policy = SnpPolicy::default();
    snp::verify_report(original, vek, &policy).expect("the unmodified report verifies");
    let mut bytes = original.to_vec();
    let mut flips = 0;
    for offset in MUTATED_RANGES.into_iter().flatten() {
        for bit in 0..8 {
            bytes[offset] ^= 1 << bit;
            match snp::verify_report(&bytes, vek, &policy) {
                Ok(_) => panic!("flip of bit {bit} at offset {offset:#x} was accepted"),
                // Flips in version, signature algorithm or signer fields fail earlier checks,
                // flips in the padding the padding check; everything else the signature.
                Err(
                    SnpError::SignatureInvalid
                    | SnpError::SignaturePadding { .. }
                    | SnpError::UnsupportedVersion { .. }
                    | SnpError::UnsupportedSignatureAlgorithm { .. }
                    | SnpError::SignerMismatch { .. },
                ) => {}
                Err(other) => panic!("flip at {offset:#x}/{bit}: unexpected error {other:?}"),
            }
            bytes[offset] ^= 1 << bit;
            flips += 1;
        }
    }
    assert_eq!(flips, (SIGNED_LEN + 144) * 8);
    assert_eq!(bytes, original, "all flips were undone");
}

#[test]
fn every_bit_flip_in_azure_report_is_rejected() {
    assert_every_bit_flip_rejected(&azure_report(), &azure_vek());
}

#[test]
fn every_bit_flip_in_aws_report_is_rejected() {
    assert_every_bit_flip_rejected(&aws_report(), &aws_vek());
}
