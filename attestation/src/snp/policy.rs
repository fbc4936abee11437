//! What a verifier requires of a (signature-checked) report beyond its authenticity.

use std::ops::RangeInclusive;

use super::report::{AttestationReport, Tcb, SUPPORTED_VERSIONS};
use super::SnpError;

/// GUEST_POLICY bit 17: reserved, must be one (SEV-SNP ABI spec, table "GUEST_POLICY").
pub const POLICY_RESERVED_ONE_BIT: u64 = 1 << 17;
/// GUEST_POLICY bit 18: a migration agent may be associated with the guest (it can read the
/// guest's memory during migration, outside the guest's trust).
pub const POLICY_MIGRATE_MA_BIT: u64 = 1 << 18;
/// GUEST_POLICY bits 0..=25 are defined (ABI minor/major, SMT, reserved-one, MIGRATE_MA,
/// DEBUG, SINGLE_SOCKET, CXL_ALLOW, MEM_AES_256_XTS, RAPL_DIS, CIPHERTEXT_HIDING,
/// PAGE_SWAP_DISABLE); bits 26..=63 are reserved and must be zero.
pub const POLICY_RESERVED_ZERO_MASK: u64 = !((1 << 26) - 1);

/// A firmware ABI version (GUEST_POLICY ABI_MAJOR.ABI_MINOR: the oldest firmware ABI the
/// guest owner allowed the guest to be launched on), ordered major first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct AbiVersion {
    pub major: u8,
    pub minor: u8,
}

impl std::fmt::Display for AbiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Requirements on a report's contents: the SEV-SNP attestation settings of a cluster plus
/// the binding (`report_data`) the validator fills in per connection.
///
/// `Default` is the strictest baseline that needs no per-image values: report versions 2..=3,
/// debug disallowed, migration agent refused (always; no setting allows it), reserved policy
/// bits checked (always), VMPL 0, minimum ABI 0.0, no minimum TCB, and no measurement /
/// id-key / report-data check. Validators set `report_data`; deployments should set
/// `allowed_measurements`.
///
/// Allow-lists: `None` means "not checked"; `Some(list)` means the report's value must be in
/// `list`, so a configured but empty list accepts no report at all (a list that was meant to
/// name the good values but names none must not turn into "anything goes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnpPolicy {
    /// Accept guests whose policy allows debugging (bit 19). Never in production.
    pub allow_debug: bool,
    /// The VMPL the report must have been requested from.
    pub vmpl: u32,
    /// Each component of `reported_tcb` must be at least this.
    pub minimum_tcb: Tcb,
    /// The guest policy's ABI_MAJOR.ABI_MINOR must be at least this.
    pub minimum_abi: AbiVersion,
    /// Report VERSION values accepted (within what the parser understands).
    pub report_versions: RangeInclusive<u32>,
    /// If set, the launch MEASUREMENT must be one of these.
    pub allowed_measurements: Option<Vec<[u8; 48]>>,
    /// If set, `id_key_digest` must be one of these.
    pub allowed_id_key_digests: Option<Vec<[u8; 48]>>,
    /// The exact REPORT_DATA expected (nonce / key binding).
    pub report_data: Option<[u8; 64]>,
}

impl Default for SnpPolicy {
    fn default() -> Self {
        Self {
            allow_debug: false,
            vmpl: 0,
            minimum_tcb: Tcb::default(),
            minimum_abi: AbiVersion::default(),
            report_versions: SUPPORTED_VERSIONS[0]
                ..=SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1],
            allowed_measurements: None,
            allowed_id_key_digests: None,
            report_data: None,
        }
    }
}

impl SnpPolicy {
    /// Runs every check in order (report version, debug, migration agent, reserved policy
    /// bits, minimum ABI, VMPL, minimum TCB, measurement, id-key digest, report data) and
    /// returns the first failure.
    pub fn check(&self, report: &AttestationReport) -> Result<(), SnpError> {
        self.check_report_version(report)?;
        self.check_debug(report)?;
        self.check_migrate_ma(report)?;
        self.check_policy_reserved(report)?;
        self.check_minimum_abi(report)?;
        self.check_vmpl(report)?;
        self.check_minimum_tcb(report)?;
        self.check_measurement(report)?;
        self.check_id_key_digest(report)?;
        self.check_report_data(report)
    }

