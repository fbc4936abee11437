//! Variant `azure-sev-snp`: an AMD SEV-SNP report signed by the chip's VCEK, the Azure HCL
//! runtime data it vouches for (REPORT_DATA = SHA-256(runtime data) || 32 zero bytes), and a
//! TPM quote signed by the vTPM attestation key that the runtime data names (JWK `HCLAkPub`).
//!
//! Evidence is JSON ([`AzureSevSnpEvidence`]); its `tpm` member is qemu-vtpm quote evidence,
//! checked against the vouched key only (the key the quote evidence names is ignored).

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::PublicKeyComponents;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::measurements::{sha256, Digest};
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

/// The key ID of the vTPM attestation key in the HCL runtime data.
pub const HCL_AK_KID: &str = "HCLAkPub";

/// The wire form of azure-sev-snp evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AzureSevSnpEvidence {
    pub variant: Variant,
    /// The raw SEV-SNP attestation report (base64), VCEK-signed.
    #[serde(with = "b64")]
    pub report: Vec<u8>,
    /// The HCL runtime data JSON exactly as hashed into REPORT_DATA (base64).
    #[serde(with = "b64")]
    pub runtime_data: Vec<u8>,
    /// The TPM quote; its `ak` is informational, the validator uses the `HCLAkPub` key.
    pub tpm: QemuVtpmEvidence,
}

impl AzureSevSnpEvidence {
    pub fn to_bytes(&self) -> Vec<u8> {
        // Strings, maps with integer keys and a unit enum always serialize.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        let evidence: Self = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::Malformed(format!("azure-sev-snp evidence JSON: {e}")))?;
        if evidence.variant != Variant::AzureSevSnp {
            return Err(ValidationError::VariantMismatch {
                expected: Variant::AzureSevSnp,
                found: evidence.variant,
            });
        }
        Ok(evidence)
    }
}

/// The HCL runtime data: only the fields the verifier uses.
#[derive(Debug, Deserialize)]
struct RuntimeData {
    keys: Vec<Jwk>,
}

/// An RSA JSON Web Key (RFC 7517/7518): modulus and exponent big-endian, base64url.
#[derive(Debug, Deserialize)]
struct Jwk {
    kid: String,
    kty: String,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
}

/// The REPORT_DATA an Azure SNP report must carry for `runtime_data`.
pub fn report_data_for_runtime_data(runtime_data: &[u8]) -> [u8; 64] {
    let mut report_data = [0u8; 64];
    for (dst, src) in report_data.iter_mut().zip(sha256(runtime_data)) {
        *dst = src;
    }
    report_data
}

/// Extracts the `HCLAkPub` RSA key from HCL runtime data JSON (must be RSA-2048).
pub fn hcl_ak_from_runtime_data(runtime_data: &[u8]) -> Result<AkPublicKey, ValidationError> {
    let malformed = |what: String| ValidationError::Malformed(format!("HCL runtime data: {what}"));
    let parsed: RuntimeData =
        serde_json::from_slice(runtime_data).map_err(|e| malformed(format!("JSON: {e}")))?;
    let kids: Vec<&str> = parsed.keys.iter().map(|k| k.kid.as_str()).collect();
    let jwk = parsed
        .keys
        .iter()
        .find(|k| k.kid == HCL_AK_KID)
        .ok_or_else(|| {
            malformed(format!(
                "expected a key {HCL_AK_KID:?}, found kids {kids:?}"
            ))
        })?;
    if jwk.kty != "RSA" {
        return Err(malformed(format!(
            "{HCL_AK_KID} kty: expected \"RSA\", found {:?}",
            jwk.kty
        )));
    }
    let component = |name: &str, value: &Option<String>| {
        let text = value
            .as_deref()
            .ok_or_else(|| malformed(format!("{HCL_AK_KID} lacks member {name:?}")))?;
        B64URL
            .decode(text.trim_end_matches('='))
            .map_err(|e| malformed(format!("{HCL_AK_KID} {name}: bad base64url: {e}")))
    };
    let n = component("n", &jwk.n)?;
    let e = component("e", &jwk.e)?;
    let der = PublicKeyComponents {
        n: n.as_slice(),
        e: e.as_slice(),
    }
    .as_der()
    .map_err(|_| malformed(format!("{HCL_AK_KID} is not a valid RSA public key")))?;
    AkPublicKey::from_spki_der(der.as_ref())
        .map_err(|e| malformed(format!("{HCL_AK_KID} as attestation key: {e}")))
}

/// What the Azure HCL hands out together: the SNP report and the runtime data it vouches for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HclReport {
    pub report: Vec<u8>,
    pub runtime_data: Vec<u8>,
}

/// Supplies the HCL report (on a CVM: vTPM NV index 0x01400001; in tests: files).
pub trait HclReportProvider: Send + Sync {
    fn hcl_report(&self) -> Result<HclReport, SnpReportError>;
}

impl<F> HclReportProvider for F
where
    F: Fn() -> Result<HclReport, SnpReportError> + Send + Sync,
{
    fn hcl_report(&self) -> Result<HclReport, SnpReportError> {
        self()
    }
}

