//! Variant `qemu-vtpm`: a (virtual) TPM 2.0 quote over the measured-boot PCRs, signed by an
//! attestation key the platform pinned at provisioning. No hardware root: the trust in the AK
//! comes from pinning it, the trust in the boot from the measurements policy.
//!
//! Evidence is JSON ([`QemuVtpmEvidence`]); the quote's extraData is the 32-byte binding.

use std::collections::BTreeMap;
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::measurements::{Digest, MeasurementMismatch, Measurements, MeasurementsError};
#[cfg(feature = "tpm-device")]
use crate::tpm::Tpm;
use crate::tpm::{verify_quote, AkKind, AkPublicKey, TpmError};
use crate::variant::{IssueError, Issuer, ValidationError, Validator, Variant, Verdict};

/// The wire form of qemu-vtpm evidence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVtpmEvidence {
    pub variant: Variant,
    /// Marshalled TPMS_ATTEST (base64).
    #[serde(with = "b64")]
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE (base64).
    #[serde(with = "b64")]
    pub signature: Vec<u8>,
    /// The quoted SHA-256 PCR values (index -> hex).
    #[serde(with = "hex_pcrs")]
    pub pcrs: BTreeMap<u32, Digest>,
    /// The AK's SubjectPublicKeyInfo DER (base64).
    #[serde(with = "b64")]
    pub ak: Vec<u8>,
    /// The boot event log (base64), when the platform has one.
    #[serde(default, with = "opt_b64", skip_serializing_if = "Option::is_none")]
    pub event_log: Option<Vec<u8>>,
}

impl QemuVtpmEvidence {
    pub fn to_bytes(&self) -> Vec<u8> {
        // A struct of strings and maps with string keys always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::Malformed(format!("qemu-vtpm evidence JSON: {e}")))
    }
}

#[cfg(feature = "tpm-device")]
/// The node side: quotes `pcrs` with the TPM's attestation key.
pub struct QemuVtpmIssuer {
    tpm: Mutex<Tpm>,
    pcrs: Vec<u32>,
}

#[cfg(feature = "tpm-device")]
impl QemuVtpmIssuer {
    /// Loads the attestation key of `ak` and quotes `pcrs` (which must include every PCR the
    /// verifier's measurements name) on each `issue`.
    pub fn new(mut tpm: Tpm, ak: AkKind, pcrs: Vec<u32>) -> Result<Self, TpmError> {
        tpm.attestation_key(ak)?;
        Ok(Self {
            tpm: Mutex::new(tpm),
            pcrs,
        })
    }

    /// Runs `f` with exclusive access to the TPM (e.g. to extend PCR 15 with the cluster ID:
    /// swtpm serves a single client, so everything goes through this one connection).
    pub fn with_tpm<T>(
        &self,
        f: impl FnOnce(&mut Tpm) -> Result<T, TpmError>,
    ) -> Result<T, TpmError> {
        let mut tpm = self.tpm.lock().map_err(|_| TpmError::Unexpected {
            what: "TPM lock",
            message: "a previous TPM operation panicked".into(),
        })?;
        f(&mut tpm)
    }

    /// The attestation key to pin for this node.
    pub fn ak_public(&self) -> Result<AkPublicKey, TpmError> {
        self.with_tpm(|tpm| tpm.ak_public())
    }
}

#[cfg(feature = "tpm-device")]
impl Issuer for QemuVtpmIssuer {
    fn variant(&self) -> Variant {
        Variant::QemuVtpm
    }

    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError> {
        let (quote, ak) =
            self.with_tpm(|tpm| Ok((tpm.quote(binding, &self.pcrs)?, tpm.ak_public()?)))?;
        let evidence = QemuVtpmEvidence {
            variant: Variant::QemuVtpm,
            attest: quote.attest,
            signature: quote.signature,
            pcrs: quote.pcrs,
            ak: ak.to_spki_der(),
            event_log: quote.event_log,
        };
        Ok(evidence.to_bytes())
    }
}

/// The verifier side: the quote must be signed by one of the pinned AKs, carry the binding as
/// extraData, and its PCRs must satisfy the measurements.
#[derive(Debug, Clone)]
pub struct QemuVtpmValidator {
    pub pinned_aks: Vec<AkPublicKey>,
    pub measurements: Measurements,
}

