//! Resource `constellation_cluster`: plan rules and the CRUD and import calls on the
//! [`ClusterBackend`]; the schema lives in `attributes`, the value mapping in `codec`.
//!
//!
//! Drift: Read asks the backend which nodes are dead or fail attestation and records the
//! *observed* healthy counts in `control_plane_count` / `worker_count` (plus the reasons in
//! `unhealthy_nodes` and a warning). The configuration still asks for the full counts, so
//! the next plan shows an in-place update (`worker_count: 1 -> 2`, exit code 2 with
//! `-detailed-exitcode`) and apply calls [`ClusterBackend::update`], which replaces them.

use std::sync::Arc;

use constellation_common::metadata::Role;
use constellation_common::secret::SecretBytes;
use rand::RngCore;

use super::attributes::schema;
use super::codec::*;
use super::model::*;
use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::plan::{self, Planned};
use crate::resource::{ApplyRequest, BoxFuture, PlanRequest, Resource, StateOutcome};
use crate::schema::Block;
use crate::value::Value;

/// Import-ID parameter restoring `kubeconfig_path` (as written in the configuration).
pub const IMPORT_KUBECONFIG_PATH: &str = "kubeconfig_path";

pub struct ClusterResource {
    schema: Block,
    backend: Arc<dyn ClusterBackend>,
}

impl ClusterResource {
    pub fn new(backend: Arc<dyn ClusterBackend>) -> Self {
        Self {
            schema: schema(),
            backend,
        }
    }
}

fn write_kubeconfig(path: &str, kubeconfig: &SecretBytes) -> Result<(), Diagnostic> {
    // Atomic, 0600, through an exclusively created random temporary: a file or symlink planted
    // next to the kubeconfig fails the write instead of receiving the admin credentials.
    constellation_common::secret_file::write_private_atomic(
        std::path::Path::new(path),
        kubeconfig.expose(),
    )
    .map_err(|e| {
        Diagnostic::error("Cannot write kubeconfig", format!("{path}: {e}"))
            .at(p(&["kubeconfig_path"]))
    })
}

fn remove_kubeconfig(path: &str) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path, error = %e, "cannot remove kubeconfig");
        }
    }
}

