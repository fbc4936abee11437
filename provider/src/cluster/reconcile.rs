//! Bringing the node groups to the configured counts: scale down highest index first, reboot,
//! boot missing nodes.

use std::path::Path;

use constellation_common::metadata::Role;
use constellation_platform::local::{NodeRecord, PlatformError};
use constellation_platform::Cloud;

use super::model::*;

use super::local_backend::*;

/// Boots `names` concurrently; a node that did not come up in the platform's fixed time (on a
/// machine busy with other work that can be too short) gets one more boot.
pub(super) fn boot_retrying(cloud: &mut dyn Cloud, names: &[String]) -> Result<(), ClusterError> {
    let mut again = Vec::new();
    for result in cloud.boot_many(names) {
        match result {
            Ok(_) => {}
            Err(PlatformError::NodeStart { node, .. }) => {
                tracing::warn!(%node, "node did not come up in time; booting it once more");
                again.push(node);
            }
            Err(e) => return Err(platform_err(e)),
        }
    }
    if again.is_empty() {
        return Ok(());
    }
    cloud
        .boot_many(&again)
        .into_iter()
        .try_for_each(|r| r.map(|_| ()).map_err(platform_err))
}

/// Names of `role`'s nodes, highest index first (the order scale-down removes them in).
pub(super) fn by_index_desc(nodes: &[NodeRecord], role: Role) -> Vec<String> {
    let mut named: Vec<(u64, String)> = nodes
        .iter()
        .filter(|n| n.role == role)
        .map(|n| {
            let index = n
                .name
                .rsplit('-')
                .next()
                .and_then(|i| i.parse().ok())
                .unwrap_or(0);
            (index, n.name.clone())
        })
        .collect();
    named.sort_by(|a, b| b.cmp(a));
    named.into_iter().map(|(_, n)| n).collect()
}

/// What [`reconcile`] did.
#[derive(Debug, Default)]
pub(super) struct Reconciled {
    /// Existing nodes it rebooted.
    pub(super) rebooted: Vec<String>,
    /// Nodes it added (booted from the given image).
    pub(super) added: Vec<String>,
}

/// Brings the node groups to `cp` / `workers`: removes extra nodes (highest index first),
/// reboots the `reboot` nodes that stay and adds missing nodes booted from `image_dir`, all
/// boots at once. Added nodes are recorded in `done` as soon as they exist, so a caller can
/// remove them again when this fails.
pub(super) fn reconcile(
    cloud: &mut dyn Cloud,
    reboot: &[String],
    (cp, workers): (u32, u32),
    image_dir: &Path,
    done: &mut Reconciled,
) -> Result<(), ClusterError> {
    let mut add = Vec::new();
    for (role, want) in [(Role::ControlPlane, cp), (Role::Worker, workers)] {
        let names = by_index_desc(&cloud.list_nodes(), role);
        let want = want as usize;
        for name in names.iter().take(names.len().saturating_sub(want)) {
            cloud.delete_node(name).map_err(platform_err)?;
        }
        add.push((role, want.saturating_sub(names.len())));
    }
    for (role, count) in add {
        let names = cloud
            .add_nodes(role, count, image_dir)
            .map_err(platform_err)?;
        done.added.extend(names);
    }
    done.rebooted = reboot
        .iter()
        .filter(|n| cloud.node(n).is_some())
        .cloned()
        .collect();
    let all: Vec<String> = done.rebooted.iter().chain(&done.added).cloned().collect();
    boot_retrying(cloud, &all)
}

/// The nodes of `cloud` named in `names`.
pub(super) fn records(cloud: &dyn Cloud, names: &[String]) -> Vec<NodeRecord> {
    names
        .iter()
        .filter_map(|n| cloud.node(n).cloned())
        .collect()
}
