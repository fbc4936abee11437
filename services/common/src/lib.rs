//! The small set of pieces every node service shares: key derivation from the master secret,
//! init-secret hashing, and secret byte strings that never print.

pub mod kdf;
pub mod secret;
