//! What the SNP-plus-vTPM variants (`aws-sev-snp`, `azure-sev-snp`) share: an AMD SEV-SNP
//! report vouches for the vTPM's attestation key, and a TPM quote by exactly that key carries
//! the binding and the measured-boot PCRs.
//!
//! [`SnpVtpmValidator`] holds where the VEK comes from, the SNP policy, the PCR measurements
//! and the clock, runs the SNP half ([`SnpVtpmValidator::verify_report_data`]) and the TPM
//! half ([`validate_vouched_quote`]); a variant ([`SnpVtpmKind`]) only says how its evidence
//! is shaped and which REPORT_DATA names the AK. The issuers share [`quote_evidence`] and
//! [`report_failed`].

use std::marker::PhantomData;
use std::sync::Arc;

use crate::measurements::{Digest, Measurements};
use crate::snp::{verify_report_from, AttestationReport, SnpPolicy, VekSource, VerifiedVek};
use crate::tpm::{AkPublicKey, TpmError};
#[cfg(feature = "tpm-device")]
use crate::variant::qemu_vtpm::QemuVtpmIssuer;
use crate::variant::qemu_vtpm::{QemuVtpmEvidence, QemuVtpmValidator};
use crate::variant::{IssueError, Issuer, ValidationError, Validator, Variant, Verdict};
use crate::Clock;

/// Why the SEV-SNP firmware (or whatever stands in for it) returned no report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SEV-SNP report request failed: {0}")]
pub struct SnpReportError(pub String);

/// One SNP-plus-vTPM variant: its name and how its evidence yields the vouched AK.
pub trait SnpVtpmKind: Send + Sync + 'static {
    const VARIANT: Variant;

    /// Parses `evidence`, verifies its SNP report through `validator` (with the REPORT_DATA
    /// that names the AK) and returns the AK the report vouches for and the TPM quote.
    fn vouched_quote<V: VekSource>(
        validator: &SnpVtpmValidator<Self, V>,
        evidence: &[u8],
    ) -> Result<(AkPublicKey, QemuVtpmEvidence), ValidationError>
    where
        Self: Sized;
}

/// The verifier side of an SNP-plus-vTPM variant `K`.
///
/// `V` is the [`VekSource`]: by default one [`VerifiedVek`] (chain verified by the caller at a
/// given time), so only reports from that chip (VCEK) or signer (VLEK) at that TCB pass. With
/// a collateral source (`Arc<dyn VekSource>`, e.g. the join service's cache) the VEK for each
/// report's signer, CHIP_ID and reported TCB is looked up instead.
pub struct SnpVtpmValidator<K, V = VerifiedVek> {
    pub vek: V,
    /// The SNP settings; its `report_data` is replaced by the value that names the AK.
    pub policy: SnpPolicy,
    pub measurements: Measurements,
    /// "Now" for the re-check of the cached chain's validity on every report.
    pub clock: Arc<dyn Clock>,
    kind: PhantomData<fn() -> K>,
}

impl<K, V: std::fmt::Debug> std::fmt::Debug for SnpVtpmValidator<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnpVtpmValidator")
            .field("vek", &self.vek)
            .field("policy", &self.policy)
            .field("measurements", &self.measurements)
            .finish_non_exhaustive()
    }
}

impl<K, V: Clone> Clone for SnpVtpmValidator<K, V> {
    fn clone(&self) -> Self {
        Self {
            vek: self.vek.clone(),
            policy: self.policy.clone(),
            measurements: self.measurements.clone(),
            clock: Arc::clone(&self.clock),
            kind: PhantomData,
        }
    }
}

impl<K> SnpVtpmValidator<K, VerifiedVek> {
    /// `clock` is consulted on every report: a VEK (or its chain) that expired after this
    /// validator was built is rejected from then on.
    pub fn new(
        vek: VerifiedVek,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_source(vek, policy, measurements, clock)
    }
}

impl<K> SnpVtpmValidator<K, Arc<dyn VekSource>> {
    /// A validator for reports from any chip: the VEK for each report's signer, CHIP_ID and
    /// reported TCB comes from `collateral`; its chain validity is re-checked at `clock`.
    pub fn with_collateral(
        collateral: Arc<dyn VekSource>,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_source(collateral, policy, measurements, clock)
    }
}

impl<K, V> SnpVtpmValidator<K, V> {
    /// A validator whose VEK comes from `vek` (a fixed key or a collateral source).
    pub fn with_source(
        vek: V,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            vek,
            policy,
            measurements,
            clock,
            kind: PhantomData,
        }
    }
}

impl<K, V: VekSource> SnpVtpmValidator<K, V> {
    /// The SNP checks alone, with REPORT_DATA expected to be `report_data`; returns the
    /// parsed report.
    pub fn verify_report_data(
        &self,
        report: &[u8],
        report_data: &[u8; 64],
    ) -> Result<AttestationReport, ValidationError> {
        let policy = SnpPolicy {
            report_data: Some(*report_data),
            ..self.policy.clone()
        };
        Ok(verify_report_from(
            report,
            &self.vek,
            &policy,
            self.clock.as_ref(),
        )?)
    }
}

impl<K: SnpVtpmKind, V: VekSource> Validator for SnpVtpmValidator<K, V> {
    fn variant(&self) -> Variant {
        K::VARIANT
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        let (ak, tpm) = K::vouched_quote(self, evidence)?;
        validate_vouched_quote(K::VARIANT, tpm, ak, &self.measurements, binding)
    }
}

/// The TPM half of both SNP variants: the quote must be signed by `ak` (the key the SNP
/// report vouches for, whatever key the quote evidence names), carry `binding` and satisfy
/// `measurements`. The verdict is labelled `variant`.
pub fn validate_vouched_quote(
    variant: Variant,
    mut tpm: QemuVtpmEvidence,
    ak: AkPublicKey,
    measurements: &Measurements,
    binding: &Digest,
) -> Result<Verdict, ValidationError> {
    // The inner tag and key carry no authority: the quote is checked as qemu-vtpm evidence
    // against the vouched key, so a quote by any other key fails its signature check.
    tpm.variant = Variant::QemuVtpm;
    tpm.ak = ak.to_spki_der();
    let verdict = QemuVtpmValidator::new(vec![ak], measurements.clone())
        .validate(&tpm.to_bytes(), binding)?;
    Ok(Verdict { variant, ..verdict })
}

/// Quotes with the issuer's TPM and returns the quote evidence (AK DER included).
#[cfg(feature = "tpm-device")]
pub(crate) fn quote_evidence(
    tpm: &QemuVtpmIssuer,
    binding: &Digest,
) -> Result<QemuVtpmEvidence, IssueError> {
    let bytes = tpm.issue(binding)?;
    // Our own issuer's output always parses; a failure here is a bug, reported as such.
    QemuVtpmEvidence::from_bytes(&bytes).map_err(|e| {
        IssueError::Tpm(TpmError::Unexpected {
            what: "qemu-vtpm evidence",
            message: e.to_string(),
        })
    })
}

/// Logs why the report provider failed (the detail) and returns the issuer error.
pub(crate) fn report_failed(variant: Variant, error: &SnpReportError) -> IssueError {
    tracing::error!(%variant, %error, "no SEV-SNP report");
    IssueError::Unsupported(variant, "the SEV-SNP report provider failed")
}
