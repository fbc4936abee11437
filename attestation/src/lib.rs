//! Attestation for Constellation nodes: evidence formats, the node-side issuers, the
//! verifier-side validators, the measurements policy, and attested TLS (aTLS).
//!
//! One module per attestation technology (`snp`, `tpm`) and one per variant
//! (`variant::qemu_vtpm`, ...). Every validator rejects by default and reports *why*
//! with a typed error carrying the expected and found values.

pub mod atls;
pub mod clock;
pub mod measurements;
pub mod pcr;
pub mod refusal;
pub mod signed_measurements;
pub mod snp;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tpm;
pub mod variant;
pub mod verification;

pub use clock::{Clock, FixedClock, SystemClock};
pub use measurements::{Measurement, MeasurementMismatch, Measurements, PolicyOutcome};
pub use refusal::{PcrMismatch, Refusal, RefusalCheck};
pub use variant::{
    issuer_for, validator_for, IssueError, Issuer, ValidationError, Validator, ValidatorPolicy,
    Variant, Verdict,
};
