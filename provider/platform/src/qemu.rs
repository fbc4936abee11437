//! The QEMU platform: every node is a detached `qemu-system-x86_64` booting the node image
//! (`constellation_image::qemu::NodeImage`) with OVMF, its own swtpm as vTPM (control socket in
//! the node's private TPM folder), a raw virtio state disk file, and user-mode networking that
//! stays on this machine.
//!
//! Networking: two NICs per VM, neither reaching anything beyond this machine.
//! - The cluster network ([`image::ClusterNic`]): one Ethernet segment per cluster, carried by
//!   QEMU as UDP multicast on the host's loopback interface (a group and port chosen at random
//!   when the cluster is created). Node *i* has the address `10.42.0.(16+i)` on it, which is the
//!   address the metadata lists for it: every node reaches every other directly (joins, the
//!   control planes' etcd peers), including nodes started after it. What crosses it is TLS
//!   (aTLS, etcd's mutual TLS); like the host forwards, it is open to local users of the host,
//!   which the threat model treats as untrusted anyway.
//! - The platform link (`-netdev user,restrict=on`, `10.0.2.0/24`, DHCP): the node's ports
//!   ([`ports`]) are forwarded from a loopback address of its own on the host (127.a.b.c,
//!   [`NodeRecord::ip`]) to its cluster address, through which the provider attests and
//!   initializes; and the metadata endpoint.
//! - Metadata: `10.0.2.100:80` is a `guestfwd` that runs `cat` of the cluster's metadata file
//!   for each connection ([`METADATA_ENDPOINT`]): guests always read the current node list (so a
//!   control plane sees workers added later) and cannot change it. No server process runs.
//!
//! Status: the host cannot read the guest's files; the bootstrapper prints its status on the
//! serial console as JSON lines after [`CONSOLE_STATUS_PREFIX`], and
//! [`QemuCloud::node_status`] parses the last one of the current boot (the console log is
//! started afresh at every boot).
//!
//! Files under the cluster folder (all private): `platform.json`, `metadata.json`,
//! `nodes/<name>/{tpm/, OVMF_VARS.fd, state.img, console.log, bootstrapper-args}`.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use constellation_attestation::tpm::{AkKind, Swtpm, Tpm};
use constellation_common::metadata::{ports, NodeInfo, Role, CONSOLE_STATUS_PREFIX};
use constellation_common::node_status::NodeStatus;
use constellation_common::secret_file::write_private_atomic;
use constellation_image::qemu::{self as image, Accel, NodeImage, VmConfig};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

use crate::local::{free_loopback_address, load_state, private_dir, save_state, ClusterSettings};
use crate::{process, BootPhase, Cloud, NodeRecord, PlatformError};

