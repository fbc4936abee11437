//! Terraform provider library.
