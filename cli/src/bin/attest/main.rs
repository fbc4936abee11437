//! `attest`: attestation diagnostics (like snpguest / `constellation verify`).
//!
//! Every `verify` subcommand prints a JSON verdict naming each check and exits 0 only when
//! every check passed; on failure it exits 1 and names the failed check with expected and
//! found values. Usage errors exit 2.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod measurements;
mod recover;
mod snp;
mod tpm;
mod verdict;
mod verify_node;

#[derive(Parser)]
#[command(
    name = "attest",
    version,
    about = "Constellation attestation diagnostics"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print evidence fields as JSON.
    #[command(subcommand)]
    Show(ShowCommand),
    /// Verify evidence; prints a JSON verdict, exit 0 only if every check passes.
    #[command(subcommand)]
    Verify(VerifyCommand),
    /// Recover a waiting control-plane node with the master secret (after a full control-plane
    /// restart); prints a JSON verdict, exit 0 only if the node attested and recovered.
    Recover(recover::RecoverArgs),
}

#[derive(Subcommand)]
enum ShowCommand {
    /// An AMD SEV-SNP attestation report.
    Snp(snp::ShowArgs),
}

#[derive(Subcommand)]
enum VerifyCommand {
    /// An AMD SEV-SNP attestation report against its VCEK/VLEK and AMD's pinned roots.
    Snp(snp::VerifyArgs),
    /// A TPM 2.0 quote in tpm2-tools' -m (TPMS_ATTEST) and -s (TPMT_SIGNATURE) formats.
    TpmQuote(tpm::VerifyArgs),
    /// A measurements file against its detached cosign-style signature.
    Measurements(measurements::VerifyArgs),
    /// A running cluster node, through its verification service.
    Cluster(verify_node::VerifyArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Show(ShowCommand::Snp(a)) => snp::show(a),
        Command::Verify(VerifyCommand::Snp(a)) => snp::verify(a),
        Command::Verify(VerifyCommand::TpmQuote(a)) => tpm::verify(a),
        Command::Verify(VerifyCommand::Measurements(a)) => measurements::verify(a),
        Command::Verify(VerifyCommand::Cluster(a)) => verify_node::verify(a),
        Command::Recover(a) => recover::recover(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("attest: {e:#}");
            ExitCode::from(2)
        }
    }
}
