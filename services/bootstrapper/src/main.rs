//! `constellation-bootstrapper`: the node daemon. The local platform starts one per node after
//! measuring it into the node's TPM.

use std::path::PathBuf;

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "constellation-bootstrapper",
    version,
    about = "Constellation node daemon"
)]
struct Args {
    /// This node's name in the cluster metadata.
    #[arg(long)]
    name: String,
    /// The node's folder (state, logs).
    #[arg(long = "node-dir")]
    node_dir: PathBuf,
    /// The platform's metadata file.
    #[arg(long)]
    metadata: PathBuf,
    /// TCTI of the node's TPM, e.g. swtpm:path=<node>/tpm/swtpm.sock (unix socket, private dir).
    #[arg(long)]
    tcti: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .init();
    let a = Args::parse();
    constellation_bootstrapper::node::run(constellation_bootstrapper::node::NodeConfig {
        name: a.name,
        node_dir: a.node_dir,
        metadata_path: a.metadata,
        tcti: a.tcti,
    })
    .await
}
