//! Why a verifier refused a peer, as data that crosses process boundaries: the aTLS outcome
//! message tells a refused attester which check failed, and a node reports it in its
//! [`crate::node_status::NodeStatus`], so callers (the provider, an operator) branch on the
//! check and print the PCRs instead of searching log text. The attestation crate converts its
//! validation errors into it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The check that refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RefusalCheck {
    /// Enforced PCRs differ from the policy ([`Refusal::mismatches`] names them).
    Measurements,
    /// The policy itself is unusable (e.g. nothing enforced).
    Policy,
    /// The evidence answers another nonce (replay).
    Nonce,
    /// The evidence is bound to another TLS session (relay) or other data.
    Binding,
    /// The attestation key is not one the platform pinned for this cluster.
    UnpinnedKey,
    /// Evidence of another attestation variant.
    Variant,
    /// The TPM quote or its signature.
    Quote,
    /// The SEV-SNP report, its signature, policy or TCB.
    Snp,
    /// SEV-SNP collateral (VCEK/VLEK chain) could not be had.
    Collateral,
    /// Evidence or exchange malformed.
    Malformed,
    /// The disk asked for is bound to another node.
    DiskBinding,
    /// The role asked for is not the one the platform lists for the node.
    Role,
    /// Anything else (transport, timeout).
    Other,
}

/// One enforced PCR that differed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PcrMismatch {
    pub pcr: u32,
    /// Hex of the expected digest.
    pub expected: String,
    /// Hex of the digest found, `None` when the evidence lacked the PCR.
    pub found: Option<String>,
}

/// A refusal: which check, the PCRs involved, and the verifier's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub check: RefusalCheck,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mismatches: Vec<PcrMismatch>,
    /// The verifier's own description (carries no secret: measurements and key fingerprints
    /// are public).
    pub message: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl Refusal {
    pub fn new(check: RefusalCheck, message: impl fmt::Display) -> Self {
        Self {
            check,
            mismatches: Vec::new(),
            message: message.to_string(),
        }
    }

    /// A refusal whose details were lost (an older peer, or a message that did not parse).
    pub fn other(message: impl fmt::Display) -> Self {
        Self::new(RefusalCheck::Other, message)
    }
}
