//! Attestation variants: one module per variant, each with its issuer (node side) and its
//! validator (verifier side), selected by [`Variant`] with stable string names. Callers get
//! them from [`factory`] ([`validator_for`], [`issuer_for`]), which also holds each variant's
//! facts ([`Variant::facts`]).

pub mod aws_sev_snp;
pub mod azure_sev_snp;
pub mod factory;
pub mod qemu_vtpm;
pub mod snp_vtpm;

#[cfg(feature = "tpm-device")]
pub use factory::{issuer_for, VariantIssuer};
pub use factory::{
    validator_for, AkAnchor, AkTrust, FactoryError, SnpAnchor, ValidatorPolicy, VariantFacts,
};

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::measurements::{Digest, MeasurementMismatch, MeasurementsError};

/// The attestation variants, with the stable names used in configs and on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Variant {
    #[serde(rename = "qemu-vtpm")]
    QemuVtpm,
    #[serde(rename = "azure-sev-snp")]
    AzureSevSnp,
    #[serde(rename = "aws-sev-snp")]
    AwsSevSnp,
    #[serde(rename = "gcp-sev-snp")]
    GcpSevSnp,
    #[serde(rename = "gcp-sev-es")]
    GcpSevEs,
}

impl Variant {
    pub const ALL: [Variant; 5] = [
        Variant::QemuVtpm,
        Variant::AzureSevSnp,
        Variant::AwsSevSnp,
        Variant::GcpSevSnp,
        Variant::GcpSevEs,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Variant::QemuVtpm => "qemu-vtpm",
            Variant::AzureSevSnp => "azure-sev-snp",
            Variant::AwsSevSnp => "aws-sev-snp",
            Variant::GcpSevSnp => "gcp-sev-snp",
            Variant::GcpSevEs => "gcp-sev-es",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown variant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown attestation variant {0:?} (known: qemu-vtpm, azure-sev-snp, aws-sev-snp, gcp-sev-snp, gcp-sev-es)")]
pub struct UnknownVariant(pub String);

impl FromStr for Variant {
    type Err = UnknownVariant;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Variant::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownVariant(s.to_owned()))
    }
}

/// What a validator established about accepted evidence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub variant: Variant,
    /// The PCR values the evidence proved (signed by the attestation key).
    pub pcrs: BTreeMap<u32, Digest>,
    /// Warn-only measurement mismatches (enforced ones fail validation).
    pub warnings: Vec<MeasurementMismatch>,
    /// SHA-256 of the attestation key's SubjectPublicKeyInfo DER: which node attested.
    pub ak_fingerprint: Digest,
}

/// Why an issuer could not produce evidence.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("TPM: {0}")]
    Tpm(#[from] crate::tpm::TpmError),
    #[error("variant {0} cannot issue evidence on this machine: {1}")]
    Unsupported(Variant, &'static str),
}

/// Why a validator refused evidence. Each case names the failed check and the values.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("evidence is malformed: {0}")]
    Malformed(String),
    #[error("attestation variant mismatch: expected {expected}, evidence is {found}")]
    VariantMismatch { expected: Variant, found: Variant },
    #[error("attestation key is not pinned for this cluster: fingerprint {fingerprint} is not among {pinned} pinned key(s)")]
    UnpinnedKey { fingerprint: String, pinned: usize },
    #[error("TPM quote: {0}")]
    Quote(#[from] crate::tpm::QuoteError),
    #[error("SEV-SNP: {0}")]
    Snp(#[from] crate::snp::SnpError),
    /// No VCEK/VLEK could be had for the report's chip and TCB, or the one fetched was refused.
    #[error("SEV-SNP collateral: {0}")]
    Collateral(#[from] crate::snp::CollateralError),
    #[error("measurements: {0}")]
    Measurements(#[from] MeasurementsError),
    #[error("evidence binding mismatch: expected {expected}, found {found}")]
    BindingMismatch { expected: String, found: String },
    /// The configured policy yields no validator (unknown anchor for the variant, ...).
    #[error("attestation policy: {0}")]
    Policy(#[from] FactoryError),
}

impl From<crate::snp::SourcedReportError> for ValidationError {
    fn from(e: crate::snp::SourcedReportError) -> Self {
        match e {
            crate::snp::SourcedReportError::Collateral(e) => ValidationError::Collateral(e),
            crate::snp::SourcedReportError::Snp(e) => ValidationError::Snp(e),
        }
    }
}

/// Produces evidence bound to a 32-byte value (nonce, session and user data, hashed by the caller).
pub trait Issuer: Send + Sync {
    fn variant(&self) -> Variant;
    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError>;
}

/// Accepts or rejects evidence that must be bound to `binding`.
pub trait Validator: Send + Sync {
    fn variant(&self) -> Variant;
    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_are_stable_and_round_trip() {
        for v in Variant::ALL {
            assert_eq!(v.as_str().parse::<Variant>().unwrap(), v);
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", v.as_str())
            );
        }
        assert_eq!("qemu-vtpm".parse::<Variant>().unwrap(), Variant::QemuVtpm);
        assert!("qemu".parse::<Variant>().is_err());
    }
}
