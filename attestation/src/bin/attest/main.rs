//! `attest`: attestation diagnostics, like snpguest.

fn main() {}
