//! Another local user reading a cluster folder: node folders (TPM state, state disk, keys) are
//! 0700 and the platform's files (pinned attestation keys, the init secret's hash) 0600, even
//! when the cluster folder's parent and an earlier node folder were open to everyone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use constellation_common::metadata::Role;
use constellation_platform::local::ClusterSettings;
use constellation_platform::LocalCloud;

/// A scratch directory removed on drop (no tempfile dev-dependency in this crate).
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "platform-{tag}-{}-{:016x}",
            std::process::id(),
            rand_u64()
        ));
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

fn settings(image_dir: &Path) -> ClusterSettings {
    ClusterSettings {
        cluster_name: "files".into(),
        init_secret_hash: "$argon2id$not-a-real-hash".into(),
        attestation_variant: "qemu-vtpm".into(),
        measurements_json: "{}".into(),
        image_dir: image_dir.to_owned(),
    }
}

#[test]
fn other_users_cannot_read_node_folders_or_platform_files() {
    let scratch = Scratch::new("modes");
    let root = scratch.0.join("cluster");
    // A folder a user created with a permissive umask.
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();

    let mut cloud = LocalCloud::create(&root, settings(&scratch.0)).unwrap();
    let names = cloud.add_nodes(Role::ControlPlane, 2, &scratch.0).unwrap();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(&root.join("nodes")), 0o700);
    for name in &names {
        let node = root.join("nodes").join(name);
        assert_eq!(mode(&node), 0o700, "{}", node.display());
        assert_eq!(mode(&node.join("state")), 0o700);
    }
    for file in ["platform.json", "metadata.json"] {
        assert_eq!(mode(&root.join(file)), 0o600, "{file}");
    }
    // No temporary of an atomic write is left next to them.
    let mut entries: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(entries, ["metadata.json", "nodes", "platform.json"]);
}
