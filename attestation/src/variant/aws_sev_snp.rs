//! Variant `aws-sev-snp`: an AMD SEV-SNP report signed by a VLEK (AWS's versioned loaded
//! endorsement key) whose REPORT_DATA is SHA-512 of the vTPM attestation key's
//! SubjectPublicKeyInfo DER, plus a TPM quote signed by exactly that key.
//!
//! The SNP report vouches for the AK (hardware root of trust instead of pinning), the quote
//! carries the binding as extraData and the measured-boot PCRs. Evidence is JSON
//! ([`AwsSevSnpEvidence`]); its `tpm` member is qemu-vtpm quote evidence and is checked by a
//! [`QemuVtpmValidator`] pinned to the vouched key, so the TPM rules live in one place.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};

use crate::measurements::{Digest, Measurements};
use crate::snp::{verify_report_from, AttestationReport, SnpPolicy, VekSource, VerifiedVek};
use crate::tpm::{AkKind, AkPublicKey, Tpm, TpmError};
use crate::variant::qemu_vtpm::{QemuVtpmEvidence, QemuVtpmIssuer, QemuVtpmValidator};
use crate::variant::{IssueError, Issuer, ValidationError, Validator, Variant, Verdict};
use crate::Clock;

/// The wire form of aws-sev-snp evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AwsSevSnpEvidence {
    pub variant: Variant,
    /// The raw SEV-SNP attestation report (base64), VLEK-signed, REPORT_DATA = SHA-512(`tpm.ak`).
    #[serde(with = "b64")]
    pub report: Vec<u8>,
    /// The TPM quote, with the AK's SubjectPublicKeyInfo DER in `tpm.ak`.
    pub tpm: QemuVtpmEvidence,
}

impl AwsSevSnpEvidence {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, maps with integer keys and a unit enum always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        let evidence: Self = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::Malformed(format!("aws-sev-snp evidence JSON: {e}")))?;
        if evidence.variant != Variant::AwsSevSnp {
            return Err(ValidationError::VariantMismatch {
                expected: Variant::AwsSevSnp,
                found: evidence.variant,
            });
        }
        Ok(evidence)
    }
}

/// The REPORT_DATA an AWS SNP report must carry for attestation key `ak_spki_der`.
pub fn report_data_for_ak(ak_spki_der: &[u8]) -> [u8; 64] {
    Sha512::digest(ak_spki_der).into()
}

/// Why the SEV-SNP firmware (or whatever stands in for it) returned no report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SEV-SNP report request failed: {0}")]
pub struct SnpReportError(pub String);

