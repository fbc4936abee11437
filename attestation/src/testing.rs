//! An in-process software attester for tests and benchmarks (cargo feature `testing`; never
//! enabled in production builds).
//!
//! [`SoftwareIssuer`] holds an ECDSA P-256 key (aws-lc-rs) standing in for a TPM attestation
//! key and claims one PCR value. Its evidence is
//!
//! ```text
//! PCR value (32) || binding (32) || public key (65, uncompressed SEC1) || ECDSA signature (64, fixed)
//! ```
//!
//! with the signature over everything before it. [`SoftwareValidator`] is honest: it accepts
//! evidence only if the key is one it pins, the signature verifies with that key, the signed
//! binding equals the expected one, and the signed PCR value passes the [`Measurements`]
//! policy (PCR [`SOFTWARE_PCR`]). So a wrong binding, a forged or altered body, an unpinned key
//! or a wrong measurement is rejected, each with its own [`ValidationError`]. What is *not*
//! real is only where the key lives (process memory instead of a TPM) and that the PCR value
//! is whatever the issuer was told to claim.
//!
//! [`real_evidence`]: loaders for the real SEV-SNP evidence in `attestation/test_data/`, shared
//! by the tests and benchmarks of every crate. [`snp_reports`]: SEV-SNP reports crafted and
//! signed with a test key.

pub mod real_evidence;
pub mod snp_reports;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};

use crate::measurements::{sha256, Digest, Measurement, Measurements};
use crate::variant::{IssueError, Issuer, ValidationError, Validator, Variant, Verdict};

/// The PCR index the software attester claims.
pub const SOFTWARE_PCR: u32 = 4;

const PCR_LEN: usize = 32;
const BINDING_LEN: usize = 32;
const PUBLIC_KEY_LEN: usize = 65;
const SIGNATURE_LEN: usize = 64;
const SIGNED_LEN: usize = PCR_LEN + BINDING_LEN + PUBLIC_KEY_LEN;
/// Length of every piece of software evidence.
pub const EVIDENCE_LEN: usize = SIGNED_LEN + SIGNATURE_LEN;

/// A policy enforcing `pcr` at [`SOFTWARE_PCR`].
pub fn software_policy(pcr: Digest) -> Measurements {
    Measurements(BTreeMap::from([(SOFTWARE_PCR, Measurement::enforce(pcr))]))
}

/// Signs (PCR value, binding) with a software P-256 key. Records the last evidence it produced
/// and can be told to replay old evidence instead of signing (to test replay defences).
pub struct SoftwareIssuer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    pcr: Digest,
    last: Mutex<Option<Vec<u8>>>,
    replay: Mutex<Option<Vec<u8>>>,
}

impl std::fmt::Debug for SoftwareIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareIssuer")
            .field("ak_fingerprint", &hex::encode(self.ak_fingerprint()))
            .field("pcr", &hex::encode(self.pcr))
            .finish_non_exhaustive()
    }
}

impl SoftwareIssuer {
    /// A fresh key claiming `pcr` at [`SOFTWARE_PCR`].
    pub fn new(pcr: Digest) -> Arc<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("generate a P-256 key");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .expect("load the generated P-256 key");
        Arc::new(Self {
            key,
            rng,
            pcr,
            last: Mutex::new(None),
            replay: Mutex::new(None),
        })
    }

    /// The public key (uncompressed SEC1 point), to pin in a [`SoftwareValidator`].
    pub fn public(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }

    /// What a validator reports as [`Verdict::ak_fingerprint`]: SHA-256 of [`Self::public`].
    pub fn ak_fingerprint(&self) -> Digest {
        sha256(self.key.public_key().as_ref())
    }

    /// The evidence most recently produced by [`Issuer::issue`].
    pub fn last_evidence(&self) -> Option<Vec<u8>> {
        lock(&self.last).clone()
    }

    /// From now on, answer every challenge with `evidence` (`None`: sign honestly again).
    pub fn replay(&self, evidence: Option<Vec<u8>>) {
        *lock(&self.replay) = evidence;
    }
}

impl Issuer for SoftwareIssuer {
    fn variant(&self) -> Variant {
        Variant::QemuVtpm
    }

    fn issue(&self, binding: &Digest) -> Result<Vec<u8>, IssueError> {
        if let Some(old) = lock(&self.replay).clone() {
            return Ok(old);
        }
        let mut body = Vec::with_capacity(EVIDENCE_LEN);
        body.extend_from_slice(&self.pcr);
        body.extend_from_slice(binding);
        body.extend_from_slice(self.key.public_key().as_ref());
        let sig = self.key.sign(&self.rng, &body).map_err(|_| {
            IssueError::Unsupported(Variant::QemuVtpm, "software ECDSA signing failed")
        })?;
        body.extend_from_slice(sig.as_ref());
        *lock(&self.last) = Some(body.clone());
        Ok(body)
    }
}

/// Accepts evidence from [`SoftwareIssuer`]s whose keys it pins, against a measurements policy.
pub struct SoftwareValidator {
    /// Pinned public keys by fingerprint.
    pinned: HashMap<Digest, Vec<u8>>,
    measurements: Measurements,
}

impl std::fmt::Debug for SoftwareValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareValidator")
            .field("pinned", &self.pinned.len())
            .field("measurements", &self.measurements)
            .finish()
    }
}

