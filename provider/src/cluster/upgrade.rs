//! Rolling image upgrades: a change of `image` (reference and measurements) replaces every
//! node, one at a time, instead of only applying to nodes added later.
//!
//! 1. The journal records the upgrade (old images, new image) before anything changes; then
//!    the join configuration accepts the old and the new measurements at once
//!    ([`AcceptedMeasurements`]), so nodes of either image attest while both run.
//! 2. Workers first, then control planes, one node at a time: a replacement is added from the
//!    new image (journaled), boots, attests and joins under the new measurements; only then
//!    is the old node removed (journaled). A replacement control plane receives the master
//!    material in its join ticket and runs a key service of its own: the old control plane is
//!    removed once the replacement serves its key and join services. If after that no control
//!    plane serves a key service (a replacement that joined without master material), the
//!    replacement is restarted and recovered ([`super::recovery::ensure_key_service`]).
//! 3. The old measurements are withdrawn and the journal's record is cleared.
//!
//! A replacement that fails to attest stops the upgrade: it is removed, the join configuration
//! goes back to the old images only, and the error names the PCRs that differ; the old nodes
//! keep serving. An apply killed at any step leaves nodes whose image the platform records:
//! the next apply boots replacements that are not running, waits for them, and continues with
//! the old nodes that are left. Applying the old image again rolls back the same way.

use std::path::Path;
use std::time::Instant;

use constellation_attestation::{AcceptedMeasurements, Measurements};
use constellation_common::metadata::Role;
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use serde::{Deserialize, Serialize};

use super::join_wait::wait_joined;
use super::journal::{Journal, JournalError};
use super::local_backend::platform_err;
use super::model::*;
use super::reconcile::by_index_desc;
use super::recovery::{ensure_key_service, wait_serving_keys, JOINED_KEY_SERVICE_WAIT};

/// One image of an upgrade as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeImage {
    pub reference: String,
    pub measurements: Measurements,
}

impl From<&ImageRef> for UpgradeImage {
    fn from(i: &ImageRef) -> Self {
        Self {
            reference: i.reference.clone(),
            measurements: i.measurements.clone(),
        }
    }
}

impl UpgradeImage {
    fn image_ref(&self) -> ImageRef {
        ImageRef {
            reference: self.reference.clone(),
            measurements: self.measurements.clone(),
        }
    }
}

/// How far one replacement got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepPhase {
    /// The replacement is in the platform's records and boots.
    Booting,
    /// The replacement attested with the cluster ID under the new measurements.
    Joined,
    /// The old node is removed.
    Done,
}

/// One node replaced by one node of the new image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStep {
    pub old: String,
    pub new: String,
    pub phase: StepPhase,
    /// From adding the replacement to removing the old node, once done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millis: Option<u64>,
}

/// A rolling upgrade that started and has not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The images nodes ran before; their measurements stay accepted until the end.
    pub from: Vec<UpgradeImage>,
    pub to: UpgradeImage,
    pub steps: Vec<UpgradeStep>,
}

impl UpgradeRecord {
    /// Every image of the upgrade, the target last.
    fn images(&self) -> Vec<ImageRef> {
        self.from
            .iter()
            .chain(std::iter::once(&self.to))
            .map(UpgradeImage::image_ref)
            .collect()
    }

    fn accepted(&self) -> AcceptedMeasurements {
        let others: Vec<Measurements> = self.from.iter().map(|i| i.measurements.clone()).collect();
        AcceptedMeasurements::during_upgrade(&others, self.to.measurements.clone())
    }

    /// The join configuration after a failed replacement: the old images only.
    fn old_only(&self) -> Option<AcceptedMeasurements> {
        let (last, others) = self.from.split_last()?;
        let others: Vec<Measurements> = others.iter().map(|i| i.measurements.clone()).collect();
        Some(AcceptedMeasurements::during_upgrade(
            &others,
            last.measurements.clone(),
        ))
    }
}

