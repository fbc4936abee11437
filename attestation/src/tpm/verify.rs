//! Pure-Rust quote verification: the checks run in the order of [`QuoteCheck::ORDER`] and the
//! first failure is returned with expected and found values.

use std::collections::BTreeMap;
use std::fmt;

use super::ak::AkPublicKey;
use super::attest::{QuoteAttest, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE};
use super::signature::{TpmSignature, TPM_ALG_SHA256};
use super::QuoteError;
use crate::measurements::Digest;

/// A quote that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub attest: QuoteAttest,
    /// The PCR values the AK signed (through pcrDigest).
    pub pcrs: BTreeMap<u32, Digest>,
    /// SHA-256 of the AK's SubjectPublicKeyInfo DER.
    pub ak_fingerprint: Digest,
}

/// The named verification steps, for reports such as the `attest` CLI's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuoteCheck {
    /// TPMT_SIGNATURE and TPMS_ATTEST structure.
    Parse,
    /// Signature over the TPMS_ATTEST bytes with the pinned AK.
    Signature,
    /// TPM_GENERATED magic and quote type.
    MagicType,
    /// extraData equals the expected nonce.
    Nonce,
    /// PCR selection equals the given PCRs and pcrDigest matches their values.
    PcrDigest,
}

impl QuoteCheck {
    /// The order [`verify_quote`] runs the checks in.
    pub const ORDER: [QuoteCheck; 5] = [
        QuoteCheck::Parse,
        QuoteCheck::Signature,
        QuoteCheck::MagicType,
        QuoteCheck::Nonce,
        QuoteCheck::PcrDigest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            QuoteCheck::Parse => "parse",
            QuoteCheck::Signature => "signature",
            QuoteCheck::MagicType => "magic/type",
            QuoteCheck::Nonce => "nonce",
            QuoteCheck::PcrDigest => "pcr-digest",
        }
    }
}

impl fmt::Display for QuoteCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl QuoteError {
    /// Which check this error failed.
    pub fn check(&self) -> QuoteCheck {
        match self {
            QuoteError::Truncated { .. }
            | QuoteError::TrailingBytes { .. }
            | QuoteError::UnsupportedSignatureAlgorithm { .. }
            | QuoteError::UnsupportedSignatureHash { .. }
            | QuoteError::EcdsaComponentTooLong { .. }
            | QuoteError::BadKey(_) => QuoteCheck::Parse,
            QuoteError::AlgorithmMismatch { .. } | QuoteError::BadSignature { .. } => {
                QuoteCheck::Signature
            }
            QuoteError::BadMagic { .. } | QuoteError::NotAQuote { .. } => QuoteCheck::MagicType,
            QuoteError::NonceMismatch { .. } => QuoteCheck::Nonce,
            QuoteError::UnsupportedPcrBank { .. }
            | QuoteError::PcrSelectionMismatch { .. }
            | QuoteError::PcrDigestMismatch { .. } => QuoteCheck::PcrDigest,
        }
    }
}

/// Verifies a TPM 2.0 quote: `attest` is the marshalled TPMS_ATTEST, `signature` the marshalled
/// TPMT_SIGNATURE, `expected_extra_data` the nonce the quote must carry, and `pcrs` the claimed
/// SHA-256 PCR values, which must be exactly the quoted selection.
pub fn verify_quote(
    ak: &AkPublicKey,
    attest: &[u8],
    signature: &[u8],
    expected_extra_data: &[u8],
    pcrs: &BTreeMap<u32, Digest>,
) -> Result<Quote, QuoteError> {
    let signature = TpmSignature::parse(signature)?;
    let parsed = QuoteAttest::parse(attest)?;
    ak.verify(attest, &signature)?;
    check_magic_and_type(&parsed)?;
    check_nonce(&parsed, expected_extra_data)?;
    check_pcrs(&parsed, pcrs)?;
    Ok(Quote {
        attest: parsed,
        pcrs: pcrs.clone(),
        ak_fingerprint: ak.fingerprint(),
    })
}

/// The TPM_GENERATED magic (the TPM made this structure itself) and the quote type.
pub fn check_magic_and_type(attest: &QuoteAttest) -> Result<(), QuoteError> {
    if attest.magic != TPM_GENERATED_VALUE {
        return Err(QuoteError::BadMagic {
            expected: TPM_GENERATED_VALUE,
            found: attest.magic,
        });
    }
    if attest.attest_type != TPM_ST_ATTEST_QUOTE {
        return Err(QuoteError::NotAQuote {
            expected: TPM_ST_ATTEST_QUOTE,
            found: attest.attest_type,
        });
    }
    Ok(())
}

