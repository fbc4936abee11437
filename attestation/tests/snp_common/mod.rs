//! The real SEV-SNP evidence for the snp_* integration tests: the shared loaders of
//! `constellation_attestation::testing::real_evidence`.
#![allow(unused_imports)]

pub use constellation_attestation::testing::real_evidence::*;
