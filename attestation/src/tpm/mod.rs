//! TPM 2.0 quotes: the wire formats (TPMS_ATTEST, TPMT_SIGNATURE), attestation keys, pure-Rust
//! quote verification (aws-lc-rs), the device side over tss-esapi, and a swtpm process helper.
//!
//! Verification never needs a TPM: [`verify_quote`] takes the signed bytes, the signature, the
//! pinned attestation key, the expected nonce and the claimed PCR values.

mod ak;
mod attest;
#[cfg(feature = "tpm-device")]
mod device;
mod signature;
mod swtpm;
mod verify;
mod wire;

pub use ak::{AkKind, AkPublicKey};
pub use attest::{ClockInfo, PcrSelection, QuoteAttest, TPM_GENERATED_VALUE, TPM_ST_ATTEST_QUOTE};
#[cfg(feature = "tpm-device")]
pub use device::{QuoteEvidence, Tpm};
pub use signature::{TpmSignature, TPM_ALG_ECDSA, TPM_ALG_RSASSA, TPM_ALG_SHA256};
pub use swtpm::{Swtpm, SwtpmHandle};
pub use verify::{
    check_magic_and_type, check_nonce, check_pcrs, pcr_digest, verify_quote, Quote, QuoteCheck,
};

/// Why a TPM quote was refused. Each variant names the failed check with expected and found
/// values (digests and nonces in hex).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("{structure} is truncated: field {field} needs {needed} byte(s) at offset {offset}, only {available} left")]
    Truncated {
        structure: &'static str,
        field: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("{structure} has {count} unexpected trailing byte(s) after offset {offset}")]
    TrailingBytes {
        structure: &'static str,
        offset: usize,
        count: usize,
    },
    #[error(
        "TPMT_SIGNATURE sigAlg: expected ECDSA (0x0018) or RSASSA (0x0014), found {found:#06x}"
    )]
    UnsupportedSignatureAlgorithm { found: u16 },
    #[error("TPMT_SIGNATURE hash: expected SHA-256 (0x000b), found {found:#06x}")]
    UnsupportedSignatureHash { found: u16 },
    #[error("ECDSA signature {component} is {len} bytes: expected at most 32 for P-256")]
    EcdsaComponentTooLong { component: &'static str, len: usize },
    #[error("attestation key is malformed or unsupported: {0}")]
    BadKey(String),
    #[error("signature algorithm does not match the attestation key: key is {key}, signature is {signature}")]
    AlgorithmMismatch {
        key: &'static str,
        signature: &'static str,
    },
    #[error("signature over TPMS_ATTEST does not verify with attestation key {ak_fingerprint}")]
    BadSignature { ak_fingerprint: String },
    #[error("TPMS_ATTEST magic: expected {expected:#010x}, found {found:#010x}")]
    BadMagic { expected: u32, found: u32 },
    #[error("TPMS_ATTEST type: expected {expected:#06x} (quote), found {found:#06x}")]
    NotAQuote { expected: u16, found: u16 },
    #[error("extraData (nonce): expected {expected}, found {found}")]
    NonceMismatch { expected: String, found: String },
    #[error("PCR selection uses unsupported bank {hash:#06x} (only SHA-256, 0x000b, once)")]
    UnsupportedPcrBank { hash: u16 },
    #[error(
        "PCR selection: expected PCRs {expected:?} (the values given), quote selects {found:?}"
    )]
    PcrSelectionMismatch { expected: Vec<u32>, found: Vec<u32> },
    #[error("pcrDigest: expected {expected} (SHA-256 of the given PCR values), quote has {found}")]
    PcrDigestMismatch { expected: String, found: String },
}

/// A failure talking to a TPM or running swtpm.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("{operation}: {message}")]
    Operation {
        operation: &'static str,
        message: String,
    },
    #[error("no attestation key is loaded: call Tpm::attestation_key first")]
    NoAttestationKey,
    #[error("PCR index {index} is out of range (0..=23)")]
    PcrIndexOutOfRange { index: u32 },
    #[error("TPM returned an unusable {what}: {message}")]
    Unexpected { what: &'static str, message: String },
    #[error("attestation key from the TPM: {0}")]
    Key(#[from] QuoteError),
    #[error("swtpm ({binary}): {message}")]
    Swtpm { binary: String, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl TpmError {
    #[cfg(feature = "tpm-device")]
    fn tss(operation: &'static str, e: tss_esapi::Error) -> Self {
        TpmError::Operation {
            operation,
            message: e.to_string(),
        }
    }

    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        TpmError::Io {
            context: context.into(),
            source,
        }
    }
}
