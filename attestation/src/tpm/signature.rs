//! TPMT_SIGNATURE (TPM 2.0 Part 2, 11.3.4) for the two AK schemes we accept: ECDSA and
//! RSASSA-PKCS1-v1_5, both with SHA-256. This is tpm2-tools' `tpm2_quote -s` default (`tss`)
//! format and what tss-esapi's `Signature::marshall()` produces.

use super::wire::{put_tpm2b, Reader};
use super::QuoteError;

/// `TPM_ALG_ECDSA`.
pub const TPM_ALG_ECDSA: u16 = 0x0018;
/// `TPM_ALG_RSASSA` (PKCS#1 v1.5).
pub const TPM_ALG_RSASSA: u16 = 0x0014;
/// `TPM_ALG_SHA256`.
pub const TPM_ALG_SHA256: u16 = 0x000b;

const STRUCTURE: &str = "TPMT_SIGNATURE";

/// A parsed TPMT_SIGNATURE. The hash is always SHA-256 (anything else is refused at parse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmSignature {
    /// ECDSA r and s as the TPM gave them (big-endian, possibly shorter than 32 bytes).
    Ecdsa { r: Vec<u8>, s: Vec<u8> },
    /// The RSASSA-PKCS1-v1_5 signature bytes.
    RsaSsa { signature: Vec<u8> },
}

impl TpmSignature {
    /// Parses marshalled TPMT_SIGNATURE bytes; bad input yields an error, never a panic.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuoteError> {
        let mut r = Reader::new(STRUCTURE, bytes);
        let alg = r.u16("sigAlg")?;
        if alg != TPM_ALG_ECDSA && alg != TPM_ALG_RSASSA {
            return Err(QuoteError::UnsupportedSignatureAlgorithm { found: alg });
        }
        let hash = r.u16("hash")?;
        if hash != TPM_ALG_SHA256 {
            return Err(QuoteError::UnsupportedSignatureHash { found: hash });
        }
        let sig = if alg == TPM_ALG_ECDSA {
            let r_bytes = r.tpm2b("signatureR")?.to_vec();
            let s_bytes = r.tpm2b("signatureS")?.to_vec();
            TpmSignature::Ecdsa {
                r: r_bytes,
                s: s_bytes,
            }
        } else {
            TpmSignature::RsaSsa {
                signature: r.tpm2b("sig")?.to_vec(),
            }
        };
        r.finish()?;
        Ok(sig)
    }

    /// The marshalled TPMT_SIGNATURE (inverse of [`TpmSignature::parse`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let (alg, parts): (u16, Vec<&[u8]>) = match self {
            TpmSignature::Ecdsa { r, s } => (TPM_ALG_ECDSA, vec![r, s]),
            TpmSignature::RsaSsa { signature } => (TPM_ALG_RSASSA, vec![signature]),
        };
        out.extend_from_slice(&alg.to_be_bytes());
        out.extend_from_slice(&TPM_ALG_SHA256.to_be_bytes());
        for part in parts {
            // Parsed values always fit; a hand-built oversized part is cut to a valid TPM2B
            // rather than panicking (the signature then simply fails to verify).
            let part = part.get(..usize::from(u16::MAX)).unwrap_or(part);
            let _ = put_tpm2b(&mut out, part);
        }
        out
    }

    /// Short algorithm name for messages.
    pub fn algorithm_name(&self) -> &'static str {
        match self {
            TpmSignature::Ecdsa { .. } => "ECDSA-P256-SHA256",
            TpmSignature::RsaSsa { .. } => "RSASSA-PKCS1-v1_5-SHA256",
        }
    }

    /// ECDSA r||s as 64 bytes (each left-padded to 32), the form aws-lc-rs' `*_FIXED` expects.
    pub(crate) fn ecdsa_fixed(r: &[u8], s: &[u8]) -> Result<[u8; 64], QuoteError> {
        let mut out = [0u8; 64];
        for (component, value, half) in [("r", r, 0usize), ("s", s, 32usize)] {
            // A leading zero byte (DER-style positive integer) is harmless; strip it.
            let trimmed = match value.iter().position(|&b| b != 0) {
                Some(first) => value.get(first..).unwrap_or_default(),
                None => &[],
            };
            if trimmed.len() > 32 {
                return Err(QuoteError::EcdsaComponentTooLong {
                    component,
                    len: value.len(),
                });
            }
            let start = half + 32 - trimmed.len();
            if let Some(dst) = out.get_mut(start..half + 32) {
                dst.copy_from_slice(trimmed);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tpm2_quote -s sig` output for an ECC P-256 AK on swtpm.
    const TPM2_TOOLS_ECDSA: &str = "0018000b00207c2329f0121df5932753678ebeedb75165aa5273028890d17be9340f37fe3dc900204d58f70bd6855dd6e49bcd7d95bfd3fc31b3ab6df7adcfd34c558dfc7e224603";

    #[test]
    fn parses_and_round_trips_a_tpm2_tools_signature() {
        let bytes = hex::decode(TPM2_TOOLS_ECDSA).unwrap();
        let sig = TpmSignature::parse(&bytes).unwrap();
        match &sig {
            TpmSignature::Ecdsa { r, s } => {
                assert_eq!(r.len(), 32);
                assert_eq!(s.len(), 32);
                assert_eq!(r[0], 0x7c);
                assert_eq!(s[0], 0x4d);
            }
            other => panic!("expected ECDSA, got {other:?}"),
        }
        assert_eq!(sig.to_bytes(), bytes);
        for len in 0..bytes.len() {
            assert!(TpmSignature::parse(&bytes[..len]).is_err());
        }
    }

    #[test]
    fn refuses_other_algorithms_and_hashes() {
        assert_eq!(
            TpmSignature::parse(&hex::decode("0016000b0000").unwrap()),
            Err(QuoteError::UnsupportedSignatureAlgorithm { found: 0x0016 })
        );
        assert_eq!(
            TpmSignature::parse(&[]),
            Err(QuoteError::Truncated {
                structure: "TPMT_SIGNATURE",
                field: "sigAlg",
                offset: 0,
                needed: 2,
                available: 0
            })
        );
        assert_eq!(
            TpmSignature::parse(&hex::decode("001400040000").unwrap()),
            Err(QuoteError::UnsupportedSignatureHash { found: 0x0004 })
        );
    }

    #[test]
    fn ecdsa_components_are_padded_or_refused() {
        let fixed = TpmSignature::ecdsa_fixed(&[1, 2], &[0, 0, 3]).unwrap();
        assert_eq!(fixed[30..32], [1, 2]);
        assert_eq!(fixed[63], 3);
        assert!(fixed[..30].iter().all(|&b| b == 0));
        let mut long = vec![0u8];
        long.extend_from_slice(&[0xff; 32]);
        assert!(TpmSignature::ecdsa_fixed(&long, &[1]).is_ok());
        assert_eq!(
            TpmSignature::ecdsa_fixed(&[0xff; 33], &[1]),
            Err(QuoteError::EcdsaComponentTooLong {
                component: "r",
                len: 33
            })
        );
    }
}
