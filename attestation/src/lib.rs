//! Attestation for Constellation nodes: evidence formats, the node-side issuers, the
//! verifier-side validators, the measurements policy, and attested TLS (aTLS).
//!
//! One module per attestation technology (`snp`, `tpm`) and one per variant
//! (`variant::qemu_vtpm`, ...). Every validator rejects by default and reports *why*
//! with a typed error carrying the expected and found values.

// Without `tpm-device` or `atls` the node-side halves are compiled out; their shared imports
// then go unused.
#![cfg_attr(
    not(all(feature = "tpm-device", feature = "atls")),
    allow(unused_imports, dead_code)
)]

#[cfg(feature = "atls")]
pub mod atls;
pub mod clock;
pub mod measurements;
pub mod pcr;
#[cfg(feature = "atls")]
pub mod refusal;
pub mod signed_measurements;
pub mod snp;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tpm;
pub mod variant;
pub mod verification;

pub use clock::{Clock, FixedClock, SystemClock};
pub use measurements::{
    AcceptedMeasurements, Measurement, MeasurementMismatch, Measurements, PolicyOutcome,
};
#[cfg(feature = "atls")]
pub use refusal::{PcrMismatch, Refusal, RefusalCheck};
#[cfg(feature = "tpm-device")]
pub use variant::issuer_for;
pub use variant::{
    validator_for, IssueError, Issuer, ValidationError, Validator, ValidatorPolicy, Variant,
    Verdict,
};