/// Requests an SNP attestation report carrying `report_data` (on a guest: the SNP firmware via
/// /dev/sev-guest or configfs-tsm; in tests: a file).
pub trait SnpReportProvider: Send + Sync {
    fn report(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, SnpReportError>;
}

impl<F> SnpReportProvider for F
where
    F: Fn(&[u8; 64]) -> Result<Vec<u8>, SnpReportError> + Send + Sync,
{
    fn report(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, SnpReportError> {
        self(report_data)
    }
}

/// The node side: an SNP report vouching for the TPM's AK plus a quote bound to the binding.
pub struct AwsSevSnpIssuer {
    tpm: QemuVtpmIssuer,
    reports: Box<dyn SnpReportProvider>,
}

impl AwsSevSnpIssuer {
    /// Quotes `pcrs` with the TPM's `ak` on each `issue`; `reports` supplies the SNP report.
    pub fn new(
        tpm: Tpm,
        ak: AkKind,
        pcrs: Vec<u32>,
        reports: Box<dyn SnpReportProvider>,
    ) -> Result<Self, TpmError> {
        Ok(Self {
            tpm: QemuVtpmIssuer::new(tpm, ak, pcrs)?,
            reports,
        })
    }

    /// The TPM half's issuer (e.g. to extend PCRs through its single connection).
    pub fn tpm_issuer(&self) -> &QemuVtpmIssuer {
        &self.tpm
    }
}

impl Issuer for AwsSevSnpIssuer {
    fn variant(&self) -> Variant {
        Variant::AwsSevSnp
    }

    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError> {
        let tpm = quote_evidence(&self.tpm, binding)?;
        let report = self
            .reports
            .report(&report_data_for_ak(&tpm.ak))
            .map_err(|e| report_failed(Variant::AwsSevSnp, &e))?;
        Ok(AwsSevSnpEvidence {
            variant: Variant::AwsSevSnp,
            report,
            tpm,
        }
        .to_bytes())
    }
}

/// The verifier side: where the VLEK comes from, the SNP policy (minimum TCB, measurement,
/// ...; its `report_data` is replaced by the AK's hash) and the PCR measurements.
///
/// `V` is the [`VekSource`]: by default one [`VerifiedVek`] (chain verified by the caller at a
/// given time). With a collateral source (`Arc<dyn VekSource>`, e.g. the join service's cache)
/// the VLEK for each report's reported TCB is looked up instead (a VLEK has no hwID; AWS
/// reports mask CHIP_ID, so the key is signer and TCB).
#[derive(Debug, Clone)]
pub struct AwsSevSnpValidator<V = VerifiedVek> {
    pub vlek: V,
    pub policy: SnpPolicy,
    pub measurements: Measurements,
    /// "Now" for the re-check of the cached chain's validity on every report.
    pub clock: Arc<dyn Clock>,
}

impl AwsSevSnpValidator<VerifiedVek> {
    /// `clock` is consulted on every report: a VLEK (or its chain) that expired after
    /// this validator was built is rejected from then on.
    pub fn new(
        vlek: VerifiedVek,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_source(vlek, policy, measurements, clock)
    }
}

impl AwsSevSnpValidator<Arc<dyn VekSource>> {
    /// A validator whose VLEK for each report's TCB comes from `collateral`; its chain
    /// validity is re-checked at `clock` per report.
    pub fn with_collateral(
        collateral: Arc<dyn VekSource>,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self::with_source(collateral, policy, measurements, clock)
    }
}

impl<V: VekSource> AwsSevSnpValidator<V> {
    /// A validator whose VLEK comes from `vlek` (a fixed key or a collateral source).
    pub fn with_source(
        vlek: V,
        policy: SnpPolicy,
        measurements: Measurements,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            vlek,
            policy,
            measurements,
            clock,
        }
    }

    /// The SNP half: the report verifies with the VLEK for its TCB and `policy`, and its
    /// REPORT_DATA is SHA-512 of `ak_spki_der` exactly as sent. Returns the AK the report
    /// vouches for.
    pub fn verify_report_for_ak(
        &self,
        report: &[u8],
        ak_spki_der: &[u8],
    ) -> Result<AkPublicKey, ValidationError> {
        self.verify_report_data(report, &report_data_for_ak(ak_spki_der))?;
        AkPublicKey::from_spki_der(ak_spki_der)
            .map_err(|e| ValidationError::Malformed(format!("attestation key: {e}")))
    }

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
            &self.vlek,
            &policy,
            self.clock.as_ref(),
        )?)
    }
}

impl<V: VekSource> Validator for AwsSevSnpValidator<V> {
    fn variant(&self) -> Variant {
        Variant::AwsSevSnp
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        let evidence = AwsSevSnpEvidence::from_bytes(evidence)?;
        let ak = self.verify_report_for_ak(&evidence.report, &evidence.tpm.ak)?;
        validate_vouched_quote(
            Variant::AwsSevSnp,
            evidence.tpm,
            ak,
            &self.measurements,
            binding,
        )
    }
}

/// Quotes with the issuer's TPM and returns the quote evidence (AK DER included).
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

pub(crate) use super::qemu_vtpm::b64;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn evidence() -> AwsSevSnpEvidence {
        AwsSevSnpEvidence {
            variant: Variant::AwsSevSnp,
            report: vec![9; 10],
            tpm: QemuVtpmEvidence {
                variant: Variant::QemuVtpm,
                attest: vec![1],
                signature: vec![2],
                pcrs: BTreeMap::from([(4, [7u8; 32])]),
                ak: vec![3],
                event_log: None,
            },
        }
    }

    #[test]
    fn evidence_round_trips_and_wrong_variant_or_garbage_is_refused() {
        let ev = evidence();
        assert_eq!(AwsSevSnpEvidence::from_bytes(&ev.to_bytes()).unwrap(), ev);
        let other = AwsSevSnpEvidence {
            variant: Variant::AzureSevSnp,
            ..ev
        };
        assert!(matches!(
            AwsSevSnpEvidence::from_bytes(&other.to_bytes()),
            Err(ValidationError::VariantMismatch {
                expected: Variant::AwsSevSnp,
                found: Variant::AzureSevSnp
            })
        ));
        assert!(matches!(
            AwsSevSnpEvidence::from_bytes(b"{\"variant\":\"aws-sev-snp\",\"report\":\"!!\"}"),
            Err(ValidationError::Malformed(_))
        ));
    }

    #[test]
    fn report_data_is_sha512_of_the_ak_der() {
        let rd = report_data_for_ak(b"abc");
        assert_eq!(
            hex::encode(&rd[..8]),
            "ddaf35a193617aba",
            "SHA-512(\"abc\") starts ddaf35a193617aba"
        );
    }
}
