//! Conversions of the trust core's errors into the [`Refusal`] data a refused peer and a node's
//! status carry (defined in `constellation_common::refusal`).

pub use constellation_common::refusal::{PcrMismatch, Refusal, RefusalCheck};

use crate::atls::AtlsError;
use crate::measurements::MeasurementsError;
use crate::variant::ValidationError;

impl From<&ValidationError> for Refusal {
    fn from(e: &ValidationError) -> Refusal {
        let check = match e {
            ValidationError::Malformed(_) => RefusalCheck::Malformed,
            ValidationError::VariantMismatch { .. } => RefusalCheck::Variant,
            ValidationError::UnpinnedKey { .. } => RefusalCheck::UnpinnedKey,
            ValidationError::Quote(_) => RefusalCheck::Quote,
            ValidationError::Snp(_) => RefusalCheck::Snp,
            ValidationError::Collateral(_) => RefusalCheck::Collateral,
            ValidationError::BindingMismatch { .. } => RefusalCheck::Binding,
            ValidationError::Measurements(MeasurementsError::Mismatch(list)) => {
                return Refusal {
                    check: RefusalCheck::Measurements,
                    mismatches: list
                        .iter()
                        .map(|m| PcrMismatch {
                            pcr: m.index,
                            expected: hex::encode(m.expected),
                            found: m.found.map(hex::encode),
                        })
                        .collect(),
                    message: e.to_string(),
                }
            }
            ValidationError::Measurements(_) | ValidationError::Policy(_) => RefusalCheck::Policy,
        };
        Refusal::new(check, e)
    }
}

impl From<&AtlsError> for Refusal {
    fn from(e: &AtlsError) -> Refusal {
        match e {
            AtlsError::Rejected(v) => v.into(),
            AtlsError::PeerRefused(r) => r.clone(),
            AtlsError::StaleNonce { .. } => Refusal::new(RefusalCheck::Nonce, e),
            AtlsError::SessionMismatch { .. } => Refusal::new(RefusalCheck::Binding, e),
            AtlsError::Protocol(_) | AtlsError::FrameTooLarge { .. } => {
                Refusal::new(RefusalCheck::Malformed, e)
            }
            _ => Refusal::new(RefusalCheck::Other, e),
        }
    }
}