fn generate_secret() -> String {
    let mut b = [0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn backend_error(op: &str) -> impl Fn(ClusterError) -> Diagnostics + '_ {
    move |e| Diagnostics::from(e.to_diagnostic(op))
}

impl Resource for ClusterResource {
    fn type_name(&self) -> &'static str {
        "constellation_cluster"
    }

    fn schema(&self) -> &Block {
        &self.schema
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut d = Decoder::new();
        let _ = decode_spec(config, &mut d);
        d.diagnostics
    }

    fn plan(&self, req: PlanRequest<'_>) -> Result<Planned, Diagnostics> {
        if !req.proposed.is_null() {
            let diags = self.validate(req.config);
            if diags.has_errors() {
                return Err(diags);
            }
            refuse_kubernetes_version_change(req.prior, req.proposed)?;
            need_write_only_secret_to_create(req.prior, req.config)?;
        }
        let mut planned = plan::plan(&self.schema, req.prior, req.proposed);
        if !req.config.get(MASTER_SECRET_WO_VERSION).is_null() {
            // Write-only: nothing to generate, nothing to keep (not even "known after apply").
            planned.state.set("master_secret", Value::Null);
        }
        if let Some(warning) = super::upgrade::plan_warning(&*self.backend, req.prior, req.proposed)
        {
            planned.warnings.push(warning);
        }
        Ok(planned)
    }

    fn apply<'a>(
        &'a self,
        req: ApplyRequest<'a>,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            if req.planned.is_null() {
                let prior = decode_state(req.prior, req.private)?;
                let progress = LogProgress {
                    cluster: prior.spec.name.clone(),
                };
                self.backend
                    .delete(&prior, &progress)
                    .await
                    .map_err(backend_error("delete"))?;
                if let Some(path) = req.prior.get("kubeconfig_path").as_str() {
                    remove_kubeconfig(path);
                }
                return Ok(StateOutcome::default());
            }
            let mut new_state = req.planned.clone();
            let mut given = [true; 3];
            for (attr, given) in SECRET_ATTRS.iter().zip(&mut given) {
                if new_state.get(attr).is_unknown() {
                    new_state.set(attr, Value::string(generate_secret()));
                    *given = false;
                }
            }
            let given = GivenSecrets {
                master_secret: given[0],
                master_secret_salt: given[1],
                measurement_salt: given[2],
            };
            // The write-only master secret is read from the configuration, for the create only
            // (afterwards the nodes hold it): decoded from a copy, never put into new_state.
            let mut with_secret = new_state.clone();
            if req.prior.is_null() {
                with_secret.set(MASTER_SECRET_WO, req.config.get(MASTER_SECRET_WO).clone());
            }
            let mut d = Decoder::new();
            let spec = decode_spec(&with_secret, &mut d);
            drop(with_secret);
            let spec = d.finish(spec)?;
            let progress = LogProgress {
                cluster: spec.name.clone(),
            };
            let result = if req.prior.is_null() {
                let created = self
                    .backend
                    .create(&spec, given, &progress)
                    .await
                    .map_err(backend_error("create"))?;
                // A resumed create keeps the secrets the interrupted one used.
                set_secrets(&mut new_state, &created.spec.secrets);
                created
            } else {
                let prior = decode_state(req.prior, req.private)?;
                let mut updated = if prior.spec == spec {
                    // Only provider-side attributes (kubeconfig_path) changed.
                    prior.clone()
                } else {
                    self.backend
                        .update(&prior, &spec, &progress)
                        .await
                        .map_err(backend_error("update"))?
                };
                // Identity and credentials stay as planned; only host and kubeconfig may move.
                let (host, kubeconfig) = (
                    updated.outputs.host.clone(),
                    updated.outputs.kubeconfig.clone(),
                );
                updated.outputs = ClusterOutputs {
                    host,
                    kubeconfig,
                    ..prior.outputs
                };
                updated
            };
            set_outputs(&mut new_state, &result.outputs);
            set_unhealthy(&mut new_state, &[]);
            if let Some(path) = new_state.get("kubeconfig_path").as_str() {
                write_kubeconfig(path, &result.outputs.kubeconfig)?;
            }
            if let Some(old) = req.prior.get("kubeconfig_path").as_str() {
                if new_state.get("kubeconfig_path").as_str() != Some(old) {
                    remove_kubeconfig(old);
                }
            }
            Ok(StateOutcome {
                state: new_state,
                private: private_bytes(&result.platform_state),
                warnings: Diagnostics::default(),
            })
        })
    }

    fn read<'a>(
        &'a self,
        current: &'a Value,
        private: &'a [u8],
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let prior = decode_state(current, private)?;
            match self
                .backend
                .read(&prior)
                .await
                .map_err(backend_error("read"))?
            {
                ClusterReadResult::Gone => {
                    tracing::warn!(cluster = %prior.spec.name, "cluster is gone; removing it from state");
                    Ok(StateOutcome::default())
                }
                ClusterReadResult::Present { state, unhealthy } => {
                    let mut v = current.clone();
                    let count = |role| unhealthy.iter().filter(|n| n.role == role).count() as u32;
                    let cp = prior
                        .spec
                        .control_plane_count
                        .saturating_sub(count(Role::ControlPlane));
                    let workers = prior.spec.worker_count.saturating_sub(count(Role::Worker));
                    v.set("control_plane_count", Value::Number(f64::from(cp)));
                    v.set("worker_count", Value::Number(f64::from(workers)));
                    v.set("host", Value::string(state.outputs.host.clone()));
                    v.set("kubeconfig", text(&state.outputs.kubeconfig));
                    set_unhealthy(&mut v, &unhealthy);
                    let mut warnings = Diagnostics::default();
                    if !unhealthy.is_empty() {
                        let list: Vec<String> = unhealthy
                            .iter()
                            .map(|n| format!("{} ({}): {}", n.name, n.role.as_str(), n.reason))
                            .collect();
                        warnings.push(Diagnostic::warning(
                            format!(
                                "Cluster {} has {} unhealthy node(s)",
                                prior.spec.name,
                                unhealthy.len()
                            ),
                            format!(
                                "{}. They are not counted in control_plane_count/worker_count; \
                                 `terraform apply` replaces them.",
                                list.join("; ")
                            ),
                        ));
                    }
                    Ok(StateOutcome {
                        state: v,
                        private: private_bytes(&state.platform_state),
                        warnings,
                    })
                }
            }
        })
    }

    fn import<'a>(
        &'a self,
        id: &'a str,
        provider: &'a crate::provider_config::ProviderConfig,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let mut import_id: ImportId = id.parse().map_err(backend_error("import"))?;
            // A provider-side attribute: no platform keeps it.
            let kubeconfig_path = import_id.params.remove(IMPORT_KUBECONFIG_PATH);
            if kubeconfig_path.as_deref() == Some("") {
                return Err(backend_error("import")(ClusterError::ImportId {
                    id: id.to_owned(),
                    reason: format!("parameter {IMPORT_KUBECONFIG_PATH:?} is empty"),
                }));
            }
            let state = self
                .backend
                .import(&import_id, provider)
                .map_err(backend_error("import"))?;
            let mut value = state_value(&state);
            if let Some(path) = kubeconfig_path {
                value.set("kubeconfig_path", Value::string(path));
            }
            Ok(StateOutcome {
                state: value,
                private: private_bytes(&state.platform_state),
                warnings: Diagnostics::default(),
            })
        })
    }
}

