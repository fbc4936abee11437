//! Where a verifier gets the VCEK/VLEK for a report: [`VekSource`].
//!
//! A validator built with one pre-verified [`VerifiedVek`] can only check reports from that one
//! chip at that one TCB (a VCEK is derived from both). A validator built over a `VekSource`
//! reads the signer kind, CHIP_ID and reported TCB from each report ([`VekRequest`]), asks the
//! source for the VEK of exactly that key, and then runs the usual per-report checks with it
//! (validity re-checked at the validator's clock, signature, TCB/CHIP_ID consistency, policy).
//!
//! The source is synchronous because [`crate::Validator::validate`] is: aTLS already runs
//! validation in `spawn_blocking`, so a source may block on a miss (the join service's
//! collateral cache waits for its coalesced async fetch there) while a hit is a map lookup.

use std::ops::Deref;
use std::sync::Arc;

use super::certs::VerifiedVek;
use super::report::{AttestationReport, CpuId, SigningKey, TcbVersion};
use super::SnpError;

/// What identifies the VEK that must have signed a report: signer kind, chip and reported TCB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VekRequest {
    pub signing_key: SigningKey,
    /// CHIP_ID from the report (all zero when the guest masked it; then only a VLEK can do).
    pub chip_id: [u8; 64],
    /// REPORTED_TCB from the report: the TCB a VCEK is derived for.
    pub reported_tcb: TcbVersion,
    /// CPUID family/model/stepping (report version 3 and later): which product's KDS to ask.
    pub cpuid: Option<CpuId>,
}

impl VekRequest {
    /// The request for `report`. A VCEK-signed report with CHIP_ID masked names no chip, so
    /// no VCEK can be looked up for it; any other signer than VCEK/VLEK is refused too.
    pub fn for_report(report: &AttestationReport) -> Result<Self, CollateralError> {
        match report.signing_key {
            SigningKey::Vcek if report.chip_id_masked() => {
                return Err(CollateralError::ChipIdMasked {
                    tcb: report.reported_tcb.raw,
                })
            }
            SigningKey::Vcek | SigningKey::Vlek => {}
            other => return Err(CollateralError::UnsupportedSigner { signer: other }),
        }
        Ok(Self {
            signing_key: report.signing_key,
            chip_id: report.chip_id,
            reported_tcb: report.reported_tcb,
            cpuid: report.cpuid,
        })
    }

    /// The cache key: signer kind, chip and the raw reported TCB. A VLEK is the cloud's key
    /// for every chip, so its key ignores CHIP_ID: otherwise a report could pick any of 2^512
    /// CHIP_IDs to force a fresh lookup each time.
    pub fn key(&self) -> (SigningKey, [u8; 64], u64) {
        let chip_id = match self.signing_key {
            SigningKey::Vlek => [0; 64],
            _ => self.chip_id,
        };
        (self.signing_key, chip_id, self.reported_tcb.raw)
    }

    /// Structural checks on what an unauthenticated report asks for, run before any lookup
    /// so garbage cannot reach a fetcher: a VEK kind that exists, a CHIP_ID for a VCEK, a CPU
    /// family with a key distribution service (Milan/Genoa 19h, Turin 1Ah), and no bits set
    /// in the TCB_VERSION bytes the layout reserves (they would make distinct keys for one
    /// TCB).
    pub fn check_structure(&self) -> Result<(), CollateralError> {
        let malformed = |field: &'static str, found: String| {
            Err(CollateralError::MalformedRequest { field, found })
        };
        match self.signing_key {
            SigningKey::Vcek if self.chip_id.iter().all(|&b| b == 0) => {
                return Err(CollateralError::ChipIdMasked {
                    tcb: self.reported_tcb.raw,
                })
            }
            SigningKey::Vcek | SigningKey::Vlek => {}
            other => return Err(CollateralError::UnsupportedSigner { signer: other }),
        }
        let turin = match self.cpuid {
            None => false,
            Some(c) if c.family == 0x19 => false,
            Some(c) if c.family == 0x1A => true,
            Some(c) => return malformed("cpuid family", format!("{:#x}", c.family)),
        };
        // Milan/Genoa: bytes 2..=5 reserved; Turin: bytes 4..=6 reserved.
        let reserved: u64 = if turin {
            0x00FF_FFFF_0000_0000
        } else {
            0x0000_FFFF_FFFF_0000
        };
        if self.reported_tcb.raw & reserved != 0 {
            return malformed(
                "reported TCB reserved bytes",
                format!("{:#018x}", self.reported_tcb.raw),
            );
        }
        Ok(())
    }

    /// Checks that `vek` is the key this request names: same kind, issued for the reported
    /// TCB, and (VCEK) hwID = CHIP_ID. A source runs this before it keeps or hands out a VEK,
    /// so collateral for another chip or TCB is never cached under this request's key.
    pub fn check_vek(&self, vek: &VerifiedVek) -> Result<(), SnpError> {
        if vek.kind() != self.signing_key {
            return Err(SnpError::SignerMismatch {
                expected: self.signing_key,
                found: vek.kind(),
            });
        }
        let ext = vek.extensions();
        let found = self.reported_tcb.tcb();
        if ext.tcb != found {
            return Err(SnpError::TcbMismatch {
                expected: ext.tcb,
                found,
            });
        }
        if self.signing_key == SigningKey::Vcek {
            match &ext.hw_id {
                Some(hw_id) if *hw_id == self.chip_id => {}
                other => {
                    return Err(SnpError::ChipIdMismatch {
                        expected: other.map(|h| h.to_vec()).unwrap_or_default(),
                        found: self.chip_id.to_vec(),
                    })
                }
            }
        }
        Ok(())
    }
}