#[cfg(feature = "tpm-device")]
/// The node side: the HCL report plus a quote bound to the binding. On Azure the TPM's AK must
/// be the HCL's RSA-2048 AK for the evidence to validate.
pub struct AzureSevSnpIssuer {
    tpm: QemuVtpmIssuer,
    hcl: Box<dyn HclReportProvider>,
}

#[cfg(feature = "tpm-device")]
impl AzureSevSnpIssuer {
    pub fn new(
        tpm: Tpm,
        pcrs: Vec<u32>,
        hcl: Box<dyn HclReportProvider>,
    ) -> Result<Self, TpmError> {
        Ok(Self {
            tpm: QemuVtpmIssuer::new(tpm, AkKind::Rsa2048, pcrs)?,
            hcl,
        })
    }

    /// The TPM half's issuer (e.g. to extend PCRs through its single connection).
    pub fn tpm_issuer(&self) -> &QemuVtpmIssuer {
        &self.tpm
    }
}

#[cfg(feature = "tpm-device")]
impl Issuer for AzureSevSnpIssuer {
    fn variant(&self) -> Variant {
        Variant::AzureSevSnp
    }

    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError> {
        let tpm = quote_evidence(&self.tpm, binding)?;
        let hcl = self
            .hcl
            .hcl_report()
            .map_err(|e| report_failed(Variant::AzureSevSnp, &e))?;
        Ok(AzureSevSnpEvidence {
            variant: Variant::AzureSevSnp,
            report: hcl.report,
            runtime_data: hcl.runtime_data,
            tpm,
        }
        .to_bytes())
    }
}

/// The verifier side: a [`SnpVtpmValidator`] whose report (VCEK-signed) must carry
/// REPORT_DATA = SHA-256(runtime data) || zeros, the runtime data naming the vouched AK.
pub type AzureSevSnpValidator<V = VerifiedVek> = SnpVtpmValidator<AzureSnp, V>;

/// The `azure-sev-snp` kind of [`SnpVtpmValidator`].
#[derive(Debug, Clone, Copy)]
pub struct AzureSnp;

impl SnpVtpmKind for AzureSnp {
    const VARIANT: Variant = Variant::AzureSevSnp;

    fn vouched_quote<V: VekSource>(
        validator: &AzureSevSnpValidator<V>,
        evidence: &[u8],
    ) -> Result<(AkPublicKey, QemuVtpmEvidence), ValidationError> {
        let evidence = AzureSevSnpEvidence::from_bytes(evidence)?;
        let ak =
            validator.verify_report_and_runtime_data(&evidence.report, &evidence.runtime_data)?;
        Ok((ak, evidence.tpm))
    }
}

impl<V: VekSource> AzureSevSnpValidator<V> {
    /// The SNP half: the report verifies with the VCEK for its chip and TCB and `policy`,
    /// REPORT_DATA is SHA-256(`runtime_data`) followed by zeros, and the runtime data names an
    /// RSA-2048 `HCLAkPub`. Returns that key: the one the report vouches for.
    pub fn verify_report_and_runtime_data(
        &self,
        report: &[u8],
        runtime_data: &[u8],
    ) -> Result<AkPublicKey, ValidationError> {
        self.verify_report_data(report, &report_data_for_runtime_data(runtime_data))?;
        hcl_ak_from_runtime_data(runtime_data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_data_is_sha256_then_zeros() {
        let rd = report_data_for_runtime_data(b"abc");
        assert_eq!(rd[..32], sha256(b"abc"));
        assert_eq!(rd[32..], [0u8; 32]);
    }

    #[test]
    fn runtime_data_without_a_usable_hcl_ak_is_malformed() {
        for (json, needle) in [
            (&b"not json"[..], "JSON"),
            (br#"{"keys":[{"kid":"other","kty":"RSA","n":"AQAB","e":"AQAB"}]}"#, "HCLAkPub"),
            (br#"{"keys":[{"kid":"HCLAkPub","kty":"EC"}]}"#, "kty"),
            (br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB"}]}"#, "\"n\""),
            (br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","n":"*","e":"AQAB"}]}"#, "base64url"),
            // A short, made-up modulus is no acceptable RSA-2048 AK.
            (
                br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","e":"AQAB","n":"wFqZ8pQv2nJ3cX4Yd7e1r0bQwZcV5sLhKm9uT3aPjNf6Gk8yXo1iE2dR4tW7qB0vC3xM5nU9hJ6gF8lA1sD2oK4pY7zV0bN3mQ5wE8rT1yU6iO9pL2kJ4hG7fD0sA3zX5cV8bN1mQ4wE7rT0yU3iO6pL9kJ2hG5fD8sA1zX4cV7bN0mQ3wE6rT9yU2iO5pL8kJ1hG4fD7sA0zX3c"}]}"#,
                "as attestation key",
            ),
        ] {
            match hcl_ak_from_runtime_data(json) {
                Err(ValidationError::Malformed(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected Malformed({needle}), got {other:?}"),
            }
        }
    }
}
