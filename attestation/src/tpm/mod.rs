//! TPM 2.0 quotes (placeholder: being written).

/// Why a TPM quote was refused.
#[derive(Debug, thiserror::Error)]
pub enum QuoteError {
    #[error("quote is malformed: {0}")]
    Malformed(String),
}

/// A failure talking to a TPM.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("{operation}: {message}")]
    Operation {
        operation: &'static str,
        message: String,
    },
}
