//! The init secret: the provider sends it with Init; the node compares it with the Argon2id
//! hash published in its metadata. Only the hash is ever stored or published.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

/// Why an init secret was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitSecretError {
    #[error("the published init-secret hash is not a valid Argon2 PHC string")]
    BadHash,
    #[error("init secret does not match the hash published in this node's metadata")]
    Mismatch,
}

/// Argon2id PHC string of `secret` with a random salt.
pub fn hash(secret: &[u8]) -> String {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    Argon2::default()
        .hash_password(secret, &salt)
        .expect("argon2 with default params hashes")
        .to_string()
}

/// Checks `secret` against a PHC hash in constant time.
pub fn verify(secret: &[u8], phc: &str) -> Result<(), InitSecretError> {
    let parsed = PasswordHash::new(phc).map_err(|_| InitSecretError::BadHash)?;
    Argon2::default()
        .verify_password(secret, &parsed)
        .map_err(|_| InitSecretError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_secret_verifies_wrong_secret_and_bad_hash_do_not() {
        let h = hash(b"correct horse");
        assert!(h.starts_with("$argon2id$"));
        assert!(!h.contains("correct"));
        verify(b"correct horse", &h).unwrap();
        assert_eq!(verify(b"wrong", &h), Err(InitSecretError::Mismatch));
        assert_eq!(verify(b"x", "not a hash"), Err(InitSecretError::BadHash));
    }
}
