//! Property tests: the TPMS_ATTEST and TPMT_SIGNATURE parsers and `verify_quote` never panic on
//! arbitrary or mutated input, and a mutated signed quote never verifies.

use std::collections::BTreeMap;

use constellation_attestation::tpm::{verify_quote, AkPublicKey, QuoteAttest, TpmSignature};
use proptest::prelude::*;

/// A quote recorded from `tpm2_quote` on swtpm (ECC AK, PCRs 0,1,4,15 all zero).
const ATTEST: &str = "ff54434780180022000bcd148bc90390be9bdc851b0ccadc0f246e52151f5f178f66a72c89b282ef59fa0008001122334455667700000000000006af000000010000000001201910230016363600000001000b03138000002038723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca";
const SIG: &str = "0018000b00207c2329f0121df5932753678ebeedb75165aa5273028890d17be9340f37fe3dc900204d58f70bd6855dd6e49bcd7d95bfd3fc31b3ab6df7adcfd34c558dfc7e224603";
const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnpsVSHUeVKJtXdS4Y2h7GNm4/NpL
PQWx3Uq1L4na5SOe9TDEn+zAHFPDoKGaaRbyWsRdC+x0hTP6JHIiSQtSPQ==
-----END PUBLIC KEY-----";
const NONCE: &str = "0011223344556677";

fn pcrs() -> BTreeMap<u32, [u8; 32]> {
    [0, 1, 4, 15].into_iter().map(|i| (i, [0u8; 32])).collect()
}

fn parse_anything(bytes: &[u8]) {
    let _ = QuoteAttest::parse(bytes);
    if let Ok(sig) = TpmSignature::parse(bytes) {
        // Whatever parses must marshal back to the same bytes.
        assert_eq!(sig.to_bytes(), bytes);
    }
}

/// Mutates one byte of the signed quote (or its signature): it must never verify.
fn mutated_quote_is_refused(in_signature: bool, index: usize, xor: u8) {
    let ak = AkPublicKey::from_pem(PEM).unwrap();
    let mut attest = hex::decode(ATTEST).unwrap();
    let mut sig = hex::decode(SIG).unwrap();
    let nonce = hex::decode(NONCE).unwrap();
    let target = if in_signature { &mut sig } else { &mut attest };
    let i = index % target.len();
    target[i] ^= xor;
    assert!(verify_quote(&ak, &attest, &sig, &nonce, &pcrs()).is_err());
}

/// Quotes with a TPM2B length or selection count rewritten: the parser must stay in bounds.
fn structured_garbage(prefix_len: usize, tail: &[u8]) {
    let attest = hex::decode(ATTEST).unwrap();
    let mut bytes = attest[..prefix_len % attest.len()].to_vec();
    bytes.extend_from_slice(tail);
    let _ = QuoteAttest::parse(&bytes);
    let ak = AkPublicKey::from_pem(PEM).unwrap();
    let _ = verify_quote(&ak, &bytes, tail, tail, &pcrs());
}

#[test]
fn recorded_quote_verifies() {
    let ak = AkPublicKey::from_pem(PEM).unwrap();
    let q = verify_quote(
        &ak,
        &hex::decode(ATTEST).unwrap(),
        &hex::decode(SIG).unwrap(),
        &hex::decode(NONCE).unwrap(),
        &pcrs(),
    )
    .unwrap();
    assert_eq!(q.pcrs, pcrs());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        parse_anything(&bytes);
    }

    #[test]
    fn mutated_quotes_never_verify(in_sig: bool, index: usize, xor in 1u8..=255) {
        mutated_quote_is_refused(in_sig, index, xor);
    }

    #[test]
    fn truncated_and_extended_quotes_never_panic(
        prefix in 0usize..200,
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        structured_garbage(prefix, &tail);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200_000))]

    #[test]
    #[ignore = "long run: cargo test --test tpm_parsers -- --ignored proptest_long"]
    fn proptest_long_parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        parse_anything(&bytes);
    }

    #[test]
    #[ignore = "long run: cargo test --test tpm_parsers -- --ignored proptest_long"]
    fn proptest_long_mutated_quotes_never_verify(in_sig: bool, index: usize, xor in 1u8..=255) {
        mutated_quote_is_refused(in_sig, index, xor);
    }
}
