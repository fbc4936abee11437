//! Kubernetes installers: the kubeadm v1beta4 configuration is read back as plain YAML and
//! checked field by field; without kubeadm the installer says so with a typed error.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::FixedClock;
use constellation_bootstrapper::kubernetes::{
    write_encryption_configuration, ControlPlaneJoin, EncryptionSetup, InitParams, JoinParams,
    KubeadmInstaller, KubeletArg, KubeletTls, KubernetesError, KubernetesInstaller, NoneInstaller,
};
use constellation_common::secret::SecretBytes;
use constellation_joinservice::pki::ClusterPki;
use constellation_joinservice::token::BootstrapToken;
use serde::Deserialize;
use serde_yaml::Value;

const NOW: u64 = 1_750_000_000;

/// A fresh directory under the system temp dir, removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bootstrapper-k8s-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn installer(dir: &ScratchDir) -> KubeadmInstaller {
    // An empty directory as the only search path: kubeadm is certainly not found.
    let empty = dir.path().join("empty-bin");
    std::fs::create_dir_all(&empty).unwrap();
    KubeadmInstaller::new(dir.path().join("config"))
        .with_certificates_dir(dir.path().join("pki"))
        .with_kubelet_pki_dir(dir.path().join("kubelet-pki"))
        .with_search_path(empty.into_os_string())
}

fn token() -> BootstrapToken {
    BootstrapToken::generate(Duration::from_secs(3600), &FixedClock::at_unix(NOW))
}

