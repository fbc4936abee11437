//! Key derivation: HKDF-SHA256(ikm = master secret, salt = master salt, info = "key-" + key ID).

use hkdf::Hkdf;
use sha2::Sha256;

use crate::secret::SecretBytes;

/// Key ID of the cluster ID, derived from the measurement secret and salt.
pub const CLUSTER_ID_KEY_ID: &str = "clusterID";
/// Key ID of the measurement secret, derived from the master secret and salt.
pub const MEASUREMENT_SECRET_KEY_ID: &str = "measurementSecret";
/// Key ID of the owner ID, derived from the measurement secret and salt.
pub const OWNER_ID_KEY_ID: &str = "ownerID";
/// Default length of a derived key.
pub const DEFAULT_KEY_LEN: usize = 32;
/// Largest key HKDF-SHA256 can produce (255 blocks of 32 bytes).
pub const MAX_KEY_LEN: usize = 255 * 32;

/// Why a key could not be derived.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KdfError {
    #[error("key length {0} is out of range (1..={MAX_KEY_LEN})")]
    BadLength(usize),
    #[error("key ID is empty")]
    EmptyKeyId,
}

/// Derives `len` bytes for `key_id` from a secret and salt.
pub fn derive_key(
    secret: &[u8],
    salt: &[u8],
    key_id: &str,
    len: usize,
) -> Result<SecretBytes, KdfError> {
    if len == 0 || len > MAX_KEY_LEN {
        return Err(KdfError::BadLength(len));
    }
    if key_id.is_empty() {
        return Err(KdfError::EmptyKeyId);
    }
    let mut okm = vec![0u8; len];
    Hkdf::<Sha256>::new(Some(salt), secret)
        .expand(format!("key-{key_id}").as_bytes(), &mut okm)
        .map_err(|_| KdfError::BadLength(len))?;
    Ok(SecretBytes::new(okm))
}

/// The cluster ID: HKDF(measurement secret, measurement salt, "key-clusterID"), 32 bytes.
pub fn cluster_id(measurement_secret: &[u8], measurement_salt: &[u8]) -> [u8; 32] {
    let k = derive_key(measurement_secret, measurement_salt, CLUSTER_ID_KEY_ID, 32)
        .expect("32 is a valid length");
    let mut out = [0u8; 32];
    out.copy_from_slice(k.expose());
    out
}

/// The measurement secret: HKDF(master secret, master salt, "key-measurementSecret").
pub fn measurement_secret(master_secret: &[u8], master_salt: &[u8]) -> SecretBytes {
    derive_key(master_secret, master_salt, MEASUREMENT_SECRET_KEY_ID, 32)
        .expect("32 is a valid length")
}

/// The owner ID: HKDF(measurement secret, measurement salt, "key-ownerID"), 32 bytes.
pub fn owner_id(measurement_secret: &[u8], measurement_salt: &[u8]) -> [u8; 32] {
    let k = derive_key(measurement_secret, measurement_salt, OWNER_ID_KEY_ID, 32)
        .expect("32 is a valid length");
    let mut out = [0u8; 32];
    out.copy_from_slice(k.expose());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_lengths_and_empty_ids() {
        assert_eq!(
            derive_key(b"s", b"t", "x", 0).unwrap_err(),
            KdfError::BadLength(0)
        );
        assert_eq!(
            derive_key(b"s", b"t", "x", MAX_KEY_LEN + 1).unwrap_err(),
            KdfError::BadLength(MAX_KEY_LEN + 1)
        );
        assert_eq!(
            derive_key(b"s", b"t", "", 32).unwrap_err(),
            KdfError::EmptyKeyId
        );
        assert_eq!(
            derive_key(b"s", b"t", "x", MAX_KEY_LEN)
                .unwrap()
                .expose()
                .len(),
            MAX_KEY_LEN
        );
    }
}