    /// The checks on what a VEK lookup is keyed by (report version, reported TCB): run before
    /// the lookup as well, so a report the policy refuses anyway cannot make a source fetch a
    /// VEK for an old or made-up TCB.
    pub fn check_lookup_fields(&self, report: &AttestationReport) -> Result<(), SnpError> {
        self.check_report_version(report)?;
        self.check_minimum_tcb(report)
    }

    pub fn check_report_version(&self, report: &AttestationReport) -> Result<(), SnpError> {
        if !self.report_versions.contains(&report.version) {
            return Err(SnpError::ReportVersionNotAccepted {
                minimum: *self.report_versions.start(),
                maximum: *self.report_versions.end(),
                found: report.version,
            });
        }
        Ok(())
    }

    pub fn check_debug(&self, report: &AttestationReport) -> Result<(), SnpError> {
        if report.policy.debug_allowed && !self.allow_debug {
            return Err(SnpError::DebugNotAllowed {
                policy: report.policy.raw,
            });
        }
        Ok(())
    }

    /// A migration agent could export the guest's memory: never accepted.
    pub fn check_migrate_ma(&self, report: &AttestationReport) -> Result<(), SnpError> {
        if report.policy.raw & POLICY_MIGRATE_MA_BIT != 0 {
            return Err(SnpError::MigrationAgentAllowed {
                policy: report.policy.raw,
            });
        }
        Ok(())
    }

    /// Bit 17 must be one and bits 26..=63 zero: a policy that breaks the ABI's own rules
    /// (or uses bits this verifier does not know the meaning of) is refused.
    pub fn check_policy_reserved(&self, report: &AttestationReport) -> Result<(), SnpError> {
        let raw = report.policy.raw;
        let bad = (raw & POLICY_RESERVED_ZERO_MASK) | (!raw & POLICY_RESERVED_ONE_BIT);
        if bad != 0 {
            return Err(SnpError::PolicyReservedBits { policy: raw, bad });
        }
        Ok(())
    }

    pub fn check_minimum_abi(&self, report: &AttestationReport) -> Result<(), SnpError> {
        let found = AbiVersion {
            major: report.policy.abi_major,
            minor: report.policy.abi_minor,
        };
        if found < self.minimum_abi {
            return Err(SnpError::AbiBelowMinimum {
                minimum: self.minimum_abi,
                found,
            });
        }
        Ok(())
    }

    pub fn check_vmpl(&self, report: &AttestationReport) -> Result<(), SnpError> {
        if report.vmpl != self.vmpl {
            return Err(SnpError::VmplMismatch {
                expected: self.vmpl,
                found: report.vmpl,
            });
        }
        Ok(())
    }

    pub fn check_minimum_tcb(&self, report: &AttestationReport) -> Result<(), SnpError> {
        let found = report.reported_tcb.tcb();
        match found.first_below(&self.minimum_tcb) {
            Some((component, _, _)) => Err(SnpError::TcbBelowMinimum {
                component,
                minimum: self.minimum_tcb,
                found,
            }),
            None => Ok(()),
        }
    }

    pub fn check_measurement(&self, report: &AttestationReport) -> Result<(), SnpError> {
        match &self.allowed_measurements {
            Some(allowed) if !allowed.contains(&report.measurement) => {
                Err(SnpError::MeasurementNotAllowed {
                    allowed: allowed.iter().map(|d| d.to_vec()).collect(),
                    found: report.measurement.to_vec(),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn check_id_key_digest(&self, report: &AttestationReport) -> Result<(), SnpError> {
        match &self.allowed_id_key_digests {
            Some(allowed) if !allowed.contains(&report.id_key_digest) => {
                Err(SnpError::IdKeyDigestNotAllowed {
                    allowed: allowed.iter().map(|d| d.to_vec()).collect(),
                    found: report.id_key_digest.to_vec(),
                })
            }
            _ => Ok(()),
        }
    }

    pub fn check_report_data(&self, report: &AttestationReport) -> Result<(), SnpError> {
        match &self.report_data {
            Some(expected) if *expected != report.report_data => {
                Err(SnpError::ReportDataMismatch {
                    expected: expected.to_vec(),
                    found: report.report_data.to_vec(),
                })
            }
            _ => Ok(()),
        }
    }
}
