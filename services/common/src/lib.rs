//! The small set of pieces every node service shares: key derivation from the master secret,
//! the node metadata seam, init-secret hashing, and secret byte strings that never print.

pub mod initsecret;
pub mod kdf;
pub mod metadata;
pub mod secret;
