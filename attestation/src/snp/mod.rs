//! AMD SEV-SNP attestation reports: parsing, the VCEK/VLEK certificate chain to AMD's pinned
//! roots, report signature verification, and policy checks.
//!
//! Verification is split so the chain is verified once and cached:
//! [`VerifiedVek::new`] (certificates, at an injected time) then [`verify_report`] per report.
//! For reports from any chip, [`verify_report_from`] asks a [`VekSource`] (e.g. the join
//! service's collateral cache) for the VEK of each report's chip and reported TCB.

mod certs;
mod collateral;
mod policy;
mod report;

pub use certs::{
    fingerprint, parse_vek_certificate, CertRole, VekExtensions, VerifiedVek, OID_BOOTLOADER,
    OID_HWID, OID_MICROCODE, OID_PRODUCT_NAME, OID_SNP, OID_TEE,
};
pub use collateral::{CollateralError, VekRef, VekRequest, VekSource};
pub use policy::{
    AbiVersion, SnpPolicy, SnpSettings, SnpSettingsError, POLICY_MIGRATE_MA_BIT,
    POLICY_RESERVED_ONE_BIT, POLICY_RESERVED_ZERO_MASK,
};
pub use report::{
    AttestationReport, CpuId, FirmwareVersion, GuestPolicy, PlatformInfo, ReportSignature,
    SigningKey, Tcb, TcbVersion, POLICY_DEBUG_BIT, REPORT_LEN, SIGNED_LEN,
    SIG_ALGO_ECDSA_P384_SHA384, SUPPORTED_VERSIONS,
};

use report::{report_body, signature_component, SIG_COMPONENT_LEN, SIG_R_OFFSET, SIG_S_OFFSET};

/// The checks of a full verification, in the order they run. [`SnpError::check`] names the
/// one that failed, so everything before it in this list passed.
pub const CHECKS: [&str; 21] = [
    "parse",
    "certificates",
    "root-pin",
    "chain",
    "validity",
    "vek-extensions",
    "product",
    "signer",
    "signature",
    "tcb-consistency",
    "chip-id",
    "report-version",
    "debug",
    "migrate-ma",
    "policy-reserved",
    "min-abi",
    "vmpl",
    "min-tcb",
    "measurement",
    "id-key-digest",
    "report-data",
];