/// The upgrade that moves nodes to `target`: the journal's unfinished one continued (its
/// images stay accepted; a target that changed, e.g. a rollback, becomes the new target), or
/// a new one from `current`, the image the state records.
fn upgrade_record(
    journal: Option<&UpgradeRecord>,
    current: &ImageRef,
    target: &ImageRef,
) -> UpgradeRecord {
    let target_json = UpgradeImage::from(target);
    let mut from: Vec<UpgradeImage> = Vec::new();
    let known: Vec<UpgradeImage> = journal
        .map(|u| {
            u.from
                .iter()
                .chain(std::iter::once(&u.to))
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for image in known
        .into_iter()
        .chain(std::iter::once(UpgradeImage::from(current)))
    {
        if image != target_json && !from.contains(&image) {
            from.push(image);
        }
    }
    UpgradeRecord {
        from,
        to: target_json,
        steps: journal
            .filter(|u| u.to == UpgradeImage::from(target))
            .map(|u| u.steps.clone())
            .unwrap_or_default(),
    }
}

/// The nodes an upgrade to `target` replaces: every node that booted another image, workers
/// first (highest index first), then control planes.
pub fn replaced_nodes(nodes: &[NodeRecord], target: &str) -> Vec<String> {
    let mut out = Vec::new();
    for role in [Role::Worker, Role::ControlPlane] {
        for name in by_index_desc(nodes, role) {
            let runs_other = nodes
                .iter()
                .any(|n| n.name == name && n.image_dir != Path::new(target));
            if runs_other {
                out.push(name);
            }
        }
    }
    out
}

/// The nodes a rolling upgrade to `reference` replaces in the cluster folder `root`.
pub(super) fn preview(platform: Platform, root: &Path, reference: &str) -> Vec<String> {
    match super::local_backend::open_cloud(platform, root) {
        Ok(Some(cloud)) => replaced_nodes(&cloud.list_nodes(), reference),
        _ => Vec::new(),
    }
}

/// The plan's warning for a change of `image.reference`: a rolling upgrade, and which nodes
/// it replaces in which order.
pub(super) fn plan_warning(
    backend: &dyn ClusterBackend,
    prior: &crate::value::Value,
    proposed: &crate::value::Value,
) -> Option<crate::diag::Diagnostic> {
    let reference =
        |v: &crate::value::Value| v.get("image").get("reference").as_str().map(str::to_owned);
    let (old, new) = (reference(prior)?, reference(proposed)?);
    if old == new {
        return None;
    }
    let name = prior.get("name").as_str()?;
    let platform: Platform = prior.get("platform").as_str()?.parse().ok()?;
    let nodes = backend.upgrade_preview(name, platform, &new);
    let which = if nodes.is_empty() {
        "every node".to_owned()
    } else {
        format!(
            "{} node(s), in this order: {}",
            nodes.len(),
            nodes.join(", ")
        )
    };
    Some(
        crate::diag::Diagnostic::warning(
            "Rolling image upgrade",
            format!(
                "image.reference changes from {old} to {new}: apply replaces {which}. Workers \
                 first, then control planes, one at a time: each replacement boots the new \
                 image and must attest and join before the node it replaces is removed; the \
                 old and the new measurements are both accepted until the last node is \
                 replaced."
            ),
        )
        .at(crate::diag::AttrPath::attr(&["image", "reference"])),
    )
}

fn store(journal: &Journal, root: &Path) -> Result<(), ClusterError> {
    journal
        .store(root)
        .map_err(|e: JournalError| ClusterError::PlatformState(e.to_string()))
}

/// Runs (or finishes) the rolling upgrade to `spec.image` when a node runs another image or
/// the journal holds an unfinished upgrade. Returns `prior` with the image the nodes run now.
pub(super) async fn roll_if_needed(
    cloud: &mut (dyn Cloud + 'static),
    prior: &ClusterState,
    spec: &ClusterSpec,
    cluster_id: &[u8],
    progress: &dyn Progress,
) -> Result<ClusterState, ClusterError> {
    let root = cloud.root().to_owned();
    let Some(mut journal) = Journal::load(&root)? else {
        return Ok(prior.clone());
    };
    let target = &spec.image;
    let nodes = cloud.list_nodes();
    let stale = replaced_nodes(&nodes, &target.reference);
    if stale.is_empty() && journal.upgrade.is_none() {
        return Ok(prior.clone());
    }
    let record = upgrade_record(journal.upgrade.as_ref(), &prior.spec.image, target);
    progress.step(&format!(
        "rolling upgrade to image {}: replacing {} node(s) one at a time: {}",
        target.reference,
        stale.len(),
        stale.join(", ")
    ));
    journal.upgrade = Some(record.clone());
    store(&journal, &root)?;
    let accepted = record.accepted().to_json();
    cloud
        .update_settings(|s| s.measurements_json = accepted)
        .map_err(platform_err)?;
    let mut roll = Roll {
        cloud,
        journal,
        root,
        spec,
        images: record.images(),
        cluster_id,
        progress,
    };
    if let Err(e) = roll.run().await {
        // With no node of the new image left, nothing of the upgrade remains to finish: the
        // old nodes keep serving under the old images' measurements only. Otherwise both stay
        // accepted (nodes of either image must be able to rejoin) and the journal keeps the
        // upgrade for the next apply.
        let target_dir = Path::new(&target.reference);
        let target_runs = roll
            .cloud
            .list_nodes()
            .iter()
            .any(|n| n.image_dir == target_dir);
        if !target_runs {
            roll.journal.upgrade = None;
            store(&roll.journal, &roll.root)?;
            if let Some(old) = record.old_only() {
                let json = old.to_json();
                if let Err(restore) = roll.cloud.update_settings(|s| s.measurements_json = json) {
                    tracing::warn!(error = %restore, "restoring the join configuration failed");
                }
            }
        }
        return Err(e);
    }
    let json = target.measurements.to_json();
    let reference = target.reference.clone();
    roll.cloud
        .update_settings(|s| {
            s.measurements_json = json;
            s.image_dir = reference.into();
        })
        .map_err(platform_err)?;
    roll.journal.upgrade = None;
    roll.journal.spec.image = target.clone();
    store(&roll.journal, &roll.root)?;
    progress.step(&format!(
        "rolling upgrade to image {} done; the old measurements are withdrawn",
        target.reference
    ));
    let mut rolled = prior.clone();
    rolled.spec.image = target.clone();
    Ok(rolled)
}

struct Roll<'a> {
    cloud: &'a mut (dyn Cloud + 'static),
    journal: Journal,
    root: std::path::PathBuf,
    spec: &'a ClusterSpec,
    /// Every image of the upgrade, the target last.
    images: Vec<ImageRef>,
    cluster_id: &'a [u8],
    progress: &'a dyn Progress,
}

/// A replacement control plane that serves no key service must be recovered with the master
/// secret once the old one goes. Without the secret (write-only, absent from this apply) the
/// old control plane stays: the caller removes the replacement and the upgrade stops with this
/// reason, the old and the new measurements staying accepted.
fn refuse_without_key_service(
    master_secret: &MasterSecret,
    new: &str,
    old: &str,
) -> Result<(), ClusterError> {
    if master_secret.bytes().is_some() {
        return Ok(());
    }
    Err(ClusterError::InvalidInput {
        attribute: crate::diag::AttrPath::attr(&["master_secret_wo"]),
        reason: format!(
            "{new} joined but serves no key service after {} s (it received no master \
             material), so removing {old} would leave no control plane able to hand out keys, \
             and this apply holds no master secret to recover {new} with (it is write-only). \
             {old} keeps serving; apply again with master_secret_wo set to the cluster's master \
             secret to finish the upgrade.",
            JOINED_KEY_SERVICE_WAIT.as_secs()
        ),
    })
}

impl Roll<'_> {
    fn target(&self) -> &ImageRef {
        self.images.last().expect("the target image")
    }

    fn record(&mut self) -> &mut UpgradeRecord {
        self.journal
            .upgrade
            .as_mut()
            .expect("an upgrade is journaled")
    }

    async fn run(&mut self) -> Result<(), ClusterError> {
        for role in [Role::Worker, Role::ControlPlane] {
            self.resume_replacements(role).await?;
            let want = match role {
                Role::Worker => self.spec.worker_count,
                Role::ControlPlane => self.spec.control_plane_count,
            } as usize;
            loop {
                let nodes = self.cloud.list_nodes();
                let target = Path::new(&self.target().reference).to_owned();
                let new = nodes
                    .iter()
                    .filter(|n| n.role == role && n.image_dir == target)
                    .count();
                // Dead old nodes go first, then the highest index.
                let mut old: Vec<String> = replaced_nodes(&nodes, &self.target().reference)
                    .into_iter()
                    .filter(|n| nodes.iter().any(|r| &r.name == n && r.role == role))
                    .collect();
                old.sort_by_key(|n| nodes.iter().any(|r| &r.name == n && r.is_alive()));
                let Some(victim) = old.first().cloned() else {
                    break;
                };
                if new < want {
                    self.replace(role, &victim).await?;
                } else {
                    self.progress.step(&format!(
                        "removing {victim}: the new image's {} node(s) are enough",
                        role.as_str()
                    ));
                    self.remove(&victim, role).await?;
                }
            }
        }
        Ok(())
    }

    /// Replacements an interrupted apply added: booted again if they do not run, then waited
    /// for under the new measurements.
    async fn resume_replacements(&mut self, role: Role) -> Result<(), ClusterError> {
        let target = Path::new(&self.target().reference).to_owned();
        let new: Vec<NodeRecord> = self
            .cloud
            .list_nodes()
            .into_iter()
            .filter(|n| n.role == role && n.image_dir == target)
            .collect();
        if new.is_empty() {
            return Ok(());
        }
        let dead: Vec<String> = new
            .iter()
            .filter(|n| !n.is_alive())
            .map(|n| n.name.clone())
            .collect();
        if !dead.is_empty() {
            self.progress.step(&format!(
                "booting the replacement(s) an interrupted apply left: {}",
                dead.join(", ")
            ));
            let cloud = &mut *self.cloud;
            tokio::task::block_in_place(|| super::reconcile::boot_retrying(cloud, &dead))?;
        }
        let images = self.images.clone();
        ensure_key_service(&mut *self.cloud, self.spec, &images, self.progress).await?;
        let new = super::reconcile::records(
            &*self.cloud,
            &new.iter().map(|n| n.name.clone()).collect::<Vec<_>>(),
        );
        wait_joined(
            &*self.cloud,
            &new,
            &self.target().measurements,
            self.cluster_id,
            self.progress,
        )
        .await
    }

    /// Adds a node of the new image for `old`, waits until it joined, then removes `old`.
    async fn replace(&mut self, role: Role, old: &str) -> Result<(), ClusterError> {
        let started = Instant::now();
        let image = Path::new(&self.target().reference).to_owned();
        let added = self
            .cloud
            .add_nodes(role, 1, &image)
            .map_err(platform_err)?;
        let new = added
            .first()
            .cloned()
            .ok_or_else(|| ClusterError::Other("the platform added no node".into()))?;
        self.record().steps.push(UpgradeStep {
            old: old.to_owned(),
            new: new.clone(),
            phase: StepPhase::Booting,
            millis: None,
        });
        store(&self.journal, &self.root)?;
        self.progress.step(&format!(
            "replacing {old} by {new} (image {})",
            image.display()
        ));
        let joined = self.boot_and_join(&new).await;
        if let Err(e) = joined {
            return self.abandon(&new, e);
        }
        self.set_phase(&new, StepPhase::Joined, None)?;
        if role == Role::ControlPlane {
            // A replacement control plane gets the master material in its join ticket and
            // starts its key service: the old one goes only once the new one serves keys and
            // joins, so joins never wait for a Recover.
            if wait_serving_keys(&*self.cloud, &new, JOINED_KEY_SERVICE_WAIT).await {
                self.progress.step(&format!(
                    "{new} serves its key service (master material from its join ticket) and \
                     its join service"
                ));
            } else if let Err(e) =
                refuse_without_key_service(&self.spec.secrets.master_secret, &new, old)
            {
                return self.abandon(&new, e);
            } else {
                self.progress.step(&format!(
                    "{new} does not serve a key service after {} s; it is recovered with the \
                     master secret once {old} is removed",
                    JOINED_KEY_SERVICE_WAIT.as_secs()
                ));
            }
        }
        self.remove(old, role).await?;
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.set_phase(&new, StepPhase::Done, Some(millis))?;
        self.progress.step(&format!(
            "replaced {old} by {new} in {:.2} s",
            millis as f64 / 1000.0
        ));
        Ok(())
    }

    /// Stops the upgrade at a replacement: it goes, the old node stays, and `error` says why.
    fn abandon(&mut self, new: &str, error: ClusterError) -> Result<(), ClusterError> {
        let cloud = &mut *self.cloud;
        tokio::task::block_in_place(|| cloud.delete_node(new)).map_err(platform_err)?;
        self.record().steps.retain(|s| s.new != new);
        store(&self.journal, &self.root)?;
        Err(error)
    }

    async fn boot_and_join(&mut self, name: &str) -> Result<(), ClusterError> {
        let names = [name.to_owned()];
        let cloud = &mut *self.cloud;
        tokio::task::block_in_place(|| super::reconcile::boot_retrying(cloud, &names))?;
        let nodes = super::reconcile::records(&*self.cloud, &names);
        wait_joined(
            &*self.cloud,
            &nodes,
            &self.target().measurements,
            self.cluster_id,
            self.progress,
        )
        .await
    }

    /// Removes an old node; after a control plane, makes sure one still holds the master
    /// secret.
    async fn remove(&mut self, old: &str, role: Role) -> Result<(), ClusterError> {
        let cloud = &mut *self.cloud;
        tokio::task::block_in_place(|| cloud.delete_node(old)).map_err(platform_err)?;
        if role == Role::ControlPlane {
            let images = self.images.clone();
            let recovered =
                ensure_key_service(&mut *self.cloud, self.spec, &images, self.progress).await?;
            wait_joined(
                &*self.cloud,
                &recovered,
                &self.target().measurements,
                self.cluster_id,
                self.progress,
            )
            .await?;
        }
        Ok(())
    }

    fn set_phase(
        &mut self,
        new: &str,
        phase: StepPhase,
        millis: Option<u64>,
    ) -> Result<(), ClusterError> {
        if let Some(step) = self.record().steps.iter_mut().find(|s| s.new == new) {
            step.phase = phase;
            step.millis = millis.or(step.millis);
        }
        store(&self.journal, &self.root)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use constellation_attestation::Measurement;
    use constellation_common::secret::SecretBytes;
    use std::path::PathBuf;

    #[test]
    fn a_replacement_without_key_service_keeps_the_old_control_plane_without_the_secret() {
        let held = MasterSecret::WriteOnly {
            version: 1,
            secret: Some(SecretBytes::new(vec![7; 32])),
        };
        assert!(refuse_without_key_service(&held, "cp-1", "cp-0").is_ok());
        let stored = MasterSecret::Stored(SecretBytes::new(vec![7; 32]));
        assert!(refuse_without_key_service(&stored, "cp-1", "cp-0").is_ok());
        let absent = MasterSecret::WriteOnly {
            version: 1,
            secret: None,
        };
        let err = refuse_without_key_service(&absent, "cp-1", "cp-0").unwrap_err();
        let ClusterError::InvalidInput { attribute, reason } = err else {
            panic!("{err:?}")
        };
        assert_eq!(
            attribute,
            crate::diag::AttrPath::attr(&["master_secret_wo"])
        );
        assert!(
            reason.contains("cp-1 joined but serves no key service"),
            "{reason}"
        );
        assert!(reason.contains("cp-0 keeps serving"), "{reason}");
    }

    /// An image whose measurements differ from another's by `v`.
    pub(in crate::cluster) fn image(reference: &str, v: u8) -> ImageRef {
        ImageRef {
            reference: reference.into(),
            measurements: Measurements([(4, Measurement::enforce([v; 32]))].into()),
        }
    }

    /// A node record (not running) that booted `image`.
    pub(in crate::cluster) fn node(name: &str, role: Role, image: &str) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            role,
            ip: std::net::Ipv4Addr::LOCALHOST.into(),
            dir: PathBuf::from("/nonexistent"),
            pid: 0,
            swtpm: None,
            ak_spki_hex: String::new(),
            image_dir: PathBuf::from(image),
        }
    }

    #[test]
    fn workers_are_replaced_first_then_control_planes() {
        let nodes = [
            node("c-control-plane-0", Role::ControlPlane, "/old"),
            node("c-worker-1", Role::Worker, "/old"),
            node("c-worker-2", Role::Worker, "/old"),
            node("c-worker-3", Role::Worker, "/new"),
        ];
        assert_eq!(
            replaced_nodes(&nodes, "/new"),
            ["c-worker-2", "c-worker-1", "c-control-plane-0"]
        );
        assert!(replaced_nodes(&nodes[3..], "/new").is_empty());
    }

    #[test]
    fn an_upgrade_accepts_old_and_new_and_a_rollback_keeps_both() {
        let (old, new) = (image("/old", 1), image("/new", 2));
        let up = upgrade_record(None, &old, &new);
        assert_eq!(up.from, [UpgradeImage::from(&old)]);
        assert_eq!(
            up.accepted().sets(),
            [old.measurements.clone(), new.measurements.clone()]
        );
        assert_eq!(
            up.old_only().unwrap(),
            AcceptedMeasurements::one(old.measurements.clone())
        );
        // Interrupted with steps done; the same target continues with them.
        let mut interrupted = up.clone();
        interrupted.steps.push(UpgradeStep {
            old: "c-worker-1".into(),
            new: "c-worker-3".into(),
            phase: StepPhase::Joined,
            millis: None,
        });
        assert_eq!(
            upgrade_record(Some(&interrupted), &old, &new).steps,
            interrupted.steps
        );
        // Back to the old image: the new image's nodes stay accepted until they are gone.
        let back = upgrade_record(Some(&interrupted), &old, &old);
        assert_eq!(back.to, UpgradeImage::from(&old));
        assert_eq!(back.from, [UpgradeImage::from(&new)]);
        assert!(back.steps.is_empty());
        assert_eq!(
            back.accepted().sets(),
            [new.measurements.clone(), old.measurements.clone()]
        );
    }

    #[test]
    fn the_journal_keeps_the_upgrade_step_by_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::new(
            crate::cluster::journal::tests::spec(),
            constellation_common::secret::SecretBytes::new(vec![9; 32]),
        );
        let mut record = upgrade_record(None, &image("/old", 1), &image("/new", 2));
        record.steps.push(UpgradeStep {
            old: "demo-worker-1".into(),
            new: "demo-worker-3".into(),
            phase: StepPhase::Booting,
            millis: None,
        });
        j.upgrade = Some(record);
        j.store(dir.path()).unwrap();
        assert_eq!(Journal::load(dir.path()).unwrap().unwrap(), j);
    }
}
