//! Attestation key (AK) public keys: ECDSA P-256 or RSA-2048, identified by the SHA-256 of
//! their SubjectPublicKeyInfo DER (the fingerprint the platform pins at provisioning).

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::PublicEncryptingKey;
#[cfg(feature = "tpm-device")]
use aws_lc_rs::rsa::PublicKeyComponents;
use aws_lc_rs::signature::{ParsedPublicKey, ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256};
use const_oid::ObjectIdentifier;
use der::Decode;
use spki::SubjectPublicKeyInfoRef;
#[cfg(feature = "tpm-device")]
use tss_esapi::interface_types::ecc::EccCurve;
#[cfg(feature = "tpm-device")]
use tss_esapi::structures::Public;

use super::signature::TpmSignature;
use super::QuoteError;
use crate::measurements::{sha256, Digest};

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// The two AK types a TPM 2.0 is required to support and that Constellation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AkKind {
    /// ECDSA on NIST P-256 with SHA-256 (endorsement hierarchy primary).
    EcdsaP256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit modulus (owner hierarchy primary).
    Rsa2048,
}

impl AkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AkKind::EcdsaP256 => "ECDSA-P256",
            AkKind::Rsa2048 => "RSA-2048",
        }
    }
}

/// A parsed AK public key, ready to verify signatures (the aws-lc-rs key is parsed once).
#[derive(Clone)]
pub struct AkPublicKey {
    kind: AkKind,
    spki_der: Vec<u8>,
    verifier: ParsedPublicKey,
}

impl AkPublicKey {
    /// From SubjectPublicKeyInfo DER. Only P-256 EC keys and 2048-bit RSA keys are accepted.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, QuoteError> {
        let spki = SubjectPublicKeyInfoRef::from_der(der)
            .map_err(|e| QuoteError::BadKey(format!("SubjectPublicKeyInfo DER: {e}")))?;
        let kind = if spki.algorithm.oid == ID_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters_oid()
                .map_err(|e| QuoteError::BadKey(format!("EC key without named curve: {e}")))?;
            if curve != SECP256R1 {
                return Err(QuoteError::BadKey(format!(
                    "EC curve: expected P-256 ({SECP256R1}), found {curve}"
                )));
            }
            AkKind::EcdsaP256
        } else if spki.algorithm.oid == RSA_ENCRYPTION {
            let bits = PublicEncryptingKey::from_der(der)
                .map_err(|e| QuoteError::BadKey(format!("RSA public key: {e}")))?
                .key_size_bits();
            if bits != 2048 {
                return Err(QuoteError::BadKey(format!(
                    "RSA modulus: expected 2048 bits, found {bits}"
                )));
            }
            AkKind::Rsa2048
        } else {
            return Err(QuoteError::BadKey(format!(
                "key algorithm: expected id-ecPublicKey or rsaEncryption, found {}",
                spki.algorithm.oid
            )));
        };
        let verifier = ParsedPublicKey::new(kind.verification_algorithm(), der)
            .map_err(|e| QuoteError::BadKey(format!("{}: {e}", kind.as_str())))?;
        // Re-encode so equal keys always have equal DER (and so equal fingerprints).
        let spki_der = verifier
            .as_der()
            .map_err(|_| QuoteError::BadKey("cannot re-encode the key".into()))?
            .as_ref()
            .to_vec();
        Ok(Self {
            kind,
            spki_der,
            verifier,
        })
    }

    /// From a PEM `PUBLIC KEY` block (e.g. `tpm2_readpublic -f pem`).
    pub fn from_pem(pem: &str) -> Result<Self, QuoteError> {
        let (label, der) = der::pem::decode_vec(pem.trim().as_bytes())
            .map_err(|e| QuoteError::BadKey(format!("PEM: {e}")))?;
        if label != "PUBLIC KEY" {
            return Err(QuoteError::BadKey(format!(
                "PEM label: expected \"PUBLIC KEY\", found {label:?}"
            )));
        }
        Self::from_spki_der(&der)
    }

    #[cfg(feature = "tpm-device")]
    /// From the public area the TPM returned for the key (`create_primary`, `read_public`).
    pub fn from_tpm_public(public: &Public) -> Result<Self, QuoteError> {
        match public {
            Public::Ecc {
                parameters, unique, ..
            } => {
                if parameters.ecc_curve() != EccCurve::NistP256 {
                    return Err(QuoteError::BadKey(format!(
                        "TPM EC key curve: expected NIST P-256, found {:?}",
                        parameters.ecc_curve()
                    )));
                }
                let mut point = [0u8; 65];
                point[0] = 0x04;
                for (coordinate, value, start) in [
                    ("x", unique.x().value(), 1usize),
                    ("y", unique.y().value(), 33),
                ] {
                    let len = value.len();
                    if len > 32 {
                        return Err(QuoteError::BadKey(format!(
                            "TPM EC point {coordinate} is {len} bytes, expected at most 32"
                        )));
                    }
                    if let Some(dst) = point.get_mut(start + 32 - len..start + 32) {
                        dst.copy_from_slice(value);
                    }
                }
                let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                    .map_err(|e| QuoteError::BadKey(format!("TPM EC point: {e}")))?;
                let der = key
                    .as_der()
                    .map_err(|_| QuoteError::BadKey("cannot encode the TPM EC key".into()))?;
                Self::from_spki_der(der.as_ref())
            }
            Public::Rsa {
                parameters, unique, ..
            } => {
                // Exponent 0 in a TPM public area means the default, 65537.
                let exponent = match parameters.exponent().value() {
                    0 => 65537u32,
                    e => e,
                };
                let e_bytes = exponent.to_be_bytes();
                let e_trimmed = match e_bytes.iter().position(|&b| b != 0) {
                    Some(first) => e_bytes.get(first..).unwrap_or_default(),
                    None => &[],
                };
                let components = PublicKeyComponents {
                    n: unique.value(),
                    e: e_trimmed,
                };
                let der = components
                    .as_der()
                    .map_err(|_| QuoteError::BadKey("TPM RSA key is not a valid RSA key".into()))?;
                Self::from_spki_der(der.as_ref())
            }
            _ => Err(QuoteError::BadKey(
                "TPM key is neither ECC nor RSA".to_owned(),
            )),
        }
    }

    pub fn kind(&self) -> AkKind {
        self.kind
    }

    /// Canonical SubjectPublicKeyInfo DER.
    pub fn to_spki_der(&self) -> Vec<u8> {
        self.spki_der.clone()
    }

    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// SHA-256 of the SubjectPublicKeyInfo DER.
    pub fn fingerprint(&self) -> Digest {
        sha256(&self.spki_der)
    }

    /// Verifies a TPM signature over `message` (the marshalled TPMS_ATTEST).
    pub fn verify(&self, message: &[u8], signature: &TpmSignature) -> Result<(), QuoteError> {
        let result = match (self.kind, signature) {
            (AkKind::EcdsaP256, TpmSignature::Ecdsa { r, s }) => {
                let fixed = TpmSignature::ecdsa_fixed(r, s)?;
                self.verifier.verify_sig(message, &fixed)
            }
            (AkKind::Rsa2048, TpmSignature::RsaSsa { signature }) => {
                self.verifier.verify_sig(message, signature)
            }
            (kind, sig) => {
                return Err(QuoteError::AlgorithmMismatch {
                    key: kind.as_str(),
                    signature: sig.algorithm_name(),
                })
            }
        };
        result.map_err(|_| QuoteError::BadSignature {
            ak_fingerprint: hex::encode(self.fingerprint()),
        })
    }
}