/// A new cluster whose master secret is write-only needs the secret in the configuration
/// (e.g. `master_secret_wo_version` set but `master_secret_wo` null): refused at plan time, not
/// after the nodes booted.
fn need_write_only_secret_to_create(prior: &Value, config: &Value) -> Result<(), Diagnostics> {
    if prior.is_null()
        && !config.get(MASTER_SECRET_WO_VERSION).is_null()
        && config.get(MASTER_SECRET_WO).is_null()
    {
        return Err(Diagnostic::error(
            "Missing master_secret_wo",
            "master_secret_wo_version is set, so the master secret is write-only, but \
             master_secret_wo is null: a new cluster needs it for Init",
        )
        .at(AttrPath::attr(&[MASTER_SECRET_WO]))
        .into());
    }
    Ok(())
}

/// A change of `kubernetes_version` on an existing cluster is refused at plan time: no
/// Kubernetes control plane runs on the nodes yet, so accepting it would record an upgrade that
/// never happened.
fn refuse_kubernetes_version_change(prior: &Value, proposed: &Value) -> Result<(), Diagnostics> {
    let (Some(old), Some(new)) = (
        prior.get("kubernetes_version").as_str(),
        proposed.get("kubernetes_version").as_str(),
    ) else {
        return Ok(());
    };
    if old == new {
        return Ok(());
    }
    Err(Diagnostic::error(
        "Kubernetes upgrades are not supported yet",
        format!(
            "kubernetes_version changed from {old:?} to {new:?}, but no Kubernetes control plane \
             runs on the nodes yet (no Kubernetes binaries on this platform), so there is \
             nothing to upgrade. Keep {old:?}, or create a new cluster."
        ),
    )
    .at(AttrPath::attr(&["kubernetes_version"]))
    .into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use constellation_attestation::{Measurement, Measurements};

    pub(crate) fn config() -> Value {
        let m = crate::image::measurements_to_value(&Measurements(
            [
                (4, Measurement::enforce([1; 32])),
                (9, Measurement::warn_only([2; 32])),
            ]
            .into(),
        ));
        let mut v = Value::object(schema().attributes.iter().map(|a| (a.name, Value::Null)));
        v.set("name", Value::string("demo"));
        v.set("platform", Value::string("local"));
        v.set(
            "image",
            Value::object([("reference", Value::string("/img")), ("measurements", m)]),
        );
        v.set("control_plane_count", Value::Number(1.0));
        v.set("worker_count", Value::Number(2.0));
        v.set(
            "attestation",
            Value::object([
                ("variant", Value::string("qemu-vtpm")),
                ("bootloader_version", Value::Null),
                ("tee_version", Value::Null),
                ("snp_version", Value::Null),
                ("microcode_version", Value::Null),
            ]),
        );
        v.set(
            "network_config",
            Value::object([
                ("pod_cidr", Value::string("10.244.0.0/16")),
                ("service_cidr", Value::string("10.96.0.0/12")),
                ("node_cidr", Value::string("192.168.178.0/24")),
            ]),
        );
        v.set("kubernetes_version", Value::string("v1.31.1"));
        v
    }

    fn errors_at(v: &Value) -> Vec<String> {
        let d = {
            let mut d = Decoder::new();
            let _ = decode_spec(v, &mut d);
            d.diagnostics
        };
        d.0.iter()
            .map(|d| {
                d.attribute
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn a_kubernetes_version_change_is_refused_at_plan_time() {
        let prior = config();
        let mut proposed = config();
        assert!(refuse_kubernetes_version_change(&prior, &proposed).is_ok());
        proposed.set("kubernetes_version", Value::string("v1.32.0"));
        let refused = refuse_kubernetes_version_change(&prior, &proposed).unwrap_err();
        assert_eq!(refused.0.len(), 1);
        assert_eq!(
            refused.0[0].summary,
            "Kubernetes upgrades are not supported yet"
        );
        assert!(refused.0[0].detail.contains("\"v1.31.1\" to \"v1.32.0\""));
        // A create (null prior) and an unknown value plan as usual.
        assert!(refuse_kubernetes_version_change(&Value::Null, &proposed).is_ok());
        proposed.set("kubernetes_version", Value::Unknown);
        assert!(refuse_kubernetes_version_change(&prior, &proposed).is_ok());
    }

    #[test]
    fn a_good_config_validates_and_needs_only_secrets() {
        let v = config();
        assert!(errors_at(&v).is_empty());
        let mut d = Decoder::new();
        assert!(decode_spec(&v, &mut d).is_none());
        assert!(d.incomplete, "null secrets are generated at apply");
        let mut v = v;
        for a in SECRET_ATTRS {
            v.set(a, Value::string("ab".repeat(32)));
        }
        let mut d = Decoder::new();
        let spec = decode_spec(&v, &mut d).unwrap();
        assert_eq!(spec.worker_count, 2);
        assert_eq!(spec.image.measurements.0.len(), 2);
        assert!(spec.image.measurements.0[&9].warn_only);
        assert!(!format!("{spec:?}").contains(&"ab".repeat(32)));
    }

    #[test]
    fn each_bad_input_points_at_its_attribute() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "network_config.pod_cidr",
                Box::new(|v| {
                    v.set("network_config", {
                        let mut n = v.get("network_config").clone();
                        n.set("pod_cidr", Value::string("10.244.0.0"));
                        n
                    })
                }),
            ),
            (
                "network_config.service_cidr",
                Box::new(|v| {
                    v.set("network_config", {
                        let mut n = v.get("network_config").clone();
                        n.set("service_cidr", Value::string("10.244.128.0/17"));
                        n
                    })
                }),
            ),
            (
                "master_secret",
                Box::new(|v| v.set("master_secret", Value::string("zz"))),
            ),
            (
                "measurement_salt",
                Box::new(|v| v.set("measurement_salt", Value::string("abcd"))),
            ),
            (
                "attestation.variant",
                Box::new(|v| {
                    v.set("attestation", {
                        let mut a = v.get("attestation").clone();
                        a.set("variant", Value::string("sgx"));
                        a
                    })
                }),
            ),
            (
                "attestation.tee_version",
                Box::new(|v| {
                    v.set("attestation", {
                        let mut a = v.get("attestation").clone();
                        a.set("variant", Value::string("azure-sev-snp"));
                        a.set("tee_version", Value::Number(300.0));
                        a
                    })
                }),
            ),
            (
                r#"image.measurements["4"].expected"#,
                Box::new(|v| {
                    v.set("image", {
                        let mut i = v.get("image").clone();
                        let mut m = i.get("measurements").clone();
                        m.set(
                            "4",
                            Value::object([
                                ("expected", Value::string("xyz")),
                                ("warn_only", Value::Bool(false)),
                            ]),
                        );
                        i.set("measurements", m);
                        i
                    })
                }),
            ),
            (
                r#"image.measurements["24"]"#,
                Box::new(|v| {
                    v.set("image", {
                        let mut i = v.get("image").clone();
                        let mut m = i.get("measurements").clone();
                        m.set(
                            "24",
                            Value::object([
                                ("expected", Value::string("00".repeat(32))),
                                ("warn_only", Value::Bool(false)),
                            ]),
                        );
                        i.set("measurements", m);
                        i
                    })
                }),
            ),
            (
                "control_plane_count",
                Box::new(|v| v.set("control_plane_count", Value::Number(0.0))),
            ),
            (
                "worker_count",
                Box::new(|v| v.set("worker_count", Value::Number(101.0))),
            ),
            ("name", Box::new(|v| v.set("name", Value::string("Demo_1")))),
            (
                "platform",
                Box::new(|v| v.set("platform", Value::string("azure"))),
            ),
            (
                "kubernetes_version",
                Box::new(|v| v.set("kubernetes_version", Value::string("1.31"))),
            ),
            (
                "kms.type",
                Box::new(|v| v.set("kms", Value::object([("type", Value::string("vault"))]))),
            ),
            (
                "kms.endpoint",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("kmip")),
                            ("endpoint", Value::string("nohost")),
                            (
                                "server_ca_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_cert_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_key_pem",
                                Value::string("-----BEGIN PRIVATE KEY-----"),
                            ),
                            ("kek_id", Value::string("k")),
                        ]),
                    )
                }),
            ),
            (
                "kms.client_key_pem",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("kmip")),
                            ("endpoint", Value::string("kms:5696")),
                            (
                                "server_ca_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_cert_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            ("kek_id", Value::string("k")),
                        ]),
                    )
                }),
            ),
            (
                "kms.endpoint",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("cluster-managed")),
                            ("endpoint", Value::string("kms:5696")),
                        ]),
                    )
                }),
            ),
        ];
        for (path, edit) in cases {
            let mut v = config();
            edit(&mut v);
            assert_eq!(errors_at(&v), vec![path.to_owned()], "case {path}");
        }
    }

    fn with_attestation(edits: &[(&str, Value)]) -> Value {
        let mut v = config();
        let mut a = v.get("attestation").clone();
        for (k, value) in edits {
            a.set(k, value.clone());
        }
        v.set("attestation", a);
        for attr in SECRET_ATTRS {
            v.set(attr, Value::string("ab".repeat(32)));
        }
        v
    }

    #[test]
    fn snp_settings_reach_the_node_policy_and_bad_ones_name_their_field() {
        use constellation_attestation::snp::{AbiVersion, SnpSettings, Tcb};
        let measurement = "4d".repeat(48);
        let v = with_attestation(&[
            ("variant", Value::string("azure-sev-snp")),
            ("tee_version", Value::Number(3.0)),
            ("microcode_version", Value::Number(217.0)),
            ("minimum_abi", Value::string("1.55")),
            (
                "allowed_launch_measurements",
                Value::List(vec![Value::string(measurement.clone())]),
            ),
            ("allowed_id_key_digests", Value::List(Vec::new())),
        ]);
        let spec = decode_spec(&v, &mut Decoder::new()).expect("complete");
        let node = spec
            .attestation
            .node_snp_settings()
            .expect("an SNP variant");
        assert_eq!(
            node,
            SnpSettings {
                minimum_tcb: Some(Tcb {
                    bootloader: 0,
                    tee: 3,
                    snp: 0,
                    microcode: 217
                }),
                minimum_abi: Some("1.55".into()),
                vmpl: None,
                allowed_launch_measurements: Some(vec![measurement]),
                allowed_id_key_digests: Some(Vec::new()),
            }
        );
        let policy = node.policy().unwrap();
        assert_eq!(
            policy.minimum_abi,
            AbiVersion {
                major: 1,
                minor: 55
            }
        );
        assert_eq!(policy.allowed_measurements, Some(vec![[0x4D; 48]]));
        assert_eq!(policy.allowed_id_key_digests, Some(Vec::new()));
        // The state written back (import) round-trips.
        let mut state = state_value(&ClusterState {
            spec: spec.clone(),
            outputs: ClusterOutputs {
                cluster_id: "ab".into(),
                owner_id: "cd".into(),
                kubeconfig: SecretBytes::new(Vec::new()),
                cluster_ca_certificate: String::new(),
                client_certificate: String::new(),
                client_key: SecretBytes::new(Vec::new()),
                host: String::new(),
                init_secret: SecretBytes::new(vec![1]),
            },
            platform_state: String::new(),
        });
        state.set("kubeconfig_path", Value::Null);
        assert_eq!(decode_spec(&state, &mut Decoder::new()), Some(spec));
        // qemu-vtpm has no SNP report: nothing to check there.
        assert!(config().get("attestation").get("minimum_abi").is_null());
        let q = decode_spec(&with_attestation(&[]), &mut Decoder::new()).unwrap();
        assert_eq!(q.attestation.node_snp_settings(), None);

        for (path, edits) in [
            (
                "attestation.minimum_abi",
                vec![
                    ("variant", Value::string("aws-sev-snp")),
                    ("minimum_abi", Value::string("1.256")),
                ],
            ),
            (
                "attestation.allowed_launch_measurements",
                vec![
                    ("variant", Value::string("aws-sev-snp")),
                    (
                        "allowed_launch_measurements",
                        Value::List(vec![Value::string("abcd")]),
                    ),
                ],
            ),
            (
                "attestation.allowed_id_key_digests[1]",
                vec![
                    ("variant", Value::string("aws-sev-snp")),
                    (
                        "allowed_id_key_digests",
                        Value::List(vec![Value::string("ab".repeat(48)), Value::Number(1.0)]),
                    ),
                ],
            ),
            (
                "attestation.minimum_abi",
                vec![("minimum_abi", Value::string("1.0"))],
            ),
            (
                "attestation.snp_version",
                vec![("snp_version", Value::Number(8.0))],
            ),
        ] {
            assert_eq!(
                errors_at(&with_attestation(&edits)),
                vec![path.to_owned()],
                "case {path}"
            );
        }
    }

    #[test]
    fn a_write_only_master_secret_decodes_and_its_misuses_point_at_their_attribute() {
        let secret = "5e".repeat(32);
        let mut v = config();
        v.set("master_secret_wo", Value::string(secret.clone()));
        v.set("master_secret_wo_version", Value::Number(3.0));
        assert!(errors_at(&v).is_empty());
        for a in &SECRET_ATTRS[1..] {
            v.set(a, Value::string("ab".repeat(32)));
        }
        let spec = decode_spec(&v, &mut Decoder::new()).expect("complete");
        assert_eq!(
            spec.secrets.master_secret,
            MasterSecret::WriteOnly {
                version: 3,
                secret: Some(SecretBytes::new(vec![0x5e; 32]))
            }
        );
        assert!(!format!("{spec:?}").contains(&secret));

        // In a state the secret is null and the version says it was write-only.
        let mut state = v.clone();
        state.set("master_secret_wo", Value::Null);
        let spec = decode_spec(&state, &mut Decoder::new()).expect("complete");
        assert_eq!(
            spec.secrets.master_secret,
            MasterSecret::WriteOnly {
                version: 3,
                secret: None
            }
        );
        // ...and writing the secrets back keeps it out.
        let mut written = state.clone();
        set_secrets(&mut written, &spec.secrets);
        assert!(written.get("master_secret").is_null());
        assert!(written.get("master_secret_wo").is_null());
        assert_eq!(written.get("master_secret_wo_version"), &Value::Number(3.0));

        let cases: [(&str, &[(&str, Value)]); 4] = [
            (
                "master_secret_wo",
                &[("master_secret", Value::string("ab".repeat(32)))],
            ),
            (
                "master_secret_wo_version",
                &[("master_secret_wo_version", Value::Null)],
            ),
            (
                "master_secret_wo",
                &[("master_secret_wo", Value::string("abcd"))],
            ),
            (
                "master_secret_wo_version",
                &[
                    ("master_secret_wo", Value::Null),
                    ("master_secret", Value::string("ab".repeat(32))),
                ],
            ),
        ];
        for (path, edits) in cases {
            let mut bad = v.clone();
            for (attr, value) in edits {
                bad.set(attr, value.clone());
            }
            assert_eq!(errors_at(&bad), vec![path.to_owned()], "case {path}");
        }
    }

    #[test]
    fn a_write_only_create_plans_no_master_secret_and_needs_the_secret() {
        let r = ClusterResource::new(Arc::new(super::super::local_backend::LocalBackend::new(
            "/nonexistent".into(),
        )));
        let mut v = config();
        v.set("master_secret_wo_version", Value::Number(1.0));
        let missing = r
            .plan(PlanRequest {
                prior: &Value::Null,
                proposed: &v,
                config: &v,
            })
            .unwrap_err();
        assert_eq!(missing.0[0].summary, "Missing master_secret_wo");
        let mut with_secret = v.clone();
        with_secret.set("master_secret_wo", Value::string("5e".repeat(32)));
        let planned = r
            .plan(PlanRequest {
                prior: &Value::Null,
                proposed: &v,
                config: &with_secret,
            })
            .unwrap();
        assert!(planned.state.get("master_secret").is_null());
        assert!(planned.state.get("measurement_salt").is_unknown());
        // An existing write-only cluster needs no secret to plan.
        assert!(r
            .plan(PlanRequest {
                prior: &planned.state,
                proposed: &v,
                config: &v,
            })
            .is_ok());
    }

    #[test]
    fn unknown_inputs_are_skipped_during_validate() {
        let mut v = config();
        v.set("network_config", Value::Unknown);
        v.set("worker_count", Value::Unknown);
        v.set(
            "image",
            Value::object([
                ("reference", Value::Unknown),
                ("measurements", Value::Unknown),
            ]),
        );
        assert!(errors_at(&v).is_empty());
    }
}