impl QemuVtpmValidator {
    pub fn new(pinned_aks: Vec<AkPublicKey>, measurements: Measurements) -> Self {
        Self {
            pinned_aks,
            measurements,
        }
    }
}

impl Validator for QemuVtpmValidator {
    fn variant(&self) -> Variant {
        Variant::QemuVtpm
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        let evidence = QemuVtpmEvidence::from_bytes(evidence)?;
        if evidence.variant != Variant::QemuVtpm {
            return Err(ValidationError::VariantMismatch {
                expected: Variant::QemuVtpm,
                found: evidence.variant,
            });
        }
        let ak = AkPublicKey::from_spki_der(&evidence.ak)
            .map_err(|e| ValidationError::Malformed(format!("attestation key: {e}")))?;
        if !self.pinned_aks.contains(&ak) {
            return Err(ValidationError::UnpinnedKey {
                fingerprint: hex::encode(ak.fingerprint()),
                pinned: self.pinned_aks.len(),
            });
        }
        let quote = verify_quote(
            &ak,
            &evidence.attest,
            &evidence.signature,
            binding,
            &evidence.pcrs,
        )?;
        // Every measured PCR must be quoted, warn-only ones included: an unquoted PCR would
        // otherwise silently downgrade to a warning.
        let unquoted: Vec<MeasurementMismatch> = self
            .measurements
            .0
            .iter()
            .filter(|(index, _)| !quote.pcrs.contains_key(index))
            .map(|(&index, m)| MeasurementMismatch {
                index,
                expected: m.expected,
                found: None,
                warn_only: m.warn_only,
            })
            .collect();
        if !unquoted.is_empty() {
            return Err(MeasurementsError::Mismatch(unquoted).into());
        }
        let outcome = self.measurements.check(&quote.pcrs)?;
        for w in &outcome.warnings {
            tracing::warn!(mismatch = %w, "warn-only measurement differs");
        }
        Ok(Verdict {
            variant: Variant::QemuVtpm,
            pcrs: quote.pcrs,
            warnings: outcome.warnings,
            ak_fingerprint: quote.ak_fingerprint,
        })
    }
}

/// Base64 (standard alphabet) for byte fields; shared by the SNP variants' evidence.
pub(crate) mod b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        B64.decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}")))
    }
}

mod opt_b64 {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(b) => s.serialize_some(&B64.encode(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| {
                B64.decode(s.as_bytes())
                    .map_err(|e| serde::de::Error::custom(format!("bad base64: {e}")))
            })
            .transpose()
    }
}

mod hex_pcrs {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(transparent)]
    struct Hex(#[serde(with = "crate::measurements::hex_digest")] Digest);

    pub fn serialize<S: Serializer>(pcrs: &BTreeMap<u32, Digest>, s: S) -> Result<S::Ok, S::Error> {
        pcrs.iter()
            .map(|(&i, &d)| (i, Hex(d)))
            .collect::<BTreeMap<u32, Hex>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, Digest>, D::Error> {
        Ok(BTreeMap::<u32, Hex>::deserialize(d)?
            .into_iter()
            .map(|(i, h)| (i, h.0))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evidence_json_round_trips_and_garbage_is_malformed() {
        let ev = QemuVtpmEvidence {
            variant: Variant::QemuVtpm,
            attest: vec![1, 2, 3],
            signature: vec![4, 5],
            pcrs: BTreeMap::from([(0, [0u8; 32]), (15, [0xab; 32])]),
            ak: vec![6],
            event_log: None,
        };
        let bytes = ev.to_bytes();
        let json = String::from_utf8(bytes.clone()).unwrap();
        assert!(json.contains("\"qemu-vtpm\""), "{json}");
        assert!(json.contains(&"ab".repeat(32)), "{json}");
        assert!(!json.contains("event_log"), "{json}");
        assert_eq!(QemuVtpmEvidence::from_bytes(&bytes).unwrap(), ev);
        assert!(matches!(
            QemuVtpmEvidence::from_bytes(b"{\"variant\":\"qemu-vtpm\"}"),
            Err(ValidationError::Malformed(_))
        ));
    }
}