/// A VEK handed out by a source: borrowed from a fixed key, or shared out of a cache.
#[derive(Debug, Clone)]
pub enum VekRef<'a> {
    Borrowed(&'a VerifiedVek),
    Shared(Arc<VerifiedVek>),
}

impl Deref for VekRef<'_> {
    type Target = VerifiedVek;
    fn deref(&self) -> &VerifiedVek {
        match self {
            VekRef::Borrowed(vek) => vek,
            VekRef::Shared(vek) => vek,
        }
    }
}

/// Supplies the verified VEK for a report's [`VekRequest`].
///
/// Implementations must only return a VEK whose chain was verified to a pinned AMD root
/// (that is what [`VerifiedVek`] stands for) and should check it with
/// [`VekRequest::check_vek`]; the validator re-checks consistency with the report anyway.
pub trait VekSource: Send + Sync + std::fmt::Debug {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError>;
}

/// One fixed, pre-verified VEK (e.g. the one an Azure HCL report or the AWS instance hands
/// out): returned for every request; a report from another chip or TCB then fails the
/// validator's consistency check with the offending values.
impl VekSource for VerifiedVek {
    fn vek_for(&self, _request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        Ok(VekRef::Borrowed(self))
    }
}

impl<T: VekSource + ?Sized> VekSource for Arc<T> {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        (**self).vek_for(request)
    }
}

/// Why no usable VEK could be had for a report. Each case carries the key that was asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CollateralError {
    #[error("report is VCEK-signed but CHIP_ID is masked (all zero): no chip to look the VCEK up for (reported TCB {tcb:#018x})")]
    ChipIdMasked { tcb: u64 },
    #[error("report signer {signer} has no endorsement key to look up (expected vcek or vlek)")]
    UnsupportedSigner { signer: SigningKey },
    #[error("report is not well-formed for a collateral lookup: {field} is {found}")]
    MalformedRequest { field: &'static str, found: String },
    #[error("SNP collateral source busy: {what} already at its limit of {limit}")]
    Busy { what: &'static str, limit: usize },
    #[error("no SNP collateral for {signer} of chip {} at reported TCB {tcb:#018x}: fetch failed and nothing is cached: {reason}", hex::encode(.chip_id))]
    Unavailable {
        signer: SigningKey,
        /// CHIP_ID as the report names it (64 bytes).
        chip_id: Vec<u8>,
        tcb: u64,
        reason: String,
    },
    #[error("SNP collateral for {signer} of chip {} at reported TCB {tcb:#018x} refused: {source}", hex::encode(.chip_id))]
    Refused {
        signer: SigningKey,
        /// CHIP_ID as the report names it (64 bytes).
        chip_id: Vec<u8>,
        tcb: u64,
        #[source]
        source: SnpError,
    },
}

impl CollateralError {
    /// [`CollateralError::Unavailable`] for `request`.
    pub fn unavailable(request: &VekRequest, reason: impl Into<String>) -> Self {
        CollateralError::Unavailable {
            signer: request.signing_key,
            chip_id: request.chip_id.to_vec(),
            tcb: request.reported_tcb.raw,
            reason: reason.into(),
        }
    }

    /// [`CollateralError::Refused`] for `request`.
    pub fn refused(request: &VekRequest, source: SnpError) -> Self {
        CollateralError::Refused {
            signer: request.signing_key,
            chip_id: request.chip_id.to_vec(),
            tcb: request.reported_tcb.raw,
            source,
        }
    }
}
