//! Progress while nodes boot: every node's boot phase, as its platform observes it through the
//! `Cloud` seam (a VM: firmware, then the kernel and the image's init, then the bootstrapper's
//! typed status; a local node: started, then its status), one progress line per change, with
//! the seconds since the node was seen starting. Attestation and joins are reported by the
//! steps that check them (`initialize`, `join_wait`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use constellation_common::node_status::NodePhase;
use constellation_platform::BootPhase;

use super::local_backend::{blocking, open_cloud};
use super::model::*;

/// How often the cluster folder is read for the nodes' phases.
const POLL: Duration = Duration::from_millis(500);

/// What a progress line says about a phase (equal labels are reported once); `None` for a
/// node that is off.
fn label(phase: &BootPhase) -> Option<String> {
    Some(match phase {
        BootPhase::Off => return None,
        BootPhase::Starting => "started".into(),
        BootPhase::Firmware => "firmware (OVMF measures and loads the kernel and initrd)".into(),
        BootPhase::Init { kernel_ms } => format!(
            "kernel up after {:.1} s of kernel boot; init loads modules and the network",
            *kernel_ms as f64 / 1000.0
        ),
        BootPhase::Bootstrapper(status) => match &status.phase {
            NodePhase::Started => "bootstrapper up".into(),
            NodePhase::WaitingForInit => "bootstrapper up, waiting for Init".into(),
            NodePhase::WaitingForRecover => "bootstrapper up, waiting for Recover".into(),
            NodePhase::Joining { .. } => "bootstrapper up, joining".into(),
            NodePhase::JoinRefused { refusal, .. } => format!("join refused: {refusal}"),
            NodePhase::Initialized { .. } => "initialized".into(),
            NodePhase::Joined { .. } => "reports it joined".into(),
        },
    })
}

/// A phase in which a node is not booting (seen first in it, it is not reported).
fn settled(phase: &BootPhase) -> bool {
    matches!(phase, BootPhase::Bootstrapper(s) if s.cluster_id().is_some())
}

/// The phase changes of one poll, as progress lines; `seen` keeps each node's start time
/// and last label.
fn changes(
    seen: &mut HashMap<String, (Instant, String)>,
    phases: Vec<(String, BootPhase)>,
    now: Instant,
) -> Vec<String> {
    let mut lines = Vec::new();
    for (name, phase) in phases {
        let Some(label) = label(&phase) else {
            seen.remove(&name);
            continue;
        };
        let restarted = matches!(phase, BootPhase::Starting | BootPhase::Firmware);
        match seen.get_mut(&name) {
            None if settled(&phase) => {
                seen.insert(name, (now, label));
            }
            Some((_, last)) if *last == label => {}
            entry => {
                let since = match entry {
                    Some((since, _)) if !restarted => *since,
                    _ => now,
                };
                let secs = now.duration_since(since).as_secs_f64();
                lines.push(format!("node {name} [{secs:.1} s]: {label}"));
                seen.insert(name, (since, label));
            }
        }
    }
    lines
}

/// Reports the boot phases of the cluster in `root` until dropped.
async fn watch(platform: Platform, root: PathBuf, progress: &dyn Progress) -> Infallible {
    let mut seen = HashMap::new();
    loop {
        let r = root.clone();
        let phases = blocking(move || {
            Ok(match open_cloud(platform, &r)? {
                Some(cloud) => cloud
                    .list_nodes()
                    .iter()
                    .map(|n| (n.name.clone(), cloud.boot_phase(n)))
                    .collect(),
                None => Vec::new(),
            })
        })
        .await
        .unwrap_or_default();
        for line in changes(&mut seen, phases, Instant::now()) {
            progress.step(&line);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `work` while reporting the boot phases of the cluster in `root` as progress.
pub(super) async fn with_boot_progress<T>(
    platform: Platform,
    root: &Path,
    progress: &dyn Progress,
    work: impl Future<Output = T>,
) -> T {
    let watcher = watch(platform, root.to_owned(), progress);
    tokio::select! {
        out = work => out,
        never = watcher => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_common::node_status::NodeStatus;

    fn status(phase: NodePhase) -> BootPhase {
        BootPhase::Bootstrapper(NodeStatus::now(phase))
    }

    #[test]
    fn each_phase_change_is_one_line_with_the_time_since_the_node_started() {
        let mut seen = HashMap::new();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let vm = |p: BootPhase| vec![("c-worker-1".to_owned(), p)];
        assert!(changes(&mut seen, vm(BootPhase::Off), at(0)).is_empty());
        assert_eq!(
            changes(&mut seen, vm(BootPhase::Firmware), at(1)),
            ["node c-worker-1 [0.0 s]: firmware (OVMF measures and loads the kernel and initrd)"]
        );
        assert!(changes(&mut seen, vm(BootPhase::Firmware), at(5)).is_empty());
        let kernel = changes(&mut seen, vm(BootPhase::Init { kernel_ms: 2100 }), at(12));
        assert_eq!(kernel.len(), 1);
        assert!(kernel[0].starts_with("node c-worker-1 [11.0 s]: kernel up after 2.1 s"));
        let joining = vm(status(NodePhase::Joining { attempts: 1 }));
        assert_eq!(
            changes(&mut seen, joining, at(14)),
            ["node c-worker-1 [13.0 s]: bootstrapper up, joining"]
        );
        // More attempts are the same phase.
        let again = vm(status(NodePhase::Joining { attempts: 2 }));
        assert!(changes(&mut seen, again, at(15)).is_empty());
        // A reboot starts the clock again.
        assert_eq!(
            changes(&mut seen, vm(BootPhase::Firmware), at(30)),
            ["node c-worker-1 [0.0 s]: firmware (OVMF measures and loads the kernel and initrd)"]
        );
    }

    #[test]
    fn a_node_first_seen_in_the_cluster_is_not_reported() {
        let mut seen = HashMap::new();
        let joined = status(NodePhase::Joined {
            cluster_id: "ab".into(),
        });
        let now = Instant::now();
        assert!(changes(&mut seen, vec![("n".into(), joined)], now).is_empty());
        let lines = changes(&mut seen, vec![("n".into(), BootPhase::Starting)], now);
        assert_eq!(lines, ["node n [0.0 s]: started"]);
    }
}
