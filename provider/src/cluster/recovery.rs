//! Recovery after every control plane restarted: their state disks and cluster records are
//! intact, but no process holds the master secret, so no join service can hand out disk keys.
//! Each control plane then reports [`NodePhase::WaitingForRecover`]; apply attests it over
//! server-only aTLS (pinned AK, the measurements of the image it booted, PCR 15 = zero) and
//! sends `Recover` with the master secret the configuration holds. The node proves the secret
//! by opening its existing state disk with the derived key, binds PCR 15 to the same cluster
//! ID and starts its key and join services; the workers then rejoin on their own.

use constellation_attest::bootstrapper_client::{self, RecoverError};
use constellation_attestation::Measurements;
use constellation_common::metadata::{ports, Role};
use constellation_common::node_status::{NodePhase, JOIN_SERVICE_DAEMON, KEY_SERVICE_DAEMON};
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use constellation_proto::recover::RecoverRequest;
use constellation_proto::PROTOCOL_VERSION;

use super::initialize::attested_bootstrapper;
use super::model::*;

/// The control planes whose current boot waits for Recover.
pub(super) fn waiting_for_recover(cloud: &dyn Cloud) -> Vec<NodeRecord> {
    cloud
        .list_nodes()
        .into_iter()
        .filter(|n| n.role == Role::ControlPlane)
        .filter(|n| {
            cloud
                .node_status(n)
                .is_some_and(|s| s.phase == NodePhase::WaitingForRecover)
        })
        .collect()
}

/// The measurements of the image `node` booted: the image in `images` whose reference is the
/// node's image folder, else the last (the cluster's target image).
pub(super) fn measurements_of<'a>(node: &NodeRecord, images: &'a [ImageRef]) -> &'a Measurements {
    images
        .iter()
        .find(|i| std::path::Path::new(&i.reference) == node.image_dir)
        .or(images.last())
        .map(|i| &i.measurements)
        .expect("at least the cluster's image is known")
}

