//! Signed measurements: a measurements file verified against a detached cosign-style signature
//! (base64 of a DER ECDSA P-256 signature over SHA-256 of the exact file bytes).
//!
//! A valid signature alone does not stop a rollback: an attacker who serves an older, genuinely
//! signed file (with measurements of an image since found vulnerable) passes it.
//! [`CosignPublicKey::verify_versioned`] therefore reads the signed `version` (Constellation's
//! `{"version": "v1.2.3", ...}`, semantic-version precedence) and refuses a file older than
//! the last version the caller accepted; the caller stores the returned version and passes it
//! next time.

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine as _;
use const_oid::ObjectIdentifier;
use der::Decode as _;
use serde::Deserialize as _;

/// id-ecPublicKey and the P-256 curve.
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// Why a signed measurements file was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignedMeasurementsError {
    #[error("public key is not a PEM \"PUBLIC KEY\": {0}")]
    PublicKeyPem(String),
    #[error("public key is not an ECDSA P-256 key: algorithm {algorithm}, curve {curve}")]
    PublicKeyType { algorithm: String, curve: String },
    #[error("signature is not base64: {0}")]
    SignatureEncoding(String),
    #[error("signature does not verify over the file's {len} bytes (SHA-256 {sha256}) with the given key")]
    BadSignature { len: usize, sha256: String },
    #[error("signed measurements carry no usable version: {0}")]
    Version(String),
    #[error("signed measurements roll back: last accepted version {last_accepted}, found {found}")]
    Rollback {
        last_accepted: String,
        found: String,
    },
}

/// The `version` of a signed measurements file: `v`MAJOR.MINOR.PATCH with an optional
/// `-pre.release` part, ordered by semantic-version precedence (a pre-release sorts before its
/// release; build metadata `+...` is not accepted, as it would not order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementsVersion {
    text: String,
    core: [u64; 3],
    pre: Vec<PreId>,
}

/// One dot-separated pre-release identifier: numeric ones sort below alphanumeric ones.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    Numeric(u64),
    Alpha(String),
}

impl MeasurementsVersion {
    pub fn parse(text: &str) -> Result<Self, SignedMeasurementsError> {
        let bad = |why: &str| SignedMeasurementsError::Version(format!("{text:?}: {why}"));
        let rest = text.strip_prefix('v').unwrap_or(text);
        let (core_text, pre_text) = match rest.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (rest, None),
        };
        let numeric = |part: &str| -> Option<u64> {
            // Semver: no leading zeros, digits only.
            let ok = !part.is_empty()
                && part.bytes().all(|b| b.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'));
            ok.then(|| part.parse().ok()).flatten()
        };
        let parts: Vec<&str> = core_text.split('.').collect();
        let core = match parts.as_slice() {
            [a, b, c] => [numeric(a), numeric(b), numeric(c)],
            _ => return Err(bad("expected MAJOR.MINOR.PATCH")),
        };
        let [Some(major), Some(minor), Some(patch)] = core else {
            return Err(bad("MAJOR, MINOR and PATCH must be decimal numbers"));
        };
        let mut pre = Vec::new();
        if let Some(pre_text) = pre_text {
            for id in pre_text.split('.') {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                    return Err(bad("pre-release identifiers are [0-9A-Za-z-]+"));
                }
                pre.push(match numeric(id) {
                    Some(n) => PreId::Numeric(n),
                    None if id.bytes().all(|b| b.is_ascii_digit()) => {
                        return Err(bad("numeric pre-release identifier with a leading zero"))
                    }
                    None => PreId::Alpha(id.to_owned()),
                });
            }
        }
        Ok(Self {
            text: text.to_owned(),
            core: [major, minor, patch],
            pre,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for MeasurementsVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl PartialOrd for MeasurementsVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for MeasurementsVersion {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering;
        self.core.cmp(&other.core).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => Ordering::Equal,
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                // Identifier by identifier; a longer list wins when one is a prefix.
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

/// A signed measurements file that verified and is not older than the last one accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedMeasurements {
    /// Store this and pass it as `last_accepted` next time.
    pub version: MeasurementsVersion,
    /// The whole signed document, for the caller to pick its variant's list.
    pub document: serde_json::Value,
}

/// The part of the signed document the rollback check reads.
#[derive(serde::Deserialize)]
struct VersionField {
    version: String,
}

/// An ECDSA P-256 public key from a PEM SubjectPublicKeyInfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignPublicKey {
    point: Vec<u8>,
}

impl CosignPublicKey {
    pub fn from_pem(pem: &[u8]) -> Result<Self, SignedMeasurementsError> {
        let (label, der) = der::pem::decode_vec(pem)
            .map_err(|e| SignedMeasurementsError::PublicKeyPem(e.to_string()))?;
        if label != "PUBLIC KEY" {
            return Err(SignedMeasurementsError::PublicKeyPem(format!(
                "label is {label:?}"
            )));
        }
        let spki = spki::SubjectPublicKeyInfoRef::from_der(&der)
            .map_err(|e| SignedMeasurementsError::PublicKeyPem(e.to_string()))?;
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
        if spki.algorithm.oid != ID_EC_PUBLIC_KEY || curve != Some(SECP256R1) {
            return Err(SignedMeasurementsError::PublicKeyType {
                algorithm: spki.algorithm.oid.to_string(),
                curve: curve
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into()),
            });
        }
        Ok(Self {
            point: spki.subject_public_key.raw_bytes().to_vec(),
        })
    }

    /// Verifies `signature_b64` (whitespace ignored) over the exact `file` bytes.
    pub fn verify(&self, file: &[u8], signature_b64: &[u8]) -> Result<(), SignedMeasurementsError> {
        let text: Vec<u8> = signature_b64
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let sig = base64::engine::general_purpose::STANDARD
            .decode(&text)
            .map_err(|e| SignedMeasurementsError::SignatureEncoding(e.to_string()))?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &self.point)
            .verify(file, &sig)
            .map_err(|_| SignedMeasurementsError::BadSignature {
                len: file.len(),
                sha256: hex::encode(crate::measurements::sha256(file)),
            })
    }

