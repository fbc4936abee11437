//! `constellation-oci`: writes the OCI image layout of one daemon binary (see the library docs).

use std::path::PathBuf;

use clap::Parser;

/// Build an OCI image layout for a daemon binary, without a container daemon.
#[derive(Debug, Parser)]
#[command(name = "constellation-oci", version)]
struct Cli {
    /// The daemon binary.
    #[arg(long)]
    binary: PathBuf,
    /// Image and binary name, e.g. constellation-verify.
    #[arg(long)]
    name: String,
    /// Tag (the index's org.opencontainers.image.ref.name).
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    tag: String,
    /// A library the binary loads with dlopen (e.g. a TPM TCTI module); repeatable.
    #[arg(long)]
    dlopen: Vec<PathBuf>,
    /// A TCP port the daemon listens on; repeatable.
    #[arg(long)]
    port: Vec<u16>,
    /// Output directory (replaced).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rootfs = constellation_oci::daemon_rootfs(&cli.binary, &cli.name, &cli.dlopen)?;
    let image = constellation_oci::ImageConfig {
        entrypoint: vec![format!("/usr/local/bin/{}", cli.name)],
        name: cli.name,
        tag: cli.tag,
        exposed_ports: cli.port,
    };
    let digest = constellation_oci::write_layout(&cli.out, &rootfs, &image)?;
    println!("{} {digest} ({} files)", cli.out.display(), rootfs.len());
    Ok(())
}
