//! A bounds-checked big-endian reader for TPM 2.0 marshalled structures: every read checks
//! the remaining length and returns [`QuoteError::Truncated`] instead of panicking.

use super::QuoteError;

pub(crate) struct Reader<'a> {
    structure: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(structure: &'static str, buf: &'a [u8]) -> Self {
        Self {
            structure,
            buf,
            pos: 0,
        }
    }

    pub(crate) fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], QuoteError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.get(..n) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(QuoteError::Truncated {
                structure: self.structure,
                field,
                offset: self.pos,
                needed: n,
                available: rest.len(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], QuoteError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(field, N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, QuoteError> {
        Ok(u8::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, QuoteError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, QuoteError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, QuoteError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A TPM2B: a u16 size followed by that many bytes.
    pub(crate) fn tpm2b(&mut self, field: &'static str) -> Result<&'a [u8], QuoteError> {
        let len = self.u16(field)?;
        self.take(field, usize::from(len))
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), QuoteError> {
        let count = self.buf.len().saturating_sub(self.pos);
        if count == 0 {
            Ok(())
        } else {
            Err(QuoteError::TrailingBytes {
                structure: self.structure,
                offset: self.pos,
                count,
            })
        }
    }
}

/// Appends a TPM2B (u16 size, then the bytes); `None` if `bytes` is longer than a TPM2B holds.
pub(crate) fn put_tpm2b(out: &mut Vec<u8>, bytes: &[u8]) -> Option<()> {
    let len = u16::try_from(bytes.len()).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Some(())
}
