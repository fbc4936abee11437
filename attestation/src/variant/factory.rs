//! One place that turns a [`Variant`] into its validator or issuer, and that knows each
//! variant's facts (which PCRs it quotes, which AK it uses, what vouches for that AK, which
//! settings apply). Callers name the variant they were configured with and never construct a
//! variant's types themselves, the way trustee keys its verifiers by TEE.

use std::ops::RangeInclusive;
use std::sync::Arc;

use crate::measurements::{Digest, Measurements};
use crate::snp::{SnpPolicy, VekSource};
#[cfg(feature = "tpm-device")]
use crate::tpm::Tpm;
use crate::tpm::{AkKind, AkPublicKey, TpmError};
use crate::variant::aws_sev_snp::AwsSevSnpValidator;
use crate::variant::azure_sev_snp::AzureSevSnpValidator;
#[cfg(feature = "tpm-device")]
use crate::variant::qemu_vtpm::QemuVtpmIssuer;
use crate::variant::qemu_vtpm::QemuVtpmValidator;
use crate::variant::{IssueError, Issuer, Validator, Variant};
use crate::{pcr, Clock};

/// What makes a verifier trust a variant's attestation key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AkTrust {
    /// The key was pinned when the platform provisioned the node (no hardware root).
    Pinned,
    /// An AMD SEV-SNP report, signed by a key chaining to AMD's roots, names the key.
    SnpReport,
}

/// The facts of one variant, defined here once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantFacts {
    /// PCRs every quote of this variant covers.
    pub quoted_pcrs: RangeInclusive<u32>,
    /// The TPM attestation key the issuer quotes with.
    pub ak_kind: AkKind,
    /// The evidence carries an AMD SEV-SNP attestation report.
    pub sev_snp: bool,
    /// What vouches for the AK; `None` when this code base has no validator for the variant.
    pub ak_trust: Option<AkTrust>,
    /// Default minimum TCB (bootloader, tee, snp, microcode) for SEV-SNP variants: no
    /// minimum beyond an authentic report (`SnpPolicy::default()`), i.e. all zero.
    pub default_minimum_tcb: Option<[u8; 4]>,
}

impl VariantFacts {
    /// This code base has a validator for the variant.
    pub fn validator_available(&self) -> bool {
        self.ak_trust.is_some()
    }
}

impl Variant {
    /// The variant's facts.
    pub fn facts(self) -> VariantFacts {
        let snp_tcb = Some([0; 4]);
        let (ak_kind, sev_snp, ak_trust, default_minimum_tcb) = match self {
            Variant::QemuVtpm => (AkKind::EcdsaP256, false, Some(AkTrust::Pinned), None),
            // On Azure the HCL's RSA AK is the one the SNP report vouches for.
            Variant::AzureSevSnp => (AkKind::Rsa2048, true, Some(AkTrust::SnpReport), snp_tcb),
            Variant::AwsSevSnp => (AkKind::EcdsaP256, true, Some(AkTrust::SnpReport), snp_tcb),
            Variant::GcpSevSnp => (AkKind::EcdsaP256, true, None, snp_tcb),
            Variant::GcpSevEs => (AkKind::EcdsaP256, false, None, None),
        };
        VariantFacts {
            quoted_pcrs: pcr::QUOTED,
            ak_kind,
            sev_snp,
            ak_trust,
            default_minimum_tcb,
        }
    }
}

/// The SEV-SNP half of an SNP-plus-vTPM policy.
#[derive(Clone)]
pub struct SnpAnchor {
    /// Where each report's VCEK/VLEK comes from (a fixed verified key or a collateral cache).
    pub vek: Arc<dyn VekSource>,
    /// Firmware, TCB and guest policy requirements; REPORT_DATA is set by the variant.
    pub policy: SnpPolicy,
    /// "Now" for certificate validity, consulted on every report.
    pub clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for SnpAnchor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnpAnchor")
            .field("vek", &self.vek)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// How the verifier trusts the attestation key: must match the variant's [`AkTrust`].
#[derive(Debug, Clone)]
pub enum AkAnchor {
    /// Keys pinned at provisioning ([`AkTrust::Pinned`]); evidence by any other key fails.
    Pinned(Vec<AkPublicKey>),
    /// SEV-SNP settings ([`AkTrust::SnpReport`]).
    Snp(SnpAnchor),
}

impl AkAnchor {
    fn trust(&self) -> AkTrust {
        match self {
            AkAnchor::Pinned(_) => AkTrust::Pinned,
            AkAnchor::Snp(_) => AkTrust::SnpReport,
        }
    }
}

/// What a validator demands besides its variant's evidence format.
#[derive(Debug, Clone)]
pub struct ValidatorPolicy {
    /// Expected PCR values.
    pub measurements: Measurements,
    /// What vouches for the attestation key.
    pub anchor: AkAnchor,
}

impl ValidatorPolicy {
    /// A policy trusting only the `pinned` attestation keys.
    pub fn pinned(pinned: Vec<AkPublicKey>, measurements: Measurements) -> Self {
        Self {
            measurements,
            anchor: AkAnchor::Pinned(pinned),
        }
    }