fn init_params(pki: Arc<ClusterPki>, token: BootstrapToken) -> InitParams {
    InitParams {
        cluster_name: "test-cluster".into(),
        kubernetes_version: "v1.31.1".into(),
        node_name: "control-0".into(),
        advertise_address: "10.0.0.2".parse().unwrap(),
        bind_port: 6443,
        control_plane_endpoint: "203.0.113.5:6443".into(),
        pod_subnet: "10.244.0.0/16".into(),
        service_subnet: "10.96.0.0/12".into(),
        cert_sans: vec!["203.0.113.5".into(), "api.example.test".into()],
        bootstrap_token: token,
        pki,
        kubelet_extra_args: vec![KubeletArg::new("node-ip", "10.0.0.2")],
        kubelet_tls: Some(KubeletTls {
            cert_pem: "-----BEGIN CERTIFICATE-----\nkubelet\n-----END CERTIFICATE-----\n".into(),
            key_pem: SecretBytes::new(b"kubelet key".to_vec()),
        }),
        encryption: None,
    }
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn init_writes_v1beta4_init_and_cluster_configuration_and_the_pki() {
    let dir = ScratchDir::new();
    let installer = installer(&dir);
    let pki = Arc::new(ClusterPki::generate("test-cluster", &FixedClock::at_unix(NOW)).unwrap());
    let token = token();
    let params = init_params(pki.clone(), token.clone());

    let err = installer.init(&params).unwrap_err();
    assert!(
        matches!(&err, KubernetesError::KubeadmAbsent { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("kubeadm is absent"));

    let config = installer.config_path();
    assert_eq!(mode(&config), 0o600, "the config holds the token");
    let docs = documents(&config);
    assert_eq!(docs.len(), 2);
    let (init, cluster) = (&docs[0], &docs[1]);

    assert_eq!(s(&init["apiVersion"]), "kubeadm.k8s.io/v1beta4");
    assert_eq!(s(&init["kind"]), "InitConfiguration");
    let bt = &init["bootstrapTokens"][0];
    assert_eq!(s(&bt["token"]), token.expose());
    assert_eq!(s(&bt["expires"]), "2025-06-15T16:06:40Z"); // NOW + 1 h
    assert_eq!(
        bt["usages"],
        serde_yaml::from_str::<Value>("[signing, authentication]").unwrap()
    );
    assert_eq!(
        s(&bt["groups"][0]),
        "system:bootstrappers:kubeadm:default-node-token"
    );
    let reg = &init["nodeRegistration"];
    assert_eq!(s(&reg["name"]), "control-0");
    let args = reg["kubeletExtraArgs"].as_sequence().unwrap();
    assert_eq!(args.len(), 3);
    assert_eq!(s(&args[0]["name"]), "node-ip");
    assert_eq!(s(&args[0]["value"]), "10.0.0.2");
    let kubelet_pki = dir.path().join("kubelet-pki");
    assert_eq!(s(&args[1]["name"]), "tls-cert-file");
    assert_eq!(
        Path::new(s(&args[1]["value"])),
        kubelet_pki.join("kubelet.crt")
    );
    assert_eq!(s(&args[2]["name"]), "tls-private-key-file");
    assert_eq!(
        Path::new(s(&args[2]["value"])),
        kubelet_pki.join("kubelet.key")
    );
    assert_eq!(
        std::fs::read(kubelet_pki.join("kubelet.key")).unwrap(),
        b"kubelet key"
    );
    assert_eq!(mode(&kubelet_pki.join("kubelet.key")), 0o600);
    assert_eq!(s(&init["localAPIEndpoint"]["advertiseAddress"]), "10.0.0.2");
    assert_eq!(init["localAPIEndpoint"]["bindPort"].as_u64(), Some(6443));

    assert_eq!(s(&cluster["apiVersion"]), "kubeadm.k8s.io/v1beta4");
    assert_eq!(s(&cluster["kind"]), "ClusterConfiguration");
    assert_eq!(s(&cluster["clusterName"]), "test-cluster");
    assert_eq!(s(&cluster["kubernetesVersion"]), "v1.31.1");
    assert_eq!(s(&cluster["controlPlaneEndpoint"]), "203.0.113.5:6443");
    assert_eq!(s(&cluster["networking"]["podSubnet"]), "10.244.0.0/16");
    assert_eq!(s(&cluster["networking"]["serviceSubnet"]), "10.96.0.0/12");
    assert_eq!(
        cluster["apiServer"]["certSANs"],
        serde_yaml::from_str::<Value>("[203.0.113.5, api.example.test]").unwrap()
    );
    let cert_dir = dir.path().join("pki");
    assert_eq!(Path::new(s(&cluster["certificatesDir"])), cert_dir);

    // The pre-generated PKI is in kubeadm's layout, keys private.
    for file in pki.shared_files() {
        let path = cert_dir.join(file.relative_path);
        assert_eq!(std::fs::read(&path).unwrap(), file.content.expose());
        assert_eq!(mode(&path), if file.is_private_key { 0o600 } else { 0o644 });
    }
    assert_eq!(
        std::fs::read_to_string(cert_dir.join("ca.crt")).unwrap(),
        pki.ca_cert_pem()
    );
}

/// The EncryptionConfiguration as kube-apiserver reads it (apiserver.config.k8s.io/v1): Secrets
/// through the KMS v2 plugin's unix socket, identity only for reading old plaintext; kubeadm
/// hands it to the API server with the flag and both host paths mounted into its pod.
#[test]
fn init_with_encryption_writes_the_kms_v2_encryption_configuration_and_api_server_flags() {
    let dir = ScratchDir::new();
    let setup = EncryptionSetup {
        config_path: dir.path().join("kubernetes/encryption-configuration.yaml"),
        kms_socket: dir.path().join("daemons/kmsplugin.sock"),
    };
    write_encryption_configuration(&setup.config_path, &setup.kms_socket).unwrap();
    assert_eq!(mode(&setup.config_path), 0o600);
    let docs = documents(&setup.config_path);
    assert_eq!(docs.len(), 1);
    let enc = &docs[0];
    assert_eq!(s(&enc["apiVersion"]), "apiserver.config.k8s.io/v1");
    assert_eq!(s(&enc["kind"]), "EncryptionConfiguration");
    let rule = &enc["resources"][0];
    assert_eq!(
        rule["resources"],
        serde_yaml::from_str::<Value>("[secrets]").unwrap()
    );
    let kms = &rule["providers"][0]["kms"];
    assert_eq!(s(&kms["apiVersion"]), "v2");
    assert_eq!(s(&kms["name"]), "constellation-kms");
    assert_eq!(
        s(&kms["endpoint"]),
        format!("unix://{}", setup.kms_socket.display())
    );
    assert_eq!(s(&kms["timeout"]), "3s");
    assert_eq!(
        rule["providers"][1],
        serde_yaml::from_str::<Value>("identity: {}").unwrap()
    );
    assert_eq!(rule["providers"].as_sequence().unwrap().len(), 2);

    let installer = installer(&dir);
    let pki = Arc::new(ClusterPki::generate("test-cluster", &FixedClock::at_unix(NOW)).unwrap());
    let mut params = init_params(pki, token());
    params.encryption = Some(setup.clone());
    let _ = installer.init(&params).unwrap_err();
    let docs = documents(&installer.config_path());
    let api = &docs[1]["apiServer"];
    assert_eq!(
        s(&api["extraArgs"][0]["name"]),
        "encryption-provider-config"
    );
    assert_eq!(
        Path::new(s(&api["extraArgs"][0]["value"])),
        setup.config_path
    );
    let volumes = api["extraVolumes"].as_sequence().unwrap();
    assert_eq!(volumes.len(), 2);
    assert_eq!(Path::new(s(&volumes[0]["hostPath"])), setup.config_path);
    assert_eq!(volumes[0]["readOnly"].as_bool(), Some(true));
    assert_eq!(
        Path::new(s(&volumes[1]["mountPath"])),
        setup.kms_socket.parent().unwrap()
    );
}

#[test]
fn worker_join_writes_join_configuration_without_control_plane() {
    let dir = ScratchDir::new();
    let installer = installer(&dir);
    let token = token();
    let params = JoinParams {
        node_name: "worker-3".into(),
        api_server_endpoint: "203.0.113.5:6443".into(),
        bootstrap_token: token.clone(),
        ca_cert_hashes: vec!["sha256:00ff".into()],
        control_plane: None,
        kubelet_extra_args: vec![KubeletArg::new("node-ip", "10.0.0.13")],
        kubelet_tls: None,
    };
    let err = installer.join(&params).unwrap_err();
    assert!(
        matches!(err, KubernetesError::KubeadmAbsent { .. }),
        "{err}"
    );

    let docs = documents(&installer.config_path());
    assert_eq!(docs.len(), 1);
    let join = &docs[0];
    assert_eq!(s(&join["apiVersion"]), "kubeadm.k8s.io/v1beta4");
    assert_eq!(s(&join["kind"]), "JoinConfiguration");
    let bt = &join["discovery"]["bootstrapToken"];
    assert_eq!(s(&bt["token"]), token.expose());
    assert_eq!(s(&bt["apiServerEndpoint"]), "203.0.113.5:6443");
    assert_eq!(s(&bt["caCertHashes"][0]), "sha256:00ff");
    assert_eq!(s(&join["discovery"]["tlsBootstrapToken"]), token.expose());
    assert_eq!(s(&join["nodeRegistration"]["name"]), "worker-3");
    let args = join["nodeRegistration"]["kubeletExtraArgs"]
        .as_sequence()
        .unwrap();
    assert_eq!(args.len(), 1);
    assert_eq!(s(&args[0]["name"]), "node-ip");
    assert_eq!(s(&args[0]["value"]), "10.0.0.13");
    assert!(join.get("controlPlane").is_none());
    assert!(!dir.path().join("pki").exists(), "a worker gets no CA");
}

#[test]
fn control_plane_join_writes_control_plane_section_and_shared_files() {
    let dir = ScratchDir::new();
    let installer = installer(&dir);
    let pki = ClusterPki::generate("test-cluster", &FixedClock::at_unix(NOW)).unwrap();
    let ticket_files = pki
        .shared_files()
        .into_iter()
        .map(|f| (f.relative_path.to_owned(), f.content.expose().to_vec()));
    let files = ControlPlaneJoin::files_from_ticket(ticket_files).unwrap();
    let params = JoinParams {
        node_name: "control-1".into(),
        api_server_endpoint: "203.0.113.5:6443".into(),
        bootstrap_token: token(),
        ca_cert_hashes: vec![pki.ca_cert_hash()],
        control_plane: Some(ControlPlaneJoin {
            advertise_address: "10.0.0.3".parse().unwrap(),
            bind_port: 6443,
            files,
        }),
        kubelet_extra_args: vec![],
        kubelet_tls: None,
    };
    let path = installer.write_join_config(&params).unwrap();
    let docs = documents(&path);
    let cp = &docs[0]["controlPlane"]["localAPIEndpoint"];
    assert_eq!(s(&cp["advertiseAddress"]), "10.0.0.3");
    assert_eq!(cp["bindPort"].as_u64(), Some(6443));
    assert_eq!(
        s(&docs[0]["discovery"]["bootstrapToken"]["caCertHashes"][0]),
        pki.ca_cert_hash()
    );
    // The shared PKI lands in the certificates directory and loads back as the same CA.
    let loaded = ClusterPki::load_from_dir(&dir.path().join("pki"), "test-cluster").unwrap();
    assert_eq!(loaded.ca_cert_hash(), pki.ca_cert_hash());
    assert_eq!(mode(&dir.path().join("pki/etcd/ca.key")), 0o600);
}

#[test]
fn ticket_file_names_outside_the_shared_pki_are_refused() {
    let err =
        ControlPlaneJoin::files_from_ticket([("../../etc/shadow".into(), vec![1])]).unwrap_err();
    assert!(
        matches!(&err, KubernetesError::UnknownControlPlaneFile { name } if name == "../../etc/shadow")
    );
}

#[test]
fn none_installer_does_nothing_and_says_so() {
    let pki = Arc::new(ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap());
    let outcome = NoneInstaller.init(&init_params(pki, token())).unwrap();
    assert_eq!(outcome.installer, "none");
    assert_eq!(NoneInstaller.name(), "none");
    assert!(outcome.config_path.is_none());
    assert!(outcome.message.contains("Kubernetes binaries are absent"));
    assert!(outcome
        .message
        .contains("only Constellation's services run"));
}

#[test]
fn kubeadm_on_the_search_path_is_found_and_its_failure_reported() {
    let dir = ScratchDir::new();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // A stand-in kubeadm that records its arguments and fails, to check the command line.
    let fake = bin.join("kubeadm");
    let record = dir.path().join("args");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\necho \"$@\" > {}\necho boom >&2\nexit 3\n",
            record.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let installer = installer(&dir).with_search_path(bin.clone().into_os_string());
    assert_eq!(installer.find_kubeadm(), Some(fake));

    let pki = Arc::new(ClusterPki::generate("c", &FixedClock::at_unix(NOW)).unwrap());
    let err = installer.init(&init_params(pki, token())).unwrap_err();
    match err {
        KubernetesError::KubeadmFailed { stderr, .. } => assert_eq!(stderr.trim(), "boom"),
        other => panic!("expected KubeadmFailed, got {other}"),
    }
    let args = std::fs::read_to_string(record).unwrap();
    assert_eq!(
        args.trim(),
        format!(
            "init --config {} --skip-phases=certs/ca,certs/front-proxy-ca,certs/etcd-ca,certs/sa",
            installer.config_path().display()
        )
    );
}
