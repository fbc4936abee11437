//! `attest ... cluster` (placeholder: being written).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct VerifyArgs {}

pub fn verify(_: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not available yet")
}