    /// A policy trusting the keys SEV-SNP reports vouch for under `snp`.
    pub fn snp(snp: SnpAnchor, measurements: Measurements) -> Self {
        Self {
            measurements,
            anchor: AkAnchor::Snp(snp),
        }
    }
}

/// Why the factory built no validator or issuer.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    #[error("no validator for attestation variant {0} in this code base")]
    NoValidator(Variant),
    #[error(
        "attestation variant {variant} trusts its key by {expected:?}, the policy gives {found:?}"
    )]
    AnchorMismatch {
        variant: Variant,
        expected: AkTrust,
        found: AkTrust,
    },
    #[error("attestation variant {variant} cannot issue evidence on this machine: {reason}")]
    IssuerUnavailable {
        variant: Variant,
        reason: &'static str,
    },
    #[error("attestation variant {variant}: TPM: {source}")]
    Tpm { variant: Variant, source: TpmError },
}

/// The validator for `variant` under `policy`.
pub fn validator_for(
    variant: Variant,
    policy: ValidatorPolicy,
) -> Result<Arc<dyn Validator>, FactoryError> {
    let expected = variant
        .facts()
        .ak_trust
        .ok_or(FactoryError::NoValidator(variant))?;
    let ValidatorPolicy {
        measurements,
        anchor,
    } = policy;
    let found = anchor.trust();
    Ok(match (variant, anchor) {
        (Variant::QemuVtpm, AkAnchor::Pinned(aks)) => {
            Arc::new(QemuVtpmValidator::new(aks, measurements))
        }
        (Variant::AzureSevSnp, AkAnchor::Snp(s)) => Arc::new(
            AzureSevSnpValidator::with_collateral(s.vek, s.policy, measurements, s.clock),
        ),
        (Variant::AwsSevSnp, AkAnchor::Snp(s)) => Arc::new(AwsSevSnpValidator::with_collateral(
            s.vek,
            s.policy,
            measurements,
            s.clock,
        )),
        _ => {
            return Err(FactoryError::AnchorMismatch {
                variant,
                expected,
                found,
            })
        }
    })
}

#[cfg(feature = "tpm-device")]
/// The node side of a variant: issues its evidence and owns the TPM connection (swtpm serves
/// one client, so PCR extends go through [`VariantIssuer::with_tpm`]).
pub struct VariantIssuer {
    variant: Variant,
    tpm: QemuVtpmIssuer,
}

#[cfg(feature = "tpm-device")]
impl VariantIssuer {
    /// Runs `f` with exclusive access to the TPM (e.g. to extend [`pcr::CLUSTER_ID`]).
    pub fn with_tpm<T>(
        &self,
        f: impl FnOnce(&mut Tpm) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        self.tpm.with_tpm(f)
    }

    /// The attestation key to pin for this node.
    pub fn ak_public(&self) -> Result<AkPublicKey, TpmError> {
        self.tpm.ak_public()
    }
}

#[cfg(feature = "tpm-device")]
impl Issuer for VariantIssuer {
    fn variant(&self) -> Variant {
        self.variant
    }

    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError> {
        self.tpm.issue(binding)
    }
}

#[cfg(feature = "tpm-device")]
/// The issuer for `variant` on this machine: opens the TPM at `tcti` (a TCTI string such as
/// `device:/dev/tpmrm0` or `swtpm:path=...`) and quotes the variant's PCRs with its AK.
/// SEV-SNP variants need a guest report device this code base has no driver for: they return
/// [`FactoryError::IssuerUnavailable`] before touching the TPM, rather than evidence no
/// validator would accept.
pub fn issuer_for(variant: Variant, tcti: &str) -> Result<VariantIssuer, FactoryError> {
    let facts = variant.facts();
    match variant {
        Variant::QemuVtpm => {
            let tpm_err = |source| FactoryError::Tpm { variant, source };
            let tpm = Tpm::open(tcti).map_err(tpm_err)?;
            let pcrs = facts.quoted_pcrs.collect();
            let tpm = QemuVtpmIssuer::new(tpm, facts.ak_kind, pcrs).map_err(tpm_err)?;
            Ok(VariantIssuer { variant, tpm })
        }
        Variant::AzureSevSnp | Variant::AwsSevSnp | Variant::GcpSevSnp | Variant::GcpSevEs => {
            Err(FactoryError::IssuerUnavailable {
                variant,
                reason: "no SEV-SNP/SEV-ES guest report device driver in this code base",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validators_exist_exactly_for_variants_with_an_ak_anchor() {
        for v in Variant::ALL {
            let policy = ValidatorPolicy::pinned(vec![], Measurements::default());
            match (v.facts().ak_trust, validator_for(v, policy)) {
                (Some(AkTrust::Pinned), Ok(val)) => assert_eq!(val.variant(), v),
                (
                    Some(AkTrust::SnpReport),
                    Err(FactoryError::AnchorMismatch {
                        expected: AkTrust::SnpReport,
                        found: AkTrust::Pinned,
                        ..
                    }),
                ) => {}
                (None, Err(FactoryError::NoValidator(found))) => assert_eq!(found, v),
                (trust, other) => panic!("{v}: trust {trust:?} gave {:?}", other.err()),
            }
        }
    }

    #[test]
    fn snp_variants_cannot_issue_here_and_say_so_before_opening_a_tpm() {
        for v in Variant::ALL.into_iter().filter(|v| *v != Variant::QemuVtpm) {
            match issuer_for(v, "swtpm:path=/nonexistent/never-opened") {
                Err(FactoryError::IssuerUnavailable { variant, .. }) => assert_eq!(variant, v),
                other => panic!("{v}: expected IssuerUnavailable, got {:?}", other.err()),
            }
        }
    }

    #[test]
    fn every_variant_quotes_the_enforced_pcrs() {
        for v in Variant::ALL {
            for p in pcr::ENFORCED {
                assert!(v.facts().quoted_pcrs.contains(&p), "{v} does not quote {p}");
            }
        }
    }
}
