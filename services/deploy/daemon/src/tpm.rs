//! The node's attestation: the daemon picks its attestation variant from the platform it runs
//! on ([`detect_variant`]) instead of a configuration naming it, and opens the TPM-backed issuer
//! of that variant with retries (see `reload::until_loaded`).

use std::path::Path;

use constellation_attestation::variant::{issuer_for, FactoryError, VariantIssuer};
use constellation_attestation::Variant;

/// The SEV-SNP guest report device; its presence makes this an SNP guest.
pub const SEV_GUEST_DEVICE: &str = "/dev/sev-guest";

/// What the platform offers this daemon for attestation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformFacts {
    /// A SEV-SNP guest report device exists.
    pub sev_guest: bool,
    /// The TPM the TCTI names is present (a device node exists, or a swtpm socket).
    pub tpm: bool,
}

impl PlatformFacts {
    /// The facts of this machine for the TPM at `tcti`.
    pub fn probe(tcti: &str) -> Self {
        let tpm_path = tcti.strip_prefix("device:").map(str::to_owned).or_else(|| {
            tcti.strip_prefix("swtpm:").and_then(|rest| {
                rest.split(',')
                    .find_map(|kv| kv.strip_prefix("path="))
                    .map(str::to_owned)
            })
        });
        Self {
            sev_guest: Path::new(SEV_GUEST_DEVICE).exists(),
            // A TCP swtpm (host=...,port=...) has no path: whether it answers shows at open.
            tpm: tpm_path.is_none_or(|p| Path::new(&p).exists()),
        }
    }
}

/// Why this daemon has no attestation variant to issue on its platform.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoVariantError {
    #[error(
        "{SEV_GUEST_DEVICE} exists: a SEV-SNP guest, whose variants (aws-sev-snp, \
         azure-sev-snp) this daemon cannot issue yet"
    )]
    SevSnpGuest,
    #[error("no TPM: no attestation variant this daemon can issue")]
    NoTpm,
}

/// Why the daemon's attestation issuer did not open (no secret in it).
#[derive(Debug, thiserror::Error)]
pub enum OpenIssuerError {
    #[error(transparent)]
    NoVariant(#[from] NoVariantError),
    #[error("TPM {tcti:?}: {source}")]
    Tpm {
        tcti: String,
        #[source]
        source: FactoryError,
    },
}

/// The variant these facts imply: a TPM without an SNP guest device is a vTPM guest (QEMU, or
/// the local platform's swtpm): `qemu-vtpm`. An SNP guest's variants need a report device
/// driver this code base does not have, so it is refused with the reason rather than
/// attested as something else.
pub fn detect_variant(facts: &PlatformFacts) -> Result<Variant, NoVariantError> {
    if facts.sev_guest {
        return Err(NoVariantError::SevSnpGuest);
    }
    if !facts.tpm {
        return Err(NoVariantError::NoTpm);
    }
    Ok(Variant::QemuVtpm)
}

/// Opens the TPM at `tcti` with the variant the platform implies and loads its attestation key.
pub fn open_issuer(tcti: &str) -> Result<VariantIssuer, OpenIssuerError> {
    let variant = detect_variant(&PlatformFacts::probe(tcti))?;
    issuer_for(variant, tcti).map_err(|source| OpenIssuerError::Tpm {
        tcti: tcti.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_variant_follows_the_platform() {
        let vtpm = PlatformFacts {
            sev_guest: false,
            tpm: true,
        };
        assert_eq!(detect_variant(&vtpm), Ok(Variant::QemuVtpm));
        let snp = PlatformFacts {
            sev_guest: true,
            tpm: true,
        };
        assert_eq!(detect_variant(&snp), Err(NoVariantError::SevSnpGuest));
        assert!(NoVariantError::SevSnpGuest
            .to_string()
            .contains(SEV_GUEST_DEVICE));
        let none = PlatformFacts {
            sev_guest: false,
            tpm: false,
        };
        assert_eq!(detect_variant(&none), Err(NoVariantError::NoTpm));
        assert!(!PlatformFacts::probe("device:/nonexistent/tpmrm0").tpm);
        assert!(PlatformFacts::probe("swtpm:host=127.0.0.1,port=1").tpm);
    }
}
