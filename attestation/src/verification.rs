//! What the verification service's evidence binds. The service (services/verify) and its
//! client (the `constellation-attest` crate) both compute it; network-free, so it lives here.

use sha2::{Digest as _, Sha256};

use crate::measurements::Digest;

/// What the evidence binds: SHA-256 over a domain label, the nonce and the user data.
pub fn binding(nonce: &[u8], user_data: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update(b"constellation-verify-v1");
    h.update((nonce.len() as u32).to_be_bytes());
    h.update(nonce);
    h.update(user_data);
    h.finalize().into()
}
