//! AMD SEV-SNP attestation reports (placeholder: being written).

/// Why an SNP report was refused.
#[derive(Debug, thiserror::Error)]
pub enum SnpError {
    #[error("report is malformed: {0}")]
    Malformed(String),
}