/// Why an SNP report or its certificates were refused. Each variant is one check, with the
/// expected and found values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnpError {
    #[error("report too short: expected at least {expected} bytes, found {found}")]
    ReportTooShort { expected: usize, found: usize },
    #[error("unsupported report version: expected one of {SUPPORTED_VERSIONS:?}, found {found}")]
    UnsupportedVersion { found: u32 },
    #[error("unsupported report signature algorithm: expected {expected} (ECDSA P-384 SHA-384), found {found}")]
    UnsupportedSignatureAlgorithm { expected: u32, found: u32 },

    #[error("{role} certificate is malformed: {reason}")]
    CertificateParse { role: CertRole, reason: String },
    #[error("certificate chain must hold ASK/ASVK and ARK: expected {expected} certificates, found {found}")]
    ChainLength { expected: usize, found: usize },
    #[error("chain root is not a pinned AMD ARK (Milan, Genoa, Turin): SHA-256 fingerprint {fingerprint}")]
    UnpinnedRoot { fingerprint: String },
    #[error("{role} certificate issuer mismatch: expected {expected:?}, found {found:?}")]
    IssuerMismatch {
        role: CertRole,
        expected: String,
        found: String,
    },
    #[error(
        "{role} certificate signature algorithm: expected {expected} (RSASSA-PSS), found {found}"
    )]
    CertificateSignatureAlgorithm {
        role: CertRole,
        expected: String,
        found: String,
    },
    #[error(
        "{role} certificate signature does not verify with its issuer's key (RSA-PSS SHA-384)"
    )]
    CertificateSignatureInvalid { role: CertRole },
    #[error("{role} certificate not yet valid: notBefore {not_before}, now {now}")]
    CertificateNotYetValid {
        role: CertRole,
        not_before: String,
        now: String,
    },
    #[error("{role} certificate expired: notAfter {not_after}, now {now}")]
    CertificateExpired {
        role: CertRole,
        not_after: String,
        now: String,
    },
    #[error("VEK certificate subject: expected CN SEV-VCEK or SEV-VLEK, found {subject_cn:?}")]
    UnknownVekKind { subject_cn: String },
    #[error("VEK public key type: expected {expected}, found {found}")]
    VekKeyType { expected: String, found: String },
    #[error("VEK certificate lacks extension {oid}")]
    MissingExtension { oid: &'static str },
    #[error("VEK certificate extension {oid} is malformed: {reason}")]
    MalformedExtension { oid: &'static str, reason: String },
    #[error("VEK product does not match the pinned root: expected {expected}, found productName {found:?}")]
    ProductMismatch { expected: String, found: String },

    #[error("report signer mismatch: report says {expected}, certificate is a {found}")]
    SignerMismatch {
        expected: SigningKey,
        found: SigningKey,
    },
    #[error("report signature component {component} has non-zero bytes above the low 48")]
    SignaturePadding { component: &'static str },
    #[error(
        "report signature does not verify with the VEK (ECDSA P-384 SHA-384 over bytes [0, 0x2A0))"
    )]
    SignatureInvalid,
    #[error("reported TCB does not match the VEK certificate: expected {expected}, found {found}")]
    TcbMismatch { expected: Tcb, found: Tcb },
    #[error("CHIP_ID does not match the VCEK hwID: expected {}, found {}", hex::encode(.expected), hex::encode(.found))]
    ChipIdMismatch { expected: Vec<u8>, found: Vec<u8> },

    #[error("report version not accepted: expected {minimum}..={maximum}, found {found}")]
    ReportVersionNotAccepted {
        minimum: u32,
        maximum: u32,
        found: u32,
    },
    #[error(
        "guest policy allows debugging (bit 19): expected debug off, found policy {policy:#x}"
    )]
    DebugNotAllowed { policy: u64 },
    #[error("guest policy allows a migration agent (MIGRATE_MA, bit 18): expected off, found policy {policy:#x}")]
    MigrationAgentAllowed { policy: u64 },
    #[error("guest policy reserved bits wrong (bit 17 must be one, bits 26-63 zero): found policy {policy:#x}, offending bits {bad:#x}")]
    PolicyReservedBits { policy: u64, bad: u64 },
    #[error("guest policy ABI below minimum: expected at least {minimum}, found {found}")]
    AbiBelowMinimum {
        minimum: AbiVersion,
        found: AbiVersion,
    },
    #[error("VMPL mismatch: expected {expected}, found {found}")]
    VmplMismatch { expected: u32, found: u32 },
    #[error(
        "reported TCB below minimum ({component}): expected at least {minimum}, found {found}"
    )]
    TcbBelowMinimum {
        component: &'static str,
        minimum: Tcb,
        found: Tcb,
    },
    #[error("launch measurement not allowed: expected one of [{}], found {}", .allowed.iter().map(hex::encode).collect::<Vec<_>>().join(", "), hex::encode(.found))]
    MeasurementNotAllowed {
        allowed: Vec<Vec<u8>>,
        found: Vec<u8>,
    },
    #[error("ID key digest not allowed: expected one of [{}], found {}", .allowed.iter().map(hex::encode).collect::<Vec<_>>().join(", "), hex::encode(.found))]
    IdKeyDigestNotAllowed {
        allowed: Vec<Vec<u8>>,
        found: Vec<u8>,
    },
    #[error("report data mismatch: expected {}, found {}", hex::encode(.expected), hex::encode(.found))]
    ReportDataMismatch { expected: Vec<u8>, found: Vec<u8> },
}