/// How long a control plane that fails attestation as "waiting for Recover" gets to report that
/// it rejoined through another control plane instead (PCR 15 is bound before its status says so).
const REJOIN_REPORT_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sends Recover to every control plane in `waiting`, each attested first against the
/// measurements of its image. A node that rejoined through another control plane meanwhile
/// answers that it is not waiting any more; [`super::join_wait::wait_joined`] checks the
/// outcome either way.
pub(super) async fn recover_control_planes(
    cloud: &dyn Cloud,
    waiting: &[NodeRecord],
    spec: &ClusterSpec,
    images: &[ImageRef],
    progress: &dyn Progress,
) -> Result<(), ClusterError> {
    if waiting.is_empty() {
        return Ok(());
    }
    // The master secret, or (write-only, with an external KMS) the KMIP credentials with which
    // each control plane unwraps the copy in its state disk's header.
    let request = match (spec.secrets.master_secret.bytes(), &spec.kms) {
        (Some(master_secret), _) => RecoverRequest {
            version: PROTOCOL_VERSION,
            master_secret: master_secret.expose().to_vec(),
            master_salt: spec.secrets.master_secret_salt.expose().to_vec(),
            kmip: None,
        },
        (None, KmsConfig::Kmip(kmip)) => {
            progress.step(&format!(
                "no master secret in this apply: the control planes unwrap theirs with the \
                 external KMS at {}",
                kmip.endpoint
            ));
            RecoverRequest {
                version: PROTOCOL_VERSION,
                kmip: Some(super::initialize::kmip_request(kmip)),
                ..Default::default()
            }
        }
        (None, KmsConfig::ClusterManaged) => {
            return Err(no_master_secret(cloud.root(), waiting, spec))
        }
    };
    // Once one is recovered, the others may rejoin through its join service instead.
    let rejoined = |node: &NodeRecord| {
        cloud
            .node_status(node)
            .is_some_and(|s| s.cluster_id().is_some())
    };
    for node in waiting {
        if rejoined(node) {
            progress.step(&format!("{} rejoined on its own", node.name));
            continue;
        }
        progress.step(&format!(
            "control plane {} restarted and waits for Recover; attesting it",
            node.name
        ));
        let variant = spec.attestation.variant;
        let channel =
            match attested_bootstrapper(variant, node, measurements_of(node, images)).await {
                Ok(channel) => channel,
                Err(e) => {
                    // It bound PCR 15 through a join ticket between the two checks; its status
                    // says so a moment after the PCR changed.
                    let deadline = std::time::Instant::now() + REJOIN_REPORT_WAIT;
                    while !rejoined(node) && std::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                    if !rejoined(node) {
                        return Err(e);
                    }
                    progress.step(&format!("{} rejoined on its own", node.name));
                    continue;
                }
            };
        match bootstrapper_client::recover(channel, request.clone()).await {
            Ok(r) => progress.step(&format!("{}: {}", node.name, r.message)),
            Err(RecoverError::NotWaiting { message }) => progress.step(&format!(
                "{} no longer waits for Recover: {message}",
                node.name
            )),
            Err(e) => {
                return Err(ClusterError::Node {
                    node: node.name.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    Ok(())
}

/// The supervised daemons `daemons` of `node` report ready in the node's status (one read of
/// it). A TCP probe of their ports would not do: QEMU's user-mode host forward accepts every
/// connection on the host side whether or not the guest listens.
fn daemons_ready(cloud: &dyn Cloud, node: &NodeRecord, daemons: &[&str]) -> bool {
    node.is_alive()
        && cloud
            .node_status(node)
            .is_some_and(|s| s.daemons_ready(daemons))
}

/// A control plane's key service is ready: it holds the master secret (it ran Init, was
/// recovered, or joined with the master material in its join ticket).
fn serves_key_service(cloud: &dyn Cloud, node: &NodeRecord) -> bool {
    daemons_ready(cloud, node, &[KEY_SERVICE_DAEMON])
}

/// How long a control plane that joined gets to serve its key service (master material from
/// its join ticket, started right after joining) and its join service (started once its etcd
/// member runs: added as a learner and promoted, which took over 20 s on a loaded machine). The
/// old control plane keeps serving meanwhile.
pub(super) const JOINED_KEY_SERVICE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Waits until the control plane `name` serves its key service and its join service (a
/// replacement that received the master material in its join ticket), at most `timeout`.
/// False when it does not (it joined through a join service without master material: then
/// only Recover gives it the master secret, see [`ensure_key_service`]).
pub(super) async fn wait_serving_keys(
    cloud: &dyn Cloud,
    name: &str,
    timeout: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let serving = cloud
            .node(name)
            .is_some_and(|n| daemons_ready(cloud, n, &[KEY_SERVICE_DAEMON, JOIN_SERVICE_DAEMON]));
        if serving {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Makes sure some control plane holds the master secret, so join services can hand out disk
/// keys (a control plane that joined holds it since its join ticket carries the master
/// material; this is for control planes that joined without it, and full restarts): when none
/// serves its key service (every control plane restarted, or the one that
/// ran Init was lost or replaced), the control planes waiting for Recover are recovered; when
/// none waits, one running control plane is restarted and recovered. Returns the control
/// planes that were recovered (the caller waits for them to attest with the cluster ID).
pub(super) async fn ensure_key_service(
    cloud: &mut dyn Cloud,
    spec: &ClusterSpec,
    images: &[ImageRef],
    progress: &dyn Progress,
) -> Result<Vec<NodeRecord>, ClusterError> {
    let control_planes: Vec<NodeRecord> = cloud
        .list_nodes()
        .into_iter()
        .filter(|n| n.role == Role::ControlPlane)
        .collect();
    if control_planes.is_empty() || control_planes.iter().any(|n| serves_key_service(cloud, n)) {
        return Ok(Vec::new());
    }
    let mut waiting = waiting_for_recover(cloud);
    if waiting.is_empty() {
        // A member of the cluster (not a control plane still waiting to join for the first
        // time): restarted, it keeps its cluster record and waits for Recover.
        let member = |n: &&NodeRecord| {
            n.is_alive()
                && cloud
                    .node_status(n)
                    .is_some_and(|s| s.cluster_id().is_some())
        };
        let Some(running) = control_planes.iter().rev().find(member) else {
            return Ok(Vec::new());
        };
        progress.step(&format!(
            "no control plane holds the master secret; restarting {} to recover it",
            running.name
        ));
        let name = running.name.clone();
        let restarted =
            tokio::task::block_in_place(|| cloud.boot_many(std::slice::from_ref(&name)));
        for r in restarted {
            r.map_err(super::local_backend::platform_err)?;
        }
        waiting = waiting_for_recover(cloud);
    }
    recover_control_planes(cloud, &waiting, spec, images, progress).await?;
    Ok(waiting)
}

/// Removes the records of nodes that are lost for good (not running, their folder with TPM
/// state and disk gone), so the node counts bring in replacements that join like new nodes.
/// Returns their names.
pub(super) fn forget_lost(
    cloud: &mut dyn Cloud,
    progress: &dyn Progress,
) -> Result<Vec<String>, ClusterError> {
    let lost: Vec<NodeRecord> = cloud
        .list_nodes()
        .into_iter()
        .filter(|n| !n.is_alive() && !n.dir.exists())
        .collect();
    for node in &lost {
        progress.step(&format!(
            "node {} is lost (its folder {} with TPM state and disk is gone); a new {} node \
             replaces it",
            node.name,
            node.dir.display(),
            node.role.as_str()
        ));
        match cloud.delete_node(&node.name) {
            Err(e) if !super::local_backend::is_not_found(&e) => {
                return Err(super::local_backend::platform_err(e))
            }
            _ => {}
        }
    }
    Ok(lost.into_iter().map(|n| n.name).collect())
}

/// Why apply cannot recover the cluster itself, and how the operator does it.
fn no_master_secret(
    root: &std::path::Path,
    waiting: &[NodeRecord],
    spec: &ClusterSpec,
) -> ClusterError {
    let endpoints: Vec<String> = waiting
        .iter()
        .map(|n| format!("{} at {}", n.name, n.endpoint(ports::BOOTSTRAPPER)))
        .collect();
    ClusterError::InvalidInput {
        attribute: crate::diag::AttrPath::attr(&["master_secret_wo"]),
        reason: format!(
            "every control plane of cluster {:?} restarted and waits for Recover ({}), but this \
             apply holds no master secret (it is write-only and is not kept in the Terraform \
             state or the cluster journal). Recover each control plane with the master secret \
             you kept: `attest recover --endpoint <address>:{} --measurements <the image's \
             measurements JSON> --ak-pub <the node's attestation key as PEM: ak_spki_hex in \
             {}, DER> --master-secret-file <file with the master secret, hex> --salt-file <file \
             with master_secret_salt from the state, hex>`; then run `terraform apply` again \
             and the workers rejoin.",
            spec.name,
            endpoints.join(", "),
            ports::BOOTSTRAPPER,
            root.join("platform.json").display(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::super::upgrade::tests::{image, node};
    use super::*;
    use constellation_common::secret::SecretBytes;
    use std::path::PathBuf;

    #[test]
    fn a_state_with_every_control_plane_down_still_decodes() {
        let mut spec = crate::cluster::journal::tests::spec();
        spec.control_plane_count = 0;
        spec.attestation.tee_version = None;
        let state = ClusterState {
            spec,
            outputs: ClusterOutputs {
                cluster_id: "ab".repeat(32),
                owner_id: "cd".repeat(32),
                kubeconfig: SecretBytes::new(b"apiVersion: v1".to_vec()),
                cluster_ca_certificate: "ca".into(),
                client_certificate: "cert".into(),
                client_key: SecretBytes::new(b"key".to_vec()),
                host: "127.0.0.1:6443".into(),
                init_secret: SecretBytes::new(vec![9; 32]),
            },
            platform_state: String::new(),
        };
        let value = super::super::codec::state_value(&state);
        let decoded = super::super::codec::decode_state(&value, b"");
        assert_eq!(decoded.map(|s| s.spec.control_plane_count), Ok(0));
    }

    #[test]
    fn without_the_master_secret_the_error_explains_attest_recover() {
        let mut spec = crate::cluster::journal::tests::spec();
        spec.secrets.master_secret = MasterSecret::WriteOnly {
            version: 1,
            secret: None,
        };
        let mut waiting = node("demo-control-plane-0", Role::ControlPlane, "/img");
        waiting.ip = "127.1.2.3".parse().unwrap();
        match no_master_secret(std::path::Path::new("/clusters/demo"), &[waiting], &spec) {
            ClusterError::InvalidInput { attribute, reason } => {
                assert_eq!(attribute.to_string(), "master_secret_wo");
                for needed in [
                    "demo-control-plane-0 at 127.1.2.3:9000",
                    "attest recover --endpoint",
                    "/clusters/demo/platform.json",
                    "--master-secret-file",
                    "--salt-file",
                ] {
                    assert!(reason.contains(needed), "{needed}: {reason}");
                }
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_node_is_checked_against_the_image_it_booted() {
        let images = [image("/old", 1), image("/new", 2)];
        let mut node = node("c-worker-1", Role::Worker, "/old");
        assert_eq!(measurements_of(&node, &images), &images[0].measurements);
        node.image_dir = PathBuf::from("/elsewhere");
        assert_eq!(measurements_of(&node, &images), &images[1].measurements);
    }
}
