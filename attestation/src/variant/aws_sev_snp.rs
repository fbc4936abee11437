//! Variant `aws-sev-snp` (placeholder: being written).
