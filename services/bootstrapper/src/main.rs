//! `constellation-bootstrapper`: the node daemon. The local platform starts one per node after
//! measuring it into the node's TPM; in a QEMU node image the image's init starts it with the
//! arguments the platform put into the firmware config (`--platform qemu ...`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use constellation_bootstrapper::vm::{self, VmSettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Platform {
    /// A host process: metadata file, swtpm TCTI, state disk as a file in the node folder.
    Local,
    /// A QEMU guest: metadata endpoint, the vTPM, the state disk as a block device mounted
    /// (dm-crypt) at the state folder.
    Qemu,
}

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
    /// Where the node runs.
    #[arg(long, value_enum, default_value = "local")]
    platform: Platform,
    /// The node's folder (state, logs). Default on qemu: /run/constellation.
    #[arg(long = "node-dir")]
    node_dir: Option<PathBuf>,
    /// The platform's metadata file (local).
    #[arg(long)]
    metadata: Option<PathBuf>,
    /// The platform's metadata endpoint (qemu), e.g. 10.42.0.250:80.
    #[arg(long = "metadata-endpoint")]
    metadata_endpoint: Option<SocketAddr>,
    /// The state disk's block device (qemu).
    #[arg(long = "state-device", default_value = vm::GUEST_STATE_DEVICE)]
    state_device: PathBuf,
    /// TCTI of the node's TPM, e.g. swtpm:path=/.../swtpm.sock. Default on qemu:
    /// device:/dev/tpmrm0.
    #[arg(long)]
    tcti: Option<String>,
    /// Directory of the service daemons' binaries (constellation-joinservice,
    /// constellation-keyservice, constellation-verify) a control plane supervises. Default: the
    /// directory of this executable.
    #[arg(long = "daemon-dir")]
    daemon_dir: Option<PathBuf>,
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
    let daemon_dir = match a.daemon_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?
            .parent()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow::anyhow!("the bootstrapper's executable has no directory"))?,
    };
    let config = match a.platform {
        Platform::Local => constellation_bootstrapper::node::NodeConfig {
            name: a.name,
            node_dir: a
                .node_dir
                .ok_or_else(|| anyhow::anyhow!("--node-dir is required on the local platform"))?,
            metadata_path: a
                .metadata
                .ok_or_else(|| anyhow::anyhow!("--metadata is required on the local platform"))?,
            tcti: a
                .tcti
                .ok_or_else(|| anyhow::anyhow!("--tcti is required on the local platform"))?,
            vm: None,
            daemon_dir,
        },
        Platform::Qemu => constellation_bootstrapper::node::NodeConfig {
            name: a.name,
            node_dir: a.node_dir.unwrap_or_else(|| vm::GUEST_NODE_DIR.into()),
            metadata_path: PathBuf::new(),
            tcti: a.tcti.unwrap_or_else(|| vm::GUEST_TCTI.to_owned()),
            vm: Some(VmSettings {
                metadata_endpoint: a.metadata_endpoint.ok_or_else(|| {
                    anyhow::anyhow!("--metadata-endpoint is required on the qemu platform")
                })?,
                state_device: a.state_device,
            }),
            daemon_dir,
        },
    };
    Ok(constellation_bootstrapper::node::run(config).await?)
}
