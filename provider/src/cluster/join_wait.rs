//! Waiting for nodes to join after Init or a reboot, from their status reports (a refusal of
//! their measurements ends the wait at once) and their attestation.

use std::time::{Duration, Instant};

use constellation_attestation::Measurements;
use constellation_common::metadata::Role;
use constellation_common::node_status::{DaemonState, NodePhase, ETCD_DAEMON, JOIN_SERVICE_DAEMON};
use constellation_common::refusal::{Refusal, RefusalCheck};
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;

use super::model::*;
use super::node_checks::*;

/// Console lines quoted when a node fails to join.
pub(super) const CONSOLE_LINES: usize = 20;

/// The refusal that stops waiting for `node` at once: a join service refused its
/// measurements, which no retry fixes. Read from the node's own status report.
pub(super) fn measurements_refusal(cloud: &dyn Cloud, node: &NodeRecord) -> Option<Refusal> {
    match cloud.node_status(node)?.phase {
        NodePhase::JoinRefused { refusal, .. } if refusal.check == RefusalCheck::Measurements => {
            Some(refusal)
        }
        _ => None,
    }
}

/// The node reports (in its current boot) that it holds the cluster ID: attesting it is then
/// worth the TPM quote. A hint only; [`wait_joined`] attests anyway now and then.
pub(super) fn reports_joined(cloud: &dyn Cloud, node: &NodeRecord) -> bool {
    cloud
        .node_status(node)
        .is_some_and(|s| s.cluster_id().is_some())
}

/// Why a control plane that attests with the cluster ID is not counted as joined yet: where
/// the other control planes run etcd members, its own member must run and vote (it is added as
/// a learner after the join and promoted once it caught up; a learner does not count towards
/// the quorum), or losing another control plane could cost the quorum. Its join service starts
/// only after the promotion, so a ready join service is the sign.
pub(super) fn etcd_member_pending(cloud: &dyn Cloud, node: &NodeRecord) -> Option<String> {
    if node.role != Role::ControlPlane {
        return None;
    }
    let uses_etcd = cloud
        .list_nodes()
        .iter()
        .filter(|n| n.role == Role::ControlPlane && n.name != node.name)
        .filter_map(|n| cloud.node_status(n))
        .any(|s| s.daemon(ETCD_DAEMON).is_some());
    if !uses_etcd {
        return None;
    }
    let status = cloud.node_status(node);
    let state = |name: &str| {
        status
            .as_ref()
            .and_then(|s| s.daemon(name).map(|d| d.state.clone()))
    };
    match (state(ETCD_DAEMON), state(JOIN_SERVICE_DAEMON)) {
        (Some(DaemonState::Ready), Some(DaemonState::Ready)) => None,
        (Some(DaemonState::Ready), _) => Some(
            "its etcd member runs but is not promoted to voter yet (its join service starts \
             after the promotion)"
                .into(),
        ),
        (Some(state), _) => Some(format!("its etcd member is not ready yet ({state:?})")),
        (None, _) => Some("its etcd member has not been added to the cluster yet".into()),
    }
}

/// Why a node is still pending, from its status report.
pub(super) fn pending_reason(cloud: &dyn Cloud, node: &NodeRecord) -> String {
    match cloud.node_status(node).map(|s| s.phase) {
        None => "its bootstrapper has not reported yet".into(),
        Some(NodePhase::JoinRefused {
            endpoint, refusal, ..
        }) => format!("the join service at {endpoint} refused it: {refusal}"),
        Some(phase) => format!("it reports {phase:?}"),
    }
}

/// The PCRs a refusal names, as a user reads them.
pub(super) fn describe_mismatches(refusal: &Refusal) -> String {
    if refusal.mismatches.is_empty() {
        return refusal.message.clone();
    }
    refusal
        .mismatches
        .iter()
        .map(|m| {
            format!(
                "PCR[{}]: expected {}, found {}",
                m.pcr,
                m.expected,
                m.found.as_deref().unwrap_or("nothing")
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// How often [`wait_joined`] attests a node that does not report it joined yet.
pub(super) const JOIN_ATTEST_ANYWAY: Duration = Duration::from_secs(3);

/// First and longest pause between two rounds of join checks. A round mostly reads the
/// pending nodes' status reports (attesting only those that say they joined), so it is cheap; the
/// longest pause is what a join can wait to be noticed.
pub(super) const JOIN_POLL_FIRST: Duration = Duration::from_millis(20);
pub(super) const JOIN_POLL_MAX: Duration = Duration::from_millis(100);

/// Waits until every node attests with the cluster ID (workers join on their own, retrying),
/// at most the platform's join timeout. A node the join service refused for its measurements
/// fails at once, with the refusal (which names the PCR) as the reason, reported on
/// `image.reference`; a node that does not join in time fails naming it, quoting its console.
pub(super) async fn wait_joined(
    cloud: &dyn Cloud,
    nodes: &[NodeRecord],
    measurements: &Measurements,
    cluster_id: &[u8],
    progress: &dyn Progress,
) -> Result<(), ClusterError> {
    let timeout = cloud.join_timeout();
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<NodeRecord> = nodes.to_vec();
    let mut pause = JOIN_POLL_FIRST;
    let mut last_attested = Instant::now();
    let mut first_round = true;
    loop {
        // Attesting costs the node a TPM quote (and CPU its join needs): skip nodes that do not
        // report they joined yet, except on the first round and every few seconds.
        let attest_all = first_round || last_attested.elapsed() >= JOIN_ATTEST_ANYWAY;
        if attest_all {
            last_attested = Instant::now();
        }
        first_round = false;
        let (ready, waiting): (Vec<NodeRecord>, Vec<NodeRecord>) = pending
            .into_iter()
            .partition(|n| attest_all || reports_joined(cloud, n));
        let results = check_nodes(
            cloud.attestation_variant(),
            &ready,
            measurements,
            cluster_id,
        )
        .await;
        let mut still = Vec::new();
        let mut last_reason = String::new();
        let waiting = waiting.into_iter().map(|n| {
            let reason = pending_reason(cloud, &n);
            (n, Err(reason))
        });
        for (node, result) in ready.into_iter().zip(results).chain(waiting) {
            let result = result.and_then(|()| match etcd_member_pending(cloud, &node) {
                Some(reason) => Err(reason),
                None => Ok(()),
            });
            match result {
                Ok(()) => progress.step(&format!("node {} joined and attested", node.name)),
                Err(reason) => {
                    if let Some(refusal) = measurements_refusal(cloud, &node) {
                        return Err(ClusterError::Refused {
                            attribute: crate::diag::AttrPath::attr(&["image", "reference"]),
                            node: node.name.clone(),
                            reason: format!(
                                "its image {} does not match the cluster's measurements \
                                 (image.measurements): {}",
                                node.image_dir.display(),
                                describe_mismatches(&refusal)
                            ),
                        });
                    }
                    last_reason = reason;
                    still.push(node);
                }
            }
        }
        pending = still;
        let Some(first) = pending.first() else {
            return Ok(());
        };
        if Instant::now() > deadline {
            return Err(ClusterError::Node {
                node: first.name.clone(),
                reason: format!(
                    "did not join within {timeout:?} ({} node(s) pending): {last_reason}; last \
                     console lines:\n{}",
                    pending.len(),
                    cloud.console_tail(first, CONSOLE_LINES)
                ),
            });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(JOIN_POLL_MAX);
    }
}
