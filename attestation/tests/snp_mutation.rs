//! Every single-bit flip in what the signature covers, and in the used bytes of R and S,
//! must be rejected, for both real reports.

mod snp_common;

use constellation_attestation::snp::{self, SnpError, SnpPolicy, VerifiedVek, SIGNED_LEN};
use snp_common::*;

/// Byte ranges a flip must break: the signed body and the low 48 bytes of R and of S.
const MUTATED_RANGES: [std::ops::Range<usize>; 3] = [
    0..SIGNED_LEN,
    SIGNED_LEN..SIGNED_LEN + 48,
    SIGNED_LEN + 72..SIGNED_LEN + 72 + 48,
];

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
                // Flips in version, signature algorithm or signer fields fail earlier checks;
                // everything else must be caught by the signature.
                Err(
                    SnpError::SignatureInvalid
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
    assert_eq!(flips, (SIGNED_LEN + 96) * 8);
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