impl SoftwareValidator {
    /// Pins one key (see [`SoftwareIssuer::public`]).
    pub fn new(public: Vec<u8>, measurements: Measurements) -> Arc<Self> {
        Self::pinning([public], measurements)
    }

    /// Pins every key in `publics`.
    pub fn pinning(
        publics: impl IntoIterator<Item = Vec<u8>>,
        measurements: Measurements,
    ) -> Arc<Self> {
        Arc::new(Self {
            pinned: publics.into_iter().map(|p| (sha256(&p), p)).collect(),
            measurements,
        })
    }
}

impl Validator for SoftwareValidator {
    fn variant(&self) -> Variant {
        Variant::QemuVtpm
    }

    fn validate(&self, evidence: &[u8], binding: &Digest) -> Result<Verdict, ValidationError> {
        if evidence.len() != EVIDENCE_LEN {
            return Err(ValidationError::Malformed(format!(
                "{} bytes of software evidence (expected {EVIDENCE_LEN})",
                evidence.len()
            )));
        }
        let (body, sig) = evidence.split_at(SIGNED_LEN);
        let (pcr, rest) = body.split_at(PCR_LEN);
        let (signed_binding, public) = rest.split_at(BINDING_LEN);
        let fingerprint = sha256(public);
        let pinned = self
            .pinned
            .get(&fingerprint)
            .ok_or_else(|| ValidationError::UnpinnedKey {
                fingerprint: hex::encode(fingerprint),
                pinned: self.pinned.len(),
            })?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pinned)
            .verify(body, sig)
            .map_err(|_| ValidationError::Malformed("bad signature".into()))?;
        if signed_binding != binding {
            return Err(ValidationError::BindingMismatch {
                expected: hex::encode(binding),
                found: hex::encode(signed_binding),
            });
        }
        let pcr: Digest = pcr.try_into().expect("32-byte PCR slice");
        let pcrs = BTreeMap::from([(SOFTWARE_PCR, pcr)]);
        let outcome = self.measurements.check(&pcrs)?;
        Ok(Verdict {
            variant: Variant::QemuVtpm,
            pcrs,
            warnings: outcome.warnings,
            ak_fingerprint: fingerprint,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: Digest = [7u8; 32];

    #[test]
    fn honest_evidence_verifies_and_names_the_key() {
        let issuer = SoftwareIssuer::new(GOOD);
        let validator = SoftwareValidator::new(issuer.public(), software_policy(GOOD));
        let evidence = issuer.issue(&[1u8; 32]).unwrap();
        let verdict = validator.validate(&evidence, &[1u8; 32]).unwrap();
        assert_eq!(verdict.ak_fingerprint, issuer.ak_fingerprint());
        assert_eq!(verdict.pcrs[&SOFTWARE_PCR], GOOD);
    }

    #[test]
    fn wrong_binding_forgery_unpinned_key_and_wrong_pcr_are_rejected() {
        let issuer = SoftwareIssuer::new(GOOD);
        let validator = SoftwareValidator::new(issuer.public(), software_policy(GOOD));
        let evidence = issuer.issue(&[1u8; 32]).unwrap();
        assert!(matches!(
            validator.validate(&evidence, &[2u8; 32]),
            Err(ValidationError::BindingMismatch { .. })
        ));
        // Rewriting the binding (or the PCR) breaks the signature.
        let mut forged = evidence.clone();
        forged[PCR_LEN..PCR_LEN + BINDING_LEN].copy_from_slice(&[2u8; 32]);
        assert!(matches!(
            validator.validate(&forged, &[2u8; 32]),
            Err(ValidationError::Malformed(m)) if m == "bad signature"
        ));
        let mut forged = evidence.clone();
        forged[0] ^= 1;
        assert!(matches!(
            validator.validate(&forged, &[1u8; 32]),
            Err(ValidationError::Malformed(m)) if m == "bad signature"
        ));
        let stranger = SoftwareIssuer::new(GOOD);
        assert!(matches!(
            validator.validate(&stranger.issue(&[1u8; 32]).unwrap(), &[1u8; 32]),
            Err(ValidationError::UnpinnedKey { pinned: 1, .. })
        ));
        let bad = SoftwareIssuer::new([1u8; 32]);
        let v = SoftwareValidator::new(bad.public(), software_policy(GOOD));
        assert!(matches!(
            v.validate(&bad.issue(&[1u8; 32]).unwrap(), &[1u8; 32]),
            Err(ValidationError::Measurements(_))
        ));
        assert!(matches!(
            validator.validate(&evidence[1..], &[1u8; 32]),
            Err(ValidationError::Malformed(_))
        ));
    }

    #[test]
    fn replay_mode_returns_the_recorded_evidence() {
        let issuer = SoftwareIssuer::new(GOOD);
        let first = issuer.issue(&[1u8; 32]).unwrap();
        assert_eq!(issuer.last_evidence().as_deref(), Some(first.as_slice()));
        issuer.replay(Some(first.clone()));
        assert_eq!(issuer.issue(&[9u8; 32]).unwrap(), first);
        issuer.replay(None);
        assert_ne!(issuer.issue(&[9u8; 32]).unwrap(), first);
    }
}
