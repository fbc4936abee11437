//! `attest ... snp` (placeholder: being written).

use std::process::ExitCode;

#[derive(clap::Args)]
pub struct ShowArgs {}

pub fn show(_: ShowArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not available yet")
}

#[derive(clap::Args)]
pub struct VerifyArgs {}

pub fn verify(_: VerifyArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not available yet")
}
