//! What a verifier requires of a (signature-checked) report beyond its authenticity.

use super::report::{AttestationReport, Tcb};
use super::SnpError;

/// Requirements on a report's contents. `Default` is the strictest sensible baseline: debug
/// disallowed, VMPL 0, no minimum TCB, and no measurement / id-key / report-data check —
/// validators must set `report_data` (the binding) and usually `measurement`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnpPolicy {
    /// Accept guests whose policy allows debugging (bit 19). Never in production.
    pub allow_debug: bool,
    /// The VMPL the report must have been requested from.
    pub vmpl: u32,
    /// Each component of `reported_tcb` must be at least this.
    pub minimum_tcb: Tcb,
    /// The expected launch measurement.
    pub measurement: Option<[u8; 48]>,
    /// If set, `id_key_digest` must be one of these.
    pub allowed_id_key_digests: Option<Vec<[u8; 48]>>,
    /// The exact REPORT_DATA expected (nonce / key binding).
    pub report_data: Option<[u8; 64]>,
}

impl SnpPolicy {
    /// Runs every check in order (debug, VMPL, minimum TCB, measurement, id-key digest,
    /// report data) and returns the first failure.
    pub fn check(&self, report: &AttestationReport) -> Result<(), SnpError> {
        self.check_debug(report)?;
        self.check_vmpl(report)?;
        self.check_minimum_tcb(report)?;
        self.check_measurement(report)?;
        self.check_id_key_digest(report)?;
        self.check_report_data(report)
    }

    pub fn check_debug(&self, report: &AttestationReport) -> Result<(), SnpError> {
        if report.policy.debug_allowed && !self.allow_debug {
            return Err(SnpError::DebugNotAllowed {
                policy: report.policy.raw,
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
        match &self.measurement {
            Some(expected) if *expected != report.measurement => {
                Err(SnpError::MeasurementMismatch {
                    expected: expected.to_vec(),
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
