//! TPMS_ATTEST of a quote (TPM 2.0 Part 2, 10.12.12), parsed in pure Rust. The parser only
//! checks structure; the magic/type, nonce and PCR checks live in `verify`.

use super::wire::Reader;
use super::QuoteError;

/// `TPM_GENERATED_VALUE`: every TPMS_ATTEST produced by a TPM starts with it.
pub const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
/// `TPM_ST_ATTEST_QUOTE`: the attestation structure type of a quote.
pub const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;

const STRUCTURE: &str = "TPMS_ATTEST";

/// TPMS_CLOCK_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// One TPMS_PCR_SELECTION: a hash bank and its PCR bitmap (bit n of byte n/8 = PCR n).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrSelection {
    pub hash: u16,
    pub bitmap: Vec<u8>,
}

impl PcrSelection {
    /// The selected PCR indices in ascending order (the order the TPM hashes them in).
    pub fn indices(&self) -> Vec<u32> {
        let mut out = Vec::new();
        for (byte_index, byte) in (0u32..).zip(&self.bitmap) {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    out.push(byte_index * 8 + bit);
                }
            }
        }
        out
    }
}

/// A parsed TPMS_ATTEST whose body is read as TPMS_QUOTE_INFO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteAttest {
    /// Must equal [`TPM_GENERATED_VALUE`]; checked by `verify`, not by the parser.
    pub magic: u32,
    /// Must equal [`TPM_ST_ATTEST_QUOTE`]; checked by `verify`, not by the parser.
    pub attest_type: u16,
    /// TPM2B_NAME of the signing key.
    pub qualified_signer: Vec<u8>,
    /// TPM2B_DATA: the caller's qualifying data (the nonce).
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    /// TPML_PCR_SELECTION, in wire order.
    pub pcr_selections: Vec<PcrSelection>,
    /// TPM2B_DIGEST: hash of the selected PCR values, concatenated in selection order.
    pub pcr_digest: Vec<u8>,
}

impl QuoteAttest {
    /// Parses marshalled TPMS_ATTEST bytes (`tpm2_quote -m`, `Attest::marshall()`). Every
    /// length is checked; bad input yields an error, never a panic.
    pub fn parse(bytes: &[u8]) -> Result<Self, QuoteError> {
        let mut r = Reader::new(STRUCTURE, bytes);
        let magic = r.u32("magic")?;
        let attest_type = r.u16("type")?;
        let qualified_signer = r.tpm2b("qualifiedSigner")?.to_vec();
        let extra_data = r.tpm2b("extraData")?.to_vec();
        let clock_info = ClockInfo {
            clock: r.u64("clockInfo.clock")?,
            reset_count: r.u32("clockInfo.resetCount")?,
            restart_count: r.u32("clockInfo.restartCount")?,
            safe: r.u8("clockInfo.safe")? != 0,
        };
        let firmware_version = r.u64("firmwareVersion")?;
        let count = r.u32("pcrSelect.count")?;
        // No pre-allocation from the untrusted count: each entry is read (and bounds-checked).
        let mut pcr_selections = Vec::new();
        for _ in 0..count {
            let hash = r.u16("pcrSelect.hash")?;
            let size = r.u8("pcrSelect.sizeofSelect")?;
            let bitmap = r.take("pcrSelect.pcrSelect", usize::from(size))?.to_vec();
            pcr_selections.push(PcrSelection { hash, bitmap });
        }
        let pcr_digest = r.tpm2b("pcrDigest")?.to_vec();
        r.finish()?;
        Ok(Self {
            magic,
            attest_type,
            qualified_signer,
            extra_data,
            clock_info,
            firmware_version,
            pcr_selections,
            pcr_digest,
        })
    }

    /// Byte offset of `clockInfo` in the marshalled form (tests flip bytes there: they are
    /// signed but not otherwise checked, so only the signature can catch the change).
    pub fn clock_info_offset(&self) -> usize {
        4 + 2 + 2 + self.qualified_signer.len() + 2 + self.extra_data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TPMS_ATTEST printed by `tpm2_quote -l sha256:0,1,4,15 -q 0011223344556677` (swtpm).
    const TPM2_TOOLS_QUOTE: &str = "ff54434780180022000bcd148bc90390be9bdc851b0ccadc0f246e52151f5f178f66a72c89b282ef59fa0008001122334455667700000000000006af000000010000000001201910230016363600000001000b03138000002038723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca";

    #[test]
    fn parses_a_tpm2_tools_quote() {
        let bytes = hex::decode(TPM2_TOOLS_QUOTE).unwrap();
        let q = QuoteAttest::parse(&bytes).unwrap();
        assert_eq!(q.magic, TPM_GENERATED_VALUE);
        assert_eq!(q.attest_type, TPM_ST_ATTEST_QUOTE);
        assert_eq!(q.qualified_signer.len(), 0x22);
        assert_eq!(q.extra_data, hex::decode("0011223344556677").unwrap());
        assert_eq!(q.clock_info.clock, 0x6af);
        assert_eq!(q.clock_info.reset_count, 1);
        assert!(q.clock_info.safe);
        assert_eq!(q.pcr_selections.len(), 1);
        assert_eq!(q.pcr_selections[0].hash, 0x000b);
        assert_eq!(q.pcr_selections[0].indices(), vec![0, 1, 4, 15]);
        assert_eq!(
            hex::encode(&q.pcr_digest),
            "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
        );
        assert_eq!(q.clock_info_offset(), 4 + 2 + 2 + 0x22 + 2 + 8);
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_an_error() {
        let bytes = hex::decode(TPM2_TOOLS_QUOTE).unwrap();
        for len in 0..bytes.len() {
            assert!(
                matches!(
                    QuoteAttest::parse(&bytes[..len]),
                    Err(QuoteError::Truncated { .. })
                ),
                "prefix of {len} bytes must be truncated"
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            QuoteAttest::parse(&long),
            Err(QuoteError::TrailingBytes {
                structure: "TPMS_ATTEST",
                offset: bytes.len(),
                count: 1
            })
        );
    }
}