impl AkKind {
    fn verification_algorithm(self) -> &'static dyn aws_lc_rs::signature::VerificationAlgorithm {
        match self {
            AkKind::EcdsaP256 => &ECDSA_P256_SHA256_FIXED,
            AkKind::Rsa2048 => &RSA_PKCS1_2048_8192_SHA256,
        }
    }
}

impl PartialEq for AkPublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}

impl Eq for AkPublicKey {}

impl fmt::Debug for AkPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AkPublicKey")
            .field("kind", &self.kind)
            .field("fingerprint", &hex::encode(self.fingerprint()))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tpm2_readpublic -f pem` of an ECC P-256 AK on swtpm.
    const EC_PEM: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnpsVSHUeVKJtXdS4Y2h7GNm4/NpL
PQWx3Uq1L4na5SOe9TDEn+zAHFPDoKGaaRbyWsRdC+x0hTP6JHIiSQtSPQ==
-----END PUBLIC KEY-----
";

    #[test]
    fn pem_and_der_agree_and_fingerprint_is_sha256_of_der() {
        let key = AkPublicKey::from_pem(EC_PEM).unwrap();
        assert_eq!(key.kind(), AkKind::EcdsaP256);
        assert_eq!(key.spki_der().len(), 91);
        let again = AkPublicKey::from_spki_der(&key.to_spki_der()).unwrap();
        assert_eq!(again, key);
        assert_eq!(key.fingerprint(), sha256(key.spki_der()));
    }

    #[test]
    fn rejects_garbage_wrong_label_and_unsupported_keys() {
        assert!(matches!(
            AkPublicKey::from_spki_der(b"\x30\x03\x02\x01\x00"),
            Err(QuoteError::BadKey(_))
        ));
        let cert_label = EC_PEM.replace("PUBLIC KEY", "CERTIFICATE");
        assert!(matches!(
            AkPublicKey::from_pem(&cert_label),
            Err(QuoteError::BadKey(m)) if m.contains("PEM label")
        ));
        // A P-384 key: the curve is checked before anything else.
        let p384 = aws_lc_rs::signature::EcdsaKeyPair::generate(
            &aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        )
        .unwrap();
        let der = aws_lc_rs::signature::KeyPair::public_key(&p384)
            .as_der()
            .unwrap();
        assert!(matches!(
            AkPublicKey::from_spki_der(der.as_ref()),
            Err(QuoteError::BadKey(m)) if m.contains("curve")
        ));
    }
}
