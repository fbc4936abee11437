//! The Terraform schema of resource `constellation_cluster`: its attributes, their types and
//! which are required, optional, computed or sensitive.

use crate::image::measurements_type;
use crate::schema::{Attribute, Block, Mode, Type};

pub(super) fn schema() -> Block {
    let s = Type::String;
    let n = Type::Number;
    Block {
        version: 0,
        description: "A Constellation cluster: confidential nodes that attest before they get any secret.",
        attributes: vec![
            Attribute::required("name", s.clone(), "Cluster name.").forces_replacement(),
            Attribute::required("platform", s.clone(), "Platform: `local` (nodes are processes with their own swtpm) or `qemu` (nodes are QEMU VMs booting the node image).")
                .forces_replacement(),
            Attribute::nested(
                "image",
                Mode::Required,
                vec![
                    Attribute::required("reference", s.clone(), "Image reference (`constellation_image.<name>.reference`)."),
                    Attribute::required("measurements", measurements_type(), "Expected measurements (`constellation_image.<name>.measurements`)."),
                ],
                "Node image and the measurements every node must attest to.",
            ),
            Attribute::required("control_plane_count", n.clone(), "Number of control-plane nodes (1..=100)."),
            Attribute::required("worker_count", n.clone(), "Number of worker nodes (0..=100)."),
            Attribute::nested(
                "attestation",
                Mode::Required,
                vec![
                    Attribute::required("variant", s.clone(), "Attestation variant, e.g. `qemu-vtpm`, `azure-sev-snp`."),
                    Attribute::optional("bootloader_version", n.clone(), "Minimum SEV-SNP boot loader SVN."),
                    Attribute::optional("tee_version", n.clone(), "Minimum SEV-SNP TEE SVN."),
                    Attribute::optional("snp_version", n.clone(), "Minimum SEV-SNP firmware SVN."),
                    Attribute::optional("microcode_version", n.clone(), "Minimum CPU microcode SVN."),
                    Attribute::optional("minimum_abi", s.clone(), "SEV-SNP: minimum firmware ABI the guest policy allows, `MAJOR.MINOR` (e.g. `1.55`)."),
                    Attribute::optional("allowed_launch_measurements", Type::List(Box::new(s.clone())), "SEV-SNP: accepted launch measurements, 96 hex characters each. Null: not checked; an empty list accepts no node."),
                    Attribute::optional("allowed_id_key_digests", Type::List(Box::new(s.clone())), "SEV-SNP: accepted ID-key digests, 96 hex characters each. Null: not checked; an empty list accepts no node."),
                ],
                "Attestation policy.",
            ),
            Attribute::nested(
                "network_config",
                Mode::Required,
                vec![
                    Attribute::required("pod_cidr", s.clone(), "Pod network, CIDR."),
                    Attribute::required("service_cidr", s.clone(), "Service network, CIDR."),
                    Attribute::required("node_cidr", s.clone(), "Node network, CIDR."),
                ],
                "Cluster networks; they must not overlap.",
            )
            .forces_replacement(),
            Attribute::required("kubernetes_version", s.clone(), "Kubernetes version, e.g. `v1.31.1`."),
            Attribute::optional_computed("master_secret", s.clone(), "Master secret, 32 bytes hex. Generated when neither it nor `master_secret_wo` is set. Kept in state (Sensitive).")
                .sensitive()
                .forces_replacement(),
            Attribute::optional("master_secret_wo", s.clone(), "Write-only master secret, 32 bytes hex (Terraform 1.11 and later): sent to the first control plane at Init and kept in no plan, state or journal. Needs `master_secret_wo_version`; conflicts with `master_secret`. Recovery then needs the KMS (`kms`) or this value kept elsewhere (`attest recover`).")
                .sensitive()
                .write_only(),
            Attribute::optional("master_secret_wo_version", n.clone(), "Version of `master_secret_wo` (kept in state; the secret is not). A change replaces the cluster, like a change of `master_secret`.")
                .forces_replacement(),
            Attribute::optional_computed("master_secret_salt", s.clone(), "Master secret salt, 32 bytes hex. Generated when not set.")
                .sensitive()
                .forces_replacement(),
            Attribute::optional_computed("measurement_salt", s.clone(), "Measurement salt, 32 bytes hex. Generated when not set.")
                .sensitive()
                .forces_replacement(),
            Attribute::nested(
                "kms",
                Mode::Optional,
                vec![
                    Attribute::required("type", s.clone(), "`cluster-managed` or `kmip`."),
                    Attribute::optional("endpoint", s.clone(), "KMIP server `host:port`."),
                    Attribute::optional("server_ca_pem", s.clone(), "CA certificate of the KMIP server, PEM."),
                    Attribute::optional("client_cert_pem", s.clone(), "Client certificate for the KMIP server, PEM."),
                    Attribute::optional("client_key_pem", s.clone(), "Client key for the KMIP server, PEM.").sensitive(),
                    Attribute::optional("kek_id", s.clone(), "ID of the key-encryption key in the KMS."),
                ],
                "Where the master secret is kept. Default: cluster-managed.",
            )
            .forces_replacement(),
            Attribute::optional("kubeconfig_path", s.clone(), "When set, the admin kubeconfig is written to this file (mode 0600)."),
            Attribute::computed("id", s.clone(), "Same as `cluster_id`."),
            Attribute::computed("cluster_id", s.clone(), "Cluster ID (hex)."),
            Attribute::computed("owner_id", s.clone(), "Owner ID (hex)."),
            Attribute::computed("kubeconfig", s.clone(), "Admin kubeconfig.").sensitive().changes_on_update(),
            Attribute::computed("cluster_ca_certificate", s.clone(), "Cluster CA certificate, PEM."),
            Attribute::computed("client_certificate", s.clone(), "Admin client certificate, PEM."),
            Attribute::computed("client_key", s.clone(), "Admin client key, PEM.").sensitive(),
            Attribute::computed("host", s.clone(), "Cluster API endpoint.").changes_on_update(),
            Attribute::computed("init_secret", s.clone(), "Init secret (hex).").sensitive(),
            Attribute::computed(
                "unhealthy_nodes",
                Type::List(Box::new(s)),
                "Nodes found dead or failing attestation at the last refresh, `<node> (<role>): <reason>`.",
            )
            .changes_on_update(),
        ],
    }
}
