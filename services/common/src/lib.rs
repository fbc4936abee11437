//! The small set of pieces every node service shares: key derivation from the master secret,
//! the node metadata seam, init-secret hashing, secret byte strings that never print, and the
//! rustls plumbing for tonic that the key service and the provider share.

pub mod initsecret;
pub mod kdf;
pub mod limits;
pub mod metadata;
pub mod node_status;
pub mod refusal;
pub mod secret;
pub mod secret_file;
pub mod tls;
