//! Signed measurements: a measurements file verified against a detached cosign-style signature
//! (base64 of a DER ECDSA P-256 signature over SHA-256 of the exact file bytes).

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use base64::Engine as _;
use const_oid::ObjectIdentifier;
use der::Decode as _;

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
