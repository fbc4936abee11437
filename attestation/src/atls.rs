//! Attested TLS (placeholder).
