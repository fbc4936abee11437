//! Variant `aws-sev-snp`: an AMD SEV-SNP report signed by a VLEK (AWS's versioned loaded
//! endorsement key) whose REPORT_DATA is SHA-512 of the vTPM attestation key's
//! SubjectPublicKeyInfo DER, plus a TPM quote signed by exactly that key.
//!
//! The SNP report vouches for the AK (hardware root of trust instead of pinning), the quote
//! carries the binding as extraData and the measured-boot PCRs. Evidence is JSON
//! ([`AwsSevSnpEvidence`]); what it shares with `azure-sev-snp` lives in
//! [`super::snp_vtpm`].

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha512};

use crate::measurements::Digest;
use crate::snp::{VekSource, VerifiedVek};
#[cfg(feature = "tpm-device")]
use crate::tpm::Tpm;
use crate::tpm::{AkKind, AkPublicKey, TpmError};
#[cfg(feature = "tpm-device")]
use crate::variant::qemu_vtpm::QemuVtpmIssuer;
use crate::variant::qemu_vtpm::{b64, QemuVtpmEvidence};
#[cfg(feature = "tpm-device")]
use crate::variant::snp_vtpm::quote_evidence;
use crate::variant::snp_vtpm::{report_failed, SnpReportError, SnpVtpmKind, SnpVtpmValidator};
use crate::variant::{IssueError, Issuer, ValidationError, Variant};

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

#[cfg(feature = "tpm-device")]
/// The node side: an SNP report vouching for the TPM's AK plus a quote bound to the binding.
pub struct AwsSevSnpIssuer {
    tpm: QemuVtpmIssuer,
    reports: Box<dyn SnpReportProvider>,
}

#[cfg(feature = "tpm-device")]
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

#[cfg(feature = "tpm-device")]
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

/// The verifier side: a [`SnpVtpmValidator`] whose report (VLEK-signed; a VLEK has no hwID
/// and AWS reports mask CHIP_ID, so a collateral source keys it by signer and TCB) must carry
/// REPORT_DATA = SHA-512 of the AK's SubjectPublicKeyInfo DER.
pub type AwsSevSnpValidator<V = VerifiedVek> = SnpVtpmValidator<AwsSnp, V>;

/// The `aws-sev-snp` kind of [`SnpVtpmValidator`].
#[derive(Debug, Clone, Copy)]
pub struct AwsSnp;

impl SnpVtpmKind for AwsSnp {
    const VARIANT: Variant = Variant::AwsSevSnp;

    fn vouched_quote<V: VekSource>(
        validator: &AwsSevSnpValidator<V>,
        evidence: &[u8],
    ) -> Result<(AkPublicKey, QemuVtpmEvidence), ValidationError> {
        let evidence = AwsSevSnpEvidence::from_bytes(evidence)?;
        let ak = validator.verify_report_for_ak(&evidence.report, &evidence.tpm.ak)?;
        Ok((ak, evidence.tpm))
    }
}

impl<V: VekSource> AwsSevSnpValidator<V> {
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
}

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