impl SnpError {
    /// The name (from [`CHECKS`]) of the check that failed.
    pub fn check(&self) -> &'static str {
        use SnpError::*;
        match self {
            ReportTooShort { .. }
            | UnsupportedVersion { .. }
            | UnsupportedSignatureAlgorithm { .. } => "parse",
            CertificateParse { .. } | ChainLength { .. } => "certificates",
            UnpinnedRoot { .. } => "root-pin",
            IssuerMismatch { .. }
            | CertificateSignatureAlgorithm { .. }
            | CertificateSignatureInvalid { .. } => "chain",
            CertificateNotYetValid { .. } | CertificateExpired { .. } => "validity",
            UnknownVekKind { .. }
            | VekKeyType { .. }
            | MissingExtension { .. }
            | MalformedExtension { .. } => "vek-extensions",
            ProductMismatch { .. } => "product",
            SignerMismatch { .. } => "signer",
            SignaturePadding { .. } | SignatureInvalid => "signature",
            TcbMismatch { .. } => "tcb-consistency",
            ChipIdMismatch { .. } => "chip-id",
            ReportVersionNotAccepted { .. } => "report-version",
            DebugNotAllowed { .. } => "debug",
            MigrationAgentAllowed { .. } => "migrate-ma",
            PolicyReservedBits { .. } => "policy-reserved",
            AbiBelowMinimum { .. } => "min-abi",
            VmplMismatch { .. } => "vmpl",
            TcbBelowMinimum { .. } => "min-tcb",
            MeasurementNotAllowed { .. } => "measurement",
            IdKeyDigestNotAllowed { .. } => "id-key-digest",
            ReportDataMismatch { .. } => "report-data",
        }
    }

    /// Expected and found values as display strings, where the check compares values.
    pub fn expected_found(&self) -> Option<(String, String)> {
        use SnpError::*;
        let pair = |e: String, f: String| Some((e, f));
        match self {
            ReportTooShort { expected, found } => {
                pair(format!(">= {expected} bytes"), format!("{found} bytes"))
            }
            UnsupportedVersion { found } => {
                pair(format!("{SUPPORTED_VERSIONS:?}"), found.to_string())
            }
            UnsupportedSignatureAlgorithm { expected, found } => {
                pair(expected.to_string(), found.to_string())
            }
            ChainLength { expected, found } => pair(expected.to_string(), found.to_string()),
            UnpinnedRoot { fingerprint } => pair(
                "a pinned AMD ARK (Milan, Genoa, Turin)".into(),
                fingerprint.clone(),
            ),
            IssuerMismatch {
                expected, found, ..
            }
            | CertificateSignatureAlgorithm {
                expected, found, ..
            }
            | VekKeyType { expected, found }
            | ProductMismatch { expected, found } => pair(expected.clone(), found.clone()),
            CertificateNotYetValid {
                not_before, now, ..
            } => pair(format!("now >= {not_before}"), now.clone()),
            CertificateExpired { not_after, now, .. } => {
                pair(format!("now <= {not_after}"), now.clone())
            }
            UnknownVekKind { subject_cn } => {
                pair("SEV-VCEK or SEV-VLEK".into(), subject_cn.clone())
            }
            SignerMismatch { expected, found } => pair(expected.name(), found.name()),
            TcbMismatch { expected, found } => pair(expected.to_string(), found.to_string()),
            TcbBelowMinimum { minimum, found, .. } => {
                pair(format!(">= {minimum}"), found.to_string())
            }
            ChipIdMismatch { expected, found } | ReportDataMismatch { expected, found } => {
                pair(hex::encode(expected), hex::encode(found))
            }
            ReportVersionNotAccepted {
                minimum,
                maximum,
                found,
            } => pair(format!("{minimum}..={maximum}"), found.to_string()),
            MigrationAgentAllowed { policy } => pair(
                "MIGRATE_MA off".into(),
                format!("policy {policy:#x} (MIGRATE_MA on)"),
            ),
            PolicyReservedBits { policy, bad } => pair(
                "bit 17 set, bits 26-63 clear".into(),
                format!("policy {policy:#x} (bits {bad:#x})"),
            ),
            AbiBelowMinimum { minimum, found } => pair(format!(">= {minimum}"), found.to_string()),
            MeasurementNotAllowed { allowed, found } | IdKeyDigestNotAllowed { allowed, found } => {
                pair(
                    allowed
                        .iter()
                        .map(hex::encode)
                        .collect::<Vec<_>>()
                        .join(","),
                    hex::encode(found),
                )
            }
            DebugNotAllowed { policy } => {
                pair("debug off".into(), format!("policy {policy:#x} (debug on)"))
            }
            VmplMismatch { expected, found } => pair(expected.to_string(), found.to_string()),
            CertificateParse { .. }
            | CertificateSignatureInvalid { .. }
            | MissingExtension { .. }
            | MalformedExtension { .. }
            | SignaturePadding { .. }
            | SignatureInvalid => None,
        }
    }
}

/// Verifies the report signature with `vek` over exactly the received bytes `[0, 0x2A0)`.
/// R and S are 72-byte little-endian fields whose bytes above the low 48 must be zero.
pub fn verify_signature(report_bytes: &[u8], vek: &VerifiedVek) -> Result<(), SnpError> {
    let body = report_body(report_bytes)?;
    let (signed, sig_area) = body.split_at(SIGNED_LEN);
    let component = |offset: usize, name: &'static str| {
        let start = offset - SIG_R_OFFSET;
        sig_area
            .get(start..start + SIG_COMPONENT_LEN)
            .and_then(signature_component)
            .ok_or(SnpError::SignaturePadding { component: name })
    };
    let r = component(SIG_R_OFFSET, "r")?;
    let s = component(SIG_S_OFFSET, "s")?;
    let mut fixed = [0u8; 96];
    for (dst, src) in fixed.iter_mut().zip(r.iter().chain(s.iter())) {
        *dst = *src;
    }
    vek.public_key()
        .verify_sig(signed, &fixed)
        .map_err(|_| SnpError::SignatureInvalid)
}

