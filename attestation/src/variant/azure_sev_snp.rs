//! Variant `azure-sev-snp` (placeholder: being written).