    /// [`verify`](Self::verify), then refuses a file whose signed `version` is older than
    /// `last_accepted` (the same version again is accepted: it is the same release). Returns
    /// the version to remember as the new last accepted one.
    pub fn verify_versioned(
        &self,
        file: &[u8],
        signature_b64: &[u8],
        last_accepted: Option<&MeasurementsVersion>,
    ) -> Result<VerifiedMeasurements, SignedMeasurementsError> {
        self.verify(file, signature_b64)?;
        let document: serde_json::Value = serde_json::from_slice(file)
            .map_err(|e| SignedMeasurementsError::Version(format!("file is not JSON: {e}")))?;
        let field = VersionField::deserialize(&document).map_err(|e| {
            SignedMeasurementsError::Version(format!("no string member \"version\": {e}"))
        })?;
        let version = MeasurementsVersion::parse(&field.version)?;
        if let Some(last) = last_accepted {
            if version < *last {
                tracing::warn!(%last, found = %version, "signed measurements rollback refused");
                return Err(SignedMeasurementsError::Rollback {
                    last_accepted: last.to_string(),
                    found: version.to_string(),
                });
            }
        }
        Ok(VerifiedMeasurements { version, document })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/test_data/measurements/");

    fn load(name: &str) -> Vec<u8> {
        std::fs::read(format!("{DIR}{name}")).unwrap_or_else(|e| panic!("{DIR}{name}: {e}"))
    }

    #[test]
    fn real_signed_measurements_verify_and_every_changed_byte_is_rejected() {
        let key = CosignPublicKey::from_pem(&load("cosign.pub")).unwrap();
        let mut file = load("measurements.json");
        let sig = load("measurements.json.sig");
        assert_eq!(
            hex::encode(crate::measurements::sha256(&file)).get(..7),
            Some("7269a1e"),
            "the fixture is the documented file"
        );
        key.verify(&file, &sig).unwrap();
        for i in 0..file.len() {
            file[i] ^= 0x01;
            assert!(
                matches!(
                    key.verify(&file, &sig),
                    Err(SignedMeasurementsError::BadSignature { .. })
                ),
                "byte {i} changed but accepted"
            );
            file[i] ^= 0x01;
        }
        file.push(b'\n');
        assert!(key.verify(&file, &sig).is_err(), "appended byte accepted");
    }

    #[test]
    fn bad_keys_and_signatures_are_typed_errors() {
        assert!(matches!(
            CosignPublicKey::from_pem(b"nope"),
            Err(SignedMeasurementsError::PublicKeyPem(_))
        ));
        let key = CosignPublicKey::from_pem(&load("cosign.pub")).unwrap();
        assert!(matches!(
            key.verify(b"x", b"!!!not base64"),
            Err(SignedMeasurementsError::SignatureEncoding(_))
        ));
    }
}