/// extraData must equal the expected nonce byte for byte.
pub fn check_nonce(attest: &QuoteAttest, expected: &[u8]) -> Result<(), QuoteError> {
    if attest.extra_data == expected {
        Ok(())
    } else {
        Err(QuoteError::NonceMismatch {
            expected: hex::encode(expected),
            found: hex::encode(&attest.extra_data),
        })
    }
}

/// The selection must be exactly the given PCRs in the SHA-256 bank (other banks may appear
/// only empty), and pcrDigest must be SHA-256 of their values in ascending index order.
pub fn check_pcrs(attest: &QuoteAttest, pcrs: &BTreeMap<u32, Digest>) -> Result<(), QuoteError> {
    let mut selected: Option<Vec<u32>> = None;
    for selection in &attest.pcr_selections {
        let indices = selection.indices();
        if indices.is_empty() {
            continue;
        }
        if selection.hash != TPM_ALG_SHA256 || selected.is_some() {
            return Err(QuoteError::UnsupportedPcrBank {
                hash: selection.hash,
            });
        }
        selected = Some(indices);
    }
    let selected = selected.unwrap_or_default();
    let expected: Vec<u32> = pcrs.keys().copied().collect();
    if selected != expected {
        return Err(QuoteError::PcrSelectionMismatch {
            expected,
            found: selected,
        });
    }
    let digest = pcr_digest(pcrs);
    if attest.pcr_digest != digest {
        return Err(QuoteError::PcrDigestMismatch {
            expected: hex::encode(digest),
            found: hex::encode(&attest.pcr_digest),
        });
    }
    Ok(())
}

/// SHA-256 over the PCR values concatenated in ascending index order (the TPM's pcrDigest for a
/// single SHA-256 bank selection).
pub fn pcr_digest(pcrs: &BTreeMap<u32, Digest>) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for value in pcrs.values() {
        h.update(value);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ATTEST: &str = "ff54434780180022000bcd148bc90390be9bdc851b0ccadc0f246e52151f5f178f66a72c89b282ef59fa0008001122334455667700000000000006af000000010000000001201910230016363600000001000b03138000002038723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca";
    const SIG: &str = "0018000b00207c2329f0121df5932753678ebeedb75165aa5273028890d17be9340f37fe3dc900204d58f70bd6855dd6e49bcd7d95bfd3fc31b3ab6df7adcfd34c558dfc7e224603";
    const PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnpsVSHUeVKJtXdS4Y2h7GNm4/NpL
PQWx3Uq1L4na5SOe9TDEn+zAHFPDoKGaaRbyWsRdC+x0hTP6JHIiSQtSPQ==
-----END PUBLIC KEY-----";

    fn zero_pcrs() -> BTreeMap<u32, Digest> {
        [0, 1, 4, 15].into_iter().map(|i| (i, [0u8; 32])).collect()
    }

    /// A quote recorded from tpm2-tools on swtpm (all four PCRs zero): the live cross-stack
    /// tests are in tests/tpm_tools.rs; this pins the format offline.
    #[test]
    fn recorded_tpm2_tools_quote_verifies_and_each_check_fails_distinctly() {
        let ak = AkPublicKey::from_pem(PEM).unwrap();
        let attest = hex::decode(ATTEST).unwrap();
        let sig = hex::decode(SIG).unwrap();
        let nonce = hex::decode("0011223344556677").unwrap();
        let q = verify_quote(&ak, &attest, &sig, &nonce, &zero_pcrs()).unwrap();
        assert_eq!(q.ak_fingerprint, ak.fingerprint());

        let err = verify_quote(&ak, &attest, &sig, b"other", &zero_pcrs()).unwrap_err();
        assert_eq!(err.check(), QuoteCheck::Nonce);

        let mut pcrs = zero_pcrs();
        pcrs.insert(4, [1u8; 32]);
        let err = verify_quote(&ak, &attest, &sig, &nonce, &pcrs).unwrap_err();
        assert!(matches!(err, QuoteError::PcrDigestMismatch { .. }), "{err}");

        let mut pcrs = zero_pcrs();
        pcrs.remove(&15);
        let err = verify_quote(&ak, &attest, &sig, &nonce, &pcrs).unwrap_err();
        assert_eq!(
            err,
            QuoteError::PcrSelectionMismatch {
                expected: vec![0, 1, 4],
                found: vec![0, 1, 4, 15]
            }
        );

        let mut bad = attest.clone();
        bad[0] ^= 1;
        let err = verify_quote(&ak, &bad, &sig, &nonce, &zero_pcrs()).unwrap_err();
        assert_eq!(err.check(), QuoteCheck::Signature);
    }
}
