//! The node's attestation issuer: a TPM 2.0 (device or swtpm TCTI) quoting PCRs 0..=15 with an
//! ECDSA P-256 attestation key, as the bootstrapper does.

use constellation_attestation::tpm::{AkKind, Tpm};
use constellation_attestation::variant::qemu_vtpm::QemuVtpmIssuer;

/// PCRs every quote covers.
pub const QUOTED_PCRS: std::ops::RangeInclusive<u32> = 0..=15;

/// Opens the TPM at `tcti` and loads the attestation key; the error says why (not secret).
pub fn open_issuer(tcti: &str) -> Result<QemuVtpmIssuer, String> {
    let tpm = Tpm::open(tcti).map_err(|e| format!("opening TPM {tcti:?}: {e}"))?;
    QemuVtpmIssuer::new(tpm, AkKind::EcdsaP256, QUOTED_PCRS.collect())
        .map_err(|e| format!("loading the attestation key from TPM {tcti:?}: {e}"))
}