/// Checks that the report is consistent with the certificate that signed it: same signer
/// kind, reported TCB equal to the VEK's TCB, and (VCEK, unmasked CHIP_ID) hwID = CHIP_ID.
fn check_signer(report: &AttestationReport, vek: &VerifiedVek) -> Result<(), SnpError> {
    if report.signing_key != vek.kind() {
        return Err(SnpError::SignerMismatch {
            expected: report.signing_key,
            found: vek.kind(),
        });
    }
    Ok(())
}

/// The reported TCB must be the TCB the VEK was issued for, and a VCEK's hwID must be the
/// report's CHIP_ID unless CHIP_ID is masked.
pub fn check_consistency(report: &AttestationReport, vek: &VerifiedVek) -> Result<(), SnpError> {
    let ext = vek.extensions();
    let found = report.reported_tcb.tcb();
    if ext.tcb != found {
        return Err(SnpError::TcbMismatch {
            expected: ext.tcb,
            found,
        });
    }
    if let Some(hw_id) = &ext.hw_id {
        if !report.chip_id_masked() && *hw_id != report.chip_id {
            return Err(SnpError::ChipIdMismatch {
                expected: hw_id.to_vec(),
                found: report.chip_id.to_vec(),
            });
        }
    }
    Ok(())
}

/// Full report verification with a cached [`VerifiedVek`]: parse, signer kind, signature,
/// TCB/CHIP_ID consistency with the certificate, then `policy`. Returns the parsed report.
pub fn verify_report(
    report_bytes: &[u8],
    vek: &VerifiedVek,
    policy: &SnpPolicy,
) -> Result<AttestationReport, SnpError> {
    let report = AttestationReport::parse(report_bytes)?;
    verify_parsed(&report, report_bytes, vek, policy)?;
    Ok(report)
}

fn verify_parsed(
    report: &AttestationReport,
    report_bytes: &[u8],
    vek: &VerifiedVek,
    policy: &SnpPolicy,
) -> Result<(), SnpError> {
    check_signer(report, vek)?;
    verify_signature(report_bytes, vek)?;
    check_consistency(report, vek)?;
    policy.check(report)
}

/// Why [`verify_report_from`] refused a report: no usable VEK for it, or a failed check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourcedReportError {
    #[error(transparent)]
    Collateral(#[from] CollateralError),
    #[error(transparent)]
    Snp(#[from] SnpError),
}

/// [`verify_report_at`] for reports from any chip: parses the report, checks what it asks for
/// is well-formed ([`VekRequest::check_structure`]) and that its version and reported TCB pass
/// `policy` ([`SnpPolicy::check_lookup_fields`]), only
/// then asks `source` for the VEK of its signer kind, CHIP_ID and reported TCB, re-checks that
/// VEK's chain validity at `clock.now()` (a cached or stale VEK may have expired since it was
/// verified), then runs the signature, consistency and policy checks. (So here a forged report
/// below the minimum TCB fails that check before any signature check.)
pub fn verify_report_from(
    report_bytes: &[u8],
    source: &dyn VekSource,
    policy: &SnpPolicy,
    clock: &dyn crate::Clock,
) -> Result<AttestationReport, SourcedReportError> {
    let report = AttestationReport::parse(report_bytes)?;
    let request = VekRequest::for_report(&report)?;
    // Before any lookup: what the report asks for must be well-formed, and a TCB the policy
    // refuses anyway must not cost a fetch.
    request.check_structure()?;
    policy.check_lookup_fields(&report)?;
    let vek = source.vek_for(&request)?;
    vek.check_valid_at(clock)?;
    verify_parsed(&report, report_bytes, &vek, policy)?;
    Ok(report)
}

/// [`verify_report`] for a long-lived verifier: first re-checks, at `clock.now()`, that every
/// certificate of the cached chain is still within its validity period.
pub fn verify_report_at(
    report_bytes: &[u8],
    vek: &VerifiedVek,
    policy: &SnpPolicy,
    clock: &dyn crate::Clock,
) -> Result<AttestationReport, SnpError> {
    vek.check_valid_at(clock)?;
    verify_report(report_bytes, vek, policy)
}
