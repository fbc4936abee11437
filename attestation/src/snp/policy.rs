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

/// The SEV-SNP attestation settings of a cluster as configured (provider schema, node
/// metadata): every field optional, hex strings for digests, unknown fields refused. An
/// absent field keeps the [`SnpPolicy`] default; a present allow-list, even an empty one, is
/// enforced (see [`SnpPolicy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnpSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_tcb: Option<Tcb>,
    /// `"MAJOR.MINOR"`, e.g. `"1.55"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum_abi: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmpl: Option<u32>,
    /// Launch measurements, 96 hex characters each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_launch_measurements: Option<Vec<String>>,
    /// ID-key digests, 96 hex characters each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_id_key_digests: Option<Vec<String>>,
}

/// Why [`SnpSettings`] do not make a policy: which setting, and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SEV-SNP setting {setting}: expected {expected}, found {found:?}")]
pub struct SnpSettingsError {
    pub setting: &'static str,
    pub expected: &'static str,
    pub found: String,
}

impl SnpSettings {
    /// The policy these settings describe (`report_data` unset: validators bind it).
    pub fn policy(&self) -> Result<SnpPolicy, SnpSettingsError> {
        let mut policy = SnpPolicy::default();
        if let Some(tcb) = self.minimum_tcb {
            policy.minimum_tcb = tcb;
        }
        if let Some(vmpl) = self.vmpl {
            policy.vmpl = vmpl;
        }
        if let Some(abi) = &self.minimum_abi {
            policy.minimum_abi = parse_abi(abi).ok_or_else(|| SnpSettingsError {
                setting: "minimum_abi",
                expected: "MAJOR.MINOR, each 0..=255",
                found: abi.clone(),
            })?;
        }
        policy.allowed_measurements = digests(
            "allowed_launch_measurements",
            self.allowed_launch_measurements.as_deref(),
        )?;
        policy.allowed_id_key_digests = digests(
            "allowed_id_key_digests",
            self.allowed_id_key_digests.as_deref(),
        )?;
        Ok(policy)
    }
}

fn parse_abi(text: &str) -> Option<AbiVersion> {
    let (major, minor) = text.split_once('.')?;
    let canonical = |s: &str| s == "0" || (!s.starts_with('0') && !s.starts_with('+'));
    if !canonical(major) || !canonical(minor) {
        return None;
    }
    Some(AbiVersion {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
    })
}

fn digests(
    setting: &'static str,
    list: Option<&[String]>,
) -> Result<Option<Vec<[u8; 48]>>, SnpSettingsError> {
    list.map(|list| {
        list.iter()
            .map(|text| {
                let mut out = [0u8; 48];
                hex::decode_to_slice(text, &mut out)
                    .map(|()| out)
                    .map_err(|_| SnpSettingsError {
                        setting,
                        expected: "96 hex characters (48 bytes)",
                        found: text.clone(),
                    })
            })
            .collect()
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_make_the_policy_and_bad_values_name_the_setting() {
        let json = format!(
            r#"{{"minimum_abi": "1.55", "vmpl": 1, "allowed_launch_measurements": ["{}"], "allowed_id_key_digests": [], "minimum_tcb": {{"bootloader": 4, "tee": 0, "snp": 24, "microcode": 217}}}}"#,
            "ab".repeat(48)
        );
        let settings: SnpSettings = serde_json::from_str(&json).unwrap();
        let policy = settings.policy().unwrap();
        assert_eq!(
            policy.minimum_abi,
            AbiVersion {
                major: 1,
                minor: 55
            }
        );
        assert_eq!(policy.vmpl, 1);
        assert_eq!(policy.allowed_measurements, Some(vec![[0xAB; 48]]));
        assert_eq!(policy.allowed_id_key_digests, Some(vec![]));
        assert_eq!(policy.minimum_tcb.microcode, 217);
        assert_eq!(policy.report_data, None);
        // Absent settings keep the defaults.
        assert_eq!(
            SnpSettings::default().policy().unwrap(),
            SnpPolicy::default()
        );

        for (json, setting) in [
            (r#"{"minimum_abi": "1"}"#, "minimum_abi"),
            (r#"{"minimum_abi": "01.5"}"#, "minimum_abi"),
            (r#"{"minimum_abi": "1.256"}"#, "minimum_abi"),
            (
                r#"{"allowed_launch_measurements": ["abcd"]}"#,
                "allowed_launch_measurements",
            ),
            (
                r#"{"allowed_id_key_digests": ["zz"]}"#,
                "allowed_id_key_digests",
            ),
        ] {
            let settings: SnpSettings = serde_json::from_str(json).unwrap();
            assert_eq!(settings.policy().unwrap_err().setting, setting, "{json}");
        }
        assert!(serde_json::from_str::<SnpSettings>(r#"{"vmpl": 0, "debug": true}"#).is_err());
    }
}
