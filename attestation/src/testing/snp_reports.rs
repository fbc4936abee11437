//! SEV-SNP attestation reports crafted and signed with a fresh P-384 test key, behind a test VEK
//! (`VerifiedVek::for_testing`) carrying the TCB under test: the signature, signer and
//! consistency checks pass, so a test reaches the policy check it aims at. Shared by
//! `attestation/tests/attacks_snp_policy.rs` and the node-side policy tests of other crates.

use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P384_SHA384_FIXED_SIGNING};

use crate::snp::{SigningKey, Tcb, VekExtensions, VerifiedVek, REPORT_LEN, SIGNED_LEN};

/// The baseline report's reported and current TCB.
pub const TCB: Tcb = Tcb {
    bootloader: 4,
    tee: 0,
    snp: 24,
    microcode: 217,
};
/// ABI 1.55, SMT allowed, bit 17 (reserved, must be one) set.
pub const GOOD_POLICY: u64 = (1 << 17) | (1 << 16) | (1 << 8) | 55;
pub const MEASUREMENT: [u8; 48] = [0x4D; 48];
pub const ID_KEY_DIGEST: [u8; 48] = [0x1D; 48];
pub const CHIP_ID: [u8; 64] = [0xC1; 64];

/// The fields a test changes; everything else is zero.
#[derive(Clone)]
pub struct Fields {
    pub version: u32,
    pub policy: u64,
    pub vmpl: u32,
    pub signer: SigningKey,
    pub reported_tcb: Tcb,
    pub current_tcb: Tcb,
    pub measurement: [u8; 48],
    pub id_key_digest: [u8; 48],
    pub chip_id: [u8; 64],
    /// REPORT_DATA, the binding the guest asked for (e.g. SHA-512 of its TPM AK).
    pub report_data: [u8; 64],
}

impl Default for Fields {
    fn default() -> Self {
        Self {
            version: 3,
            policy: GOOD_POLICY,
            vmpl: 0,
            signer: SigningKey::Vcek,
            reported_tcb: TCB,
            current_tcb: TCB,
            measurement: MEASUREMENT,
            id_key_digest: ID_KEY_DIGEST,
            chip_id: CHIP_ID,
            report_data: [0; 64],
        }
    }
}

/// Milan/Genoa TCB_VERSION layout: byte 0 bootloader, 1 tee, 6 snp, 7 microcode.
pub fn tcb_u64(t: Tcb) -> u64 {
    u64::from_le_bytes([t.bootloader, t.tee, 0, 0, 0, 0, t.snp, t.microcode])
}

/// A test signer and the VEK that stands for it.
pub struct TestChip {
    key: EcdsaKeyPair,
}

impl TestChip {
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        Self { key }
    }

    pub fn vek(&self, kind: SigningKey, tcb: Tcb) -> VerifiedVek {
        let extensions = VekExtensions {
            product_name: "Milan-B0".into(),
            tcb,
            hw_id: (kind == SigningKey::Vcek).then_some(CHIP_ID),
        };
        VerifiedVek::for_testing(
            kind,
            self.key.public_key().as_ref(),
            extensions,
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH + Duration::from_secs(4_000_000_000),
        )
        .unwrap()
    }

    /// Builds the report and signs bytes [0, 0x2A0) the way the firmware does: R and S as
    /// 72-byte little-endian fields.
    pub fn report(&self, f: &Fields) -> Vec<u8> {
        let mut r = vec![0u8; REPORT_LEN];
        let mut put = |offset: usize, bytes: &[u8]| {
            r[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        put(0x00, &f.version.to_le_bytes());
        put(0x08, &f.policy.to_le_bytes());
        put(0x30, &f.vmpl.to_le_bytes());
        put(0x34, &1u32.to_le_bytes()); // ECDSA P-384 SHA-384
        put(0x38, &tcb_u64(f.current_tcb).to_le_bytes());
        let signer: u32 = match f.signer {
            SigningKey::Vcek => 0,
            SigningKey::Vlek => 1,
            _ => 7,
        };
        put(0x48, &(signer << 2).to_le_bytes());
        put(0x50, &f.report_data);
        put(0x90, &f.measurement);
        put(0xE0, &f.id_key_digest);
        put(0x180, &tcb_u64(f.reported_tcb).to_le_bytes());
        if f.version >= 3 {
            put(0x188, &[0x19, 0x01, 0x01]); // family 19h (Milan)
        }
        put(0x1A0, &f.chip_id);
        put(0x1E0, &tcb_u64(f.current_tcb).to_le_bytes());
        put(0x1F0, &tcb_u64(f.reported_tcb).to_le_bytes());
        let sig = self
            .key
            .sign(&SystemRandom::new(), &r[..SIGNED_LEN])
            .unwrap();
        let (rs, ss) = sig.as_ref().split_at(48);
        for (i, b) in rs.iter().rev().enumerate() {
            r[SIGNED_LEN + i] = *b;
        }
        for (i, b) in ss.iter().rev().enumerate() {
            r[SIGNED_LEN + 72 + i] = *b;
        }
        r
    }
}

impl Default for TestChip {
    fn default() -> Self {
        Self::new()
    }
}
