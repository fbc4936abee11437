//! Signed measurements (placeholder).