const METADATA_FILE: &str = "metadata.json";
const CONSOLE_FILE: &str = "console.log";
const STATE_DISK_FILE: &str = "state.img";
const VARS_FILE: &str = "OVMF_VARS.fd";
const ARGS_FILE: &str = "bootstrapper-args";
/// Size of a node's state disk (sparse on the host). A control plane's holds its etcd member,
/// whose write-ahead log preallocates 64 MB segments (the current one and a spare): 128 MiB
/// would not hold them. Every byte costs at Init or join (the integrity tags are written once),
/// so a worker's disk stays small.
pub fn state_disk_bytes(role: Role) -> u64 {
    match role {
        Role::ControlPlane => 256 << 20,
        Role::Worker => 128 << 20,
    }
}
/// The cluster network: node addresses `10.42.0.(16+i)/24`.
const GUEST_NET: [u8; 3] = [10, 42, 0];
const GUEST_PREFIX: u8 = 24;
const GUEST_FIRST_HOST: u32 = 16;
const GUEST_MAX_NODES: u32 = 200;
/// The platform link (QEMU user-mode networking), its DHCP range and the metadata endpoint on it.
const PLATFORM_LINK: &str = "net=10.0.2.0/24,host=10.0.2.2,dhcpstart=10.0.2.15";
pub const METADATA_ENDPOINT: &str = "10.0.2.100:80";
/// How long a node gets from QEMU start to its bootstrapper's first status (TCG boots of a
/// few VMs sharing two cores take most of a minute).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long VMs get to join after Init or a reboot (a join under TCG takes seconds; several
/// VMs share two cores).
const JOIN_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Ports forwarded from the node's host address into the guest.
const FORWARDED: [u16; 4] = [
    ports::BOOTSTRAPPER,
    ports::KEY_SERVICE,
    ports::VERIFY,
    ports::JOIN,
];

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PlatformError + '_ {
    move |source| PlatformError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One node: the shared record plus what only QEMU needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct QemuNode {
    record: NodeRecord,
    /// The node's address on the guest networks (what the metadata lists).
    guest_ip: Ipv4Addr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlatformState {
    settings: ClusterSettings,
    /// OVMF code file the nodes boot (the measurements depend on it).
    firmware_code: PathBuf,
    accel: QemuAccel,
    next_index: u32,
    nodes: Vec<QemuNode>,
    /// The cluster network's multicast group and port (a cluster folder from before the cluster
    /// network gets one when it is opened; its VMs get the NIC at their next boot).
    #[serde(default = "random_cluster_group")]
    cluster_group: std::net::SocketAddrV4,
}

/// A random multicast group in 239.192.0.0/14 (organization-local scope) and a random port in
/// the dynamic range: two clusters on one host share a segment with negligible probability.
fn random_cluster_group() -> std::net::SocketAddrV4 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    let group = Ipv4Addr::new(
        239,
        192 + rng.gen_range(0..4),
        rng.gen(),
        rng.gen_range(1..255),
    );
    std::net::SocketAddrV4::new(group, rng.gen_range(49152..65535))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum QemuAccel {
    Kvm,
    Tcg,
}

impl From<QemuAccel> for Accel {
    fn from(a: QemuAccel) -> Self {
        match a {
            QemuAccel::Kvm => Accel::Kvm,
            QemuAccel::Tcg => Accel::Tcg,
        }
    }
}

/// The QEMU platform for one cluster folder.
#[derive(Debug)]
pub struct QemuCloud {
    root: PathBuf,
    state: PlatformState,
}

impl QemuCloud {
    /// Prepares a new cluster folder; `settings.image_dir` is a built QEMU node image. Probes
    /// once whether KVM can boot a guest here (TCG otherwise; same arguments either way).
    pub fn create(root: &Path, settings: ClusterSettings) -> Result<Self, PlatformError> {
        private_dir(root)?;
        private_dir(&root.join("nodes"))?;
        NodeImage::open(&settings.image_dir)?;
        let firmware_code = PathBuf::from(image::OVMF_CODE);
        let accel = match image::probe_kvm(
            &firmware_code,
            Path::new(image::OVMF_VARS_TEMPLATE),
            root,
            Duration::from_secs(3),
        ) {
            Accel::Kvm => QemuAccel::Kvm,
            Accel::Tcg => QemuAccel::Tcg,
        };
        tracing::info!(?accel, "QEMU accelerator");
        let cloud = Self {
            root: root.to_owned(),
            state: PlatformState {
                settings,
                firmware_code,
                accel,
                next_index: 0,
                nodes: Vec::new(),
                cluster_group: random_cluster_group(),
            },
        };
        cloud.save()?;
        Ok(cloud)
    }

    /// Opens an existing cluster folder.
    pub fn open(root: &Path) -> Result<Self, PlatformError> {
        Ok(Self {
            root: root.to_owned(),
            state: load_state(root)?,
        })
    }

    /// Whether the VMs run under KVM (else TCG).
    pub fn uses_kvm(&self) -> bool {
        self.state.accel == QemuAccel::Kvm
    }

    pub fn metadata_path(&self) -> PathBuf {
        self.root.join(METADATA_FILE)
    }

    /// The node's raw state disk file on the host.
    pub fn state_disk_path(node: &NodeRecord) -> PathBuf {
        node.dir.join(STATE_DISK_FILE)
    }

    /// The node's serial console log of its current boot.
    pub fn console_path(node: &NodeRecord) -> PathBuf {
        node.dir.join(CONSOLE_FILE)
    }

    fn save(&self) -> Result<(), PlatformError> {
        let nodes = self
            .state
            .nodes
            .iter()
            .map(|n| NodeInfo {
                name: n.record.name.clone(),
                role: n.record.role,
                ip: IpAddr::V4(n.guest_ip),
                ak_spki_hex: n.record.ak_spki_hex.clone(),
            })
            .collect();
        save_state(
            &self.root,
            &self.state,
            &self.state.settings,
            nodes,
            &self.metadata_path(),
        )
    }

    fn add_node(&mut self, role: Role, image_dir: &Path) -> Result<String, PlatformError> {
        let index = self.state.next_index;
        if index >= GUEST_MAX_NODES {
            return Err(PlatformError::NoAddress);
        }
        self.state.next_index += 1;
        let name = format!(
            "{}-{}-{index}",
            self.state.settings.cluster_name,
            role.as_str()
        );
        let dir = self.root.join("nodes").join(&name);
        private_dir(&dir)?;
        let taken: Vec<IpAddr> = self.state.nodes.iter().map(|n| n.record.ip).collect();
        let ip = free_loopback_address(&taken)?;
        let [a, b, c] = GUEST_NET;
        let guest_ip = Ipv4Addr::new(a, b, c, (GUEST_FIRST_HOST + index) as u8);
        self.state.nodes.push(QemuNode {
            record: NodeRecord {
                name: name.clone(),
                role,
                ip,
                dir,
                pid: 0,
                swtpm: None,
                ak_spki_hex: String::new(),
                image_dir: image_dir.to_owned(),
            },
            guest_ip,
        });
        self.save()?;
        Ok(name)
    }

    fn entry(&self, name: &str) -> Result<QemuNode, PlatformError> {
        self.state
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .cloned()
            .ok_or_else(|| PlatformError::UnknownNode(name.to_owned()))
    }

    fn replace(&mut self, record: NodeRecord) -> Result<(), PlatformError> {
        if let Some(slot) = self
            .state
            .nodes
            .iter_mut()
            .find(|n| n.record.name == record.name)
        {
            slot.record = record;
        }
        self.save()
    }

    /// The `-netdev user` options of a node: its DHCP address, host forwards of its ports, the
    /// metadata endpoint and relays to the other control planes' join ports.
    fn user_net(&self, node: &QemuNode) -> String {
        let guest = node.guest_ip;
        let mut opts = vec!["restrict=on".to_owned(), PLATFORM_LINK.to_owned()];
        for port in FORWARDED {
            opts.push(format!(
                "hostfwd=tcp:{}:{port}-{guest}:{port}",
                node.record.ip
            ));
        }
        opts.push(format!(
            "guestfwd=tcp:{METADATA_ENDPOINT}-cmd:cat {}",
            self.metadata_path().display()
        ));
        opts.join(",")
    }

    /// The node's NIC on the cluster network: its MAC ends in its address's last byte.
    fn cluster_nic(&self, node: &QemuNode) -> image::ClusterNic {
        let [a, b, c, d] = node.guest_ip.octets();
        image::ClusterNic {
            group: self.state.cluster_group,
            mac: [0x52, 0x54, 0x00, a, b ^ c, d],
            address: node.guest_ip,
            prefix: GUEST_PREFIX,
        }
    }

    /// Starts a node's VM: pins (or checks) its TPM's attestation key, starts its vTPM and QEMU.
    /// Returns without waiting for the guest.
    fn start(&mut self, name: &str) -> Result<NodeRecord, PlatformError> {
        let node = self.entry(name)?;
        let mut record = node.record.clone();
        let image = NodeImage::open(&record.image_dir)?;
        let tpm_dir = record.dir.join("tpm");
        let tpm_err = |source| PlatformError::Tpm {
            node: name.to_owned(),
            source,
        };
        // The AK, read before QEMU owns the TPM: the same seeds give the guest the same key.
        let ak_hex = {
            let swtpm = Swtpm::spawn_detached(&tpm_dir).map_err(tpm_err)?;
            let ak = Tpm::open(&swtpm.tcti())
                .and_then(|mut tpm| tpm.attestation_key(AkKind::EcdsaP256))
                .map(|ak| hex::encode(ak.to_spki_der()));
            swtpm.stop().map_err(tpm_err)?;
            ak.map_err(tpm_err)?
        };
        if record.ak_spki_hex.is_empty() {
            record.ak_spki_hex = ak_hex;
        } else if record.ak_spki_hex != ak_hex {
            return Err(PlatformError::AkChanged {
                node: record.name.clone(),
                pinned: record.ak_spki_hex,
                found: ak_hex,
            });
        }
        let vars = record.dir.join(VARS_FILE);
        if !vars.exists() {
            std::fs::copy(image::OVMF_VARS_TEMPLATE, &vars).map_err(io_err(&vars))?;
        }
        let disk = Self::state_disk_path(&record);
        if !disk.exists() {
            std::fs::File::create(&disk)
                .and_then(|f| f.set_len(state_disk_bytes(record.role)))
                .map_err(io_err(&disk))?;
        }
        let args_file = record.dir.join(ARGS_FILE);
        let args = [
            "--platform",
            "qemu",
            "--name",
            &record.name,
            "--metadata-endpoint",
            METADATA_ENDPOINT,
        ]
        .join("\n");
        write_private_atomic(&args_file, args.as_bytes()).map_err(|e| PlatformError::Io {
            path: args_file.clone(),
            source: e.into(),
        })?;
        // Recorded before QEMU starts, so a launcher killed now still tears it down.
        record.swtpm = Some(Swtpm::spawn_detached_for_qemu(&tpm_dir).map_err(tpm_err)?);
        self.replace(record.clone())?;
        let config = VmConfig {
            accel: self.state.accel.into(),
            ram_mib: image.manifest.ram_mib,
            firmware_code: self.state.firmware_code.clone(),
            firmware_vars: vars,
            tpm_socket: record
                .swtpm
                .as_ref()
                .map(|s| s.ctrl_socket())
                .unwrap_or_default(),
            kernel: image.kernel_path(),
            initrd: image.initrd_path(),
            cmdline: image.manifest.cmdline.clone(),
            user_net: Some(self.user_net(&node)),
            state_disk: Some(disk),
            bootstrapper_args: Some(args_file),
            cluster_nic: Some(self.cluster_nic(&node)),
        };
        let console = Self::console_path(&record);
        // A fresh console per boot: every status line in it is this boot's.
        match std::fs::remove_file(&console) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&console)(e)),
            _ => {}
        }
        let qemu = Path::new("qemu-system-x86_64");
        record.pid =
            process::spawn_detached(qemu, &config.args(), &console, &[]).map_err(io_err(qemu))?;
        self.replace(record.clone())?;
        tracing::info!(node = %record.name, ip = %record.ip, guest = %node.guest_ip, pid = record.pid, "VM started");
        Ok(record)
    }

    /// Waits until the node's bootstrapper reported a status (a control plane: that it waits for
    /// Init), or fails naming the node and quoting its console.
    fn wait_up(&self, record: &NodeRecord, deadline: Instant) -> Result<(), PlatformError> {
        loop {
            let status = self.node_status(record);
            let up = match (&status, record.role) {
                (Some(s), Role::ControlPlane) => !matches!(
                    s.phase,
                    constellation_common::node_status::NodePhase::Started
                ),
                (Some(_), Role::Worker) => true,
                (None, _) => false,
            };
            if up {
                return Ok(());
            }
            if Instant::now() > deadline || !record.is_alive() {
                // Which part ended (the VM or its vTPM) when the console does not say.
                let ended = match (record.bootstrapper_alive(), record.swtpm.as_ref()) {
                    (false, _) => "\n[the VM's QEMU process is not running]",
                    (true, Some(swtpm)) if !swtpm.is_alive() => "\n[the VM's swtpm is not running]",
                    _ => "",
                };
                return Err(PlatformError::NodeStart {
                    node: record.name.clone(),
                    timeout: BOOT_TIMEOUT,
                    log: format!("{}{ended}", self.console_tail(record, 30)),
                });
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Boots (or reboots) nodes: all VMs start at once, then each is waited for. One result per
    /// name, in order.
    fn start_and_wait(&mut self, names: &[String]) -> Vec<Result<NodeRecord, PlatformError>> {
        let started: Vec<Result<NodeRecord, PlatformError>> = names
            .iter()
            .map(|name| {
                self.halt(name)?;
                self.start(name)
            })
            .collect();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        started
            .into_iter()
            .map(|r| {
                let record = r?;
                self.wait_up(&record, deadline)?;
                Ok(record)
            })
            .collect()
    }

    /// Powers a node off (QEMU and its vTPM); keeps its folder, disk and records.
    pub fn halt(&mut self, name: &str) -> Result<(), PlatformError> {
        let mut record = self.entry(name)?.record;
        power_off(&record)?;
        record.pid = 0;
        record.swtpm = None;
        self.replace(record)
    }

    /// Stops every VM and removes the cluster folder. Besides the recorded pids it stops any
    /// process whose command line names a path in the cluster folder (a VM a killed launcher
    /// did not record, a metadata `cat` or a join relay still running).
    pub fn destroy(mut self) -> Result<(), PlatformError> {
        let results: Vec<Result<(), PlatformError>> = self
            .state
            .nodes
            .iter()
            .map(|n| power_off(&n.record))
            .collect();
        for n in &mut self.state.nodes {
            n.record.pid = 0;
            n.record.swtpm = None;
        }
        process::stop_all_under(&self.root, STOP_GRACE);
        results.into_iter().collect::<Result<(), _>>()?;
        std::fs::remove_dir_all(&self.root).map_err(io_err(&self.root))
    }
}

/// Stops a node's QEMU (SIGTERM, then SIGKILL) and its vTPM.
fn power_off(record: &NodeRecord) -> Result<(), PlatformError> {
    if record.pid != 0 {
        process::stop(
            record.pid,
            &record.dir.display().to_string(),
            Signal::SIGTERM,
            STOP_GRACE,
        );
    }
    if let Some(swtpm) = &record.swtpm {
        swtpm.stop().map_err(|source| PlatformError::Tpm {
            node: record.name.clone(),
            source,
        })?;
    }
    Ok(())
}

/// The last status line of a console log, parsed.
pub fn last_console_status(console: &str) -> Option<NodeStatus> {
    console.lines().rev().find_map(|line| {
        let line = line.trim_end_matches('\r');
        let json = &line[line.find(CONSOLE_STATUS_PREFIX)? + CONSOLE_STATUS_PREFIX.len()..];
        serde_json::from_str(json).ok()
    })
}

/// The last `n` lines of a console a person reads in a diagnostic: without the PCR values and
/// the base64 event log the image's init prints between its markers (data for tests and
/// tools, tens of lines that would crowd out the bootstrapper's own).
pub fn readable_tail(console: &str, n: usize) -> String {
    let mut inside = false;
    let lines: Vec<&str> = console
        .lines()
        .filter(|line| {
            let marker = [image::PCRS_BEGIN, image::EVENTLOG_BEGIN]
                .iter()
                .any(|m| line.contains(m));
            let end = [image::PCRS_END, image::EVENTLOG_END]
                .iter()
                .any(|m| line.contains(m));
            inside = (inside || marker) && !end;
            !(inside || end)
        })
        .collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The line the image's init prints when it starts (`image/src/init.sh`), followed by the
/// kernel's uptime in seconds.
const INIT_STARTED: &str = "constellation-init: phase=init uptime=";

/// How far a running VM's boot got, from its console: the bootstrapper's last status line,
/// else init's start line, else the firmware still runs.
pub fn console_phase(console: &str) -> BootPhase {
    if let Some(status) = last_console_status(console) {
        return BootPhase::Bootstrapper(status);
    }
    let init = console.lines().find_map(|line| {
        let uptime = &line[line.find(INIT_STARTED)? + INIT_STARTED.len()..];
        let secs: f64 = uptime.trim_end_matches('\r').trim().parse().ok()?;
        Some((secs * 1000.0) as u64)
    });
    match init {
        Some(kernel_ms) => BootPhase::Init { kernel_ms },
        None => BootPhase::Firmware,
    }
}

/// A QEMU node is a VM whose TPM is a swtpm over QEMU's TPM CRB device, without SEV-SNP.
pub const NODE_VARIANT: constellation_attestation::Variant =
    constellation_attestation::Variant::QemuVtpm;

impl Cloud for QemuCloud {
    fn root(&self) -> &Path {
        &self.root
    }

    fn attestation_variant(&self) -> constellation_attestation::Variant {
        NODE_VARIANT
    }

    fn settings(&self) -> &ClusterSettings {
        &self.state.settings
    }

    fn set_settings(&mut self, settings: ClusterSettings) -> Result<(), PlatformError> {
        self.state.settings = settings;
        self.save()
    }

    fn node(&self, name: &str) -> Option<&NodeRecord> {
        self.state
            .nodes
            .iter()
            .find(|n| n.record.name == name)
            .map(|n| &n.record)
    }

    fn list_nodes(&self) -> Vec<NodeRecord> {
        self.state.nodes.iter().map(|n| n.record.clone()).collect()
    }

    fn add_nodes(
        &mut self,
        role: Role,
        count: usize,
        image_dir: &Path,
    ) -> Result<Vec<String>, PlatformError> {
        (0..count).map(|_| self.add_node(role, image_dir)).collect()
    }

    fn boot_many(&mut self, names: &[String]) -> Vec<Result<NodeRecord, PlatformError>> {
        self.start_and_wait(names)
    }

    fn delete_node(&mut self, name: &str) -> Result<(), PlatformError> {
        self.halt(name)?;
        let record = self.entry(name)?.record;
        self.state.nodes.retain(|n| n.record.name != name);
        self.save()?;
        std::fs::remove_dir_all(&record.dir).map_err(io_err(&record.dir))
    }

    fn destroy(self: Box<Self>) -> Result<(), PlatformError> {
        QemuCloud::destroy(*self)
    }

    fn join_timeout(&self) -> Duration {
        JOIN_TIMEOUT
    }

    /// A VM takes 15–20 s to boot under TCG, mostly in its firmware on one core: the workers'
    /// boots then use the cores the control plane's leaves idle.
    fn boot_workers_with_control_planes(&self) -> bool {
        true
    }

    fn boot_phase(&self, node: &NodeRecord) -> BootPhase {
        if !node.is_alive() {
            return BootPhase::Off;
        }
        match std::fs::read(Self::console_path(node)) {
            Ok(console) => console_phase(&String::from_utf8_lossy(&console)),
            Err(_) => BootPhase::Firmware,
        }
    }

    fn node_status(&self, node: &NodeRecord) -> Option<NodeStatus> {
        if !node.bootstrapper_alive() {
            return None;
        }
        let console = std::fs::read(Self::console_path(node)).ok()?;
        last_console_status(&String::from_utf8_lossy(&console))
    }

    fn console_tail(&self, node: &NodeRecord, lines: usize) -> String {
        let console = std::fs::read(Self::console_path(node)).unwrap_or_default();
        readable_tail(&String::from_utf8_lossy(&console), lines)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_status_line_of_the_console_is_parsed_typed() {
        let console = "boot noise\r\nconstellation-status: {\"pid\":7,\"phase\":\"started\"}\r\n\
            kernel: something\nconstellation-status: {\"pid\":7,\"phase\":\"joined\",\"cluster_id\":\"ab\"}\r\n\
            constellation-status: {broken\n";
        let s = last_console_status(console).unwrap();
        assert_eq!(s.cluster_id(), Some("ab"));
        assert!(last_console_status("no status yet\n").is_none());
    }

    #[test]
    fn the_readable_tail_leaves_out_the_measurement_dumps() {
        let console = format!(
            "constellation-init: phase=init\n{}\n0 abcd\n{}\n{}\nAAAA\nBBBB\n{}\nbootstrapper starting\nwaiting for Init\n",
            image::PCRS_BEGIN,
            image::PCRS_END,
            image::EVENTLOG_BEGIN,
            image::EVENTLOG_END
        );
        assert_eq!(
            readable_tail(&console, 3),
            "constellation-init: phase=init\nbootstrapper starting\nwaiting for Init"
        );
        assert_eq!(readable_tail(&console, 1), "waiting for Init");
    }

    #[test]
    fn the_boot_phase_follows_the_console() {
        assert_eq!(console_phase(""), BootPhase::Firmware);
        let init = "EFI stub: Loaded initrd\r\nconstellation-init: phase=init uptime=2.13\r\n";
        assert_eq!(console_phase(init), BootPhase::Init { kernel_ms: 2130 });
        let up =
            format!("{init}constellation-status: {{\"pid\":7,\"phase\":\"waiting-for-init\"}}\n");
        match console_phase(&up) {
            BootPhase::Bootstrapper(s) => assert_eq!(
                s.phase,
                constellation_common::node_status::NodePhase::WaitingForInit
            ),
            other => panic!("{other:?}"),
        }
    }
}
